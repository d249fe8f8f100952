"""The leave-one-site-out table: AUC of every test-time strategy on every held-out site (`crosssite.experiment`'s
``loso.jsonl``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crosssite.ioutil import read_jsonl
from crosssite.reporting.results import ReportError
from crosssite.reporting.tables import Table

__all__ = ["loso_strategy", "loso_summary", "loso_table"]

def loso_strategy(strategy: str, trained_on: Sequence[str]) -> str:
    """A strategy's name across runs: ``site:NAME`` of a trained-on site becomes ``site:<k>`` by position."""
    if strategy.startswith("site:") and strategy[5:] in trained_on:
        return f"site:{list(trained_on).index(strategy[5:]) + 1}"
    return strategy


def loso_summary(path: Path) -> tuple[list[str], dict[str, dict[str, tuple[float, float, float]]]]:
    """Held-out sites, and per strategy per held-out site the mean AUC and mean 95% interval over seeds."""
    rows = read_jsonl(path)
    held = list(dict.fromkeys(r["held_out"] for r in rows))
    table: dict[str, dict[str, list]] = {}
    for r in rows:
        key = loso_strategy(r["strategy"], r["trained_on"])
        auc, (low, high) = r["metrics"].get("auc"), r["ci"].get("auc", [None, None])
        if auc is not None:
            table.setdefault(key, {}).setdefault(r["held_out"], []).append((auc, low, high))
    summary = {k: {h: tuple(float(np.nanmean([v[i] for v in vals])) for i in range(3)) for h, vals in per.items()}
               for k, per in table.items()}
    return held, summary


def loso_table(path: Path) -> Table:
    """Leave one site out (`crosssite.experiment.run_loso`): AUC (95% CI) of every test-time strategy on every
    held-out site, with the mean over held-out sites; the best mean is bold."""
    held, summary = loso_summary(Path(path))
    if not summary:
        raise ReportError(f"{path}: no leave-one-site-out result")
    means = {k: float(np.mean([v[h][0] for h in held if h in v])) for k, v in summary.items()}
    best = max(means, key=means.get)
    body = []
    for key in sorted(summary, key=lambda k: -means[k]):
        cells = [f"**{key}**" if key == best else key]
        for h in held:
            auc, low, high = summary[key].get(h, (float("nan"),) * 3)
            cells.append("–" if math.isnan(auc) else f"{100 * auc:.2f} ({100 * low:.2f}-{100 * high:.2f})")
        cells.append(f"{100 * means[key]:.2f}")
        body.append(cells)
    caption = ("Each held-out site scored by a model trained on every other site (every slice but a grouped "
               "validation part). `site:k`: the k-th training site's statistics; `mean`: their mean; "
               "`adabn`, `standardise`, `tent`, `ensemble`: test-time strategies (docs/METHODS.md). 95% bootstrap "
               "intervals over patients where the held-out site has ids, else slices; means over seeds.")
    return Table("Leave one site out: AUC per test-time strategy", ["strategy", *held, "mean"], body, caption)
