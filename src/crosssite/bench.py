"""Speed of the paper's network on this machine, against its arithmetic limit and against the plain path.

    crosssite bench [--json]   (or: python benchmarks/bench_model.py [--json])
    options: [--steps 5] [--compile] [--width 1.0] [--image-size 224]
    crosssite bench --preset cpu|paper [--device cuda]: the preset's engine step on the real sites instead
    (`crosssite.bench_preset`; the CLI dispatches on ``--preset``)

Network: ``covidnet_redesign``, 2 sites, site-specific BN, projection head (SepNorm + contrastive), width 1,
224 px. Measured in one process (`crosssite.bench_timing`): every path of a workload is built and warmed first (the
warm-up's seconds are reported), then the paths run in turn, ``--steps`` rounds, and each figure is the median:

(a) training step of 16 + 16 images: forward, cross-entropy + contrastive loss, backward, gradient-norm
    clip 2.0, Adam step;
(b) evaluation forward of 32 images of one site;
(c) single-image latency, PNG file -> `read_image` -> `eval_transform` -> forward (p50 and p90).

Each reports images/s, achieved GFLOP/s (FLOPs of one forward from `torch.utils.flop_counter`, times 3 for
a training step), the ratio to an fp32 and a bf16 square matmul (up to 2048) measured in the same process (at
the start and at the end; the better rate counts), and peak RSS (the kernel's high-water mark, reset once the
workload is built and before it runs).

The plain path is fp32, eager, contiguous, one forward per site. Each lever is switched on alone --
one forward for the mixed-site batch, channels_last, bf16 autocast (skipped where a bf16 matmul is
slower than an fp32 one, i.e. no native bf16), torch.compile (``--compile``), and for inference ONNX Runtime on
the exported model and on its int8 quantisation (when onnx and onnxruntime are installed; the int8 ranges are
calibrated on random inputs here, which sets the speed, not the accuracy: see benchmarks/fast_path_accuracy.py)
-- and with every PyTorch lever together; the fast path is the quickest of these in this run (an ONNX Runtime
path where that is quicker). ``--json`` prints one JSON object.

The report holds the machine's load before and after (1-minute load average, runnable threads, cores), the CPU
model and its AMX / AVX-512 flags; where the load or the spread of a path's repeats says a neighbour distorted the
timings, the speed-ups are withheld from the table with the reason (``ratios_trusted`` / ``ratios_note`` in JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from crosssite.bench_timing import cpu_flags, interleaved, machine_load, ratio_verdict
from crosssite.data import eval_transform, read_image
from crosssite.inference.export import missing_onnx_packages
from crosssite.losses import supervised_contrastive_loss
from crosssite.models import create_model
from crosssite.training.precision import cpu_model

# A real slice for the latency figure: site A under $CROSSSITE_DATA, or ../shared/data beside the repository.
DATA_ROOT = Path(os.environ.get("CROSSSITE_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
SITE_A = DATA_ROOT / "sars_cov2_ct" / "COVID"


@dataclasses.dataclass(frozen=True)
class Mode:
    """A way of running the network (the plain path: every lever off)."""

    mixed: bool = False  # one forward for the 16 + 16 batch instead of one per site
    channels_last: bool = False
    bf16: bool = False  # torch.autocast(cpu, bfloat16)
    compile: bool = False
    onnx: bool = False  # inference only: `crosssite export --onnx` + ONNX Runtime (`predict model.onnx`)
    int8: bool = False  # inference only: `crosssite export --onnx --int8` + ONNX Runtime

    @property
    def replaces_torch(self) -> bool:
        """ONNX Runtime runs the network instead of PyTorch, so this path combines with no PyTorch lever."""
        return self.onnx or self.int8

    @property
    def name(self) -> str:
        on = [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]
        return "+".join(on) or "plain"


# --- measurement helpers -------------------------------------------------------------------------------


def timed(fn: Callable[[], object], steps: int, warmup: int) -> list[float]:
    """Wall seconds of ``steps`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(dtype: torch.dtype, max_n: int = 2048, steps: int = 5) -> float:
    """Square-matmul GFLOP/s in ``dtype``; the size grows from 256 while one product takes under 0.1 s."""
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        once = min(timed(lambda: a @ b, 1, warmup=1))
        if once > 0.1 or n >= max_n:
            return 2 * n**3 / statistics.median(timed(lambda: a @ b, steps, warmup=0)) / 1e9
        n *= 2


def forward_flops(width: float, image_size: int) -> float:
    """FLOPs (multiply-add = 2) of one image's forward pass."""
    model = create_model("covidnet_redesign", num_sites=2, norm="site", projection=True, width=width,
                         image_size=image_size).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, image_size, image_size), torch.tensor([0]))
    return float(counter.get_total_flops())


# --- the three workloads -------------------------------------------------------------------------------


def build(mode: Mode, width: float, image_size: int, train: bool) -> tuple[torch.nn.Module, Callable]:
    """The network for ``mode`` and the callable that runs it (compiled or not)."""
    torch.manual_seed(0)
    model = create_model("covidnet_redesign", num_sites=2, norm="site", projection=True, width=width,
                         image_size=image_size)
    model.train(train)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if mode.compile else model
    return model, run


def autocast(mode: Mode) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode.bf16 else contextlib.nullcontext()


def images(n: int, image_size: int, mode: Mode) -> torch.Tensor:
    x = torch.randn(n, 3, image_size, image_size)
    return x.contiguous(memory_format=torch.channels_last) if mode.channels_last else x


def train_step_fn(mode: Mode, width: float, image_size: int, per_site: int) -> Callable[[], None]:
    model, run = build(mode, width, image_size, train=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-7)
    x = images(2 * per_site, image_size, mode)
    site = torch.arange(2).repeat_interleave(per_site)  # (B,) 16 of site 0, then 16 of site 1
    label = torch.arange(2).repeat(per_site)  # (B,) both classes in each site

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        if mode.mixed:
            out = run(x, site)
            return out.logits, out.projection
        outs = [run(x[site == s], site[site == s]) for s in range(2)]
        return torch.cat([o.logits for o in outs]), torch.cat([o.projection for o in outs])

    def step() -> None:
        with autocast(mode):
            logits, projection = forward()
            loss = F.cross_entropy(logits.float(), label) + supervised_contrastive_loss(projection, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()

    return step


def onnx_backend(mode: Mode, width: float, image_size: int, workdir: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """The network saved as a model file, exported with `export_onnx` (site 0's statistics) and, for ``int8``,
    quantised by `quantize_int8`, run by `OnnxBackend`: what ``crosssite export`` + ``crosssite predict
    model.onnx`` do."""
    from crosssite.inference.export import OnnxBackend, export_onnx, quantize_int8
    from crosssite.models import save

    stem = workdir / f"bench_w{width}_{image_size}"
    fp32, int8 = stem.with_name(stem.name + "_fp32.onnx"), stem.with_name(stem.name + "_int8.onnx")
    if not fp32.is_file():  # built once per benchmark run, then reused by every ONNX Runtime path
        model, _ = build(Mode(), width, image_size, train=False)
        save(model, stem, {"site_names": ["a", "b"], "preprocessing": {"image_size": image_size}})
        export_onnx(stem, fp32, site="a")
    if mode.int8 and not int8.is_file():
        calibration = torch.randn(64, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        quantize_int8(fp32, int8, calibration.split(16))
    return OnnxBackend(int8 if mode.int8 else fp32).probabilities


def eval_fn(mode: Mode, width: float, image_size: int, batch: int, workdir: Path) -> Callable[[], None]:
    x = images(batch, image_size, mode)
    site = torch.zeros(batch, dtype=torch.long)
    if mode.replaces_torch:
        backend = onnx_backend(mode, width, image_size, workdir)
        return lambda: backend(x)
    _, run = build(mode, width, image_size, train=False)

    def forward() -> None:
        with torch.inference_mode(), autocast(mode):
            run(x, site)

    return forward


def png_file(tmp: Path) -> Path:
    """A real site-A slice if the data is present, else a synthetic grey PNG."""
    if SITE_A.is_dir():
        return next(iter(sorted(SITE_A.glob("*.png"))))
    file = tmp / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((300, 400)) * 255).astype(np.uint8)).save(file)
    return file


def latency_fn(mode: Mode, width: float, image_size: int, file: Path, workdir: Path) -> Callable[[], None]:
    transform = eval_transform(image_size)
    if mode.replaces_torch:
        backend = onnx_backend(mode, width, image_size, workdir)
        return lambda: backend(transform(read_image(file))[None])
    _, run = build(mode, width, image_size, train=False)
    site = torch.zeros(1, dtype=torch.long)

    def predict() -> None:
        x = transform(read_image(file))[None]  # (1, 3, H, W)
        if mode.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(mode):
            torch.softmax(run(x, site).logits.float(), 1)

    return predict


# --- driver --------------------------------------------------------------------------------------------


def report_part(times: list[float], rss: float, n_images: int, flops: float) -> dict:
    t = statistics.median(times)
    return {
        "seconds": round(t, 4),
        "images_per_s": round(n_images / t, 2),
        "gflops": round(flops / t / 1e9, 1),
        "peak_rss_gb": round(rss, 2),
    }


def add_ratios(result: dict, peaks: dict[str, float]) -> None:
    """Each workload's GFLOP/s as a fraction of the fp32 and bf16 matmul rates."""
    for part in ("train_step", "eval_batch"):
        for entry in result[part]["paths"].values():
            entry["of_fp32_matmul"] = round(entry["gflops"] / peaks["fp32"], 3)
            entry["of_bf16_matmul"] = round(entry["gflops"] / peaks["bf16"], 3)


def run_benchmark(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return _run_benchmark(args, Path(tmp))


def _combined(modes: list[Mode]) -> Mode:
    return Mode(**{f.name: any(getattr(m, f.name) for m in modes) for f in dataclasses.fields(Mode)})


def _makers(args: argparse.Namespace, part: str, modes: list[Mode], workdir: Path
            ) -> dict[str, Callable[[], Callable[[], None]]]:
    """Name -> builder of the call to time, per mode, for ``part`` (``train_step`` or ``eval_batch``)."""
    if part == "train_step":
        return {m.name: (lambda m=m: train_step_fn(m, args.width, args.image_size, args.per_site)) for m in modes}
    return {m.name: (lambda m=m: eval_fn(m, args.width, args.image_size, 2 * args.per_site, workdir)) for m in modes}


def _entries(timings: dict, batch: int, work: float) -> dict[str, dict]:
    return {name: report_part(t.times, t.peak_rss_gb, batch, work) | {"warmup_s": round(t.warmup_s, 3),
                                                                      "spread": round(t.spread, 3)}
            for name, t in timings.items()}


def _run_benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    load_before = machine_load()  # before this process adds its own load
    torch.set_num_threads(args.threads)
    steps, warmup = args.steps, args.warmup
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    flops = forward_flops(args.width, args.image_size)
    batch = 2 * args.per_site
    levers = [Mode(mixed=True), Mode(channels_last=True)]
    if peaks["bf16"] > peaks["fp32"]:  # else this CPU has no native bf16: autocast could only slow it down
        levers.append(Mode(bf16=True))
    if args.compile:
        levers.append(Mode(compile=True))
    onnx_levers = [] if missing_onnx_packages() else [Mode(onnx=True), Mode(int8=True)]
    inference_levers = levers[1:] + onnx_levers
    result: dict = {
        "machine": {
            "cpu": cpu_model(),
            **cpu_flags(),
            "load_before": load_before,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "config": {"width": args.width, "image_size": args.image_size, "per_site": args.per_site, "steps": steps},
        "forward_gflop_per_image": round(flops / 1e9, 3),
    }

    # (a) and (b): the plain path, each lever alone and every PyTorch lever together, in one interleaved run; the
    # fast path is the quickest of them (ONNX Runtime replaces PyTorch, so it combines with nothing)
    for part, candidates in (("train_step", levers), ("eval_batch", inference_levers)):
        torch_levers = [m for m in candidates if not m.replaces_torch]
        combined = [_combined(torch_levers)] if len(torch_levers) > 1 else []
        timings = interleaved(_makers(args, part, [Mode(), *candidates, *combined], workdir), steps, warmup)
        entries = _entries(timings, batch, (3 if part == "train_step" else 1) * flops * batch)
        for name, entry in entries.items():
            if name != "plain":
                entry["speedup"] = round(entries["plain"]["seconds"] / entry["seconds"], 2)
        fast = min(entries, key=lambda name: entries[name]["seconds"])
        trusted, why = ratio_verdict(timings, result["machine"]["load_before"], machine_load())
        result[part] = {"paths": entries, "fast": fast, "speedup": entries[fast].get("speedup", 1.0),
                        "ratios_trusted": trusted, "ratios_note": why}

    result["single_image"] = _latency(args, workdir, Mode(**_flags(result["eval_batch"]["fast"])))

    # the matmul rates drift on a shared machine: measured again at the end, the limit is the better of the two
    again = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    result["matmul_gflops_start_end"] = {k: [round(v, 1), round(again[k], 1)] for k, v in peaks.items()}
    peaks = {k: round(max(v, again[k]), 1) for k, v in peaks.items()}  # ratios use the figures reported
    result["matmul_gflops"] = peaks
    add_ratios(result, peaks)
    result["machine"]["load_after"] = machine_load()
    return result


def _latency(args: argparse.Namespace, workdir: Path, fast_eval: Mode) -> dict:
    """(c) single-image latency from a PNG file, plain and with the evaluation's fast path."""
    file = png_file(workdir)
    modes = list(dict.fromkeys([Mode(), fast_eval]))
    timings = interleaved({m.name: (lambda m=m: latency_fn(m, args.width, args.image_size, file, workdir))
                           for m in modes}, 4 * args.steps, args.warmup)
    latency = {
        name: {"p50_ms": round(1e3 * t.median, 1), "p90_ms": round(1e3 * float(np.percentile(t.times, 90)), 1),
               "peak_rss_gb": round(t.peak_rss_gb, 2), "warmup_ms": round(1e3 * t.warmup_s, 1)}
        for name, t in timings.items()
    }
    return {"file": str(file), "paths": latency}


def _flags(name: str) -> dict[str, bool]:
    return {} if name == "plain" else {flag: True for flag in name.split("+")}


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"{m['cpu']} ({m['cpu_capability']}, AMX {m['amx']}, AVX-512 {m['avx512']}) x {m['threads']} threads, "
          f"torch {m['torch']}; load before {m['load_before']}, after {m['load_after']}")
    print(f"forward {result['forward_gflop_per_image']} GFLOP/image; matmul GFLOP/s {result['matmul_gflops']}")
    for part in ("train_step", "eval_batch"):
        trusted = result[part]["ratios_trusted"]
        verdict = f"x{result[part]['speedup']}" if trusted else f"speed-ups withheld: {result[part]['ratios_note']}"
        print(f"\n{part} (fast path: {result[part]['fast']}, {verdict})")
        print(f"  {'path':<28}{'s':>8}{'img/s':>9}{'GFLOP/s':>9}{'/fp32mm':>9}{'/bf16mm':>9}{'RSS GB':>8}"
              f"{'warm s':>8}{'spread':>8}{'x' if trusted else '':>6}")
        for name, r in result[part]["paths"].items():
            ratio = f"{r.get('speedup', 1.0):>6.2f}" if trusted else ""
            print(f"  {name:<28}{r['seconds']:>8.3f}{r['images_per_s']:>9.2f}{r['gflops']:>9.1f}"
                  f"{r['of_fp32_matmul']:>9.3f}{r['of_bf16_matmul']:>9.3f}{r['peak_rss_gb']:>8.2f}"
                  f"{r['warmup_s']:>8.2f}{r['spread']:>8.2f}{ratio}")
    print(f"\nsingle image from {result['single_image']['file']}")
    for name, r in result["single_image"]["paths"].items():
        print(f"  {name:<28} p50 {r['p50_ms']:.1f} ms, p90 {r['p90_ms']:.1f} ms, peak RSS {r['peak_rss_gb']:.2f} GB")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--steps", type=int, default=5, help="timed runs per figure (median; latency: 4x)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--per-site", type=int, default=16, help="images per site in a training step")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--compile", action="store_true", help="also try torch.compile (slow to compile)")
    args = parser.parse_args(argv)
    result = run_benchmark(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return result


if __name__ == "__main__":
    main()
