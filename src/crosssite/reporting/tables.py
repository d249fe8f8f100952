"""Tables of a report: the `Table` type and its cells, Table I and the bootstrap intervals table.

Table I is mean +- sample standard deviation (ddof=1) over the folds x seeds of each row, in %. The rows come from
`crosssite.reporting.rows`, the runs from `crosssite.reporting.results`; the claims and Tables II-III are in
`crosssite.reporting.claims`, the choice of the row to train in `crosssite.reporting.choice`, the leave-one-site-out
table in `crosssite.reporting.loso`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crosssite.evaluation import bootstrap_ci, corrected_mean_interval
from crosssite.reporting.results import METRIC_LABELS, PAPER_SITES, TABLE_METRICS, RunResult, site_layout
from crosssite.reporting.rows import TableRow, rows_for, runs_of, summarise

__all__ = ["Table", "site_letter", "sites_legend", "metric_header", "table_one", "interval_table"]

@dataclass
class Table:
    """A rendered table: header, body cells as text, and a caption with notes."""

    title: str
    header: list[str]
    body: list[list[str]]
    caption: str = ""

    def to_markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.header) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(self.header) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.body]
        if self.caption:
            lines += ["", self.caption]
        return "\n".join(lines)


def _pct(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def site_letter(position: int) -> str:
    """'A' for the first site of a report, 'B' for the second, and so on."""
    return chr(ord("A") + position)


def sites_legend(sites: Sequence[str]) -> str:
    return ", ".join(f"site {site_letter(i)} = {site}" for i, site in enumerate(sites))


def _paper_auc(row: TableRow, layout: str) -> str:
    """The paper's AUC for this column, when the column is one of the paper's two sites."""
    if layout in PAPER_SITES and row.paper_auc is not None:
        return f"{row.paper_auc[PAPER_SITES.index(layout)]:.2f}"
    return "–"


def metric_header(first: list[str], sites: Sequence[str], paper_column: str) -> list[str]:
    """Column names: ``first``, then per site (A, B, ...) every metric of `TABLE_METRICS` and the paper's column."""
    columns = list(first)
    for pos in range(len(sites)):
        letter = site_letter(pos)
        columns += [f"{letter} {METRIC_LABELS[m]}" for m in TABLE_METRICS] + [f"{letter} {paper_column}"]
    return columns


def table_one(runs: Sequence[RunResult], sites: Sequence[str]) -> Table:
    """Table I: per row and site, mean ± std in % over folds x seeds, the paper's AUC beside ours."""
    header = metric_header(["Method", "runs"], sites, "AUC (paper)")
    body = []
    for row in rows_for(runs):
        mine = runs_of(runs, row)
        collapsed = sum(r.collapsed for r in mine)
        label = row.label + (f" ⚠ collapsed in {collapsed} of {len(mine)} runs" if collapsed else "")
        cells = [label, str(len(mine) - collapsed)]
        for site in sites:
            values = [_pct(*summarise(runs, row, site, m)[:2]) for m in TABLE_METRICS]
            cells += ["collapsed" if mine and collapsed == len(mine) else v for v in values]
            cells.append(_paper_auc(row, site_layout(runs, site)))
        body.append(cells)
    caption = (
        f"Columns: {sites_legend(sites)}. "
        "Mean ± sample standard deviation (ddof=1) over every finished fold x seed run of each row, in %; "
        "'runs' counts them, '–' marks a row or site without runs. A run whose predictions collapsed (P(COVID) "
        "nearly constant over a validation part: its AUC is noise around the class prior, not a result) is left "
        "out and the row is marked. The paper's AUC (mean of 4 folds x 3 runs) "
        f"stands beside ours; the paper's site A is {PAPER_SITES[0]} (SARS-CoV-2 CT-scan) and its site B is "
        f"{PAPER_SITES[1]} (COVID-CT)."
    )
    return Table("Table I. COVID-19 CT classification per site (mean ± std)", header, body, caption)


def holdout_ratio(runs: Sequence[RunResult]) -> float:
    """n_test / n_train of one run of the k-fold protocol: 1/k against (1 - 1/k)(1 - val_fraction)."""
    config = next((r.config for r in runs if r.config), {})
    k, val = int(config.get("folds", 4)), float(config.get("val_fraction", 0.2))
    return (1 / k) / ((1 - 1 / k) * (1 - val))


def interval_table(runs: Sequence[RunResult], sites: Sequence[str], n_boot: int = 200, seed: int = 0) -> Table:
    """Per row and site: the mean test AUC with a 95% interval for that mean (`corrected_mean_interval` over the
    row's runs), and the mean over runs of each run's 95% bootstrap interval, drawn over patients where the runs
    carry patient ids (site B), else over slices."""
    header = ["Method"] + [h for i in range(len(sites))
                           for h in (f"{site_letter(i)} mean AUC (95% CI of the mean)", f"{site_letter(i)} per-run CI")]
    ratio = holdout_ratio(runs)
    units = {}
    body = []
    for row in rows_for(runs):
        mine = [r for r in runs_of(runs, row) if not r.collapsed]
        cells = [row.label]
        for site in sites:
            results = [r.sites[site] for r in mine if site in r.sites and len(r.sites[site].y_true)]
            if not results:
                cells += ["–", "–"]
                continue
            lows, highs, aucs = [], [], []
            for res in results:
                low, high = bootstrap_ci(res.y_true, res.p_covid, n=n_boot, seed=seed, groups=res.patients)["auc"]
                lows.append(low)
                highs.append(high)
                aucs.append(res.metrics.get("auc", float("nan")))
                units.setdefault(site, set()).add("patients" if res.patients is not None else "slices")
            mean, low, high = (100 * v for v in corrected_mean_interval(aucs, ratio))
            cells.append(f"{mean:.2f} ({low:.2f}-{high:.2f})" if len(aucs) > 1 else f"{mean:.2f}")
            cells.append(f"{100 * np.nanmean(lows):.2f}-{100 * np.nanmean(highs):.2f}")
        body.append(cells)
    resampled = "; ".join(f"site {site_letter(i)}: {' and '.join(sorted(units.get(s, {'-'})))}"
                          for i, s in enumerate(sites))
    caption = (
        f"Columns: {sites_legend(sites)}. The row's mean test AUC over its runs (collapsed runs left out) with a "
        "95% interval for that mean: mean +- t(J-1) sqrt((1/J + n_test/n_train) var), the variance corrected as "
        f"in the corrected resampled t-test since the runs share training data (n_test/n_train = {ratio:.3f}). "
        f"Beside it, the per-run 95% stratified percentile bootstrap intervals ({n_boot} resamples) averaged over "
        f"the runs: how uncertain one run's test AUC is on its test set. Resampled units: {resampled}. "
        "Where patient ids exist, whole patients are drawn (a cluster bootstrap): slices of one patient are not "
        "independent, and drawing slices would give intervals that are too narrow."
    )
    return Table("Test AUC with 95% bootstrap intervals", header, body, caption)
