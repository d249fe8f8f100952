"""Throughput of the training input pipeline: decode-cache read + augmentation + collation, images/s.

    python benchmarks/bench_data.py [--image-size 224] [--workers 2] [--steps 50] [--site NAME=PATH ...]

By default both real sites of ../shared/data (or two synthetic sites when they are absent). The decode
cache is built first (once; later runs reuse it from $CROSSSITE_CACHE) and is not part of the figure.
Target: >= 500 images/s at 224 on 2 cores.

The pipeline costs about 1 ms per image in one process; handing a float batch (32 x 3 x 224 x 224) from a
worker process to the trainer through shared memory costs more than that on small virtual machines, so
``workers=0`` is usually fastest on 2 cores. Workers pay off with more free cores and a GPU consumer.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from crosssite.data import build_cache, load_sites, short_side_for, train_loader

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def default_sites() -> list[str]:
    if (DATA / "sars_cov2_ct").is_dir() and (DATA / "covid_ct").is_dir():
        return [f"A={DATA / 'sars_cov2_ct'}", f"B={DATA / 'covid_ct'}"]
    return ["A=synthetic:shift=0", "B=synthetic:shift=1"]


def measure(loader, steps: int, repeats: int = 3, warmup: int = 5) -> list[float]:
    """Images per second over ``steps`` batches, ``repeats`` times, after ``warmup`` batches."""
    rates = []
    epoch = 0
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    for _ in range(repeats):
        images, start = 0, time.perf_counter()
        for _ in range(steps):
            try:
                batch = next(it)
            except StopIteration:
                epoch += 1
                loader.batch_sampler.set_epoch(epoch)
                it = iter(loader)
                batch = next(it)
            images += batch["image"].shape[0]
        rates.append(images / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", action="append", help="NAME=PATH[:LAYOUT] (repeatable)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-per-site", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="batches per measurement (3 measurements)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    sites = load_sites(args.site or default_sites())
    start = time.perf_counter()
    cache = build_cache(sites, image_size=args.image_size)
    print(f"cache: {len(cache)} slices, short side {short_side_for(args.image_size)}, "
          f"ready in {time.perf_counter() - start:.1f} s")
    for workers in sorted({0, args.workers}):
        loader = train_loader(sites, None, cache, args.image_size, batch_per_site=args.batch_per_site,
                              workers=workers)
        rates = measure(loader, args.steps)
        print(f"train pipeline at {args.image_size}: {max(rates):.0f} images/s best of {len(rates)} "
              f"(all: {', '.join(f'{r:.0f}' for r in rates)}; workers={workers}, "
              f"batch {args.batch_per_site} x {len(sites)} sites)")
    print(f"load average of the machine (1 min): {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
