"""The rows of Table I: the paper's, in its order, then one per other (method, backbone) the runs hold; the runs of
a row and their summary.

`PAPER_METHOD` is the paper's own method (its tables' "ours", SepNorm + Contrastive on the redesign): Tables II
and III and the claims compare the other rows against it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from crosssite.reporting.results import RunResult
from crosssite.training.methods import METHODS, PAPER_TABLE_I

__all__ = ["TableRow", "ROWS", "PAPER_METHOD", "BASELINES", "COMPARISONS", "row_of", "rows_for", "runs_of",
           "summarise", "one_model"]


@dataclass(frozen=True)
class TableRow:
    """One row of Table I: how it was trained, its label, and the paper's own numbers (None for a row the paper
    does not have: a method added to the registry)."""

    method: str
    backbone: str
    label: str
    paper_auc: tuple[float, float] | None  # % on site A (SARS-CoV-2 CT), site B (COVID-CT); None: not in the paper
    paper_p: tuple[float, float] | None = None  # Tables II/III of the paper (metric unstated), sites A, B


ROWS: tuple[TableRow, ...] = tuple(
    TableRow(method, backbone, r.label, r.auc, r.p) for (method, backbone), r in PAPER_TABLE_I.items()
)


def row_of(method: str, backbone: str = "covidnet_redesign") -> TableRow:
    """The paper's row of ``method`` on ``backbone``."""
    return next(r for r in ROWS if r.method == method and r.backbone == backbone)


# the paper's method, by name: the row every other row is tested against
PAPER_METHOD = row_of("sepnorm-contrastive")
# Table II: the paper's method against the baselines; Table III: against the comparison methods.
BASELINES = tuple(r for r in ROWS if r.method in ("single", "joint", "sepnorm"))
COMPARISONS = tuple(r for r in ROWS if r.method in ("series-adapter", "parallel-adapter", "ms-net"))


def rows_for(runs: Iterable[RunResult]) -> list[TableRow]:
    """The paper's rows in its order, then a row for every other (method, backbone) the runs hold (a method
    added to `crosssite.training.METHODS`), without paper numbers."""
    extra = sorted({(r.method, r.backbone) for r in runs} - {(row.method, row.backbone) for row in ROWS})
    return [*ROWS, *(TableRow(m, b, _label(m, b), None) for m, b in extra)]


def _label(method: str, backbone: str) -> str:
    """A non-paper row's name: its method's `label` (the redesign implied), else ``method (backbone)``."""
    registered = METHODS.get(method)
    if registered is not None and registered.label and backbone == "covidnet_redesign":
        return registered.label
    return f"{method} ({backbone})"


def runs_of(runs: Iterable[RunResult], row: TableRow) -> list[RunResult]:
    """The runs of one table row, ordered by (seed, fold)."""
    mine = [r for r in runs if r.method == row.method and r.backbone == row.backbone]
    return sorted(mine, key=lambda r: (r.seed, r.fold))


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    return float(v.mean()), std, int(len(v))


def summarise(runs: Sequence[RunResult], row: TableRow, site: str, metric: str) -> tuple[float, float, int]:
    """(mean, std, n) in % of one metric of one row on one site over its runs that did not collapse; NaN where
    there is none."""
    values = [100.0 * r.sites[site].metrics.get(metric, float("nan"))
              for r in runs_of(runs, row) if site in r.sites and not r.collapsed]
    return _mean_std(values)


def one_model(row: TableRow) -> bool:
    """Whether ``row`` trains one model on every site (Single trains one per site, and so has no model for a site
    it never saw)."""
    method = METHODS.get(row.method)
    return method is None or not method.per_site
