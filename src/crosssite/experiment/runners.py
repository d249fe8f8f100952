"""Runner processes: ``run_experiment(runners=N)`` shares a grid among N spawned processes, each with a share of
the torch threads, and passes an interrupt or SIGTERM / SIGHUP on to them."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from crosssite.errors import CrossSiteError
from crosssite.experiment.grid import RunKey
from crosssite.experiment.runs import Job, run_keys

__all__ = ["run_runners"]

def worker(index: int, threads: int, job: Job, todo: list[RunKey], done: Any) -> None:
    """One runner process of `run_experiment(runners=N)`: ``threads`` torch threads, its lines prefixed, the keys
    it ran put on ``done``; it stops between runs once its parent is gone, and quietly on an interrupt."""
    import torch

    def say(text: str) -> None:
        print(f"[runner {index}] {text}", flush=True)

    torch.set_num_threads(threads)
    # the parent's stop request is an interrupt, even where the runner was started with SIGINT ignored (a
    # background job of a shell script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parent = multiprocessing.parent_process()
    try:
        ran = run_keys(job, todo, False, say, quiet_skips=True,
                        stop=lambda: parent is not None and not parent.is_alive())
    except KeyboardInterrupt:
        say("interrupted: its run resumes from its last checkpoint next time")
        sys.exit(130)
    except CrossSiteError as e:
        print(f"[runner {index}] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    done.put(ran)


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_runners(job: Job, todo: list[RunKey], runners: int, log: Callable[[str], None]) -> list[RunKey]:
    """Start ``runners`` runner processes on ``todo`` (each takes the next run nobody holds), wait for all and
    return the keys they ran. An interrupt or a SIGTERM / SIGHUP of this process is passed on to the runners as
    an interrupt (each finishes its write and stops; its run resumes from its checkpoint next time)."""
    import torch

    threads = max(1, torch.get_num_threads() // runners)
    log(f"{runners} runner processes, {threads} torch thread(s) each")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    done = context.SimpleQueue()
    procs = [context.Process(target=worker, args=(i, threads, job, todo, done), name=f"runner-{i}")
             for i in range(1, runners + 1)]
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)} if in_main else {}
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    except BaseException:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ran: list[RunKey] = []
    while not done.empty():
        ran += done.get()
    failed = [f"runner {i} (" + (f"killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exit status {p.exitcode}")
              + ")" for i, p in enumerate(procs, 1) if p.exitcode != 0]
    if failed:
        raise CrossSiteError(f"{', '.join(failed)} stopped early (its messages are above); the grid resumes from "
                             "the finished runs and checkpoints when the command is run again")
    return ran
