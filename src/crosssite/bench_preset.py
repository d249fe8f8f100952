"""The training step of a preset as the engine runs it, on the real sites: ``crosssite bench --preset cpu``.

    crosssite bench --preset cpu [--steps 20] [--threads 2] [--compile] [--device cuda] [--json]

The run is built as ``crosssite train`` builds it with the preset's settings (`build_run_data` on the two real
sites under ``$CROSSSITE_DATA`` or ``--data``, `create_model`, `make_optimizer`, `train_step`), so the figure
includes the real input pipeline (cache read, crop, flip, normalise, collate: the batch's loading is inside each timed
step), or with ``data_on_device`` the slices kept on the device and cut there (`crosssite.data.resident`). Each path is the preset's config
with the speed levers set: the plain path has every lever off (contiguous tensors, the site tensor, Adam's loop,
fp32, eager); each lever is then switched on alone; ``fast`` is the engine's defaults on this machine (the levers
`TrainConfig` turns on, bf16 where `native_bf16` says the hardware has it and the preset is large). Each figure
is the median step time of ``--steps`` steps after a warm-up, with images/s, GFLOP/s (3 x the FLOPs of a forward),
the fractions of an fp32 and a bf16 square matmul measured in the same process, and the speed-up over the plain
path, which is measured first and last (the mean of both counts; both are reported, so drift shows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from crosssite.bench import forward_flops, matmul_gflops
from crosssite.data import load_sites
from crosssite.data.resident import ResidentLoader
from crosssite.errors import ConfigError
from crosssite.training.config import TrainConfig, apply_overrides
from crosssite.training.data import build_run_data, data_on_device
from crosssite.training.methods import METHODS
from crosssite.training.precision import native_bf16, resolve_precision
from crosssite.training.step import CompiledForward, build_model, make_optimizer, train_step

__all__ = ["LEVERS", "preset_config", "measure_path", "run_preset_benchmark"]

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


def measure_path(config: TrainConfig, data: Any, steps: int, warmup: int,
                 resident: ResidentLoader | None = None) -> dict[str, float]:
    """Median wall seconds of one engine step of ``config``, the batch's loading included (model and optimiser
    built fresh, seed 0); ``resident``: the device-resident twin of ``data.train``, used when `data_on_device`
    says the config keeps its slices on the device."""
    device = torch.device("cuda" if config.device == "cuda" else "cpu")
    method = METHODS[config.method]
    torch.manual_seed(0)
    model = build_model(config, len(data.sites), device)
    optimizer = make_optimizer(model, config)
    forward = CompiledForward(model, log=lambda line: None) if config.compile else model
    model.train()
    batches = iter(resident if resident is not None and data_on_device(config, device) else data.train)

    def fail(what: str, values: dict) -> None:
        raise RuntimeError(f"non-finite {what} in the benchmark")

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        train_step(model, forward, optimizer, batch, method, config, device, lr=config.lr, on_diverged=fail)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    out = {"seconds": statistics.median(times)}
    if config.compile:
        out["compile_seconds"] = forward.compile_seconds
    return out


def run_preset_benchmark(preset: str, *, steps: int = 20, warmup: int = 3, threads: int | None = None,
                         compile: bool = False, device: str = "cpu", data_root: Path | None = None) -> dict[str, Any]:
    """The preset's engine step on the plain path, with each lever alone, and on the fast path (see the module)."""
    if threads:
        torch.set_num_threads(threads)
    root = data_root or DATA
    specs = [f"sars_cov2_ct={root / 'sars_cov2_ct'}", f"covid_ct={root / 'covid_ct'}"]
    base = preset_config(preset, device)
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
    measure_path(base.replace(**PLAIN), data, steps, warmup)  # untimed: caches, allocator and threads warm up
    paths: dict[str, dict[str, float]] = {}
    order = [("plain", PLAIN)] + [(k, PLAIN | v) for k, v in levers.items()] + [("fast", None), ("plain (again)", PLAIN)]
    for name, changes in order:
        config = fast if changes is None else base.replace(**changes)
        paths[name] = measure_path(config, data, steps, warmup, resident)
    plain = (paths["plain"]["seconds"] + paths["plain (again)"]["seconds"]) / 2
    for entry in paths.values():
        entry |= {
            "images_per_s": round(batch / entry["seconds"], 1),
            "gflops": round(3 * flops * batch / entry["seconds"] / 1e9, 1),
            "of_fp32_matmul": round(3 * flops * batch / entry["seconds"] / 1e9 / peaks["fp32"], 3),
            "of_bf16_matmul": round(3 * flops * batch / entry["seconds"] / 1e9 / peaks["bf16"], 3),
            "speedup": round(plain / entry["seconds"], 2),
            "seconds": round(entry["seconds"], 4),
        }
    return {
        "preset": preset,
        "machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": device, "native_bf16": native_bf16(torch_device)},
        "config": {k: getattr(base, k) for k in ("image_size", "width", "batch_per_site", "method")},
        "fast_path": {k: getattr(fast, k) for k in PLAIN} | {"data_on_device": data_on_device(fast, torch_device)},
        "forward_gflop_per_image": round(flops / 1e9, 3),
        "matmul_gflops": {k: round(v, 1) for k, v in peaks.items()},
        "steps": steps,
        "paths": paths,
    }


def print_preset(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"preset {result['preset']} {result['config']}: {m['device']} {m['cpu_capability']} x {m['threads']} "
          f"threads, torch {m['torch']}, native bf16 {m['native_bf16']}; forward {result['forward_gflop_per_image']} "
          f"GFLOP/image; matmul GFLOP/s {result['matmul_gflops']}")
    print(f"fast path: {result['fast_path']}")
    print(f"  {'path':<16}{'s/step':>9}{'img/s':>9}{'GFLOP/s':>9}{'/fp32mm':>9}{'/bf16mm':>9}{'x plain':>9}")
    for name, r in result["paths"].items():
        extra = f"  (compiled in {r['compile_seconds']:.1f} s)" if r.get("compile_seconds") else ""
        print(f"  {name:<16}{r['seconds']:>9.4f}{r['images_per_s']:>9.1f}{r['gflops']:>9.1f}{r['of_fp32_matmul']:>9.3f}"
              f"{r['of_bf16_matmul']:>9.3f}{r['speedup']:>9.2f}{extra}")



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
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run_preset_benchmark(args.preset, steps=args.steps, warmup=args.warmup, threads=args.threads,
                                  compile=args.compile, device=args.device, data_root=args.data)
    if args.json:
        print(json.dumps(result))
    else:
        print_preset(result)
    return result


if __name__ == "__main__":
    main()
