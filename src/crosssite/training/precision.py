"""Which arithmetic a run uses: ``precision="auto"`` becomes ``"bf16"`` or ``"fp32"`` when the run starts.

bf16 autocast pays only where the hardware multiplies bf16 natively (CUDA GPUs from Ampere on; CPUs with
AVX512-BF16 or AMX) and only when the network is large enough for its convolutions to dominate the step: at the
cpu preset's size (0.07 GFLOP per image forward) the casts cost more than the faster arithmetic saves (0.96x on a
Zen 4 EPYC with AVX512-BF16), at the paper's size (12.3 GFLOP) it is the largest lever (docs/PERFORMANCE.md). The
resolved value is what the run's ``config.yaml`` stores, so a run and its resume compute in the same precision on
any machine, and a small preset gives the same numbers on every CPU kind.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from crosssite.training.config import TrainConfig

__all__ = ["BF16_MIN_GFLOP", "cpu_model", "native_bf16", "forward_gflop", "resolve_precision"]

# Forward GFLOP per image from which bf16 autocast is chosen on hardware with native bf16 (measured:
# docs/PERFORMANCE.md, `crosssite bench --preset`).
BF16_MIN_GFLOP = 1.0


@functools.cache
def _cpuinfo(key: str) -> str | None:
    """The first ``key : value`` of /proc/cpuinfo (None where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == key:
            return line.split(":", 1)[1].strip()
    return None


def _cpu_flags() -> frozenset[str]:
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows: wall times are quoted with it."""
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or
    AMX-BF16 (read from /proc/cpuinfo; False where that cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@functools.cache
def forward_gflop(backbone: str, width: float, image_size: int) -> float:
    """GFLOP (multiply-add = 2) of one image's forward pass of ``backbone`` with two site-specific BN copies."""
    from torch.utils.flop_counter import FlopCounterMode

    from crosssite.models import create_model

    model = create_model(backbone, num_sites=2, norm="site", width=width, image_size=image_size).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size), torch.tensor([0]))
    return counter.get_total_flops() / 1e9


def resolve_precision(config: TrainConfig, device: torch.device) -> str:
    """``config.precision``, with ``"auto"`` resolved: bf16 where `native_bf16` and the forward pass is at least
    `BF16_MIN_GFLOP` per image, else fp32."""
    if config.precision != "auto":
        return config.precision
    large = forward_gflop(config.backbone, config.width, config.image_size) >= BF16_MIN_GFLOP
    return "bf16" if large and native_bf16(device) else "fp32"
