// Vectorized CPU kernels for the transformers' element-wise work, as MLX primitives: layer norm, softmax over the
// last axis and BERT's GELU, each with its backward pass and that backward pass's own (for MAML's second
// derivatives). Built on first use by metapeft/native/__init__.py; metapeft/models/native_ops.py chains them into
// differentiable, vmappable functions.
//
// Why: MLX 0.32's own CPU kernels on x86-64 are scalar and run on one thread (docs/performance.md, "What
// remains"); these loops are written so that the compiler vectorizes them (-O3 -march=native, OpenMP's simd
// pragmas for the reductions), and rows are split over threads when there are enough of them.
//
// Every kernel reads and writes row-contiguous float32 arrays whose last axis is the row; the Python side makes its
// inputs so. The arithmetic is the same as the Python forms' in metapeft/models (the polynomial exp of softmax.py,
// the erf of gelu.py), so results agree to float32 rounding (tested).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <pthread.h>
#include <sched.h>
#include <sys/sysinfo.h>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

// ------------------------------------------------------------------------------------------------------------------
// Element-wise functions (the Python forms' arithmetic, written for the vectorizer: no branches, no libm calls)

constexpr float LOG2_E = 1.4426950408889634f;
constexpr float LN2_HIGH = 0.693145751953125f, LN2_LOW = 1.428606765330187e-06f;
constexpr float SMALLEST_EXPONENT = -87.0f;
constexpr float ROUNDING = 12582912.0f;  // 1.5 * 2^23: (t + ROUNDING) - ROUNDING rounds t to an integer

// e^x for x <= 0 (softmax.py's exp_polynomial): x = n ln 2 + r, Taylor polynomial of degree 6 of e^r, 2^n in the
// exponent bits.
inline float exp_nonpositive(float x) {
  const bool underflows = x < SMALLEST_EXPONENT;
  x = std::max(x, SMALLEST_EXPONENT);
  float n = (x * LOG2_E + ROUNDING) - ROUNDING;
  float r = (x - n * LN2_HIGH) - n * LN2_LOW;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return underflows ? 0.0f : p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

constexpr float SQRT_HALF = 0.70710678118654752f;
constexpr float C1 = 0.0705230784f, C2 = 0.0422820123f, C3 = 0.0092705272f, C4 = 0.0001520143f,
                C5 = 0.0002765672f, C6 = 0.0000430638f;  // erf(a) = 1 - p(a)^-16 (gelu.py)

inline float erf_polynomial(float a) {
  return 1.0f + a * (C1 + a * (C2 + a * (C3 + a * (C4 + a * (C5 + a * C6)))));
}

inline float sixteenth_power(float p) {
  float p2 = p * p, p4 = p2 * p2, p8 = p4 * p4;
  return p8 * p8;
}

// gelu.py's gelu_forward: (x + |x| erf(|x| / sqrt 2)) / 2
inline float gelu(float x) {
  float a = std::fabs(x);
  return 0.5f * (x + a * (1.0f - 1.0f / sixteenth_power(erf_polynomial(a * SQRT_HALF))));
}

// What GELU's first and second derivatives share (gelu.py's erf_parts): u = x / sqrt 2, a = |u| clamped at 6,
// p(a), p(a)^16, p'(a), and erf's slope 16 p' p^-17 (0 beyond the clamp)
struct ErfParts {
  float u, a, p, p16, p_slope, erf_slope;
};

inline ErfParts erf_parts(float x) {
  ErfParts e;
  e.u = x * SQRT_HALF;
  e.a = std::min(std::fabs(e.u), 6.0f);
  e.p = erf_polynomial(e.a);
  e.p16 = sixteenth_power(e.p);
  e.p_slope = C1 + e.a * (2 * C2 + e.a * (3 * C3 + e.a * (4 * C4 + e.a * (5 * C5 + e.a * (6 * C6)))));
  const float erf_slope = 16.0f * e.p_slope / (e.p16 * e.p);
  e.erf_slope = (std::fabs(e.u) < 6.0f) ? erf_slope : 0.0f;
  return e;
}

// gelu.py's gelu_slope: the derivative of the GELU above
inline float gelu_slope(float x, ErfParts e) {
  float erf_u = std::copysign(1.0f - 1.0f / e.p16, e.u);  // sign(u) (1 - p^-16); at u = 0, p = 1 and both are 0
  return 0.5f * (1.0f + erf_u) + 0.5f * SQRT_HALF * x * e.erf_slope;
}

// The derivative of gelu_slope as autodiff traces it through gelu.py's form: with a = |u| below the clamp,
// erf_u' = sqrt(1/2) erf_slope and erf_slope' = sqrt(1/2) sign(u) 16 (p'' p^-17 - 17 p'^2 p^-18), both 0 beyond it.
inline float gelu_curvature(float x, ErfParts e) {
  float p_curvature = 2 * C2 + e.a * (6 * C3 + e.a * (12 * C4 + e.a * (20 * C5 + e.a * (30 * C6))));
  float inside = std::fabs(e.u) < 6.0f ? 1.0f : 0.0f;
  float sign = (e.u > 0.0f) - (e.u < 0.0f);
  float erf_curvature =
      inside * sign * 16.0f * (p_curvature - 17.0f * e.p_slope * e.p_slope / e.p) / (e.p16 * e.p);
  return SQRT_HALF * e.erf_slope + 0.25f * x * erf_curvature;
}

// ------------------------------------------------------------------------------------------------------------------
// Row kernels: each computes rows [first, last) of its outputs.

struct Rows {
  std::vector<const float*> in;
  std::vector<float*> out;
  size_t width;
  float parameter;  // layer norm's epsilon
};

void gelu_rows(const Rows& a, size_t first, size_t last, size_t) {
  const float* x = a.in[0];
  float* y = a.out[0];
#pragma omp simd
  for (size_t i = first * a.width; i < last * a.width; ++i) y[i] = gelu(x[i]);
}

void gelu_backward_rows(const Rows& a, size_t first, size_t last, size_t) {
  const float *x = a.in[0], *g = a.in[1];
  float* dx = a.out[0];
#pragma omp simd
  for (size_t i = first * a.width; i < last * a.width; ++i) dx[i] = g[i] * gelu_slope(x[i], erf_parts(x[i]));
}

// The backward pass's own backward pass, for MAML's second derivatives: with the cotangent c of g slope(x),
// dx = c g slope'(x) and dg = c slope(x)
void gelu_second_rows(const Rows& a, size_t first, size_t last, size_t) {
  const float *x = a.in[0], *g = a.in[1], *c = a.in[2];
  float *dx = a.out[0], *dg = a.out[1];
  // no omp simd here: it makes e an array of one struct a lane, which g++ then fails to vectorize; without it, the
  // loop vectorizes (-fopt-info-vec)
  for (size_t i = first * a.width; i < last * a.width; ++i) {
    const ErfParts e = erf_parts(x[i]);  // once for both derivatives
    dx[i] = c[i] * g[i] * gelu_curvature(x[i], e);
    dg[i] = c[i] * gelu_slope(x[i], e);
  }
}

void softmax_rows(const Rows& a, size_t first, size_t last, size_t) {
  const size_t n = a.width;
  for (size_t row = first; row < last; ++row) {
    const float* x = a.in[0] + row * n;
    float* y = a.out[0] + row * n;
    float maximum = -INFINITY;
#pragma omp simd reduction(max : maximum)
    for (size_t i = 0; i < n; ++i) maximum = x[i] > maximum ? x[i] : maximum;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (size_t i = 0; i < n; ++i) {
      y[i] = exp_nonpositive(x[i] - maximum);
      sum += y[i];
    }
    const float inverse = 1.0f / sum;
#pragma omp simd
    for (size_t i = 0; i < n; ++i) y[i] *= inverse;
  }
}

// dx = y (g - <g, y>)
void softmax_backward_rows(const Rows& a, size_t first, size_t last, size_t) {
  const size_t n = a.width;
  for (size_t row = first; row < last; ++row) {
    const float *y = a.in[0] + row * n, *g = a.in[1] + row * n;
    float* dx = a.out[0] + row * n;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (size_t i = 0; i < n; ++i) dot += g[i] * y[i];
#pragma omp simd
    for (size_t i = 0; i < n; ++i) dx[i] = y[i] * (g[i] - dot);
  }
}

// Sums of a row with four independent vector accumulators: one accumulator would wait on its own previous addition
// every step (the loop is then bound by the adder's latency, not by its throughput).
typedef float Vector8 __attribute__((vector_size(32)));

inline Vector8 load8(const float* p) {
  Vector8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float lanes_sum(Vector8 v) {
  float total = 0.0f;
  for (int j = 0; j < 8; ++j) total += v[j];
  return total;
}

// The sum of f(x[i]) over a row; f is written once for vectors and single floats alike
template <class F>
inline float row_sum(const float* x, size_t n, F f) {
  Vector8 a = {}, b = {}, c = {}, d = {};
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a += f(load8(x + i));
    b += f(load8(x + i + 8));
    c += f(load8(x + i + 16));
    d += f(load8(x + i + 24));
  }
  for (; i + 8 <= n; i += 8) a += f(load8(x + i));
  float total = lanes_sum((a + b) + (c + d));
  for (; i < n; ++i) total += f(x[i]);
  return total;
}

// The backward pass's own backward pass: with the cotangent c of y (g - <g, y>),
// dy = c (g - <g, y>) - g <c, y> and dg = y (c - <c, y>)
void softmax_second_rows(const Rows& a, size_t first, size_t last, size_t) {
  const size_t n = a.width;
  for (size_t row = first; row < last; ++row) {
    const float *y = a.in[0] + row * n, *g = a.in[1] + row * n, *c = a.in[2] + row * n;
    float *dy = a.out[0] + row * n, *dg = a.out[1] + row * n;
    float gy = 0.0f, cy = 0.0f;
#pragma omp simd reduction(+ : gy, cy)
    for (size_t i = 0; i < n; ++i) {
      gy += g[i] * y[i];
      cy += c[i] * y[i];
    }
#pragma omp simd
    for (size_t i = 0; i < n; ++i) {
      dy[i] = c[i] * (g[i] - gy) - g[i] * cy;
      dg[i] = y[i] * (c[i] - cy);
    }
  }
}

// mean and 1 / sqrt(variance + eps) of a row, the variance from the centred values (as a two-pass algorithm)
inline void moments(const float* x, size_t n, float eps, float& mean, float& inverse_deviation) {
  mean = row_sum(x, n, [](auto v) { return v; }) / n;
  const float variance = row_sum(x, n, [mean](auto v) { return (v - mean) * (v - mean); }) / n;
  inverse_deviation = 1.0f / std::sqrt(variance + eps);
}

void layer_norm_rows(const Rows& a, size_t first, size_t last, size_t) {
  const size_t n = a.width;
  const float *scale = a.in[1], *bias = a.in[2];
  for (size_t row = first; row < last; ++row) {
    const float* x = a.in[0] + row * n;
    float* y = a.out[0] + row * n;
    float mean, inverse_deviation;
    moments(x, n, a.parameter, mean, inverse_deviation);
#pragma omp simd
    for (size_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * inverse_deviation * scale[i] + bias[i];
  }
}

// With x^ = (x - mean) / deviation and h = g * scale: dx = (h - mean(h) - x^ mean(h x^)) / deviation; the scale's
// and bias's gradients, sums over rows of g x^ and g, go to row `part` of out[1] and out[2], one a thread, which the
// caller adds up (so that threads never write the same memory).
void layer_norm_backward_rows(const Rows& a, size_t first, size_t last, size_t part) {
  const size_t n = a.width;
  const float* scale = a.in[1];
  float *scale_sum = a.out[1] + part * n, *bias_sum = a.out[2] + part * n;
  std::vector<float> h(n);
  std::fill(scale_sum, scale_sum + n, 0.0f);
  std::fill(bias_sum, bias_sum + n, 0.0f);
  for (size_t row = first; row < last; ++row) {
    const float *x = a.in[0] + row * n, *g = a.in[2] + row * n;
    float* dx = a.out[0] + row * n;
    float mean, inverse_deviation;
    moments(x, n, a.parameter, mean, inverse_deviation);
    float h_sum = 0.0f, hx_sum = 0.0f;
#pragma omp simd reduction(+ : h_sum, hx_sum)
    for (size_t i = 0; i < n; ++i) {
      float normalized = (x[i] - mean) * inverse_deviation;
      h[i] = g[i] * scale[i];
      h_sum += h[i];
      hx_sum += h[i] * normalized;
      scale_sum[i] += g[i] * normalized;
      bias_sum[i] += g[i];
    }
    const float h_mean = h_sum / n, hx_mean = hx_sum / n;
#pragma omp simd
    for (size_t i = 0; i < n; ++i) {
      float normalized = (x[i] - mean) * inverse_deviation;
      dx[i] = (h[i] - h_mean - normalized * hx_mean) * inverse_deviation;
    }
  }
}

// The backward pass's own backward pass, for MAML's second derivatives. With x^, r = 1 / deviation and h = g scale
// as above, and the cotangents c of dx, c_s of dscale and c_b of dbias, per row (means over the row):
//   u = c_s g - r (c mean(h x^) + h mean(c x^)),  rho = sum c (h - mean(h) - x^ mean(h x^)),
//   grad x = r (u - mean(u) - x^ mean(u x^)) - rho r^2 x^ / n,
//   grad h = r (c - mean(c) - x^ mean(c x^)),  grad g = c_b + c_s x^ + scale grad h,  grad scale = sum g grad h,
// the last summed over rows into row `part` of out[2], as in layer_norm_backward_rows.
void layer_norm_second_rows(const Rows& a, size_t first, size_t last, size_t part) {
  const size_t n = a.width;
  const float *scale = a.in[1], *c_scale = a.in[4], *c_bias = a.in[5];
  float* scale_sum = a.out[2] + part * n;
  std::vector<float> normalized(n), u(n);
  std::fill(scale_sum, scale_sum + n, 0.0f);
  for (size_t row = first; row < last; ++row) {
    const float *x = a.in[0] + row * n, *g = a.in[2] + row * n, *c = a.in[3] + row * n;
    float *dx = a.out[0] + row * n, *dg = a.out[1] + row * n;
    float mean, r;
    moments(x, n, a.parameter, mean, r);
    float h_sum = 0.0f, hx_sum = 0.0f, c_sum = 0.0f, cx_sum = 0.0f, ch_sum = 0.0f;
#pragma omp simd reduction(+ : h_sum, hx_sum, c_sum, cx_sum, ch_sum)
    for (size_t i = 0; i < n; ++i) {
      normalized[i] = (x[i] - mean) * r;
      const float h = g[i] * scale[i];
      h_sum += h;
      hx_sum += h * normalized[i];
      c_sum += c[i];
      cx_sum += c[i] * normalized[i];
      ch_sum += c[i] * h;
    }
    const float h_mean = h_sum / n, hx_mean = hx_sum / n, c_mean = c_sum / n, cx_mean = cx_sum / n;
    const float rho = ch_sum - h_mean * c_sum - hx_mean * cx_sum;
    float u_sum = 0.0f, ux_sum = 0.0f;
#pragma omp simd reduction(+ : u_sum, ux_sum)
    for (size_t i = 0; i < n; ++i) {
      u[i] = c_scale[i] * g[i] - r * (c[i] * hx_mean + g[i] * scale[i] * cx_mean);
      u_sum += u[i];
      ux_sum += u[i] * normalized[i];
    }
    const float u_mean = u_sum / n, ux_mean = ux_sum / n, rho_term = rho * r * r / n;
#pragma omp simd
    for (size_t i = 0; i < n; ++i) {
      dx[i] = r * (u[i] - u_mean - normalized[i] * ux_mean) - rho_term * normalized[i];
      const float grad_h = r * (c[i] - c_mean - normalized[i] * cx_mean);
      dg[i] = c_bias[i] + c_scale[i] * normalized[i] + scale[i] * grad_h;
      scale_sum[i] += g[i] * grad_h;
    }
  }
}

using RowKernel = void (*)(const Rows&, size_t first, size_t last, size_t part);

// Rows are split over at most `kernel_threads` threads (the calling one included), each with at least
// `elements_a_thread` elements: below that, handing a range to another thread costs more than it saves.
std::atomic<int> kernel_threads{1};

// The first row of each of the ranges covering [0, rows)
std::vector<size_t> split(size_t rows, size_t width, size_t elements_a_thread) {
  size_t parts = std::max<size_t>(1, std::min<size_t>(kernel_threads.load(), rows * width / elements_a_thread));
  parts = std::min(parts, std::max<size_t>(rows, 1));
  std::vector<size_t> bounds(parts + 1);
  for (size_t p = 0; p <= parts; ++p) bounds[p] = rows * p / parts;
  return bounds;
}

// How long a thread that waits for the pool spins before it sleeps. Without it every call wakes the other thread
// from sleep (a system call and a wake-up on the other core): in `python -m benchmarks encoder-ops` on an Intel Xeon,
// layer norm took 2.3 to 2.6 times PyTorch's time with no spin and 0.64 to 0.89 with 200 microseconds; 50 gave 2.64
// once and 0.87 once. The FOMAML step's time did not change (8.4 to 8.6 s an iteration with 0, 50 or 200;
// docs/performance.md). Short, so the core goes back to OpenBLAS's threads soon after a burst of kernels.
constexpr auto SPIN = std::chrono::microseconds(200);

inline void relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until done() or SPIN has passed; says which.
template <class Done>
bool spin_until(Done done) {
  const auto deadline = std::chrono::steady_clock::now() + SPIN;
  for (unsigned i = 1;; ++i) {
    if (done()) return true;
    if (i % 64 == 0 && std::chrono::steady_clock::now() > deadline) return false;
    relax();
  }
}

// Threads that wait for row ranges to compute, started once: starting and joining a thread for each call costs 50
// to 85 microseconds, a third to a half of a layer norm on MiniLM's activations (docs/performance.md, "Native
// kernels"). The caller computes the first range. Each waiting thread spins for SPIN, then sleeps.
// One call at a time: a second caller (another CPU stream's thread) computes all its ranges itself.
class WorkerPool {
 public:
  void run(size_t parts, const std::function<void(size_t)>& work) {
    std::unique_lock<std::mutex> running(running_, std::try_to_lock);
    if (!running.owns_lock() || parts <= 1) {
      for (size_t part = 0; part < parts; ++part) work(part);
      return;
    }
    while (workers_.size() + 1 < parts) workers_.emplace_back([this, index = workers_.size() + 1] { serve(index); });
    {
      std::lock_guard<std::mutex> lock(mutex_);
      work_ = &work;
      parts_ = parts;
      remaining_.store(parts - 1);
      generation_.fetch_add(1);
    }
    wake_.notify_all();  // no system call when no worker sleeps
    work(0);
    const auto finished = [this] { return remaining_.load() == 0; };
    if (spin_until(finished)) return;
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, finished);
  }

 private:
  // A worker may run on any core: it would otherwise inherit MLX's stream thread's, which metapeft pins to the
  // main thread's core (metapeft/affinity.py).
  void serve(size_t index) {
    cpu_set_t every_core;
    CPU_ZERO(&every_core);
    for (int core = 0; core < get_nprocs() && core < CPU_SETSIZE; ++core) CPU_SET(core, &every_core);
    pthread_setaffinity_np(pthread_self(), sizeof(every_core), &every_core);  // failing, it stays where it is
    size_t seen = 0;
    for (;;) {
      const auto called = [&] { return generation_.load() != seen; };
      spin_until(called);
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, called);
      seen = generation_.load();
      if (index >= parts_) continue;
      const std::function<void(size_t)>* work = work_;
      lock.unlock();
      (*work)(index);
      if (remaining_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> notifying(mutex_);  // the caller checks `remaining_` under it before sleeping
        finished_.notify_one();
      }
    }
  }

  std::mutex running_, mutex_;
  std::condition_variable wake_, finished_;
  std::vector<std::thread> workers_;
  const std::function<void(size_t)>* work_ = nullptr;
  size_t parts_ = 0;
  std::atomic<size_t> remaining_{0}, generation_{0};
};

// The process's pool, never destroyed: its threads wait until the process ends. (A child made by fork() cannot
// use it, but neither can it evaluate anything in MLX: its stream thread is not copied either.)
WorkerPool& pool() {
  static WorkerPool* shared = new WorkerPool();
  return *shared;
}

void run_split(RowKernel kernel, const Rows& rows, const std::vector<size_t>& bounds) {
  pool().run(bounds.size() - 1, [&](size_t part) { kernel(rows, bounds[part], bounds[part + 1], part); });
}

// ------------------------------------------------------------------------------------------------------------------
// One primitive class for all kernels. Inputs are rows (shaped as the first input) or columns (a layer norm's scale
// and bias, shaped as the last axis); outputs are shaped as the inputs named by `output_like`.

struct Signature {
  std::string name;
  RowKernel kernel;
  std::vector<bool> is_row;  // per input
  std::vector<int> output_like;
  size_t row_outputs;  // outputs from this one on are sums over rows (a layer norm's scale and bias gradients)
  size_t elements_a_thread;  // the least work worth a thread (measured: a layer norm costs a fifth of a GELU)
};

// A row-contiguous copy of an input that is not (a view, a broadcast), read through its strides
std::shared_ptr<std::vector<float>> contiguous_copy(const mx::array& a) {
  auto copy = std::make_shared<std::vector<float>>(a.size());
  const float* data = a.data<float>();
  for (size_t i = 0; i < a.size(); ++i) (*copy)[i] = data[mx::elem_to_loc(static_cast<int64_t>(i), a.shape(), a.strides())];
  return copy;
}

std::vector<mx::array> apply(const Signature& signature, std::vector<mx::array> inputs, float parameter);

class RowPrimitive : public mx::Primitive {
 public:
  RowPrimitive(mx::Stream stream, Signature signature, float parameter)
      : mx::Primitive(stream), signature_(std::move(signature)), parameter_(parameter) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    const size_t width = x.ndim() ? x.shape(-1) : 1;
    const size_t rows = width ? x.size() / width : 0;
    std::vector<size_t> bounds = split(rows, width, signature_.elements_a_thread);
    const size_t parts = bounds.size() - 1;
    for (auto& out : outputs) out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    Rows arguments{{}, {}, width, parameter_};
    std::vector<size_t> to_copy;
    for (size_t i = 0; i < inputs.size(); ++i) {
      encoder.set_input_array(inputs[i]);
      arguments.in.push_back(inputs[i].data<float>());
      if (!inputs[i].flags().row_contiguous) to_copy.push_back(i);
    }
    // a kernel that sums over rows writes one partial sum a thread, added up once all have finished
    std::vector<std::shared_ptr<std::vector<float>>> sums;
    std::vector<float*> targets;
    for (size_t o = 0; o < outputs.size(); ++o) {
      encoder.set_output_array(outputs[o]);
      if (o >= signature_.row_outputs) {
        sums.push_back(std::make_shared<std::vector<float>>(parts * width));
        arguments.out.push_back(sums.back()->data());
        targets.push_back(outputs[o].data<float>());
      } else {
        arguments.out.push_back(outputs[o].data<float>());
      }
    }
    encoder.dispatch([kernel = signature_.kernel, arguments, bounds, sums, targets, width, parts, to_copy,
                      inputs]() mutable {
      std::vector<std::shared_ptr<std::vector<float>>> copies;
      for (size_t i : to_copy) {
        copies.push_back(contiguous_copy(inputs[i]));
        arguments.in[i] = copies.back()->data();
      }
      run_split(kernel, arguments, bounds);
      for (size_t s = 0; s < sums.size(); ++s) {
        float* target = targets[s];
        std::fill(target, target + width, 0.0f);
        for (size_t p = 0; p < parts; ++p) {
          const float* part = sums[s]->data() + p * width;
#pragma omp simd
          for (size_t i = 0; i < width; ++i) target[i] += part[i];
        }
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(signature_.name + " has no GPU kernel (metapeft.native is for the CPU)");
  }

  // Mapped rows become more rows: one call. Mapped columns, or sums over rows, are per mapped entry: one call an
  // entry, stacked. (metapeft/models/native_ops.py maps its custom functions itself; MLX still maps the kernels
  // inside them while tracing.)
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override {
    int size = 0;
    bool per_entry = signature_.row_outputs < signature_.output_like.size();
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (axes[i] >= 0) {
        size = inputs[i].shape(axes[i]);
        per_entry = per_entry || !signature_.is_row[i];
      }
    }
    if (!per_entry) {
      std::vector<mx::array> front;
      for (size_t i = 0; i < inputs.size(); ++i) {
        mx::array input = inputs[i];
        if (signature_.is_row[i]) {
          if (axes[i] >= 0) {
            input = mx::moveaxis(input, axes[i], 0);
          } else {
            mx::Shape shape = input.shape();
            shape.insert(shape.begin(), size);
            input = mx::broadcast_to(input, shape);
          }
        }
        front.push_back(input);
      }
      auto outputs = apply(signature_, front, parameter_);
      return {outputs, std::vector<int>(outputs.size(), 0)};
    }
    std::vector<std::vector<mx::array>> entries;
    for (int entry = 0; entry < size; ++entry) {
      std::vector<mx::array> sliced;
      for (size_t i = 0; i < inputs.size(); ++i)
        sliced.push_back(axes[i] >= 0 ? mx::take(inputs[i], entry, axes[i]) : inputs[i]);
      entries.push_back(apply(signature_, sliced, parameter_));
    }
    std::vector<mx::array> outputs;
    for (size_t o = 0; o < entries[0].size(); ++o) {
      std::vector<mx::array> parts;
      for (auto& entry : entries) parts.push_back(entry[o]);
      outputs.push_back(mx::stack(parts, 0));
    }
    return {outputs, std::vector<int>(outputs.size(), 0)};
  }

  const char* name() const override { return signature_.name.c_str(); }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* same = dynamic_cast<const RowPrimitive*>(&other);
    return same && same->signature_.name == signature_.name && same->parameter_ == parameter_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    std::vector<mx::Shape> shapes;
    for (int like : signature_.output_like) shapes.push_back(inputs[like].shape());
    return shapes;
  }

 private:
  Signature signature_;
  float parameter_;
};

std::vector<mx::array> apply(const Signature& signature, std::vector<mx::array> inputs, float parameter) {
  // no mx::contiguous, which would add a node a call: eval_cpu copies the inputs that are not row-contiguous
  for (auto& input : inputs) input = mx::astype(input, mx::float32);
  const int width = inputs[0].ndim() ? inputs[0].shape(-1) : 1;
  for (size_t i = 0; i < inputs.size(); ++i) {
    bool fits = signature.is_row[i] ? inputs[i].shape() == inputs[0].shape()
                                    : inputs[i].ndim() == 1 && inputs[i].shape(0) == width;
    if (!fits) throw std::invalid_argument(signature.name + ": input " + std::to_string(i) + " has the wrong shape");
  }
  std::vector<mx::Shape> shapes;
  for (int like : signature.output_like) shapes.push_back(inputs[like].shape());
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  return mx::array::make_arrays(std::move(shapes), dtypes,
                                std::make_shared<RowPrimitive>(mx::default_stream(mx::Device::cpu), signature,
                                                               parameter),
                                inputs);
}

const Signature GELU{"GELU", gelu_rows, {true}, {0}, 1, 1 << 15};
const Signature GELU_BACKWARD{"GELUBackward", gelu_backward_rows, {true, true}, {0}, 1, 1 << 15};
const Signature GELU_SECOND{"GELUSecond", gelu_second_rows, {true, true, true}, {0, 0}, 2, 1 << 15};
const Signature SOFTMAX{"Softmax", softmax_rows, {true}, {0}, 1, 1 << 15};
const Signature SOFTMAX_BACKWARD{"SoftmaxBackward", softmax_backward_rows, {true, true}, {0}, 1, 1 << 15};
const Signature SOFTMAX_SECOND{"SoftmaxSecond", softmax_second_rows, {true, true, true}, {0, 0}, 2, 1 << 15};
const Signature LAYER_NORM{"LayerNorm", layer_norm_rows, {true, false, false}, {0}, 1, 1 << 15};
const Signature LAYER_NORM_BACKWARD{"LayerNormBackward", layer_norm_backward_rows, {true, false, true}, {0, 1, 1},
                                    1, 1 << 15};
// (x, scale, g, and the cotangents of dx, dscale, dbias) -> the gradients of x, g and scale
const Signature LAYER_NORM_SECOND{"LayerNormSecond", layer_norm_second_rows, {true, false, true, true, false, false},
                                  {0, 0, 1}, 2, 1 << 15};

}  // namespace

NB_MODULE(_metapeft_kernels, m) {
  m.doc() = "metapeft's vectorized CPU kernels (metapeft/native/kernels.cpp)";
  m.def("gelu", [](const mx::array& x) { return apply(GELU, {x}, 0.0f)[0]; });
  m.def("gelu_backward",
        [](const mx::array& x, const mx::array& g) { return apply(GELU_BACKWARD, {x, g}, 0.0f)[0]; });
  m.def("gelu_second", [](const mx::array& x, const mx::array& g, const mx::array& c) {
    return apply(GELU_SECOND, {x, g, c}, 0.0f);
  });
  m.def("softmax_second", [](const mx::array& y, const mx::array& g, const mx::array& c) {
    return apply(SOFTMAX_SECOND, {y, g, c}, 0.0f);
  });
  m.def("softmax", [](const mx::array& x) { return apply(SOFTMAX, {x}, 0.0f)[0]; });
  m.def("softmax_backward",
        [](const mx::array& y, const mx::array& g) { return apply(SOFTMAX_BACKWARD, {y, g}, 0.0f)[0]; });
  m.def("layer_norm", [](const mx::array& x, const mx::array& scale, const mx::array& bias, float eps) {
    return apply(LAYER_NORM, {x, scale, bias}, eps)[0];
  });
  m.def("layer_norm_backward", [](const mx::array& x, const mx::array& scale, const mx::array& g, float eps) {
    return apply(LAYER_NORM_BACKWARD, {x, scale, g}, eps);
  });
  m.def("layer_norm_second", [](const mx::array& x, const mx::array& scale, const mx::array& g, const mx::array& c,
                                 const mx::array& c_scale, const mx::array& c_bias, float eps) {
    return apply(LAYER_NORM_SECOND, {x, scale, g, c, c_scale, c_bias}, eps);
  });
  m.def("set_threads", [](int threads) { kernel_threads = std::max(1, threads); });
  m.def("threads", []() { return kernel_threads.load(); });
}
