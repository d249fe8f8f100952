"""How many threads inference uses: the cores that are free now, not the cores that exist.

OpenMP threads wait for each other by spinning; on a core that another process holds, a spinning thread waits for
the scheduler instead, and one forward pass of a small batch can take tens of times longer than on one thread
(docs/PERFORMANCE.md). So a prediction run counts the cores this process may use (``os.sched_getaffinity``), takes
away the other runnable threads the kernel reports (``/proc/loadavg``, sampled a few times), and runs torch on what
is left, at least one.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["usable_cores", "free_cores", "split_cores", "torch_threads"]

_SAMPLES = 5
_SAMPLE_GAP_S = 0.002


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` where the platform has none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _runnable() -> int | None:
    """Runnable threads on the machine now (the 4th field of /proc/loadavg counts this one too)."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def free_cores() -> int:
    """Usable cores minus the other runnable threads (median of a few samples of /proc/loadavg), at least 1."""
    cores = usable_cores()
    samples = []
    for i in range(_SAMPLES):
        n = _runnable()
        if n is None:
            return cores
        samples.append(n)
        if i + 1 < _SAMPLES:
            time.sleep(_SAMPLE_GAP_S)
    others = max(0, int(statistics.median(samples)) - 1)
    return max(1, min(cores, cores - others))


def split_cores(free: int, workers: int | None = None) -> tuple[int, int]:
    """``(decoding threads, torch threads)`` for ``free`` cores: decoding a slice costs about as much CPU as its
    forward passes (docs/PERFORMANCE.md), so each gets half (``workers`` fixes the decoding side), one at least;
    together they never ask for more than the free cores, so no OpenMP thread spins on a core a decoder holds."""
    decode = max(1, free // 2) if workers is None else max(1, workers)
    return decode, max(1, free - decode)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Within the body torch runs ``n`` intra-op threads (None: `free_cores`); the count is restored after."""
    before = torch.get_num_threads()
    n = free_cores() if n is None else max(1, int(n))
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
