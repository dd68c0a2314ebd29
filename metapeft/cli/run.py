"""The metapeft runner: ``metapeft-run [group=option ...] [key=value ...]``, or ``python runners/run.py ...`` from a
checkout (add ``--multirun`` to sweep). Its configs ship inside the package (``metapeft/conf``).

Builds the model, meta-trains, evaluates next to strong simple baselines and writes ``metrics.json``, ``history.csv``
and ``checkpoint/`` into the Hydra run directory. In a sweep, a failing job records its failure in its own
directory and the sweep goes on; the sweep lists every failed job at the end and exits non-zero. ``resume=true``
skips jobs whose directory already holds a completed result for the same overrides.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from metapeft import affinity, backend, blas, distributed, io, native, sweep_stop
from metapeft.config import CONF_DIR, GROUPS, RunConfig, group_options, register_configs
from metapeft.errors import STOP_REQUESTS, ConfigError, DivergedError, Interrupted, WriteFailed
from metapeft.experiment import run
from metapeft.launchers import threads_per_job
from metapeft.measure import seconds_since_process_start
from metapeft.sweep import completed_metrics, identifying

log = logging.getLogger("metapeft")


_first_job_in_process = [True]


def start_up_seconds() -> float | None:
    """How long this process ran before its first job began; later jobs of a sweep run in the same process (the
    basic launcher) have no start-up of their own: 0."""
    if not _first_job_in_process[0]:
        return 0.0
    _first_job_in_process[0] = False
    return seconds_since_process_start()


def validation_objective(metrics: dict) -> float:
    """What a sweeper optimizes: the validation metric of the meta-parameters the run kept (keep=last|best_val)."""
    train = metrics["train"]
    return train.get("kept_val_metric", train["final_val_metric"])


def requeued_by_slurm() -> bool:
    """A Slurm job run again after preemption or a timeout (submitit requeues it on Slurm's warning signal, with
    the same overrides into the same directory): it goes on from its last training state, as ``resume=true``."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def under_submitit_slurm() -> bool:
    # submitit ignores SIGTERM on Slurm (preemption sends it before the USR2 on which submitit requeues the job)
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def stop_on_signal(signum, frame) -> None:
    """SIGINT (Ctrl-C) and SIGTERM (Slurm's timeout or preemption) stop the run so that its files are written."""
    name = signal.Signals(signum).name
    STOP_REQUESTS.append(name)
    raise Interrupted(name)


_job_started = [False]  # Hydra composed a config and called main: its errors from here on are the run's


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    _job_started[0] = True
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    if requeued_by_slurm() and not cfg.resume:
        log.info("requeued by Slurm (restart %s): resuming", os.environ["SLURM_RESTART_COUNT"])
        cfg.resume = True
    if cfg.resume and (done := completed_metrics(out_dir, overrides)) is not None:
        log.info("resume: %s already completed with these overrides; skipped", out_dir)
        return validation_objective(done)
    backend.load()  # the BLAS, then MLX (--help and --cfg never get here: they load neither)
    if distributed.size() > 1:  # under mlx.launch: one run, written by the first process into its directory
        out_dir = Path(distributed.shared_text(str(out_dir)))
        if not distributed.is_main():
            cfg.progress = False
            log.setLevel(logging.WARNING)
        else:
            log.info("one run on %d processes (mlx.launch): rank 0 writes %s", distributed.size(), out_dir)
    side_by_side = sweeping and (threads := threads_per_job(hydra_cfg.launcher)) is not None
    if side_by_side:
        blas.set_threads(threads)  # parallel jobs share the cores
        native.set_threads(threads)
        cfg.progress = False  # bars of jobs side by side overwrite each other: the sweep prints k of N instead
    elif distributed.size() > 1:  # mlx.launch -n N: the processes share this machine's cores (as if on one host)
        blas.set_threads(max(1, (os.cpu_count() or 1) // distributed.size()))
        native.set_threads(max(1, (os.cpu_count() or 1) // distributed.size()))
    # side by side, two jobs or two processes of one run could pin themselves to one core
    affinity.colocate(enabled=not side_by_side and distributed.size() == 1,
                      reason="parallel sweep job" if side_by_side else "one of several processes (mlx.launch)")
    log.info("BLAS for MLX's CPU matmuls: %s; MLX thread placement: %s", blas.status(), affinity.status())
    if blas.status()["backend"] == "bundled" and blas.status()["reason"] != "METAPEFT_BLAS=bundled":
        log.warning("MLX uses its bundled reference BLAS (%s): small matrix products run about 10x slower and "
                    "meta-training about 3x; install a C compiler (cc) so metapeft can load scipy-openblas32",
                    blas.status()["reason"])
    for key in ("checkpoint", "task.root"):  # relative to where the command ran, even with hydra.job.chdir=true
        if OmegaConf.select(cfg, key):
            OmegaConf.update(cfg, key, to_absolute_path(str(OmegaConf.select(cfg, key))))
    with contextlib.suppress(ValueError):  # a launcher running jobs off the main thread keeps its own handling
        signal.signal(signal.SIGINT, stop_on_signal)
        if not under_submitit_slurm():
            signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        metrics = run(cfg, out_dir, overrides=overrides, start_up_seconds=start_up_seconds())
    except KeyboardInterrupt as error:  # recorded in metrics.json (status interrupted) and history.csv by run()
        signal_name = getattr(error, "signal_name", "SIGINT")
        if distributed.is_main():  # the other processes of an mlx.launch run write nothing
            written = "metrics.json and history.csv" if (out_dir / "history.csv").exists() else "metrics.json"
            log.error("interrupted by %s: %s written to %s", signal_name, written, out_dir)
        if sweep_stop.in_worker():  # the sweep's main process ends this worker once every job is recorded
            logging.shutdown()
            sweep_stop.await_the_end()
            os._exit(128 + getattr(signal, signal_name))
        sys.exit(128 + getattr(signal, signal_name))
    except WriteFailed as error:  # a full disk: one line naming the file; what was written before is intact
        log.error("%s; the run's earlier files are intact (every write replaces a file only when complete)", error)
        if sweeping:
            return None
        sys.exit(4)
    except Exception as error:  # noqa: BLE001 - recorded in metrics.json by run(); reported here
        kind = {ConfigError: "invalid configuration", DivergedError: "run diverged"}.get(type(error), "run failed")
        log.error("%s: %s (recorded in %s)", kind, error, getattr(error, "record", out_dir / "metrics.json"))
        if sweeping:
            return None  # the sweep goes on; SweepReport lists every failure at the end
        if isinstance(error, (ConfigError, DivergedError)):
            sys.exit(2 if isinstance(error, ConfigError) else 3)
        raise
    evaluation = metrics["evaluation"]
    for k, result in evaluation["shots"].items():
        ours = result["meta_learned"]
        baselines = " | ".join(f"{name} {b['mean']:.4f}" for name, b in result["baselines"].items())
        identity = metrics["identity"]  # a saved run's own choices under train=false, not this command's defaults
        log.info("%s-shot %s: %s+%s %.4f ± %.4f | %s", k, evaluation["metric"], identity["algorithm"],
                 identity["peft"], ours["mean"], ours["ci95"], baselines)
        if "versus_best_baseline" in result:
            best = result["versus_best_baseline"]
            verdict = "better than" if best["better"] else "worse than" if best["worse"] else "not distinguishable from"
            log.info("%s-shot: %s the best baseline, %s (paired difference %+.4f ± %.4f)", k, verdict,
                     best["baseline"], best["difference"], best["ci95"])
    if "seconds_per_iteration" in metrics["train"]:
        log.info("%.2f ms per meta-iteration", 1e3 * metrics["train"]["seconds_per_iteration"])
    log.info("outputs in %s", out_dir)
    return validation_objective(metrics)


def top_level_keys() -> list[str]:
    """What a command-line override may start with: the run config's keys and every config group under conf/ (an
    experiment's own groups, such as low_rank_arm, included)."""
    groups = {path.name for path in CONF_DIR.iterdir() if path.is_dir() and not path.name.startswith("_")}
    return sorted({*GROUPS, *groups, *(f.name for f in dataclasses.fields(RunConfig)), "experiment", "hydra"})


def refuse_before_hydra(argv: list[str]) -> None:
    """Input Hydra would answer with a traceback or a misleading hint, refused with one line and exit 2: a key that
    is no key of the config (``foo=bar``; ``algoritm=maml``, for which Hydra suggests adding it with ``+``), named
    with the closest valid one; ``shots=5`` (a number where Hydra wants an option name); a value with characters
    outside ASCII, unquoted (Hydra's lexer refuses it with no hint); an output directory that cannot be created."""
    valid = top_level_keys()
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:  # flags; '+' adds and '~' deletes: checked later
            continue
        top = re.split(r"[./@]", arg.partition("=")[0], maxsplit=1)[0]
        if top not in valid:
            close = difflib.get_close_matches(top, valid, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            print(f"error: {arg}: '{top}' is not a key of the config; {hint}valid: {', '.join(valid)}",
                  file=sys.stderr)
            sys.exit(2)
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "shots" and value.isdigit():
            names = group_options("shots")
            hint = f"shots={value}shot" if f"{value}shot" in names else f"shots.train={value} (no {value}shot option)"
            print(f"error: {arg}: shots takes an option name ({', '.join(names)}): {hint}", file=sys.stderr)
            sys.exit(2)
        if not value.isascii() and unquoted(value) == value:  # refused by Hydra's lexer, with no hint to quote
            print(f"error: {arg}: Hydra's override grammar takes characters outside ASCII only in quotes: "
                  f"write {key}='{value}' (quoted for the shell as \"{key}='{value}'\")", file=sys.stderr)
            sys.exit(2)
        value = unquoted(value)  # quoted, as Hydra's grammar allows
        if key in ("hydra.run.dir", "hydra.sweep.dir") and "${" not in value:
            try:
                Path(value).expanduser().mkdir(parents=True, exist_ok=True)
            except OSError as error:
                print(f"error: {key}={value}: cannot create that directory ({error.strerror})", file=sys.stderr)
                sys.exit(2)


def unquoted(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def refuse_resume_of_another_run(argv: list[str]) -> None:
    """``resume=true hydra.run.dir=DIR`` where DIR holds a run (completed, interrupted, failed ...) made with other
    overrides: refused before Hydra writes anything there (it would rewrite ``.hydra/``, relabelling the run), with
    one line naming what differs; the refusal is written beside the run (``refused.json``), never over it."""
    if any(arg in ("-m", "--multirun") for arg in argv):
        return  # a sweep's jobs are named by their overrides: resume finds each job's own directory
    pairs = [arg.partition("=") for arg in argv if "=" in arg and not arg.startswith("-")]
    values = {key: unquoted(value) for key, _, value in pairs}
    run_dir = values.get("hydra.run.dir")
    if values.get("resume", "").lower() != "true":
        return
    if not run_dir:  # a new directory is made for this run: there is nothing in it to go on with
        print("note: resume=true without hydra.run.dir starts a new run directory; to go on with an interrupted run, "
              "give its directory: hydra.run.dir=<its run directory>", file=sys.stderr)
        return
    if "${" in run_dir:
        return
    try:
        earlier = json.loads((Path(run_dir).expanduser() / "metrics.json").read_text())
        stored = earlier["identity"]["overrides"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # nothing recorded there: the run itself says whether there is anything to resume
    given = [arg for arg in argv if "=" in arg and not arg.startswith(("-", "hydra."))]
    if identifying(stored) == identifying(given):
        return
    missing = sorted(set(identifying(stored)) - set(identifying(given)))
    added = sorted(set(identifying(given)) - set(identifying(stored)))
    differs = ", ".join([*(f"without {o}" for o in missing), *(f"with {o}" for o in added)])
    status = earlier.get("status", "recorded")
    article = "an" if status[0] in "aeiou" else "a"
    reason = (f"resume=true: {run_dir} holds {article} {status} run made with other overrides ({differs}); resume "
              f"it with its own overrides ({' '.join(stored) or 'none'}), or give another hydra.run.dir")
    with contextlib.suppress(WriteFailed, OSError):
        io.write_json(Path(run_dir).expanduser() / "refused.json",
                      {"status": "refused", "reason": reason, "config_key": "resume", "overrides": given})
    print(f"error: {reason}", file=sys.stderr)
    sys.exit(2)


def distributed_arguments(argv: list[str]) -> list[str]:
    """Under ``mlx.launch`` the processes make one run: a sweep is refused; every process but the first composes
    into a scratch directory (it writes nothing; it learns the first one's run directory after start-up)."""
    if not distributed.launched():
        return argv
    if any(arg in ("-m", "--multirun") for arg in argv):
        print("error: --multirun: mlx.launch runs one run on several processes; sweep without it, or launch each "
              "job of the sweep on its own", file=sys.stderr)
        sys.exit(2)
    if os.environ[distributed.LAUNCHED] == "0":
        return argv
    scratch = tempfile.mkdtemp(prefix=f"metapeft-rank{os.environ[distributed.LAUNCHED]}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [*argv, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def cli() -> None:
    """The command line: what Hydra would answer with a traceback is refused first, the config schemas and plugins
    are registered, then Hydra composes and runs."""
    refuse_before_hydra(sys.argv[1:])
    refuse_resume_of_another_run(sys.argv[1:])
    sys.argv[1:] = distributed_arguments(sys.argv[1:])
    try:
        register_configs()
    except ConfigError as error:  # a plugin that does not import: before Hydra, so said here
        print(f"invalid configuration: {error}", file=sys.stderr)
        sys.exit(2)
    # conf/hydra/launcher/{ray,submitit_*}.yaml are complete configs that share their names with the plugins'
    # schemas; Hydra 1.3 validates them against those schemas and warns that it will stop doing so. Either way
    # they work.
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")
    try:
        main()
    except SystemExit as stop:
        # Hydra reports a config it cannot compose (an unknown option, a wrong type) and exits 1; every refused
        # configuration exits 2, as metapeft's own refusals do
        if stop.code == 1 and not _job_started[0]:
            sys.exit(2)
        raise


if __name__ == "__main__":
    cli()
