// Vectorized CPU kernels for the transformers' element-wise work, as MLX primitives: layer norm, softmax over the
// last axis and BERT's GELU, each with its backward pass. Built on first use by metapeft/native/__init__.py, which
// also gives each one its derivatives (the backward kernels here, and differentiable MLX operations beyond the
// first order) and its vmap.
//
// Why: MLX 0.32's own CPU kernels on x86-64 are scalar and run on one thread (docs/performance.md, "What
// remains"); these loops are written so that the compiler vectorizes them (-O3 -march=native, OpenMP's simd
// pragmas for the reductions), and rows are split over threads when there are enough of them.
//
// Every kernel reads and writes row-contiguous float32 arrays whose last axis is the row; the Python side makes its
// inputs so. The arithmetic is the same as the Python forms' in metapeft/models (the polynomial exp of softmax.py,
// the erf of hf_encoder.py), so results agree to float32 rounding (tested).

#include <algorithm>
#include <atomic>
#include <bit>
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
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

constexpr float SQRT_HALF = 0.70710678118654752f;
constexpr float C1 = 0.0705230784f, C2 = 0.0422820123f, C3 = 0.0092705272f, C4 = 0.0001520143f,
                C5 = 0.0002765672f, C6 = 0.0000430638f;  // erf(a) = 1 - p(a)^-16 (hf_encoder.py)

inline float erf_polynomial(float a) {
  return 1.0f + a * (C1 + a * (C2 + a * (C3 + a * (C4 + a * (C5 + a * C6)))));
}

inline float sixteenth_power(float p) {
  float p2 = p * p, p4 = p2 * p2, p8 = p4 * p4;
  return p8 * p8;
}

// hf_encoder.py's gelu_forward: (x + |x| erf(|x| / sqrt 2)) / 2
inline float gelu(float x) {
  float a = std::fabs(x);
  return 0.5f * (x + a * (1.0f - 1.0f / sixteenth_power(erf_polynomial(a * SQRT_HALF))));
}

// hf_encoder.py's gelu_slope: the derivative of the GELU above, with |x| / sqrt 2 clamped at 6
inline float gelu_slope(float x) {
  float u = x * SQRT_HALF;
  float a = std::min(std::fabs(u), 6.0f);
  float p = erf_polynomial(a);
  float p16 = sixteenth_power(p);
  float p_slope = C1 + a * (2 * C2 + a * (3 * C3 + a * (4 * C4 + a * (5 * C5 + a * (6 * C6)))));
  float erf_u = std::copysign(1.0f - 1.0f / p16, u);  // sign(u) (1 - p^-16); at u = 0, p = 1 and both are 0
  float erf_slope = 16.0f * p_slope / (p16 * p);
  erf_slope = (std::fabs(u) < 6.0f) ? erf_slope : 0.0f;
  return 0.5f * (1.0f + erf_u) + 0.5f * SQRT_HALF * x * erf_slope;
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
  for (size_t i = first * a.width; i < last * a.width; ++i) dx[i] = g[i] * gelu_slope(x[i]);
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

// mean and 1 / sqrt(variance + eps) of a row, the variance from the centred values (as a two-pass algorithm)
inline void moments(const float* x, size_t n, float eps, float& mean, float& inverse_deviation) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (size_t i = 0; i < n; ++i) sum += x[i];
  mean = sum / n;
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (size_t i = 0; i < n; ++i) squares += (x[i] - mean) * (x[i] - mean);
  inverse_deviation = 1.0f / std::sqrt(squares / n + eps);
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

using RowKernel = void (*)(const Rows&, size_t first, size_t last, size_t part);

// Rows are split over at most `threads` threads (the calling one included), each with at least kMinimumWork
// elements: below that, starting a thread costs more than it saves.
constexpr size_t kMinimumWork = 1 << 16;
std::atomic<int> kernel_threads{1};

// The first row of each of `parts` ranges covering [0, rows)
std::vector<size_t> split(size_t rows, size_t width) {
  size_t parts = std::max<size_t>(1, std::min<size_t>(kernel_threads.load(), rows * width / kMinimumWork));
  parts = std::min(parts, std::max<size_t>(rows, 1));
  std::vector<size_t> bounds(parts + 1);
  for (size_t p = 0; p <= parts; ++p) bounds[p] = rows * p / parts;
  return bounds;
}

// A helper thread may run on any core: it would otherwise inherit MLX's stream thread's, which metapeft pins to the
// main thread's core (metapeft/affinity.py).
void run_anywhere(RowKernel kernel, const Rows& rows, size_t first, size_t last, size_t part) {
  cpu_set_t every_core;
  CPU_ZERO(&every_core);
  for (int core = 0; core < get_nprocs() && core < CPU_SETSIZE; ++core) CPU_SET(core, &every_core);
  pthread_setaffinity_np(pthread_self(), sizeof(every_core), &every_core);  // failing, it stays where it is
  kernel(rows, first, last, part);
}

void run_split(RowKernel kernel, const Rows& rows, const std::vector<size_t>& bounds) {
  const size_t parts = bounds.size() - 1;
  std::vector<std::thread> helpers;
  for (size_t p = 1; p < parts; ++p)
    helpers.emplace_back(run_anywhere, kernel, std::cref(rows), bounds[p], bounds[p + 1], p);
  kernel(rows, bounds[0], bounds[1], 0);
  for (auto& helper : helpers) helper.join();
}

// ------------------------------------------------------------------------------------------------------------------
// One primitive class for all kernels. Inputs are rows (shaped as the first input) or columns (a layer norm's scale
// and bias, shaped as the last axis); outputs are shaped as the inputs named by `output_like`.

struct Signature {
  std::string name;
  RowKernel kernel;
  std::vector<bool> is_row;  // per input
  std::vector<int> output_like;
  bool reduces_rows;  // outputs after the first are sums over rows (a layer norm's scale and bias gradients)
};

std::vector<mx::array> apply(const Signature& signature, std::vector<mx::array> inputs, float parameter);

class RowPrimitive : public mx::Primitive {
 public:
  RowPrimitive(mx::Stream stream, Signature signature, float parameter)
      : mx::Primitive(stream), signature_(std::move(signature)), parameter_(parameter) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (auto& input : inputs) {
      if (input.dtype() != mx::float32 || !input.flags().row_contiguous)
        throw std::invalid_argument(signature_.name + ": inputs must be row-contiguous float32 arrays");
    }
    const mx::array& x = inputs[0];
    const size_t width = x.ndim() ? x.shape(-1) : 1;
    const size_t rows = width ? x.size() / width : 0;
    std::vector<size_t> bounds = split(rows, width);
    const size_t parts = bounds.size() - 1;
    for (auto& out : outputs) out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    Rows arguments{{}, {}, width, parameter_};
    for (auto& input : inputs) {
      encoder.set_input_array(input);
      arguments.in.push_back(input.data<float>());
    }
    // a kernel that sums over rows writes one partial sum a thread, added up once all have finished
    std::vector<std::shared_ptr<std::vector<float>>> sums;
    std::vector<float*> targets;
    for (size_t o = 0; o < outputs.size(); ++o) {
      encoder.set_output_array(outputs[o]);
      if (signature_.reduces_rows && o > 0) {
        sums.push_back(std::make_shared<std::vector<float>>(parts * width));
        arguments.out.push_back(sums.back()->data());
        targets.push_back(outputs[o].data<float>());
      } else {
        arguments.out.push_back(outputs[o].data<float>());
      }
    }
    encoder.dispatch([kernel = signature_.kernel, arguments, bounds, sums, targets, width, parts]() {
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
    bool per_entry = signature_.reduces_rows;
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
  for (auto& input : inputs) input = mx::contiguous(mx::astype(input, mx::float32));
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

const Signature GELU{"GELU", gelu_rows, {true}, {0}, false};
const Signature GELU_BACKWARD{"GELUBackward", gelu_backward_rows, {true, true}, {0}, false};
const Signature SOFTMAX{"Softmax", softmax_rows, {true}, {0}, false};
const Signature SOFTMAX_BACKWARD{"SoftmaxBackward", softmax_backward_rows, {true, true}, {0}, false};
const Signature LAYER_NORM{"LayerNorm", layer_norm_rows, {true, false, false}, {0}, false};
const Signature LAYER_NORM_BACKWARD{"LayerNormBackward", layer_norm_backward_rows, {true, false, true}, {0, 1, 1},
                                    true};

}  // namespace

NB_MODULE(_metapeft_kernels, m) {
  m.doc() = "metapeft's vectorized CPU kernels (metapeft/native/kernels.cpp)";
  m.def("gelu", [](const mx::array& x) { return apply(GELU, {x}, 0.0f)[0]; });
  m.def("gelu_backward",
        [](const mx::array& x, const mx::array& g) { return apply(GELU_BACKWARD, {x, g}, 0.0f)[0]; });
  m.def("softmax", [](const mx::array& x) { return apply(SOFTMAX, {x}, 0.0f)[0]; });
  m.def("softmax_backward",
        [](const mx::array& y, const mx::array& g) { return apply(SOFTMAX_BACKWARD, {y, g}, 0.0f)[0]; });
  m.def("layer_norm", [](const mx::array& x, const mx::array& scale, const mx::array& bias, float eps) {
    return apply(LAYER_NORM, {x, scale, bias}, eps)[0];
  });
  m.def("layer_norm_backward", [](const mx::array& x, const mx::array& scale, const mx::array& g, float eps) {
    return apply(LAYER_NORM_BACKWARD, {x, scale, g}, eps);
  });
  m.def("set_threads", [](int threads) { kernel_threads = std::max(1, threads); });
  m.def("threads", []() { return kernel_threads.load(); });
}
