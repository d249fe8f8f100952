"""How the benchmarks time things so that a neighbour cannot fake a speed-up: every path warmed before any is timed
(the warm-up reported), the paths timed in turn round after round (a burst of load hits them alike) with the
median counting, the machine's load recorded, and ratios withheld, with the reason, when the load or the spread of
repeated timings says another process distorted them.

    paths = interleaved({"plain": make_plain, "fast": make_fast}, steps=5, warmup=1)
    verdict = ratio_verdict(paths, machine_load(), load_after)   # (trusted, why)
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MAX_SPREAD", "Timing", "machine_load", "cpu_flags", "interleaved", "ratio_verdict", "reset_peak_rss",
           "peak_rss_gb"]

MAX_SPREAD = 0.3
"""Largest (max - min) / median of one path's repeated timings for which its ratios are trusted: a quiet machine
repeats a step within a few percent, a neighbour's burst does not."""


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gb() -> float:
    """Resident-set high-water mark since the last `reset_peak_rss`, in GB."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def cpu_flags() -> dict[str, bool]:
    """Whether the CPU has AMX and AVX-512 (from /proc/cpuinfo; False where it cannot be read)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {"amx": any(f.startswith("amx") for f in flags), "avx512": "avx512f" in flags}


def machine_load() -> dict[str, float | int | None]:
    """The 1-minute load average, the runnable threads now (this one included) and the usable cores."""
    try:
        fields = Path("/proc/loadavg").read_text().split()
        load, runnable = float(fields[0]), int(fields[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        load, runnable = None, None
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return {"loadavg_1m": load, "runnable": runnable, "cores": cores}


@dataclass
class Timing:
    """One path's timings: the warm-up's seconds, each timed call's seconds, the peak RSS while they ran."""

    warmup_s: float
    times: list[float] = field(default_factory=list)
    peak_rss_gb: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed calls."""
        return (max(self.times) - min(self.times)) / self.median


def interleaved(makers: Mapping[str, Callable[[], Callable[[], object]]], steps: int, warmup: int = 1
                ) -> dict[str, Timing]:
    """Build every path (``makers[name]()`` returns the call to time), warm each with ``max(1, warmup)`` calls,
    then time one call of each path in turn, ``steps`` rounds."""
    calls = {name: make() for name, make in makers.items()}
    out: dict[str, Timing] = {}
    for name, call in calls.items():
        start = time.perf_counter()
        for _ in range(max(1, warmup)):
            call()
        out[name] = Timing(time.perf_counter() - start)
    for _ in range(steps):
        for name, call in calls.items():
            reset_peak_rss()
            start = time.perf_counter()
            call()
            out[name].times.append(time.perf_counter() - start)
            out[name].peak_rss_gb = max(out[name].peak_rss_gb, peak_rss_gb())
    return out


def ratio_verdict(timings: Mapping[str, Timing], before: Mapping, after: Mapping,
                  same: tuple[str, str] | None = None) -> tuple[bool, str]:
    """Whether ratios of these timings can be trusted, and why not: the load before the run already filled the
    cores (other processes alone), a path's repeats spread by more than `MAX_SPREAD`, or two runs of the same path
    (``same``) disagree by more than that."""
    cores = before["cores"]
    if before["loadavg_1m"] is not None and before["loadavg_1m"] >= cores:
        return False, f"the load before the run ({before['loadavg_1m']}) filled the {cores} cores"
    if after["loadavg_1m"] is not None and after["loadavg_1m"] > 2 * cores:
        return False, f"the load during the run ({after['loadavg_1m']}) was over twice the {cores} cores"
    worst = max(timings, key=lambda name: timings[name].spread if len(timings[name].times) > 1 else 0.0)
    if len(timings[worst].times) > 1 and timings[worst].spread > MAX_SPREAD:
        return False, f"repeats of {worst!r} spread by {timings[worst].spread:.0%} of their median"
    if same is not None:
        a, b = (timings[name].median for name in same)
        if abs(a - b) / min(a, b) > MAX_SPREAD:
            return False, f"{same[0]!r} and {same[1]!r} (the same path) differ by {abs(a - b) / min(a, b):.0%}"
    return True, "load below the cores and repeats consistent"
