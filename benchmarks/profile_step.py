"""Where the time of a training run goes: `torch.profiler` over the engine's own step, BN recalibration and
validation, on the real sites at a preset's size.

    python benchmarks/profile_step.py [--preset cpu] [--steps 30] [--threads 2] [--set key=value ...]

The data are the two real sites under ``$CROSSSITE_DATA`` (default ``../shared/data``). The run is built as
``crosssite train`` builds it (`build_run_data`, `create_model`, `train_step`); after ``--warmup`` steps,
``--steps`` optimiser steps are profiled, then one BN recalibration pass and one validation pass are timed.
Prints the wall time of each phase per epoch and the operators with the largest self CPU time, grouped
(convolution, batch norm, split/cat, optimiser, ...).
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from crosssite.data import load_sites
from crosssite.experiment import PRESETS
from crosssite.training.config import TrainConfig, apply_overrides, parse_overrides
from crosssite.training.data import build_run_data
from crosssite.training.methods import METHODS
from crosssite.training.step import build_model, make_optimizer, train_step
from crosssite.training.validation import recalibrate_bn, score_part

DATA = Path(os.environ.get("CROSSSITE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

GROUPS = (
    ("convolution (+ backward)", ("conv", "mkldnn_convolution")),
    ("batch norm (+ backward)", ("batch_norm", "native_batch_norm")),
    ("split / cat / index (site grouping)", ("split", "cat", "index", "unique", "narrow", "slice", "select")),
    ("optimiser (Adam, clip)", ("adam", "_foreach", "addcdiv", "lerp", "sqrt", "norm", "clip")),
    ("matmul / linear", ("addmm", "mm", "linear", "bmm", "matmul")),
    ("pooling", ("pool",)),
    ("elementwise (add, mul, relu, copy)", ("add", "mul", "relu", "threshold", "copy", "fill", "zero", "div",
                                            "sub", "clone", "empty", "contiguous", "to")),
    ("host syncs (item, tolist)", ("item", "_local_scalar_dense", "tolist")),
)


def group_of(name: str) -> str:
    lower = name.lower()
    for group, keys in GROUPS:
        if any(k in lower for k in keys):
            return group
    return "other"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = apply_overrides(TrainConfig(), {**PRESETS[args.preset], **parse_overrides(args.overrides)})
    sites = load_sites([f"sars_cov2_ct={DATA / 'sars_cov2_ct'}", f"covid_ct={DATA / 'covid_ct'}"])
    with tempfile.TemporaryDirectory() as tmp:
        data = build_run_data(config, sites, Path(tmp) / "split.json", reuse_split=False)
    method, device = METHODS[config.method], torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(config, 2, device)
    optimizer = make_optimizer(model, config)
    forward = torch.compile(model) if config.compile else model

    def fail(what: str, values: dict) -> None:
        raise RuntimeError(f"non-finite {what}")

    batches = iter(data.train)
    step = lambda: train_step(model, forward, optimizer, next(batches), method, config, device, lr=config.lr,  # noqa: E731
                              on_diverged=fail)
    model.train()
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    per_step = (time.perf_counter() - start) / args.steps
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    per_step_unprofiled = (time.perf_counter() - start) / args.steps
    start = time.perf_counter()
    if data.recalibration is not None:
        recalibrate_bn(model, data.recalibration, device, config)
    recal = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    score_part(model, data, "val", device, config)
    val = time.perf_counter() - start

    steps = data.steps_per_epoch
    print(f"{args.preset} preset {dict(PRESETS[args.preset])} overrides {args.overrides}; "
          f"{torch.backends.cpu.get_cpu_capability()} x {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"per epoch ({steps} steps): training {steps * per_step_unprofiled:.2f} s "
          f"({1e3 * per_step_unprofiled:.1f} ms/step; {1e3 * per_step:.1f} under the profiler), "
          f"BN recalibration {recal:.2f} s, validation {val:.2f} s")
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    grouped: dict[str, float] = collections.defaultdict(float)
    for e in events:
        grouped[group_of(e.key)] += e.self_cpu_time_total
    print(f"\nself CPU time of {args.steps} profiled steps by group (total {total / 1e6:.2f} s):")
    for group, t in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<40} {t / 1e6:7.3f} s  {100 * t / total:5.1f}%")
    print(f"\ntop {args.top} operators by self CPU time:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
