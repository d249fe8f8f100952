"""The one training loop behind every method of the paper's Table I.

    metrics = train(TrainConfig(method="sepnorm-contrastive", epochs=100), sites, Path("runs/ours"))

A run directory holds:

    config.yaml           the resolved configuration
    sites.json            the sites as given (name, path, layout), so `--resume` needs no --site
    split.json            per site the train / val / test indices and files (crosssite.data.Split)
    log.csv               one row per epoch: losses, learning rate, validation AUC per site, images/s, time
    checkpoints/last.pt   the full training state, written every `ckpt_every` steps and at each epoch end
    model.safetensors     the best model (highest mean validation AUC over sites; never chosen on test)
    model.json            its model card (architecture, sites, classes, preprocessing, config, val metrics)
    metrics.json          validation and test metrics of the best model, per site
    predictions.csv       the best model's P(COVID) for every validation and test slice
    skipped.json          unreadable files left out (only with `skip_bad`)

Method `single` trains one such run per site in ``out_dir/<site name>/`` and merges their metrics.

Every step draws ``batch_per_site`` slices from each site and runs one forward pass over the mixed batch; the
loss is the universal head's cross-entropy plus the method's terms (`compute_loss`). Every `eval_every` epochs
(and after the last) the model is validated on each site's validation part -- with ``bn_recalibrate``, after its
batch-norm statistics are recomputed on the training part (`recalibrate_bn`) -- and the best mean AUC over sites
is kept as ``model.safetensors``.

The learning rate is a pure function of the global step (`crosssite.training.schedule`), so resuming needs only
the counters, the model, the optimiser and the random generators saved in ``last.pt``; the batch sampler skips
the steps of the interrupted epoch that were already done, so a resumed run makes exactly as many optimiser steps
as an uninterrupted one (and, with ``workers=0`` on CPU, ends with the same weights).

Distributed data parallel (``torchrun --nproc_per_node=N -m crosssite train ...``): ``rank``/``world_size`` are
read from the environment, the sampler is sharded by rank, `train` initialises the process group, the model is
wrapped in `DistributedDataParallel`, batch-norm statistics and the contrastive batch are synchronised across
ranks, and only rank 0 writes files; see `crosssite.training.distributed` for why N processes compute what one
process computes on the same global batch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosssite import models
from crosssite.data import CLASS_NAMES, Site, load_sites
from crosssite.errors import ConfigError, CrossSiteError
from crosssite.evaluation import binary_metrics, collect_probabilities
from crosssite.losses import ms_net_loss, supervised_contrastive_loss
from crosssite.training import distributed
from crosssite.training.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from crosssite.training.config import TrainConfig, save_config
from crosssite.training.data import RunData, build_run_data, multi_site_steps, write_run_files
from crosssite.training.methods import METHODS, Method, model_kwargs
from crosssite.training.progress import ProgressBar, TensorBoard, write_log_csv
from crosssite.training.rundir import undo_failed_start
from crosssite.training.schedule import lr_at

__all__ = ["TrainingError", "TrainingDiverged", "train", "train_step", "learning_rate", "compute_loss", "evaluate", "recalibrate_bn",
           "site_spec", "load_site_specs", "json_safe", "model_card", "write_json", "write_predictions",
           "resolve_device", "RUNTIME_KEYS"]

# Keys that may change when a run is resumed: they change speed or bookkeeping, not what is computed.
RUNTIME_KEYS = ("workers", "device", "compile", "channels_last", "log_every", "ckpt_every")

CHECKPOINT = Path("checkpoints") / "last.pt"
MODEL_STEM = "model"


class TrainingError(CrossSiteError):
    """A run that cannot start or continue (run directory in use, mismatching resume, ...)."""


class TrainingDiverged(TrainingError):
    """The loss, the gradient norm, a parameter or a buffer became NaN or infinite; the last good (finite)
    checkpoint is kept."""


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` holding a NaN or an infinity."""
    return [name for name, t in model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


# ------------------------------------------------------------------------------------------------- loss


def compute_loss(
    out: models.ModelOutput,
    labels: Tensor,
    method: Method,
    config: TrainConfig,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and its unweighted parts: ``ce`` (+ ``con``) (+ ``aux_ce``, ``kt``), all in float32.

    total = ce + alpha * con + aux_ce + kt_weight * kt

    ``gather`` (data-parallel training) maps a rank's projections and labels to the global batch's, on which the
    contrastive term is computed.
    """
    parts = {"ce": F.cross_entropy(out.logits.float(), labels)}
    if method.contrastive:
        projection, con_labels = (gather(out.projection), gather(labels)) if gather else (out.projection, labels)
        parts["con"] = supervised_contrastive_loss(projection, con_labels, config.tau, config.contrastive_form)
    if method.knowledge_transfer:
        parts.update(ms_net_loss(out.logits, out.aux_logits, labels, config.kt_temperature))
    weights = {"con": config.alpha, "kt": config.kt_weight}
    total = sum(weights.get(name, 1.0) * value for name, value in parts.items())
    return total, parts


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``epochs`` epochs: step decay for `covidnet`, else
    cosine (`crosssite.training.schedule.lr_at`)."""
    kind = "step" if config.backbone == "covidnet" else "cosine"
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
    images = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = batch["label"].to(device, non_blocking=True)  # (B,)
    site = batch["site"].to(device, non_blocking=True)  # (B,)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with _autocast(config, device), distributed.synchronised_norms(model):
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


def resolve_device(config: TrainConfig) -> torch.device:
    """The device ``config.device`` names (``auto``: CUDA when available, else the CPU)."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is available")
    return torch.device(config.device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if config.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _resumed_config(config: TrainConfig, saved: dict[str, Any], where: Path) -> TrainConfig:
    """The saved config with the runtime keys of ``config``; any other difference is an error."""
    saved_config = TrainConfig(**saved)
    differ = [k for k in saved if k not in RUNTIME_KEYS and getattr(config, k) != saved[k]]
    if differ:
        changes = ", ".join(f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in differ)
        raise TrainingError(f"{where}: cannot resume with a different configuration ({changes})")
    return saved_config.replace(**{k: getattr(config, k) for k in RUNTIME_KEYS})


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(
    model: nn.Module, data: RunData, part: str, device: torch.device, config: TrainConfig
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Metrics per site on ``part`` (``val`` / ``test``) and one prediction row per slice."""
    with _autocast(config, device):
        probs = collect_probabilities(model, data.eval[part], device)
    metrics, rows = {}, []
    for s, site in enumerate(data.sites):
        mine = probs.site == s
        metrics[site.name] = binary_metrics(probs.label[mine], probs.p_covid[mine])
        for index, label, p in zip(probs.index[mine], probs.label[mine], probs.p_covid[mine]):
            sample = site.samples[index]
            rows.append({"site": site.name, "path": str(sample.path), "frame": sample.frame,
                         "patient": sample.patient if site.has_patients else None,
                         "label": int(label), "p_covid": float(p), "part": part})
    return metrics, rows


def prediction_spread(rows: list[dict[str, Any]], site_names: Sequence[str]) -> dict[str, float]:
    """Standard deviation of P(COVID) over each site's rows (NaN for a site without rows)."""
    return {name: float(np.std([r["p_covid"] for r in rows if r["site"] == name]))
            if any(r["site"] == name for r in rows) else float("nan") for name in site_names}


def collapsed_sites(spread: dict[str, float], threshold: float) -> list[str]:
    """Sites whose predictions barely vary (std of P(COVID) below ``threshold``): a collapsed model."""
    return [name for name, std in spread.items() if std < threshold]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Any, device: torch.device, config: TrainConfig) -> None:
    """Recompute every batch-norm running mean and variance as the plain average over ``loader``'s batches.

    Running statistics kept with momentum 0.1 trail a network that changes quickly (high learning rates, short
    runs) and are estimated on augmented crops; re-estimating them after training on the evaluation view of the
    training part ("precise BN", Wu & Johnson 2021) removes both gaps. ``loader`` draws its batches as the
    training sampler does (`RunData.recalibration`), so a shared BN mixes the sites in training's proportions.
    Weights are not touched.
    """
    norms = [m for m in model.modules() if hasattr(m, "momentum") and any(
        hasattr(b, "running_mean") for b in m.modules())]
    stats = [m for m in model.modules() if isinstance(getattr(m, "running_mean", None), Tensor)]
    for m in stats:
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
        m.num_batches_tracked.zero_()
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.momentum = None  # cumulative average
    model.train()
    try:
        with _autocast(config, device):
            for batch in loader:
                model(batch["image"].to(device, non_blocking=True), batch["site"].to(device, non_blocking=True))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def _selection_metric(val: dict[str, dict[str, float]]) -> float:
    """Mean validation AUC over sites (mean accuracy if no site's AUC is defined)."""
    aucs = [m["auc"] for m in val.values() if not math.isnan(m["auc"])]
    if aucs:
        return float(np.mean(aucs))
    return float(np.mean([m["accuracy"] for m in val.values()]))


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


_NORM_TEXT = {"train": "pixel mean / std of the run's training part", "fixed": "fixed constants (crosssite 0.1)"}
_FRAME_TEXT = {
    "resize": "whole slice resized to a square",
    "pad": "whole slice padded to a square (median border grey), then resized",
    "crop": "short side to image_size, central square",
}


def model_card(
    config: TrainConfig, site_names: list[str], method: str, metrics: dict[str, Any], data: RunData
) -> dict[str, Any]:
    """The card saved beside a trained model: what `crosssite evaluate` / `predict` / `export` need to use it
    (sites, classes, preprocessing with the run's own normalisation, threshold) and how it was made
    (configuration, method, selection metrics)."""
    return {
        "site_names": list(site_names),
        "class_names": list(CLASS_NAMES),
        "preprocessing": {"image_size": config.image_size, "frame": config.frame, "mean": list(data.mean),
                          "std": list(data.std), "normalisation": _NORM_TEXT[config.input_norm],
                          "eval_resize": _FRAME_TEXT[config.frame]},
        "train_config": config.to_dict(),
        "method": method,
        "threshold": 0.5,
        "metrics": json_safe(metrics),
    }


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["site", "path", "frame", "patient", "label", "p_covid", "part"],
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        frame = "" if row["frame"] is None else row["frame"]
        patient = "" if row.get("patient") is None else row["patient"]
        writer.writerow({**row, "frame": frame, "patient": patient, "p_covid": repr(float(row["p_covid"]))})
    atomic_write_text(path, buffer.getvalue())


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=2) + "\n")


# ------------------------------------------------------------------------------------------------- train


def train(
    config: TrainConfig,
    sites: Sequence[Site | str],
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``config.method`` on ``sites`` into ``out_dir``; return the metrics written to ``metrics.json``.

    Args:
        sites: loaded sites or ``NAME=PATH[:LAYOUT]`` specs; a site's position is its integer id.
        resume: continue the run in ``out_dir`` from ``checkpoints/last.pt`` (a finished run returns its
            metrics; a directory without a checkpoint starts a fresh run). Without it, a directory that
            already holds a run is an error.
        progress: show a progress bar (only on a terminal) and print one line per epoch.
    """
    sites = load_sites(sites)
    with distributed.process_group(resolve_device(config)), undo_failed_start(out_dir):
        return _train_sites(config, sites, Path(out_dir), resume, progress)


def _train_sites(config: TrainConfig, sites: list[Site], out_dir: Path, resume: bool, progress: bool) -> dict[str, Any]:
    method = METHODS[config.method]
    if not resume and (out_dir / "sites.json").is_file():
        raise TrainingError(f"{out_dir}: already holds a run; resume it or use a new folder")
    distributed.barrier()  # every rank has checked the folder before rank 0 writes to it
    is_main = distributed.world()[0] == 0
    if is_main:
        write_json(out_dir / "sites.json", {"sites": [site_spec(site) for site in sites]})
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
    merged = _merge_single(config, per_site)
    if is_main:
        write_json(out_dir / "metrics.json", merged)
    return merged


def site_spec(site: Site) -> dict[str, str | None]:
    """``{"name", "path", "layout"}`` from which `crosssite.data.load_site` reloads ``site`` (``sites.json``)."""
    if site.layout == "synthetic":
        options = ",".join(f"{k}={v}" for k, v in sorted(site.params.items()))
        return {"name": site.name, "path": f"synthetic:{options}", "layout": "synthetic"}
    return {"name": site.name, "path": str(site.root), "layout": site.layout}


def load_site_specs(out_dir: str | Path) -> list[Site]:
    """The sites a run in ``out_dir`` was trained on, reloaded from its ``sites.json``."""
    path = Path(out_dir) / "sites.json"
    if not path.is_file():
        raise TrainingError(f"{path}: not found; give the sites with --site")
    entries = json.loads(path.read_text())["sites"]
    return load_sites([(e["name"], e["path"], e["layout"]) for e in entries])


def _merge_single(config: TrainConfig, per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sites = {name: run["sites"][name] for name, run in per_site.items()}
    return {
        **_run_header(config),
        "steps": sum(run["steps"] for run in per_site.values()),
        "collapsed": any(run.get("collapsed", False) for run in per_site.values()),
        "val_mean_auc": _nanmean([s["val"]["auc"] for s in sites.values()]),
        "test_mean_auc": _nanmean([s["test"]["auc"] for s in sites.values()]),
        "sites": sites,
    }


def _nanmean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _run_header(config: TrainConfig) -> dict[str, Any]:
    return {
        "method": config.method,
        "backbone": config.backbone,
        "protocol": config.protocol,
        "fold": config.fold,
        "folds": config.folds,
        "seed": config.seed,
        "epochs": config.epochs,
    }


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
        config = _resumed_config(config, saved["config"], ckpt_path)
        if saved["state"]["finished"] and (out_dir / "metrics.json").is_file():
            return json.loads((out_dir / "metrics.json").read_text())

    method = METHODS[config.method]
    device = distributed.local_device(resolve_device(config))
    _seed_everything(config.seed)
    data = build_run_data(
        config, sites, out_dir / "split.json", reuse_split=saved is not None, rank=rank, world_size=world_size,
        progress=progress, pin_memory=device.type == "cuda",
    )
    if is_main:
        write_run_files(out_dir, data, new_split=saved is None)
        save_config(config, out_dir / "config.yaml")

    model = models.create_model(
        config.backbone,
        image_size=config.image_size,
        **model_kwargs(method, config.backbone, num_sites=len(sites), width=config.width, block_act=config.block_act,
                       init=config.init),
    ).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = RunState()
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = RunState(**saved["state"])
        set_rng_state(saved["rng"])
    forward = distributed.wrap(model, device)
    forward = torch.compile(forward) if config.compile else forward

    loop = _Loop(config, method, data, model, forward, optimizer, state, device, out_dir, is_main, progress)
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
        state: RunState,
        device: torch.device,
        out_dir: Path,
        is_main: bool,
        progress: bool,
    ) -> None:
        self.config, self.method, self.data = config, method, data
        self.model, self.forward, self.optimizer, self.state = model, forward, optimizer, state
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
        return train_step(
            self.model, self.forward, self.optimizer, batch, self.method, self.config, self.device,
            lr=self.lr(self.state.global_step), on_diverged=lambda what, values: self.diverged(epoch, what, values),
        )

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
        sampler = self.data.train.batch_sampler
        self.tensorboard = TensorBoard(self.out_dir / "tb", enabled=self.is_main)
        try:
            for epoch in range(s.epoch, c.epochs):
                sampler.set_epoch(epoch)
                sampler.start_step = s.step_in_epoch
                self.model.train()
                tick = time.perf_counter()
                for batch in self.data.train:
                    values = self.step(batch, epoch)
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
                recalibrate_bn(self.model, self.data.recalibration, self.device, c)
            val, rows = evaluate(self.model, self.data, "val", self.device, c)
            metric = _selection_metric(val)
            spread = prediction_spread(rows, self.site_names)
            row |= {f"val_auc_{name}": m["auc"] for name, m in val.items()}
            row |= {"val_auc_mean": _nanmean([m["auc"] for m in val.values()]), "val_selection": metric}
            row |= {f"val_p_std_{name}": std for name, std in spread.items()}
            # The first epoch may still sit at the prior; from the second on, a flat output is a collapse.
            collapsed = collapsed_sites(spread, c.collapse_std) if epoch > 0 or c.epochs == 1 else []
            row["collapsed"] = int(bool(collapsed))
            if collapsed:
                bar.print(f"warning: collapsed predictions at epoch {epoch + 1}: the std of P(COVID) over the "
                          f"validation part of {', '.join(collapsed)} is below {c.collapse_std:g}")
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
        bad = non_finite_tensors(self.model)
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
            "state": self.state.to_dict(),
            "rng": rng_state(),
            "sites": [{"name": s.name, "layout": s.layout, "root": str(s.root)} for s in self.data.sites],
        })

    def save_best(self, val: dict[str, dict[str, float]], epoch: int) -> None:
        card = model_card(self.config, self.site_names, self.config.method,
                          {"val": val, "epoch": epoch, "selection": "mean validation AUC over sites"}, self.data)
        models.save(self.model, self.out_dir / MODEL_STEM, card)

    def finish(self) -> dict[str, Any]:
        """Evaluate the best model on every site's validation and test parts; write metrics and predictions."""
        distributed.barrier()  # rank 0 has written the best model
        best, _ = models.load(self.out_dir / MODEL_STEM, map_location=self.device)
        if self.config.channels_last:
            best = best.to(memory_format=torch.channels_last)
        val, val_rows = evaluate(best, self.data, "val", self.device, self.config)
        test, test_rows = evaluate(best, self.data, "test", self.device, self.config)
        spread = prediction_spread(val_rows, self.site_names)
        collapsed = collapsed_sites(spread, self.config.collapse_std)
        if collapsed and self.progress:
            print(f"warning: the best model's predictions have collapsed on {', '.join(collapsed)} (std of "
                  f"P(COVID) over validation below {self.config.collapse_std:g}); its metrics are not a result")
        s = self.state
        metrics = {
            **_run_header(self.config),
            "steps": s.global_step,
            "best_epoch": s.best_epoch,
            "collapsed": bool(collapsed),
            "normalisation": {"mean": list(self.data.mean), "std": list(self.data.std)},
            "val_mean_auc": _nanmean([m["auc"] for m in val.values()]),
            "test_mean_auc": _nanmean([m["auc"] for m in test.values()]),
            "sites": {
                site.name: {
                    "n_train": int(len(split.train)),
                    "n_val": int(len(split.val)),
                    "n_test": int(len(split.test)),
                    "best_epoch": s.best_epoch,
                    "val_p_std": spread[site.name],
                    "collapsed": site.name in collapsed,
                    "val": val[site.name],
                    "test": test[site.name],
                }
                for site, split in zip(self.data.sites, self.data.splits)
            },
        }
        metrics = json_safe(metrics)
        if self.is_main:
            write_predictions(self.out_dir / "predictions.csv", val_rows + test_rows)
            write_json(self.out_dir / "metrics.json", metrics)
            s.finished = True
            self.save_checkpoint()
        return metrics
