"""``python -m benchmarks SUBCOMMAND``: see ``benchmarks/__init__.py``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import causal_lm, encoder, processes, resnet12, runs, steps
from metapeft import blas, io, machine
from metapeft.backend import load, mx


def record(path: Path, result: dict) -> None:
    """Write a benchmark's result with the processor and the BLAS it ran on (the one this process loads, as the
    processes it starts for each side do): timings from two machines do not compare."""
    load()
    io.write_json(path, {"machine": machine.describe(), "blas": blas.status(), **result})


def checked(names: str, valid, option: str, parser: argparse.ArgumentParser) -> list[str]:
    chosen = [name for name in names.split(",") if name]
    if unknown := sorted(set(chosen) - set(valid)):
        parser.error(f"{option}: unknown {unknown}; valid: {','.join(valid)}")
    return chosen


def timings(args) -> None:
    results = {name: steps.time_workload(name, steps.WORKLOADS[name], args.repeats, args.seconds)
               for name in args.workloads}
    record(args.out, {"device": str(mx.default_device()), "workloads": results, "overrides": steps.WORKLOADS})
    print(f"MLX device: {mx.default_device()}; BLAS: {blas.status()}; MLX thread placement while timing ours: "
          f"{next(iter(results.values()))['cpu_affinity']}")
    print(f"{'workload':24s} {'ours ms':>9s} {'JAX ms':>9s} {'ours/JAX':>9s} {'torch ms':>9s} {'ours/torch':>10s}")
    for name, result in results.items():
        cells, notes = [], []
        for peer_name in ("jax", "pytorch"):
            peer = result["peers"][peer_name]
            if isinstance(peer, dict):
                cells.append(f"{peer['ms_per_iteration']:9.3f} {peer['ours_over_peer']:9.2f}")
            else:
                cells.append(f"{'-':>9s} {'-':>9s}")
                notes.append(f"{peer_name} {peer}")
        print(f"{name:24s} {result['ms_per_iteration']:9.3f} {cells[0]} {cells[1]} {'; '.join(notes)}")
    print(f"written to {args.out}")


def memory(args) -> None:
    checkpoints = sorted(int(n) for n in args.iterations.split(","))
    readings = {name: steps.memory_workload(steps.WORKLOADS[name], checkpoints) for name in args.workloads}
    path = args.out.with_name("bench_memory.json")
    record(path, {"memory": readings})
    for name, by_count in readings.items():
        for n, r in by_count.items():
            print(f"{name:24s} after {n:>6s} iterations: MLX peak {r['mlx_peak_mb']:8.2f} MB, MLX active "
                  f"{r['mlx_active_mb']:8.2f} MB, RSS {r['rss_mb']:8.1f} MB ({r['seconds']:.0f} s)")
    print(f"written to {path}")


def per_call(args) -> None:
    result = steps.iterations_per_call([int(k) for k in args.counts.split(",")], args.repeats, args.seconds)
    record(args.out.with_name("bench_per_call.json"), {"ms_per_iteration": result})
    sampling = result.pop("numpy_sampling_ms")
    for k, ms in result.items():
        print(f"(a) {k:>3s} meta-iterations per compiled call: {ms:.3f} ms per meta-iteration "
              f"({ms / result[next(iter(result))]:.2f}x the first)")
    print(f"(a) sampling a batch in NumPy, as the runner's loop does: {sampling:.3f} ms")


def whole_runs(args) -> None:
    results = runs.run_breakdown(args.out.parent / "runs")
    path = args.out.with_name("bench_runs.json")
    record(path, {"runs": results, "overrides": runs.RUNS})
    runs.print_breakdown(results)
    print(f"written to {path}")


def start_up(args) -> None:
    result = runs.start_up(args.repeats, args.out.parent / "runs")
    record(args.out.with_name("bench_start_up.json"), result)
    runs.print_start_up(result, args.repeats)


def evaluation(args) -> None:
    overrides = args.overrides or ["task=digits", "peft=lora"]
    parts = runs.evaluation_parts(overrides)
    record(args.out.with_name("bench_evaluation.json"), {"overrides": overrides, "seconds": parts})
    runs.print_evaluation(parts)


def encoder_workloads(args) -> None:
    results = encoder.encoder_workloads(args.repeats, args.variants)
    path = args.out.with_name("bench_encoder.json")
    record(path, {"workloads": results, "overrides": encoder.ENCODER})
    encoder.print_encoder(results)
    print(f"written to {path}")


def encoder_ops(args) -> None:
    both = encoder.encoder_ops_both()
    record(args.out.with_name("bench_encoder_ops.json"), both)
    encoder.print_encoder_ops(both)


def text_padding(args) -> None:
    results = encoder.text_padding(args.overrides)
    record(args.out.with_name("bench_text_padding.json"), results)
    encoder.print_text_padding(results)


def encoder_streams(args) -> None:
    results = encoder.encoder_streams(args.repeats)
    record(args.out.with_name("bench_encoder_streams.json"), {"seconds": results})
    for name, seconds in results.items():
        print(f"encoder-streams {name:48s} {seconds:7.2f} s")


def resnet12_workloads(args) -> None:
    results = resnet12.resnet12_workloads(args.repeats, args.names)
    path = args.out.with_name("bench_resnet12.json")
    record(path, {"workloads": results, "overrides": resnet12.COMMON})
    resnet12.print_resnet12(results)
    print(f"written to {path}")


def causal_lm_workloads(args) -> None:
    results = causal_lm.lm_workloads(args.out.parent / "causal_lm", args.shape, args.algorithms, args.repeats,
                                     with_peer=not args.without_peer)
    path = args.out.with_name(f"bench_causal_lm_{args.shape}.json")
    record(path, {"shape": causal_lm.SHAPES[args.shape], "workloads": results})
    causal_lm.print_lm(args.shape, results)
    print(f"written to {path}")


def process_scaling(args) -> None:
    results = processes.scaling(args.names, args.processes, args.out.parent / "processes")
    path = args.out.with_name("bench_processes.json")
    record(path, {"scaling": results})
    processes.print_scaling(results)
    print(f"written to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__import__("benchmarks").__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="rough time budget per workload")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/bench.json"),
                        help="the step timings' file; the others are written beside it (bench_<subcommand>.json)")
    parser.add_argument("--workloads", default=",".join(steps.WORKLOADS), metavar="NAMES",
                        help=f"which of {list(steps.WORKLOADS)} steps and memory run")
    commands = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    commands.add_parser("steps", help="ms per meta-iteration of each workload, ours and the peers'")
    commands.add_parser("memory", help="memory after N1, N2, ... iterations").add_argument("iterations",
                                                                                         metavar="N1,N2")
    commands.add_parser("per-call", help="(a) with K meta-iterations per compiled call").add_argument(
        "counts", metavar="K1,K2,...")
    commands.add_parser("runs", help="where whole quick runs spend their time")
    commands.add_parser("start-up", help="seconds to the first meta-iteration against `import mlx.core, hydra`")
    commands.add_parser("evaluation", help="each part of a quick run's evaluation").add_argument(
        "overrides", nargs="*", metavar="OVERRIDE", help="the run (default task=digits peft=lora)")
    commands.add_parser("encoder", help="MAML, FOMAML, Reptile + LoRA on model=hf_encoder").add_argument(
        "variants", nargs="?", default=encoder.ENCODER_DEFAULT, help=f"some of {list(encoder.ENCODER_VARIANTS)}")
    commands.add_parser("encoder-ops", help="the encoder's largest operations, MLX and PyTorch")
    commands.add_parser("text-padding", help="how much of the encoder's input is padding (task=text episodes)"
                        ).add_argument("overrides", nargs="*", metavar="OVERRIDE", help="e.g. model.max_length=64")
    commands.add_parser("encoder-streams", help="the encoder's FOMAML work in two halves on one CPU stream or two")
    commands.add_parser("resnet12", help="ResNet-12 at 84x84: a ProtoNet episode, a FOMAML step, against PyTorch"
                        ).add_argument("names", nargs="?", default=",".join(resnet12.RESNET12_WORKLOADS),
                                       help=f"some of {list(resnet12.RESNET12_WORKLOADS)}")
    lm = commands.add_parser("causal-lm", help="MAML, FOMAML + LoRA on a random Qwen2.5-shaped model, 128 tokens, "
                             "against torch.func")
    lm.add_argument("algorithms", nargs="?", default=",".join(causal_lm.ALGORITHMS),
                    help=f"some of {list(causal_lm.ALGORITHMS)}")
    lm.add_argument("--shape", default="0.5b", choices=sorted(causal_lm.SHAPES))
    lm.add_argument("--without-peer", action="store_true", help="ours alone (where the peer needs more memory)")
    scaling = commands.add_parser("processes", help="meta-iterations per second on 1 and N processes (mlx.launch)")
    scaling.add_argument("names", nargs="?", default=",".join(processes.WORKLOADS),
                         help=f"some of {list(processes.WORKLOADS)}")
    scaling.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    args.workloads = checked(args.workloads, steps.WORKLOADS, "--workloads", parser)
    if args.command == "encoder":
        args.variants = checked(args.variants, encoder.ENCODER_VARIANTS, "encoder", parser)
    if args.command == "processes":
        args.names = checked(args.names, processes.WORKLOADS, "processes", parser)
    if args.command == "causal-lm":
        args.algorithms = checked(args.algorithms, causal_lm.ALGORITHMS, "causal-lm", parser)
    if args.command == "resnet12":
        args.names = checked(args.names, resnet12.RESNET12_WORKLOADS, "resnet12", parser)
    {"steps": timings, "memory": memory, "per-call": per_call, "runs": whole_runs, "start-up": start_up,
     "evaluation": evaluation, "encoder": encoder_workloads, "encoder-ops": encoder_ops,
     "encoder-streams": encoder_streams, "text-padding": text_padding, "processes": process_scaling,
     "resnet12": resnet12_workloads, "causal-lm": causal_lm_workloads}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
