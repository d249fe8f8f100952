"""The one training loop behind every method: `train` -> one `_Loop` per model (per site for `single`).

    metrics = train(TrainConfig(method="sepnorm-contrastive", epochs=100), sites, Path("runs/ours"))

The run directory's files are written and read by `crosssite.rundir`; a step is `crosssite.training.step.train_step`
(the loss: the method's `compute_loss`); validation, scoring, collapse check, BN recalibration: `training.validation`.
With ``ema_decay`` > 0 the loop keeps an exponential moving average of the weights (`step.weight_average`), updated
after every step: the average is recalibrated, validated, selected, saved and checkpointed beside the raw weights.
Method `single` trains one run per site in ``out_dir/<site>/`` with the multi-site rows' batch and step count.

Resuming: the learning rate is a pure function of the global step, so resuming needs only the counters, the model,
the optimiser and the random generators saved in ``last.pt``; the batch sampler skips the steps of the interrupted
epoch that were already done, so a resumed run makes exactly as many optimiser steps as an uninterrupted one (and,
with ``workers=0`` on CPU, ends with the same weights). A checkpoint is written only when every parameter and
buffer is finite.

Distributed data parallel (``torchrun --nproc_per_node=N -m crosssite train ...``): ``rank``/``world_size`` come
from the environment, the sampler is sharded by rank, the model is wrapped in `DistributedDataParallel`, batch-norm
statistics and the contrastive batch are synchronised across ranks, and only rank 0 writes files
(`crosssite.training.distributed`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from crosssite import models
from crosssite.data import Site, load_sites
from crosssite.errors import TrainingDiverged, TrainingError
from crosssite.rundir import (CHECKPOINT, METRICS, MODEL_STEM, PREDICTIONS, json_safe, model_card, undo_failed_start,
                              write_json, write_predictions, write_run_files, write_sites)
from crosssite.training import distributed
from crosssite.training.checkpoint import load_checkpoint, non_finite_tensors, rng_state, save_checkpoint, set_rng_state
from crosssite.training.config import TrainConfig, resumed_config, save_config, with_recipe
from crosssite.training.data import RunData, build_run_data, multi_site_steps
from crosssite.training.methods import METHODS, Method
from crosssite.training.precision import resolve_precision
from crosssite.training.progress import ProgressBar, TensorBoard, write_log_csv
from crosssite.training.step import (CompiledForward, build_model, epoch_steps, learning_rate, make_optimizer,
                                     resolve_device, train_step, weight_average)
from crosssite.training.validation import merge_site_runs, recalibrate_bn, run_metrics, score_part, validate_epoch

__all__ = ["TrainingError", "TrainingDiverged", "train"]


# ------------------------------------------------------------------------------------------------ state


@dataclass
class RunState:
    """Counters of a run; saved in ``last.pt`` with the model, optimiser and RNG states."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimiser steps done in the current (unfinished) epoch
    global_step: int = 0  # optimiser steps done in the whole run
    best_metric: float = -math.inf
    best_epoch: int = 0  # 1-based epoch of the saved best model (0: none yet)
    finished: bool = False
    # running sums of the current epoch (so a resumed epoch logs the same means)
    loss_sums: dict[str, float] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # rows of log.csv

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------- train


def train(
    config: TrainConfig,
    sites: Sequence[Site | str],
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``config.method`` (its recipe in the keys ``config`` was not given) on ``sites`` into ``out_dir``;
    return the metrics written to ``metrics.json``.

    Args:
        sites: loaded sites or ``NAME=PATH[:LAYOUT]`` specs; a site's position is its integer id.
        resume: continue the run in ``out_dir`` from ``checkpoints/last.pt`` (a finished run returns its
            metrics; a directory without a checkpoint starts a fresh run). Without it, a directory that
            already holds a run is an error.
        progress: show a progress bar (only on a terminal) and print one line per epoch.
    """
    sites = load_sites(sites)
    config = with_recipe(config)
    device = resolve_device(config.device)
    config = config.replace(precision=resolve_precision(config, device))  # "auto" -> what this run computes in
    with distributed.process_group(device), undo_failed_start(out_dir):
        return _train_sites(config, sites, Path(out_dir), resume, progress)


def _train_sites(config: TrainConfig, sites: list[Site], out_dir: Path, resume: bool, progress: bool) -> dict[str, Any]:
    method = METHODS[config.method]
    if not resume and (out_dir / "sites.json").is_file():
        raise TrainingError(f"{out_dir}: already holds a run; resume it or use a new folder")
    distributed.barrier()  # every rank has checked the folder before rank 0 writes to it
    is_main = distributed.world()[0] == 0
    if is_main:
        write_sites(out_dir, sites)
    if not method.per_site:
        return _train_run(config, sites, out_dir, resume, progress)
    if is_main:
        save_config(config, out_dir / "config.yaml")
    # One site per run, with the multi-site rows' global batch (batch_per_site x sites, 32) and step count.
    site_config = config.replace(batch_per_site=config.batch_per_site * len(sites),
                                 steps_per_epoch=config.steps_per_epoch or multi_site_steps(sites, config))
    per_site = {}
    for site in sites:
        if progress and is_main:
            print(f"[{config.method}] site {site.name}: batch {site_config.batch_per_site}, "
                  f"{site_config.steps_per_epoch} steps per epoch")
        per_site[site.name] = _train_run(site_config, [site], out_dir / site.name, resume, progress)
    merged = merge_site_runs(config, per_site)
    if is_main:
        write_json(out_dir / METRICS, merged)
    return merged


def _train_run(config: TrainConfig, sites: list[Site], out_dir: Path, resume: bool, progress: bool) -> dict[str, Any]:
    """One model on ``sites``: the loop, best-model selection on validation, final test evaluation."""
    rank, world_size = distributed.world()
    is_main = rank == 0
    ckpt_path = out_dir / CHECKPOINT
    saved = None
    if ckpt_path.is_file():
        if not resume:
            raise TrainingError(f"{out_dir}: already holds a run (checkpoints/last.pt); resume it or use a new folder")
        saved = load_checkpoint(ckpt_path)
        config = resumed_config(config, saved["config"], ckpt_path)
        if saved["state"]["finished"] and (out_dir / METRICS).is_file():
            return json.loads((out_dir / METRICS).read_text())

    method = METHODS[config.method]
    device = distributed.local_device(resolve_device(config.device))
    _seed_everything(config.seed)
    data = build_run_data(
        config, sites, out_dir / "split.json", reuse_split=saved is not None, rank=rank, world_size=world_size,
        progress=progress, pin_memory=device.type == "cuda", device=device,
    )
    if is_main:
        write_run_files(out_dir, data.sites, data.splits, data.cache, new_split=saved is None)
        save_config(config, out_dir / "config.yaml")

    model = build_model(config, len(sites), device)
    optimizer = make_optimizer(model, config)
    ema = weight_average(model, config.ema_decay)
    state = RunState()
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        state = RunState(**saved["state"])
        set_rng_state(saved["rng"])
    forward = distributed.wrap(model, device)
    forward = CompiledForward(forward) if config.compile else forward

    loop = _Loop(config, method, data, model, forward, optimizer, ema, state, device, out_dir, is_main, progress)
    if not state.finished:
        loop.run()
    return loop.finish()


class _Loop:
    """The epoch / step loop of one run and its bookkeeping (checkpoints, log, best model)."""

    def __init__(
        self,
        config: TrainConfig,
        method: Method,
        data: RunData,
        model: nn.Module,
        forward: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: AveragedModel | None,
        state: RunState,
        device: torch.device,
        out_dir: Path,
        is_main: bool,
        progress: bool,
    ) -> None:
        self.config, self.method, self.data = config, method, data
        self.model, self.forward, self.optimizer, self.ema, self.state = model, forward, optimizer, ema, state
        # what is validated, selected and saved: the weight average when there is one
        self.eval_model = ema.module if ema is not None else model
        self.device, self.out_dir, self.is_main, self.progress = device, out_dir, is_main, progress
        self.steps_per_epoch = data.steps_per_epoch
        self.total_steps = config.epochs * self.steps_per_epoch
        self.site_names = [s.name for s in data.sites]
        self.tensorboard: TensorBoard | None = None

    # ---------------------------------------------------------------------------------------- steps

    def lr(self, step: int) -> float:
        return learning_rate(self.config, step, self.steps_per_epoch, self.config.epochs)

    def step(self, batch: dict[str, Tensor], epoch: int) -> dict[str, float]:
        """One optimiser step on a mixed-site batch; returns the loss parts (and ``loss``) as floats."""
        values = train_step(
            self.model, self.forward, self.optimizer, batch, self.method, self.config, self.device,
            lr=self.lr(self.state.global_step), on_diverged=lambda what, values: self.diverged(epoch, what, values),
        )
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return values

    def diverged(self, epoch: int, what: str, values: dict[str, float]) -> None:
        s = self.state
        parts = "".join(f", {k}={v:.4g}" for k, v in values.items())
        kept = self.out_dir / CHECKPOINT
        where = f"last good checkpoint kept: {kept}" if kept.is_file() else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"non-finite {what} at global step {s.global_step + 1} (epoch {epoch + 1}, step "
            f"{s.step_in_epoch + 1} of {self.steps_per_epoch}){parts}; {where}"
        )

    # ----------------------------------------------------------------------------------------- loop

    def run(self) -> None:
        s, c = self.state, self.config
        bar = ProgressBar(self.total_steps, s.global_step, enabled=self.progress and self.is_main,
                          description=f"{c.method} {'/'.join(self.site_names)}")
        self.tensorboard = TensorBoard(self.out_dir / "tb", enabled=self.is_main)
        try:
            for epoch in range(s.epoch, c.epochs):
                self.model.train()
                tick = time.perf_counter()
                steps = epoch_steps(self.data.train, epoch, s.step_in_epoch, lambda batch, _: self.step(batch, epoch))
                for batch, values in steps:
                    s.global_step += 1
                    s.step_in_epoch += 1
                    for k, v in values.items():
                        s.loss_sums[k] = s.loss_sums.get(k, 0.0) + v
                    s.images += len(batch["label"])
                    now = time.perf_counter()
                    s.seconds += now - tick
                    tick = now
                    if s.global_step % c.log_every == 0 or s.step_in_epoch == self.steps_per_epoch:
                        speed = s.images / max(s.seconds, 1e-9)
                        bar.update(s.global_step, f"loss {values['loss']:.4f}  {speed:.1f} img/s")
                        self.tensorboard.scalars({f"train/{k}": v for k, v in values.items()}, s.global_step)
                    if c.ckpt_every and s.global_step % c.ckpt_every == 0 and s.step_in_epoch < self.steps_per_epoch:
                        self.save_checkpoint()
                self.end_epoch(epoch, bar)
        finally:
            bar.close()
            self.tensorboard.close()

    def end_epoch(self, epoch: int, bar: ProgressBar) -> None:
        """Validate (every `eval_every` epochs and at the end), log, keep the best model, checkpoint."""
        s, c = self.state, self.config
        row: dict[str, Any] = {"epoch": epoch + 1, "step": s.global_step, "lr": self.lr(s.global_step - 1)}
        row |= {k: v / max(s.step_in_epoch, 1) for k, v in s.loss_sums.items()}
        if (epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs:
            self.check_finite(epoch)
            if self.data.recalibration is not None:
                recalibrate_bn(self.eval_model, self.data.recalibration, self.device, c)
            val, scores = validate_epoch(self.eval_model, self.data, self.device, c, epoch)
            row |= scores
            if row["collapsed"]:
                bar.print(f"warning: collapsed predictions at epoch {epoch + 1}: the std of P(COVID) over a "
                          f"validation part is below {c.collapse_std:g}")
            metric = scores["val_selection"]
            if metric > s.best_metric:
                s.best_metric, s.best_epoch = metric, epoch + 1
                if self.is_main:
                    self.save_best(val, epoch + 1)
        row |= {"images_per_s": s.images / max(s.seconds, 1e-9), "time_s": s.seconds}
        s.history.append(row)
        s.epoch, s.step_in_epoch = epoch + 1, 0
        s.loss_sums, s.images, s.seconds = {}, 0, 0.0
        if self.is_main:
            write_log_csv(self.out_dir / "log.csv", s.history)
            self.tensorboard.scalars({f"val/{k}": v for k, v in row.items() if k.startswith("val_")}, s.global_step)
            self.save_checkpoint()
        shown = " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and "_p_std_" not in k)
        shown += " COLLAPSED" if row.get("collapsed") else ""
        bar.print(f"epoch {epoch + 1}/{c.epochs} step {s.global_step} {shown}")

    # ----------------------------------------------------------------------------------------- files

    def check_finite(self, epoch: int) -> None:
        """Raise `TrainingDiverged` (before anything is saved) if a parameter or buffer is not finite."""
        bad = non_finite_tensors(self.model) + (non_finite_tensors(self.eval_model) if self.ema is not None else [])
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            self.diverged(epoch, f"values in {len(bad)} parameter/buffer tensor(s) ({shown})", {})

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        self.check_finite(self.state.epoch)  # a checkpoint counts as good only when every tensor is finite
        save_checkpoint(self.out_dir / CHECKPOINT, {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "state": self.state.to_dict(),
            "rng": rng_state(),
            "sites": [{"name": s.name, "layout": s.layout, "root": str(s.root)} for s in self.data.sites],
        })

    def save_best(self, val: dict[str, dict[str, float]], epoch: int) -> None:
        metrics = {"val": val, "epoch": epoch, "selection": "mean validation AUC over sites"}
        card = model_card(self.config.to_dict(), self.site_names, self.config.method, metrics, self.data.mean,
                          self.data.std)
        models.save(self.eval_model, self.out_dir / MODEL_STEM, card)

    def finish(self) -> dict[str, Any]:
        """Evaluate the best model on every site's validation and test parts; write metrics and predictions."""
        distributed.barrier()  # rank 0 has written the best model
        best, _ = models.load(self.out_dir / MODEL_STEM, map_location=self.device)
        best = best.to(memory_format=torch.channels_last) if self.config.channels_last else best
        val, val_rows = score_part(best, self.data, "val", self.device, self.config)
        test, test_rows = score_part(best, self.data, "test", self.device, self.config)
        metrics = run_metrics(self.config, self.data, val, test, val_rows, self.state)
        if metrics["collapsed"] and self.progress:
            print(f"warning: the best model's predictions have collapsed (std of P(COVID) over a validation part "
                  f"below {self.config.collapse_std:g}); its metrics are not a result")
        s = self.state
        metrics = json_safe(metrics)
        if self.is_main:
            write_predictions(self.out_dir / PREDICTIONS, val_rows + test_rows)
            write_json(self.out_dir / METRICS, metrics)
            s.finished = True
            self.save_checkpoint()
        return metrics
