"""The benchmarks: speed and memory of the meta-step, whole runs, start-up, evaluation and the pretrained encoder,
against JAX and PyTorch peers where installed. One command line, run from the repository root:

    python -m benchmarks [--repeats 5] [--workloads a_sinusoid_maml_1step,...] steps   # ms per meta-iteration
    METAPEFT_BLAS=bundled python -m benchmarks steps      # the same with MLX's bundled reference BLAS
    python -m benchmarks memory 1000,10000                # memory after 1k and 10k iterations of each workload
    python -m benchmarks per-call 1,2,4,8,16              # (a) with k meta-iterations per compiled call
    python -m benchmarks runs                             # where whole quick runs spend their time
    python -m benchmarks start-up                         # seconds to the first meta-iteration vs imports alone
    python -m benchmarks evaluation [OVERRIDE ...]        # each part of a quick run's evaluation
    python -m benchmarks encoder [VARIANTS]               # MAML task by task, FOMAML, Reptile + LoRA, hf_encoder
    python -m benchmarks encoder-ops                      # the encoder's largest operations, MLX vs PyTorch
    python -m benchmarks text-padding [OVERRIDE ...]      # how much of the encoder's input is padding
    python -m benchmarks processes [--processes 2]        # one run on 1 and on N processes (mlx.launch)
    python -m benchmarks resnet12 [protonet,fomaml]       # ResNet-12 at 84x84 against PyTorch
    python -m benchmarks causal-lm [maml,fomaml] [--shape 0.5b]   # a Qwen2.5-shaped language model, 128 tokens

Modules: ``steps`` (the workloads and their timing), ``runs`` (whole runs), ``encoder`` (the pretrained encoder),
``processes`` (one run on several processes), ``resnet12`` (ResNet-12 episodes), ``causal_lm`` (a language
model), ``peers`` (the JAX and PyTorch
implementations), ``common`` (composing a workload). Results go to ``outputs/benchmarks/bench*.json`` (``--out``).
"""
