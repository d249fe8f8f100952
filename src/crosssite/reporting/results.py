"""Reading an experiment's results.jsonl: one `RunResult` per finished run, and the order of its sites.

`results.jsonl` holds one JSON object per finished run (written by `crosssite.experiment`):
``{"method", "backbone", "fold", "seed", "run_dir", "sites": {name: {metric: value, ..., "y_true": [...],
"p_covid": [...]}}, "config", "git_commit", "machine", "wall_s", "finished_at"}``, metrics as fractions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crosssite.errors import CrossSiteError

__all__ = ["ReportError", "COLLAPSE_STD", "PAPER_SITES", "TABLE_METRICS", "METRIC_LABELS", "SiteResult", "RunResult",
           "load_results", "site_layout", "site_order"]

# A run whose results.jsonl line predates the engine's collapse flag is judged by the spread of its test
# predictions with the engine's default threshold (TrainConfig.collapse_std).
COLLAPSE_STD = 1e-3


class ReportError(CrossSiteError):
    """An experiment directory or results file that cannot be reported on."""


TABLE_METRICS = ("accuracy", "f1", "recall", "precision", "auc")

METRIC_LABELS = {
    "accuracy": "Accuracy",
    "f1": "F1",
    "recall": "Recall",
    "specificity": "Specificity",
    "precision": "Precision",
    "auc": "AUC",
}


# The paper's site A and site B, by the layout names of the real datasets.
PAPER_SITES = ("sars_cov2_ct", "covid_ct")


@dataclass(frozen=True)
class SiteResult:
    """One run's test result on one site."""

    metrics: dict[str, float]  # fractions; NaN where undefined
    y_true: np.ndarray  # (N,) int
    p_covid: np.ndarray  # (N,) float
    patients: tuple[str, ...] | None = None  # patient id per slice, where the site has them


@dataclass(frozen=True)
class RunResult:
    """One line of results.jsonl."""

    method: str
    backbone: str
    fold: int
    seed: int
    run_dir: str
    sites: dict[str, SiteResult]
    config: dict[str, Any] = field(default_factory=dict)
    git_commit: str = "unknown"
    machine: Any = None
    wall_s: float = float("nan")
    finished_at: str = ""
    site_order: tuple[str, ...] = ()  # optional: the sites in the order they were given
    site_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # optional: layout, has_patients per site
    collapsed: bool = False  # the engine flagged its validation predictions as collapsed (a near-constant output)
    val_auc: dict[str, float] = field(default_factory=dict)  # optional: the selected checkpoint's validation AUC
    split_seed: int = 0  # the partition the fold is of (grids of several partitions: `--repeats`)

    @property
    def key(self) -> tuple[str, str, int, int, int]:
        return (self.method, self.backbone, self.fold, self.seed, self.split_seed)

    @property
    def pair(self) -> tuple[int, int, int]:
        """What pairs two rows' runs in a test: the same test set (fold of one partition) and model seed."""
        return (self.fold, self.seed, self.split_seed)


def _metric_value(value: Any, where: str) -> float:
    if value is None:
        return float("nan")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ReportError(f"{where}: not a number: {value!r}") from None
    if not math.isnan(v) and not 0.0 <= v <= 1.0:
        raise ReportError(f"{where}: {v} is not a fraction in [0, 1]")
    return v


def _parse_site(name: str, raw: Any, where: str) -> SiteResult:
    if not isinstance(raw, dict):
        raise ReportError(f"{where}: site {name!r} is not an object")
    missing = [k for k in TABLE_METRICS if k not in raw]
    if missing:
        raise ReportError(f"{where}: site {name!r} lacks {', '.join(missing)}")
    metrics = {k: _metric_value(raw[k], f"{where}: site {name!r} {k}") for k in METRIC_LABELS if k in raw}
    y_true = np.asarray(raw.get("y_true", []), dtype=np.int64)  # predictions are optional: no ROC without them
    p_covid = np.asarray(raw.get("p_covid", []), dtype=np.float64)
    if y_true.shape != p_covid.shape or y_true.ndim != 1:
        raise ReportError(f"{where}: site {name!r} has {y_true.size} labels but {p_covid.size} probabilities")
    patients = raw.get("patients")
    if patients is not None and len(patients) != y_true.size:
        raise ReportError(f"{where}: site {name!r} has {len(patients)} patient ids for {y_true.size} labels")
    return SiteResult(metrics=metrics, y_true=y_true, p_covid=p_covid,
                      patients=None if patients is None else tuple(map(str, patients)))


def _collapsed(raw: dict[str, Any], sites: dict[str, SiteResult]) -> bool:
    if "collapsed" in raw:
        return bool(raw["collapsed"])
    return any(len(s.p_covid) > 1 and float(np.std(s.p_covid)) < COLLAPSE_STD for s in sites.values())


def _parse_line(text: str, where: str) -> RunResult:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{where}: not valid JSON ({e.msg})") from None
    missing = [k for k in ("method", "backbone", "fold", "seed", "sites") if k not in raw]
    if missing:
        raise ReportError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(raw["sites"], dict) or not raw["sites"]:
        raise ReportError(f"{where}: 'sites' must be a non-empty object")
    sites = {name: _parse_site(name, value, where) for name, value in raw["sites"].items()}
    return RunResult(
        method=str(raw["method"]),
        backbone=str(raw["backbone"]),
        fold=int(raw["fold"]),
        seed=int(raw["seed"]),
        split_seed=int(raw.get("split_seed", 0)),
        run_dir=str(raw.get("run_dir", "")),
        sites=sites,
        config=dict(raw.get("config") or {}),
        git_commit=str(raw.get("git_commit", "unknown")),
        machine=raw.get("machine"),
        wall_s=float(raw.get("wall_s", float("nan"))),
        finished_at=str(raw.get("finished_at", "")),
        site_order=tuple(raw.get("site_order") or ()),
        site_info=dict(raw.get("site_info") or {}),
        collapsed=_collapsed(raw, sites),
        val_auc={name: _metric_value((v or {}).get("auc"), f"{where}: validation of {name!r}")
                 for name, v in (raw.get("val") or {}).items()},
    )


def load_results(path: str | Path) -> tuple[list[RunResult], list[str]]:
    """Parse results.jsonl.

    Returns:
        The runs in file order, one per (method, backbone, fold, seed) (a later line of the same run replaces
        an earlier one), and notes on what was replaced.
    """
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: no results file (run `crosssite experiment` first)")
    runs: dict[tuple[str, str, int, int], RunResult] = {}
    notes = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        run = _parse_line(text, f"{path}:{number}")
        if run.key in runs:
            notes.append(f"{path.name}:{number} repeats run {run.key}; the later line is used")
        runs[run.key] = run
    if not runs:
        raise ReportError(f"{path}: holds no finished run")
    return list(runs.values()), notes


def site_layout(runs: Sequence[RunResult], site: str) -> str:
    """The layout a site was read with, where the runs record it (`site_info`), else its name."""
    for run in runs:
        layout = (run.site_info.get(site) or {}).get("layout")
        if layout:
            return str(layout)
    return site


def site_order(runs: Sequence[RunResult]) -> list[str]:
    """Sites in report order: the paper's (A = the sars_cov2_ct site, B = the covid_ct site) first, then the
    order the runs recorded (`site_order`), else by name."""
    names = {name for run in runs for name in run.sites}
    given = next((list(r.site_order) for r in runs if r.site_order and set(r.site_order) >= names), sorted(names))
    rank = {layout: i for i, layout in enumerate(PAPER_SITES)}
    return sorted(given, key=lambda n: (rank.get(site_layout(runs, n), len(rank)), given.index(n)))
