"""Which row to train: the rows ranked on validation, and the one `TrainConfig`'s default method and the shipped
model follow (`chosen_row`; tests/test_recipe.py ties the default to the committed grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crosssite.reporting.results import RunResult
from crosssite.reporting.rows import TableRow, one_model, rows_for, runs_of, summarise
from crosssite.reporting.tables import Table, site_letter, sites_legend

__all__ = ["validation_ranking", "chosen_row", "validation_table"]

def validation_ranking(runs: Sequence[RunResult], sites: Sequence[str]
                       ) -> tuple[list[tuple[TableRow, float, list[float]]], int]:
    """The rows ranked on validation, best first, as (row, mean over sites of the mean validation AUC in %, the
    per-site means), and the number of (fold, seed) pairs the means are over. Each run's validation AUC is its
    selected checkpoint's, on its own validation part: a choice made here reads no test fold. Rows are compared on
    the pairs they all have, so a partial grid ranks like with like; collapsed runs and runs without validation on
    every site are left out."""
    with_val = {row: [r for r in runs_of(runs, row) if not r.collapsed and all(s in r.val_auc for s in sites)]
                for row in rows_for(runs)}
    with_val = {row: mine for row, mine in with_val.items() if mine}
    common = set.intersection(*({r.pair for r in mine} for mine in with_val.values())) if with_val else set()
    if not common:
        return [], 0
    ranked = []
    for row, mine in with_val.items():
        per_site = [float(np.mean([100 * r.val_auc[s] for r in mine if r.pair in common])) for s in sites]
        ranked.append((row, float(np.mean(per_site)), per_site))
    return sorted(ranked, key=lambda item: -item[1]), len(common)


def _first_one_model(ranked: Sequence[tuple[TableRow, float, list[float]]]) -> TableRow | None:
    return next((row for row, _, _ in ranked if one_model(row)), None)


def chosen_row(runs: Sequence[RunResult], sites: Sequence[str]) -> TableRow | None:
    """The row `crosssite train` defaults to and the shipped model is trained with: the best-ranked on validation
    (`validation_ranking`) that trains one model on every site (`one_model`); None when nothing can be ranked."""
    return _first_one_model(validation_ranking(runs, sites)[0])


def validation_table(runs: Sequence[RunResult], sites: Sequence[str]) -> Table:
    """The rows ranked by mean validation AUC over sites; the best row that trains one model on every site is the
    one `crosssite train` defaults to and the shipped model is trained with."""
    ranked, pairs = validation_ranking(runs, sites)
    if not ranked:
        return Table("Which row to train: the rows ranked on validation", ["Method"], [],
                     "No (fold, seed) pair has a validation AUC on every site in every row's runs: nothing to rank.")
    chosen = _first_one_model(ranked)  # `chosen_row`, from the ranking already made
    header = ["Method", "one model", *(f"{site_letter(i)} val AUC" for i in range(len(sites))), "mean",
              "test AUC mean"]
    body = []
    for row, mean, per_site in ranked:
        test = np.mean([summarise(runs, row, s, "auc")[0] for s in sites])
        label = f"**{row.label}** (chosen)" if row == chosen else row.label
        body.append([label, "yes" if one_model(row) else "no, one per site", *(f"{v:.2f}" for v in per_site),
                     f"{mean:.2f}", f"{test:.2f}"])
    caption = (f"Columns: {sites_legend(sites)}. Mean over the {pairs} (fold, seed) pairs every ranked row has of the "
               "validation AUC of each run's selected checkpoint (its own validation part, never a test fold), in %; "
               "'mean' averages the sites. The chosen row is the best one that trains one model on every site, "
               "which a hospital the model never saw needs (Single's per-site models have no slot for it): "
               "`crosssite train` defaults to it and the shipped model is trained with it. It is chosen on "
               "validation alone, so its Table I test AUC stays an honest estimate (the last column, Table I's mean "
               "over sites, is shown, not used). Validation AUCs are optimistic: each is the best of its run's "
               "epochs.")
    return Table("Which row to train: the rows ranked on validation", header, body, caption)
