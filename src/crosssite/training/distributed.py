"""Data-parallel training across processes (PyTorch DDP), launched by ``torchrun`` or ``crosssite train --nproc``.

    torchrun --nproc_per_node=2 -m crosssite train --site A=... --site B=... --out runs/ddp

The engine calls the helpers here; every one of them is a no-op in a single process, so the loop has one code
path. What makes N processes train like one process with the same global batch:

* Data. Every rank draws the same global batch and keeps its ``batch_per_site // N`` items of every site
  (`crosssite.data.MultiSiteBatchSampler`), so every site-specific layer is used on every rank at every step and
  DDP needs no ``find_unused_parameters``.
* Batch-norm statistics are synchronised (`convert_sync_batchnorm`): in a training forward every batch-norm slot
  -- shared or one per site, each a PyTorch `_BatchNorm` -- normalises with the mean and variance of its samples on *all* ranks, gathered with
  gradients, and updates its running statistics from them. Running statistics therefore stay identical on every
  rank and equal to the single-process ones; nothing needs reducing before evaluation.
* The contrastive loss sees the global batch: projections and labels are all-gathered (`gather`) before
  `crosssite.losses.supervised_contrastive_loss`.
* Gradient scale. DDP averages gradients over ranks, i.e. it differentiates ``(1/N) sum_r L_r`` where ``L_r`` is
  rank r's loss. Cross-entropy is a mean over the rank's (equal-sized) share, so the average of the ``L_r`` is the
  global mean. The contrastive term is computed on the gathered batch and is the same number on every rank, so
  its average is itself. For the gradient of that average to be exact, each rank's backward must carry the
  gradients of *every* rank's loss with respect to its own samples: the backward of every collective here is
  therefore an all-reduce (sum) of the incoming gradients, of which a rank keeps its own slice. With that, no
  extra loss scaling is needed (the factor is 1).

Evaluation is not sharded: every rank validates the whole validation part on its unwrapped model (identical on
every rank), so model selection needs no communication; only rank 0 writes files, and a barrier precedes loading
the best model at the end.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from crosssite.models.norms import SlotBatchNorm

__all__ = [
    "world",
    "is_active",
    "process_group",
    "local_device",
    "barrier",
    "wrap",
    "gather",
    "mean_over_ranks",
    "SyncSlotBatchNorm",
    "convert_sync_batchnorm",
]


def world() -> tuple[int, int]:
    """(rank, world_size) from the environment a distributed launcher sets; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_active() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_device(device: torch.device) -> torch.device:
    """``device`` with the GPU of this process (``LOCAL_RANK``) when it is an unindexed CUDA device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Initialise the default process group from the launcher's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) for the body, and destroy it afterwards.

    NCCL on CUDA, gloo otherwise. Nothing happens in a single process or when a group already exists (the
    caller then owns it).
    """
    _, world_size = world()
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_active():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in `DistributedDataParallel`, its batch norms synchronised (`convert_sync_batchnorm`), when a
    process group is active, else ``model`` itself.

    Every rank sees every site at every step, so every parameter receives a gradient at every step.
    """
    if not is_active():
        return model
    convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


class _AllGather(torch.autograd.Function):
    """Stack ``x`` of every rank into (world_size, *x.shape); backward: sum the gradients of every rank's
    output, keep this rank's slice (the gradient of the sum of every rank's loss with respect to ``x``)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank = dist.get_rank()
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank]


def _stack(x: Tensor) -> Tensor:
    return _AllGather.apply(x)


def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) of every rank in rank order, with gradients (``x`` itself in one process).

    Every rank must pass the same shape (the sampler gives every rank an equal share).
    """
    if not is_active():
        return x
    return _stack(x).flatten(0, 1)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (for logging the global batch's losses)."""
    if not is_active() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def _synchronised_batch_norm(slot: nn.Module, x: Tensor, momentum: float | None, eps: float) -> Tensor:
    """Training-mode batch norm of ``x`` (B, C, ...) with the statistics of the samples on every rank.

    Each rank contributes its per-channel mean and sum of squared deviations; they are combined exactly
    (Chan et al.'s parallel variance), which is stable in float32, unlike E[x^2] - E[x]^2.
    """
    world_size = dist.get_world_size()
    n = x.numel() // x.shape[1]  # values per channel on this rank; equal on every rank
    total = n * world_size
    if total <= 1:  # no batch variance anywhere: running statistics, no update (as in the single-process slot)
        return nn.functional.batch_norm(x, slot.running_mean, slot.running_var, slot.weight, slot.bias,
                                        False, 0.0, eps)
    dims = [0, *range(2, x.dim())]
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 / fp16 in float32; float64 stays float64
    mean_r = xf.mean(dim=dims)
    m2_r = (xf - _expand(mean_r, x)).square().sum(dim=dims)
    stats = _stack(torch.stack([mean_r, m2_r]))  # (world_size, 2, C)
    means, m2s = stats[:, 0], stats[:, 1]
    mean = means.mean(0)
    var = (m2s.sum(0) + n * (means - mean).square().sum(0)) / total  # biased, used to normalise
    with torch.no_grad():
        slot.num_batches_tracked.add_(1)
        factor = 1.0 / float(slot.num_batches_tracked) if momentum is None else momentum
        slot.running_mean.mul_(1 - factor).add_(mean.detach().to(slot.running_mean), alpha=factor)
        unbiased = var.detach() * (total / (total - 1))
        slot.running_var.mul_(1 - factor).add_(unbiased.to(slot.running_var), alpha=factor)
    y = (xf - _expand(mean, x)) * _expand(torch.rsqrt(var + eps) * slot.weight, x) + _expand(slot.bias, x)
    return y.to(x.dtype)


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """Per-channel (C,) to (1, C, 1, ...) broadcastable against ``like``."""
    return v.view(1, -1, *([1] * (like.dim() - 2)))


class SyncSlotBatchNorm(SlotBatchNorm):
    """A `SlotBatchNorm` whose training forward (with gradients) normalises with the statistics of its samples
    on every rank and updates its running statistics from them; anything else (evaluation, a forward under
    ``torch.no_grad`` such as BN recalibration, one process) is the plain slot.

    (`torch.nn.SyncBatchNorm` does the same on GPUs only; this serves gloo on CPUs as well.)
    """

    def forward(self, input: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled() and is_active():
            return _synchronised_batch_norm(self, input, self.momentum, self.eps)
        return super().forward(input)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Turn every `SlotBatchNorm` of ``model`` (shared or per-site BN) into a `SyncSlotBatchNorm`, in place: the
    same parameters and buffers, so state dicts and saved models do not change."""
    for module in model.modules():
        if type(module) is SlotBatchNorm:
            module.__class__ = SyncSlotBatchNorm
    return model
