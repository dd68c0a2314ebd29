"""SIGTERM to a sweep that runs its jobs in worker processes (joblib/loky, submitit_local): forwarded to the jobs.

Schedulers stop a sweep by sending SIGTERM to its main process alone. Without help its workers would outlive it,
keep training and race a later ``resume=true``. The main process of a multirun installs ``forward_stop``: on
SIGTERM it sends SIGTERM to each worker process it started (not to their resource trackers, which clean up after
them), each job stops as a single run does (its ``metrics.json`` says ``interrupted``, its training state of the
last validation kept) and its worker then waits, alive, to be ended: a worker that exited at once would make the
launcher (loky) take the pool for broken and kill the other workers, perhaps before they had written their records.
Once no job directory is held any more (every running job has recorded its stop), or the workers are gone, the main
process ends the workers that remain, marks as ``interrupted`` any job record still saying ``running`` that no
process holds (a worker that ended before it could write its own), says what it did and exits 143. Jobs of the basic
launcher run inside the main process and stop through their own handler. Ctrl-C reaches every process of the
terminal's group at once and needs none of this.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("metapeft")

MAIN_PID = "METAPEFT_SWEEP_PID"  # set by the sweep's main process; its workers inherit it
# children that clean up after the workers (they end by themselves), and the listing command itself
SPARED = ("resource_tracker", "pid=,args=", "pgrep -lf")
GRACE_SECONDS = 120.0  # for the workers to write their records; then they are killed


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is ``pid``."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)] if sys.platform.startswith("linux")
                         else ["pgrep", "-lf", "-P", str(pid)], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        number, _, command = line.strip().partition(" ")
        if number.isdigit():
            found.append((int(number), command))
    return found


def alive(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # reaped already, or not our child
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def held(job_dir: Path) -> bool:
    """Whether a process holds the job directory's lock (``metapeft.experiment.hold_directory``): a job running, or
    still writing its record."""
    import fcntl

    try:
        with open(job_dir / ".metapeft.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def every_job_recorded(sweep_dir: Path) -> bool:
    return not any(held(lock.parent) for lock in Path(sweep_dir).glob("**/.metapeft.lock"))


def await_the_end(seconds: float = GRACE_SECONDS) -> None:
    """In a worker whose job has recorded its stop: wait for the sweep's main process to end this process (a worker
    exiting by itself would have the launcher kill its peers); after ``seconds``, end anyway."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    time.sleep(seconds)


def stop_workers(sweep_dir: Path, grace_seconds: float = GRACE_SECONDS) -> int:
    """SIGTERM to every worker, wait until every running job has recorded its stop (or the workers are gone, or
    ``grace_seconds`` passed), then end the workers that remain; how many there were."""
    found = {pid: command for pid, command in children(os.getpid()) if not any(s in command for s in SPARED)}
    workers = list(found)
    for pid in workers:
        signal_quietly(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while (running := [pid for pid in workers if alive(pid)]) and not every_job_recorded(sweep_dir) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in running:
        if time.monotonic() >= deadline:
            log.error("worker %d (%s) did not stop within %.0f s: killed", pid, found[pid][:80], grace_seconds)
        signal_quietly(pid, signal.SIGKILL)
    while any(alive(pid) for pid in running) and time.monotonic() < deadline + 10:
        time.sleep(0.05)
    for pid, command in children(os.getpid()):  # one the launcher started meanwhile has no job to record
        if alive(pid) and not any(s in command for s in SPARED):
            signal_quietly(pid, signal.SIGKILL)
    return len(workers)


def record_unfinished(sweep_dir: Path) -> list[Path]:
    """Every job directory of the sweep whose ``metrics.json`` still says ``running`` once its workers are gone and
    that no process holds (the run's directory lock): recorded as ``interrupted``, so that a stopped sweep never
    leaves a job ``running``. The job directories it marked."""
    import json

    from metapeft import io

    marked = []
    for path in sorted(Path(sweep_dir).glob("**/metrics.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("status") == "running" and not held(path.parent):
            record.update(status="interrupted", reason="stopped by SIGTERM (its sweep was stopped before the job "
                          "could record it)")
            io.write_json(path, record)
            marked.append(path.parent)
    return marked


def signal_quietly(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
        os.kill(pid, signum)


def in_worker() -> bool:
    """Whether this process runs jobs for a sweep's main process (a joblib/loky or submitit_local worker): a job
    stopped by a signal there records its stop and waits for the main process to end the worker
    (``await_the_end``)."""
    return os.environ.get(MAIN_PID) not in (None, str(os.getpid()))


def forward_stop(sweep_dir: Path) -> None:
    """Install the main process's SIGTERM handler for this sweep (see the module's docstring)."""
    os.environ[MAIN_PID] = str(os.getpid())

    def on_sigterm(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM while waiting changes nothing
        count = stop_workers(sweep_dir)
        for job in record_unfinished(sweep_dir):
            log.error("%s: its worker ended without recording the stop; recorded as interrupted", job)
        log.error("sweep stopped by SIGTERM: %d worker process(es) stopped, each running job recorded as "
                  "interrupted in %s; the same command with resume=true goes on", count, sweep_dir)
        logging.shutdown()
        os._exit(128 + signal.SIGTERM)  # not SystemExit: the launcher must not schedule the jobs left

    signal.signal(signal.SIGTERM, on_sigterm)
