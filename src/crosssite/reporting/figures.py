"""The paper's figures: ROC curves per site (Fig. 3) and Grad-CAM panels (Fig. 4 and 5), as PNG files.

Figures are drawn on `matplotlib.figure.Figure` objects rendered by the Agg canvas, never through pyplot,
so reporting works without a display and leaves matplotlib's global state alone.

ROC curves are mean ROCs: each run's ROC (one fold x seed, its test part) is interpolated on a common
grid of false-positive rates and the true-positive rates are averaged (vertical averaging). The legend's
AUC is the mean ± std of the runs' own AUCs, the same numbers as Table I, so the figure and the table agree.
Pooling every run's predictions into one curve would instead mix the calibrations of different models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from crosssite.gradcam import overlay
from crosssite.reporting.results import RunResult
from crosssite.reporting.rows import BASELINES, COMPARISONS, PAPER_METHOD, ROWS, TableRow, runs_of

__all__ = ["FPR_GRID", "MeanRoc", "ROC_PANELS", "mean_roc", "roc_figure", "GradCamCase", "gradcam_figure"]

FPR_GRID = np.linspace(0.0, 1.0, 201)
_COLOURS = {row.label: f"C{i}" for i, row in enumerate(r for r in ROWS if r != PAPER_METHOD)}  # one colour per row

# Fig. 3 of the paper: (a) backbones, (b) baselines on the redesigned backbone, (c) comparison methods.
ROC_PANELS: tuple[tuple[str, tuple[TableRow, ...]], ...] = (
    ("(a) backbones", tuple(r for r in ROWS if r.method in ("single", "joint"))),
    ("(b) baselines", tuple(r for r in BASELINES if r.backbone == PAPER_METHOD.backbone) + (PAPER_METHOD,)),
    ("(c) comparison methods", COMPARISONS + (PAPER_METHOD,)),
)


@dataclass(frozen=True)
class MeanRoc:
    """Vertically averaged ROC of several runs."""

    fpr: np.ndarray  # (G,) FPR_GRID
    tpr: np.ndarray  # (G,) mean true-positive rate
    auc_mean: float  # mean of the runs' AUCs (fraction)
    auc_std: float  # sample std (ddof=1), NaN for one run
    n: int  # runs with predictions of both classes


def mean_roc(runs: Sequence[RunResult], site: str) -> MeanRoc | None:
    """Mean ROC of the runs' test predictions on `site`; None when no run has predictions of both classes."""
    curves, aucs = [], []
    for run in runs:
        res = run.sites.get(site)
        if res is None or len(np.unique(res.y_true)) < 2:
            continue
        fpr, tpr, _ = roc_curve(res.y_true, res.p_covid)
        interp = np.interp(FPR_GRID, fpr, tpr)
        interp[0] = 0.0
        curves.append(interp)
        aucs.append(roc_auc_score(res.y_true, res.p_covid))
    if not curves:
        return None
    tpr = np.mean(curves, axis=0)
    tpr[-1] = 1.0
    std = float(np.std(aucs, ddof=1)) if len(aucs) > 1 else float("nan")
    return MeanRoc(FPR_GRID, tpr, float(np.mean(aucs)), std, len(aucs))


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
    return path


def roc_figure(runs: Sequence[RunResult], site: str, title: str, path: str | Path) -> Path:
    """Fig. 3 for one site: three panels of mean ROC curves, AUC (mean ± std over runs) in each legend."""
    fig = Figure(figsize=(15, 5), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(ROC_PANELS))
    for ax, (panel, rows) in zip(axes, ROC_PANELS):
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        for row in rows:
            roc = mean_roc(runs_of(runs, row), site)
            if roc is None:
                ax.plot([], [], lw=0, label=f"{row.label} (no runs)")
                continue
            auc = f"{100 * roc.auc_mean:.2f}" + ("" if np.isnan(roc.auc_std) else f" ± {100 * roc.auc_std:.2f}")
            style = {"lw": 2.4, "color": "crimson"} if row == PAPER_METHOD else {"lw": 1.5, "color": _COLOURS[row.label]}
            ax.plot(roc.fpr, roc.tpr, label=f"{row.label}: AUC {auc} (n={roc.n})", **style)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title=panel)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    return _save(fig, Path(path))


@dataclass(frozen=True)
class GradCamCase:
    """One test slice with its Grad-CAM map."""

    image: np.ndarray  # (H, W) grey in [0, 1], what the model saw
    cam: np.ndarray  # (H, W) in [0, 1]
    label: int  # true class, 1 = COVID
    p_covid: float
    name: str  # file name, shown under the panel


def gradcam_figure(cases: Sequence[GradCamCase], title: str, path: str | Path) -> Path:
    """Fig. 4/5 style panel: each column one case, the slice on top and its Grad-CAM overlay below."""
    if not cases:
        raise ValueError("gradcam_figure needs at least one case")
    cols = len(cases)
    fig = Figure(figsize=(2.4 * cols, 5.4), dpi=100, layout="constrained")
    axes = np.asarray(fig.subplots(2, cols, squeeze=False))
    for j, case in enumerate(cases):
        truth = "COVID" if case.label == 1 else "non-COVID"
        axes[0, j].imshow(case.image, cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(f"true {truth}\nP(COVID) = {case.p_covid:.2f}", fontsize=9)
        axes[1, j].imshow(overlay(case.image, case.cam))
        axes[1, j].set_xlabel(case.name[:28], fontsize=7)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title)
    return _save(fig, Path(path))
