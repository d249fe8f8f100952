"""Validation of a run and the scoring of its parts: per-site metrics and prediction rows of a validation or test
part (`score_part`), the collapse check, and BN recalibration.

Every `eval_every` epochs (and after the last) the engine validates on each site's validation part -- with
``bn_recalibrate``, after its batch-norm statistics are recomputed on the training part (`recalibrate_bn`) -- and
keeps the best mean AUC over sites (`selection_metric`). A validation whose P(COVID) barely varies over a site
(`prediction_spread` below ``collapse_std``) marks the run as collapsed (`collapsed_sites`). With ``tta="flip"``
every validation and test prediction is averaged with the slice's mirror, so selection sees what is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from crosssite.evaluation import METRICS, binary_metrics, collect_probabilities
from crosssite.models.norms import cumulative_statistics
from crosssite.training.config import TrainConfig
from crosssite.training.data import RunData
from crosssite.training.step import autocast, batch_sites, input_dtype

__all__ = ["score_part", "prediction_spread", "collapsed_sites", "recalibrate_bn", "selection_metric", "nanmean",
           "validate_epoch", "run_metrics", "run_header", "merge_site_runs"]


def score_part(
    model: nn.Module, data: RunData, part: str, device: torch.device, config: TrainConfig
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Metrics per site on ``part`` (``val`` or ``test``) and one prediction row per slice; an empty part (the
    test part of ``protocol="all"``) has undefined (NaN) metrics and no rows."""
    if len(data.eval[part].dataset) == 0:
        return {site.name: dict.fromkeys(METRICS, float("nan")) for site in data.sites}, []
    with autocast(config, device):
        probs = collect_probabilities(model, data.eval[part], device, tta=config.tta)
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


@torch.inference_mode()
def recalibrate_bn(model: nn.Module, loader: Any, device: torch.device, config: TrainConfig) -> None:
    """Recompute every batch-norm running mean and variance as the plain average over ``loader``'s batches.

    Running statistics kept with momentum 0.1 trail a network that changes quickly (high learning rates, short
    runs) and are estimated on augmented crops; re-estimating them after training on the evaluation view of the
    training part ("precise BN", Wu & Johnson 2021) removes both gaps. ``loader`` draws its batches as the
    training sampler does (`RunData.recalibration`: per-site runs of 4 x ``batch_per_site``, ``bn_recalibrate_images``
    per site), so a shared BN mixes the sites in training's proportions. Weights are not touched.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with cumulative_statistics(model, norms, reset=True), autocast(config, device):
        for batch in loader:
            images = batch["image"].to(device, input_dtype(model), non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            model(images, batch_sites(batch, config, device))


def selection_metric(val: dict[str, dict[str, float]]) -> float:
    """Mean validation AUC over sites (mean accuracy if no site's AUC is defined)."""
    aucs = [m["auc"] for m in val.values() if not math.isnan(m["auc"])]
    if aucs:
        return float(np.mean(aucs))
    return float(np.mean([m["accuracy"] for m in val.values()]))


def nanmean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def merge_site_runs(config: TrainConfig, per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The metrics of a `single` run from the metrics of its per-site runs."""
    sites = {name: run["sites"][name] for name, run in per_site.items()}
    return {
        **run_header(config),
        "steps": sum(run["steps"] for run in per_site.values()),
        "collapsed": any(run.get("collapsed", False) for run in per_site.values()),
        "val_mean_auc": nanmean([s["val"]["auc"] for s in sites.values()]),
        "test_mean_auc": nanmean([s["test"]["auc"] for s in sites.values()]),
        "sites": sites,
    }


def run_header(config: TrainConfig) -> dict[str, Any]:
    return {
        "method": config.method,
        "backbone": config.backbone,
        "protocol": config.protocol,
        "fold": config.fold,
        "folds": config.folds,
        "seed": config.seed,
        "epochs": config.epochs,
    }


def validate_epoch(
    model: nn.Module, data: RunData, device: torch.device, config: TrainConfig, epoch: int
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Validate after epoch ``epoch`` (0-based): per-site metrics, and the ``log.csv`` columns (AUC per site and
    mean, the selection metric, the spread of P(COVID) per site, ``collapsed``)."""
    val, rows = score_part(model, data, "val", device, config)
    spread = prediction_spread(rows, [s.name for s in data.sites])
    scores: dict[str, Any] = {f"val_auc_{name}": m["auc"] for name, m in val.items()}
    scores |= {"val_auc_mean": nanmean([m["auc"] for m in val.values()]), "val_selection": selection_metric(val)}
    scores |= {f"val_p_std_{name}": std for name, std in spread.items()}
    # The first epoch may still sit at the prior; from the second on, a flat output is a collapse.
    collapsed = collapsed_sites(spread, config.collapse_std) if epoch > 0 or config.epochs == 1 else []
    scores["collapsed"] = int(bool(collapsed))
    return val, scores


def run_metrics(
    config: TrainConfig, data: RunData, val: dict[str, dict[str, float]], test: dict[str, dict[str, float]],
    val_rows: list[dict[str, Any]], state: Any,
) -> dict[str, Any]:
    """``metrics.json`` of a finished run: header, steps, best epoch, the collapse flag, normalisation, and per
    site the part sizes, the spread of validation P(COVID), validation and test metrics."""
    spread = prediction_spread(val_rows, [s.name for s in data.sites])
    collapsed = collapsed_sites(spread, config.collapse_std)
    return {
        **run_header(config),
        "steps": state.global_step,
        "best_epoch": state.best_epoch,
        "collapsed": bool(collapsed),
        "normalisation": {"mean": list(data.mean), "std": list(data.std)},
        "val_mean_auc": nanmean([m["auc"] for m in val.values()]),
        "test_mean_auc": nanmean([m["auc"] for m in test.values()]),
        "sites": {
            site.name: {
                "n_train": int(len(split.train)), "n_val": int(len(split.val)), "n_test": int(len(split.test)),
                "best_epoch": state.best_epoch, "val_p_std": spread[site.name], "collapsed": site.name in collapsed,
                "val": val[site.name], "test": test[site.name],
            }
            for site, split in zip(data.sites, data.splits)
        },
    }
