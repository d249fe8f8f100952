"""Batch assembly of the cpu preset's training loader against its device-resident twin (`crosssite.data.resident`).

    python benchmarks/bench_resident.py [--device cuda] [--batches 40]

Both draw the same batches of the two real sites (under ``$CROSSSITE_DATA``, default ``../shared/data``); the figure
is the median time to produce one batch (32 slices, 64 px) ready on the device, each loader measured twice in
alternation so drift shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from crosssite.bench_preset import preset_config
from crosssite.data import load_sites
from crosssite.data.resident import ResidentLoader
from crosssite.training.data import build_run_data

DATA = Path(os.environ.get("CROSSSITE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = preset_config("cpu", "cpu")
    sites = load_sites([f"sars_cov2_ct={DATA / 'sars_cov2_ct'}", f"covid_ct={DATA / 'covid_ct'}"])
    with tempfile.TemporaryDirectory() as tmp:
        data = build_run_data(config, sites, Path(tmp) / "split.json", reuse_split=False)
    resident = ResidentLoader.from_loader(data.train, device)
    for name, loader in (("cpu loader", data.train), ("resident", resident)) * 2:
        batches = iter(loader)
        next(batches)
        times = []
        for _ in range(args.batches):
            start = time.perf_counter()
            batch = next(batches)
            image = batch["image"].to(device, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(f"{name:<11} {1000 * statistics.median(times):7.2f} ms per batch of {len(image)} on {device}")


if __name__ == "__main__":
    main()
