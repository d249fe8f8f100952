"""The training step of a preset as the engine runs it, on the real sites: ``crosssite bench --preset cpu``.

    crosssite bench --preset cpu [--steps 20] [--threads 2] [--compile] [--device cuda] [--json]

The run is built as ``crosssite train`` builds it with the preset's settings (`build_run_data` on the two real
sites under ``$CROSSSITE_DATA`` or ``--data``, `create_model`, `make_optimizer`, `train_step`), so the figure
includes the real input pipeline (cache read, crop, flip, normalise, collate: the batch's loading is inside each timed
step), or with ``data_on_device`` the slices kept on the device and cut there (`crosssite.data.resident`). Each path is the preset's config
with the speed levers set: the plain path has every lever off (contiguous tensors, the site tensor, Adam's loop,
fp32, eager); each lever is then switched on alone; ``fast`` is the engine's defaults on this machine (the levers
`TrainConfig` turns on, bf16 where `native_bf16` says the hardware has it and the preset is large). Each figure
is the median step time of ``--steps`` steps, with images/s, GFLOP/s (3 x the FLOPs of a forward), the fractions
of an fp32 and a bf16 square matmul measured in the same process, and the speed-up over the plain path.

Every path is built and warmed (``--warmup`` steps, their seconds reported) before any is timed; then one step of
each path runs in turn, ``--steps`` rounds (`crosssite.bench_timing.interleaved`), so a neighbour's burst of load
slows every path alike. ``plain (again)`` is a second, separately built plain path in the same rounds: it should
match ``plain``, and where the two differ, or a path's repeats spread, or the machine's load (recorded before and
after, with the CPU model and its AMX / AVX-512 flags) fills the cores, the speed-ups are withheld with the reason
(``ratios_trusted`` / ``ratios_note``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from crosssite.bench import forward_flops, matmul_gflops
from crosssite.bench_timing import cpu_flags, interleaved, machine_load, ratio_verdict
from crosssite.data import load_sites
from crosssite.data.resident import ResidentLoader
from crosssite.errors import ConfigError
from crosssite.training.config import TrainConfig, apply_overrides
from crosssite.training.data import build_run_data, data_on_device
from crosssite.training.methods import METHODS
from crosssite.training.precision import cpu_model, native_bf16, resolve_precision
from crosssite.training.step import CompiledForward, build_model, make_optimizer, train_step

__all__ = ["LEVERS", "preset_config", "path_step", "run_preset_benchmark"]

DATA = Path(os.environ.get("CROSSSITE_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
PLAIN = {"channels_last": False, "static_layout": False, "fused_adam": False, "precision": "fp32", "compile": False,
         "data_on_device": "off"}
# Each lever alone on top of the plain path.
LEVERS: dict[str, dict[str, Any]] = {
    "channels_last": {"channels_last": True},
    "static_layout": {"static_layout": True},
    "fused_adam": {"fused_adam": True},
    "bf16": {"precision": "bf16"},
    "compile": {"compile": True},
    "data_on_device": {"data_on_device": "on"},
}


def preset_config(preset: str, device: str) -> TrainConfig:
    from crosssite.experiment import PRESETS

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return apply_overrides(TrainConfig(), {**PRESETS[preset], "device": device})


class _Stream:
    """Batches of one loader, started again when it ends: every path draws its next batch from the same stream."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.it = loader, iter(loader)

    def __next__(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


def path_step(config: TrainConfig, n_sites: int, batches: _Stream) -> Callable[[], None]:
    """One engine step of ``config`` with the batch's loading (model and optimiser built fresh, seed 0)."""
    device = torch.device("cuda" if config.device == "cuda" else "cpu")
    method = METHODS[config.method]
    torch.manual_seed(0)
    model = build_model(config, n_sites, device)
    optimizer = make_optimizer(model, config)
    forward = CompiledForward(model, log=lambda line: None) if config.compile else model
    model.train()

    def fail(what: str, values: dict) -> None:
        raise RuntimeError(f"non-finite {what} in the benchmark")

    def step() -> None:
        train_step(model, forward, optimizer, next(batches), method, config, device, lr=config.lr, on_diverged=fail)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step.forward = forward  # type: ignore[attr-defined]  # for the compile time
    return step


def _entries(timings: dict, steps_of: dict[str, Callable[[], None]], work: float, batch: int,
             peaks: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each path's figures from its timings; ``work``: FLOPs of one step; the speed-up is over the mean of both
    plain paths."""
    paths: dict[str, dict[str, float]] = {}
    for name, t in timings.items():
        paths[name] = {"seconds": t.median, "warmup_s": round(t.warmup_s, 3), "spread": round(t.spread, 3)}
        forward = getattr(steps_of[name], "forward", None)
        if isinstance(forward, CompiledForward):
            paths[name]["compile_seconds"] = forward.compile_seconds
    plain = (paths["plain"]["seconds"] + paths["plain (again)"]["seconds"]) / 2
    for entry in paths.values():
        entry |= {
            "images_per_s": round(batch / entry["seconds"], 1),
            "gflops": round(work / entry["seconds"] / 1e9, 1),
            "of_fp32_matmul": round(work / entry["seconds"] / 1e9 / peaks["fp32"], 3),
            "of_bf16_matmul": round(work / entry["seconds"] / 1e9 / peaks["bf16"], 3),
            "speedup": round(plain / entry["seconds"], 2),
            "seconds": round(entry["seconds"], 4),
        }
    return paths


def run_preset_benchmark(preset: str, *, steps: int = 20, warmup: int = 3, threads: int | None = None,
                         compile: bool = False, device: str = "cpu", data_root: Path | None = None,
                         limit_per_site: int = 0) -> dict[str, Any]:
    """The preset's engine step on the plain path, with each lever alone, and on the fast path (see the module);
    ``limit_per_site`` > 0 builds the loaders from that many slices per site (a quick check: the step's cost does
    not depend on how many slices the epoch holds, only the decoding before it does)."""
    load_before = machine_load()  # before this process adds its own load
    if threads:
        torch.set_num_threads(threads)
    root = data_root or DATA
    specs = [f"sars_cov2_ct={root / 'sars_cov2_ct'}", f"covid_ct={root / 'covid_ct'}"]
    base = preset_config(preset, device).replace(limit_per_site=limit_per_site)
    sites = load_sites(specs)
    torch_device = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        data = build_run_data(base, sites, Path(tmp) / "split.json", reuse_split=False)
    resident = ResidentLoader.from_loader(data.train, torch_device)
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    flops = forward_flops(base.width, base.image_size)
    batch = base.batch_per_site * len(sites)
    fast = base.replace(precision=resolve_precision(base, torch_device))
    levers = {k: v for k, v in LEVERS.items() if (k != "compile" or compile) and (k != "bf16" or native_bf16(torch_device))}
    order = [("plain", PLAIN)] + [(k, PLAIN | v) for k, v in levers.items()] + [("fast", None), ("plain (again)", PLAIN)]
    streams = {False: _Stream(data.train), True: _Stream(resident)}
    steps_of: dict[str, Callable[[], None]] = {}

    def maker(name: str, changes: dict | None) -> Callable[[], Callable[[], None]]:
        config = fast if changes is None else base.replace(**changes)

        def make() -> Callable[[], None]:
            steps_of[name] = path_step(config, len(sites), streams[data_on_device(config, torch_device)])
            return steps_of[name]

        return make

    timings = interleaved({name: maker(name, changes) for name, changes in order}, steps, warmup)
    trusted, why = ratio_verdict(timings, load_before, machine_load(), same=("plain", "plain (again)"))
    paths = _entries(timings, steps_of, 3 * flops * batch, batch, peaks)
    return {
        "preset": preset,
        "machine": {"cpu": cpu_model(), **cpu_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
                    "native_bf16": native_bf16(torch_device), "load_before": load_before, "load_after": machine_load()},
        "config": {k: getattr(base, k) for k in ("image_size", "width", "batch_per_site", "method", "limit_per_site")},
        "fast_path": {k: getattr(fast, k) for k in PLAIN} | {"data_on_device": data_on_device(fast, torch_device)},
        "forward_gflop_per_image": round(flops / 1e9, 3),
        "matmul_gflops": {k: round(v, 1) for k, v in peaks.items()},
        "steps": steps,
        "paths": paths,
        "ratios_trusted": trusted,
        "ratios_note": why,
    }


def print_preset(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"preset {result['preset']} {result['config']}: {m['device']} {m['cpu_capability']} x {m['threads']} "
          f"threads, torch {m['torch']}, native bf16 {m['native_bf16']}; forward {result['forward_gflop_per_image']} "
          f"GFLOP/image; matmul GFLOP/s {result['matmul_gflops']}")
    print(f"{m['cpu']} (AMX {m['amx']}, AVX-512 {m['avx512']}); load before {m['load_before']}, after "
          f"{m['load_after']}")
    print(f"fast path: {result['fast_path']}")
    trusted = result["ratios_trusted"]
    if not trusted:
        print(f"speed-ups withheld: {result['ratios_note']}")
    print(f"  {'path':<16}{'s/step':>9}{'img/s':>9}{'GFLOP/s':>9}{'/fp32mm':>9}{'/bf16mm':>9}{'warm s':>8}{'spread':>8}"
          f"{'x plain' if trusted else '':>9}")
    for name, r in result["paths"].items():
        extra = f"  (compiled in {r['compile_seconds']:.1f} s)" if r.get("compile_seconds") else ""
        ratio = f"{r['speedup']:>9.2f}" if trusted else ""
        print(f"  {name:<16}{r['seconds']:>9.4f}{r['images_per_s']:>9.1f}{r['gflops']:>9.1f}{r['of_fp32_matmul']:>9.3f}"
              f"{r['of_bf16_matmul']:>9.3f}{r['warmup_s']:>8.2f}{r['spread']:>8.2f}{ratio}{extra}")



def main(argv: list[str] | None = None) -> dict[str, Any]:
    from crosssite.experiment import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--data", type=Path, default=None, help="folder of the two real sites")
    parser.add_argument("--limit-per-site", type=int, default=0,
                        help="slices per site to build the loaders from (0: all; the step's cost is the same)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run_preset_benchmark(args.preset, steps=args.steps, warmup=args.warmup, threads=args.threads,
                                  compile=args.compile, device=args.device, data_root=args.data,
                                  limit_per_site=args.limit_per_site)
    if args.json:
        print(json.dumps(result))
    else:
        print_preset(result)
    return result


if __name__ == "__main__":
    main()
