"""One optimiser step, and the learning rate of each step: what every trainer (central, data-parallel,
federated client) runs.

The learning rate is a pure function of the global step (`crosssite.training.schedule`), so resuming needs only
the step count.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from crosssite import models
from crosssite.errors import ConfigError
from crosssite.training import distributed
from crosssite.training.config import TrainConfig
from crosssite.training.methods import METHODS, Method, compute_loss, model_kwargs
from crosssite.training.precision import resolve_precision
from crosssite.training.schedule import lr_at

__all__ = ["learning_rate", "train_step", "epoch_steps", "autocast", "resolve_device", "make_optimizer", "batch_sites",
           "build_model", "input_dtype", "weight_average", "CompiledForward"]


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``epochs`` epochs, in the backbone's schedule
    (`crosssite.models.model_config`: step decay for `covidnet`, cosine for the redesign; `schedule.lr_at`)."""
    kind = models.model_config(config.backbone).schedule
    return lr_at(step, steps_per_epoch=steps_per_epoch, epochs=epochs, lr=config.lr, lr_min=config.lr_min,
                 kind=kind, per=config.schedule_per)


def train_step(
    model: nn.Module,
    forward: Callable[..., models.ModelOutput],
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    method: Method,
    config: TrainConfig,
    device: torch.device,
    *,
    lr: float,
    on_diverged: Callable[[str, dict[str, float]], None],
    penalty: Callable[[], Tensor] | None = None,
) -> dict[str, float]:
    """One optimiser step on a mixed-site batch: forward, `compute_loss` (+ ``penalty()`` as ``prox``), backward,
    gradient clipping, update. Returns the loss parts (and ``loss``) as floats, averaged over ranks.

    ``forward`` is ``model`` or its DDP / compiled wrapper. ``on_diverged(what, values)`` is called (and must raise)
    when the loss or the gradient norm is not finite, before the weights are touched.
    """
    images = batch["image"].to(device, input_dtype(model), non_blocking=True)  # (B, 3, H, W)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = batch["label"].to(device, non_blocking=True)  # (B,)
    site = batch_sites(batch, config, device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(config, device):
        out = forward(images, site)
    total, parts = compute_loss(out, labels, method, config, gather=distributed.gather)
    if penalty is not None:
        parts["prox"] = penalty()
        total = total + parts["prox"]
    values = {"loss": float(total.detach())} | {k: float(v.detach()) for k, v in parts.items()}
    values = distributed.mean_over_ranks(values)  # the global batch's losses, on every rank
    if not math.isfinite(values["loss"]):
        on_diverged("loss", values)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if config.grad_clip > 0:
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
        if not math.isfinite(norm):
            on_diverged("gradient norm", values | {"grad_norm": norm})
    optimizer.step()
    return values


class CompiledForward:
    """``torch.compile(module)`` (inductor), called like ``module``; if compiling fails, one line says why and every
    later call runs ``module`` eagerly. The first call, which compiles, is timed (``compile_seconds``): with the
    static site layout the graph depends only on the batch's shape, so one compilation serves every step, and
    torch's on-disk inductor cache serves later runs of the same shapes.
    """

    def __init__(self, module: nn.Module, log: Callable[[str], None] = print) -> None:
        self.module, self.log = module, log
        self.compiled: Callable[..., Any] | None = torch.compile(module)
        self.compile_seconds: float | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.module(*args)
        start = time.perf_counter()
        try:
            out = self.compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.log(f"warning: torch.compile failed ({type(e).__name__}: {first}); running eagerly")
            self.compiled = None
            return self.module(*args)
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - start
            self.log(f"torch.compile: first step (compilation) took {self.compile_seconds:.1f} s")
        return out


def batch_sites(batch: dict[str, Any], config: TrainConfig, device: torch.device) -> Tensor | models.SiteLayout:
    """The sites of a training batch as the model takes them: its per-site runs as Python ints
    (`crosssite.models.SiteLayout`: no host sync, static shapes) when ``static_layout`` is on and the loader
    collated them, else the (B,) site tensor on ``device``."""
    if config.static_layout and "site_runs" in batch:
        return models.SiteLayout(batch["site_runs"])
    return batch["site"].to(device, non_blocking=True)


def build_model(config: TrainConfig, num_sites: int, device: torch.device) -> nn.Module:
    """The network ``config`` trains (its method's model options on its backbone), on ``device``, in channels_last
    memory format when ``config.channels_last``."""
    model = models.create_model(
        config.backbone,
        **model_kwargs(METHODS[config.method], config.backbone, num_sites=num_sites, width=config.width,
                       block_act=config.block_act, init=config.init, mixstyle=config.mixstyle,
                       standardise_input=config.standardise_input, image_size=config.image_size),
    ).to(device, torch.float64 if resolve_precision(config, device) == "fp64" else None)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def input_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype ``model``'s weights hold, which its inputs are cast to (float64 under ``precision=fp64``;
    bf16 autocast keeps float32 weights and casts inside the forward pass)."""
    return next(model.parameters()).dtype


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s parameters and buffers (``torch.optim.swa_utils``), to update
    with ``.update_parameters(model)`` after every optimiser step; None when ``decay`` is 0."""
    if decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Adam:
    """Adam over ``model``'s parameters (``fused_adam``: one fused kernel for every parameter, on CPU and CUDA)."""
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                            fused=config.fused_adam or None)


def autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when the run's (resolved) precision is bf16, else nothing."""
    if resolve_precision(config, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    """The device ``name`` (``auto``: CUDA when available, else the CPU); a missing CUDA is a `ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but no CUDA device is available")
    return torch.device(name)


def epoch_steps(
    loader: Any, epoch: int, start_step: int, step: Callable[[dict[str, Tensor], int], dict[str, float]]
) -> Iterator[tuple[dict[str, Tensor], dict[str, float]]]:
    """One epoch of optimiser steps: the loader's multi-site sampler set to ``epoch`` and resumed at
    ``start_step``; ``step(batch, i)`` (``i``: the step's index in the epoch) runs each step, and every batch is
    yielded with the loss values it returned. Central training and each federated client run their epochs here."""
    sampler = loader.batch_sampler
    sampler.set_epoch(epoch)
    sampler.start_step = start_step
    for i, batch in enumerate(loader, start_step):
        yield batch, step(batch, i)
