"""Training throughput of a grid's runs by torch threads per runner, from each run's ``log.csv``.

    python scripts/runner_throughput.py results/cpu-v2

For every run of ``results.jsonl`` whose folder is present: the median over its epochs of ``images_per_s``,
grouped by the run's torch threads (``machine.torch_threads``); with R runners side by side, each of T threads,
the machine trains about R times the per-runner figure (a resumed run's epochs may mix thread counts, and a
runner left alone at a grid's end trains faster than beside another). Single's runs (one model per site, a folder each) have no
``log.csv`` of their own and are not counted.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiment", type=Path)
    args = parser.parse_args()
    groups: dict[int, list[float]] = {}
    for text in (args.experiment / "results.jsonl").read_text().splitlines():
        if not text.strip():
            continue
        run = json.loads(text)
        log = args.experiment / run["run_dir"] / "log.csv"
        if not log.exists():
            continue
        with open(log, newline="") as fh:
            rates = [float(r["images_per_s"]) for r in csv.DictReader(fh) if r.get("images_per_s")]
        if rates:
            threads = int(run.get("machine", {}).get("torch_threads", 0))  # 0: not recorded
            groups.setdefault(threads, []).append(statistics.median(rates))
    print("| torch threads per runner | runs | median images/s per runner (range) |")
    print("|---:|---:|---|")
    for threads, rates in sorted(groups.items()):
        print(f"| {threads} | {len(rates)} | {statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) |")


if __name__ == "__main__":
    main()
