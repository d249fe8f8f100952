"""Throughput of the training input pipeline: decode-cache read + augmentation + collation, images/s.

    python benchmarks/bench_data.py [--image-size 224] [--workers 2] [--steps 100] [--site NAME=PATH ...]

By default both real sites of ../shared/data (or two synthetic sites when they are absent). The decode
cache is built first (once; later runs reuse it from $CROSSSITE_CACHE) and is not part of the figure.
Target: >= 500 images/s at 224 on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from crosssite.data import build_cache, load_sites, short_side_for, train_loader

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def default_sites() -> list[str]:
    if (DATA / "sars_cov2_ct").is_dir() and (DATA / "covid_ct").is_dir():
        return [f"A={DATA / 'sars_cov2_ct'}", f"B={DATA / 'covid_ct'}"]
    return ["A=synthetic:shift=0", "B=synthetic:shift=1"]


def measure(loader, steps: int, warmup: int = 5) -> float:
    """Images per second over ``steps`` batches, after ``warmup`` batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        images += next(it)["image"].shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", action="append", help="NAME=PATH[:LAYOUT] (repeatable)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-per-site", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
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
        rate = measure(loader, args.steps)
        print(f"train pipeline at {args.image_size}: {rate:.0f} images/s "
              f"(workers={workers}, batch {args.batch_per_site} x {len(sites)} sites)")


if __name__ == "__main__":
    main()
