"""SIGTERM to a sweep that runs its jobs in worker processes (joblib/loky, submitit_local): forwarded to the jobs.

Schedulers stop a sweep by sending SIGTERM to its main process alone. Without help its workers would outlive it,
keep training and race a later ``resume=true``. The main process of a multirun installs ``forward_stop``: on
SIGTERM it sends SIGTERM to each worker process it started (not to their resource trackers, which clean up after
them), each job stops as a single run does (its ``metrics.json`` says ``interrupted``, its training state of the
last validation kept), the main process waits for the workers, marks as ``interrupted`` any job record still saying
``running`` that no process holds (a worker that ended before it could write its own), says what it did and exits
143. Jobs of the basic
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


def stop_workers(sweep_dir: Path, grace_seconds: float = GRACE_SECONDS) -> int:
    """SIGTERM to every worker, then wait for them (killing what outlives ``grace_seconds``); how many there were."""
    found = {pid: command for pid, command in children(os.getpid()) if not any(s in command for s in SPARED)}
    workers = list(found)
    for pid in workers:
        signal_quietly(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while (running := [pid for pid in workers if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in running:
        log.error("worker %d (%s) did not stop within %.0f s: killed", pid, found[pid][:80], grace_seconds)
        signal_quietly(pid, signal.SIGKILL)
    for pid, command in children(os.getpid()):  # one the launcher started meanwhile has no job to record
        if alive(pid) and not any(s in command for s in SPARED):
            signal_quietly(pid, signal.SIGKILL)
    return len(workers)


def record_unfinished(sweep_dir: Path) -> list[Path]:
    """Every job directory of the sweep whose ``metrics.json`` still says ``running`` once its workers are gone and
    that no process holds (the run's directory lock): recorded as ``interrupted``, so that a stopped sweep never
    leaves a job ``running``. The job directories it marked."""
    import fcntl
    import json

    from metapeft import io

    marked = []
    for path in sorted(Path(sweep_dir).glob("**/metrics.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or record.get("status") != "running":
            continue
        with contextlib.suppress(OSError), open(path.parent / ".metapeft.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a process still writes there: its own record will say how it ended
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
    stopped by a signal there ends the worker, which its main process waits for."""
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
