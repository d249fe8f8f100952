"""Reading an experiment's results.jsonl, and the paper's Tables I-III computed from it.

`results.jsonl` holds one JSON object per finished run (written by `crosssite.experiment`):
``{"method", "backbone", "fold", "seed", "run_dir", "sites": {name: {metric: value, ..., "y_true": [...],
"p_covid": [...]}}, "config", "git_commit", "machine", "wall_s", "finished_at"}``, metrics as fractions.

Table I is mean +- sample standard deviation (ddof=1) over the folds x seeds of each row, in %.
Tables II and III are two-sided paired t-tests of ours against the other rows, pairing runs by (fold, seed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crosssite.errors import CrossSiteError
from crosssite.evaluation import bootstrap_ci, corrected_resampled_ttest, holm, paired_ttest
from crosssite.ioutil import read_jsonl
from crosssite.training.methods import METHODS, PAPER_TABLE_I

__all__ = [
    "ReportError",
    "PaperRow",
    "ROWS",
    "OURS",
    "TABLE_METRICS",
    "SiteResult",
    "RunResult",
    "Table",
    "load_results",
    "site_layout",
    "site_letter",
    "site_order",
    "runs_of",
    "rows_for",
    "summarise",
    "table_one",
    "ttest_pvalues",
    "ttest_table",
    "CLAIMS",
    "claim_tests",
    "claims_table",
    "claim_verdicts",
    "verdict_table",
    "validation_ranking",
    "validation_table",
    "chosen_row",
    "one_model",
    "interval_table",
    "loso_table",
    "loso_summary",
    "COLLAPSE_STD",
]

# A run whose results.jsonl line predates the engine's collapse flag is judged by the spread of its test
# predictions with the engine's default threshold (TrainConfig.collapse_std).
COLLAPSE_STD = 1e-3


class ReportError(CrossSiteError):
    """An experiment directory or results file that cannot be reported on."""


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Table I: how it was trained, its label, and the paper's own numbers."""

    method: str
    backbone: str
    label: str
    paper_auc: tuple[float, float] | None  # % on site A (SARS-CoV-2 CT), site B (COVID-CT); None: not in the paper
    paper_p: tuple[float, float] | None = None  # Tables II/III of the paper (metric unstated), sites A, B


ROWS: tuple[PaperRow, ...] = tuple(
    PaperRow(method, backbone, r.label, r.auc, r.p) for (method, backbone), r in PAPER_TABLE_I.items()
)
OURS = ROWS[-1]
# Table II: ours against the baselines; Table III: ours against the comparison methods.
BASELINES = tuple(r for r in ROWS if r.method in ("single", "joint", "sepnorm"))
COMPARISONS = tuple(r for r in ROWS if r.method in ("series-adapter", "parallel-adapter", "ms-net"))

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

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.method, self.backbone, self.fold, self.seed)


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


def rows_for(runs: Iterable[RunResult]) -> list[PaperRow]:
    """The paper's rows in its order, then a row for every other (method, backbone) the runs hold (a method
    added to `crosssite.training.METHODS`), without paper numbers."""
    extra = sorted({(r.method, r.backbone) for r in runs} - {(row.method, row.backbone) for row in ROWS})
    return [*ROWS, *(PaperRow(m, b, _label(m, b), None) for m, b in extra)]


def _label(method: str, backbone: str) -> str:
    """A non-paper row's name: its method's `label` (the redesign implied), else ``method (backbone)``."""
    registered = METHODS.get(method)
    if registered is not None and registered.label and backbone == "covidnet_redesign":
        return registered.label
    return f"{method} ({backbone})"


def runs_of(runs: Iterable[RunResult], row: PaperRow) -> list[RunResult]:
    """The runs of one table row, ordered by (seed, fold)."""
    mine = [r for r in runs if r.method == row.method and r.backbone == row.backbone]
    return sorted(mine, key=lambda r: (r.seed, r.fold))


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    return float(v.mean()), std, int(len(v))


def summarise(runs: Sequence[RunResult], row: PaperRow, site: str, metric: str) -> tuple[float, float, int]:
    """(mean, std, n) in % of one metric of one row on one site over its runs that did not collapse; NaN where
    there is none."""
    values = [100.0 * r.sites[site].metrics.get(metric, float("nan"))
              for r in runs_of(runs, row) if site in r.sites and not r.collapsed]
    return _mean_std(values)


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


def _sites_legend(sites: Sequence[str]) -> str:
    return ", ".join(f"site {site_letter(i)} = {site}" for i, site in enumerate(sites))


def _paper_auc(row: PaperRow, layout: str) -> str:
    """The paper's AUC for this column, when the column is one of the paper's two sites."""
    if layout in PAPER_SITES and row.paper_auc is not None:
        return f"{row.paper_auc[PAPER_SITES.index(layout)]:.2f}"
    return "–"


def _header(first: list[str], sites: Sequence[str], paper_column: str) -> list[str]:
    """Column names: ``first``, then per site (A, B, ...) every metric of `TABLE_METRICS` and the paper's column."""
    header = list(first)
    for pos in range(len(sites)):
        letter = site_letter(pos)
        header += [f"{letter} {METRIC_LABELS[m]}" for m in TABLE_METRICS] + [f"{letter} {paper_column}"]
    return header


def table_one(runs: Sequence[RunResult], sites: Sequence[str]) -> Table:
    """Table I: per row and site, mean ± std in % over folds x seeds, the paper's AUC beside ours."""
    header = _header(["Method", "runs"], sites, "AUC (paper)")
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
        f"Columns: {_sites_legend(sites)}. "
        "Mean ± sample standard deviation (ddof=1) over every finished fold x seed run of each row, in %; "
        "'runs' counts them, '–' marks a row or site without runs. A run whose predictions collapsed (P(COVID) "
        "nearly constant over a validation part: its AUC is noise around the class prior, not a result) is left "
        "out and the row is marked. The paper's AUC (mean of 4 folds x 3 runs) "
        f"stands beside ours; the paper's site A is {PAPER_SITES[0]} (SARS-CoV-2 CT-scan) and its site B is "
        f"{PAPER_SITES[1]} (COVID-CT)."
    )
    return Table("Table I. COVID-19 CT classification per site (mean ± std)", header, body, caption)


def validation_ranking(runs: Sequence[RunResult], sites: Sequence[str]
                       ) -> tuple[list[tuple[PaperRow, float, list[float]]], int]:
    """The rows ranked on validation, best first, as (row, mean over sites of the mean validation AUC in %, the
    per-site means), and the number of (fold, seed) pairs the means are over. Each run's validation AUC is its
    selected checkpoint's, on its own validation part: a choice made here reads no test fold. Rows are compared on
    the pairs they all have, so a partial grid ranks like with like; collapsed runs and runs without validation on
    every site are left out."""
    with_val = {row: [r for r in runs_of(runs, row) if not r.collapsed and all(s in r.val_auc for s in sites)]
                for row in rows_for(runs)}
    with_val = {row: mine for row, mine in with_val.items() if mine}
    common = set.intersection(*({(r.fold, r.seed) for r in mine} for mine in with_val.values())) if with_val else set()
    if not common:
        return [], 0
    ranked = []
    for row, mine in with_val.items():
        per_site = [float(np.mean([100 * r.val_auc[s] for r in mine if (r.fold, r.seed) in common])) for s in sites]
        ranked.append((row, float(np.mean(per_site)), per_site))
    return sorted(ranked, key=lambda item: -item[1]), len(common)


def one_model(row: PaperRow) -> bool:
    """Whether ``row`` trains one model on every site (Single trains one per site, and so has no model for a site
    it never saw)."""
    method = METHODS.get(row.method)
    return method is None or not method.per_site


def _first_one_model(ranked: Sequence[tuple[PaperRow, float, list[float]]]) -> PaperRow | None:
    return next((row for row, _, _ in ranked if one_model(row)), None)


def chosen_row(runs: Sequence[RunResult], sites: Sequence[str]) -> PaperRow | None:
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
    caption = (f"Columns: {_sites_legend(sites)}. Mean over the {pairs} (fold, seed) pairs every ranked row has of the "
               "validation AUC of each run's selected checkpoint (its own validation part, never a test fold), in %; "
               "'mean' averages the sites. The chosen row is the best one that trains one model on every site, "
               "which a hospital the model never saw needs (Single's per-site models have no slot for it): "
               "`crosssite train` defaults to it and the shipped model is trained with it. It is chosen on "
               "validation alone, so its Table I test AUC stays an honest estimate (the last column, Table I's mean "
               "over sites, is shown, not used). Validation AUCs are optimistic: each is the best of its run's "
               "epochs.")
    return Table("Which row to train: the rows ranked on validation", header, body, caption)


def _matched(ours: Sequence[RunResult], other: Sequence[RunResult], site: str, metric: str) -> tuple[list, list]:
    theirs = {(r.fold, r.seed): r for r in other if site in r.sites}
    a, b = [], []
    for r in ours:
        match = theirs.get((r.fold, r.seed))
        if match is not None and site in r.sites:
            a.append(r.sites[site].metrics.get(metric, float("nan")))
            b.append(match.sites[site].metrics.get(metric, float("nan")))
    return a, b


def ttest_pvalues(
    runs: Sequence[RunResult], other: PaperRow, site: str, metric: str, ours: PaperRow = OURS
) -> tuple[float, float, int]:
    """(p, mean difference ours - other in %, pairs) of a paired t-test matched by (fold, seed)."""
    a, b = _matched(runs_of(runs, ours), runs_of(runs, other), site, metric)
    res = paired_ttest(a, b)
    diff = 100.0 * float(np.nanmean(np.subtract(a, b))) if res.n else float("nan")
    return res.p, diff, res.n


def _p_text(p: float, diff: float, n: int) -> str:
    if n < 2:
        return "n/a"
    if math.isnan(p):
        return "– (=)"  # every difference is zero
    text = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    return f"{text} ({'+' if diff > 0 else '-' if diff < 0 else '='})"


def ttest_table(runs: Sequence[RunResult], sites: Sequence[str], which: str) -> Table:
    """Table II (`which="baselines"`) or Table III (`which="comparisons"`): p-values of ours against each row."""
    if which not in ("baselines", "comparisons"):
        raise ValueError(f"which must be 'baselines' or 'comparisons', got {which!r}")
    rows = BASELINES if which == "baselines" else COMPARISONS
    header = _header(["Ours vs.", "pairs"], sites, "paper")
    body = []
    for row in rows:
        counts = [ttest_pvalues(runs, row, site, "auc")[2] for site in sites]
        cells = [row.label, "/".join(str(c) for c in counts)]
        for site in sites:
            cells += [_p_text(*ttest_pvalues(runs, row, site, m)) for m in TABLE_METRICS]
            layout = site_layout(runs, site)
            paper = row.paper_p[PAPER_SITES.index(layout)] if row.paper_p and layout in PAPER_SITES else None
            cells.append("–" if paper is None else f"{paper:g}")
        body.append(cells)
    number, against = ("II", "Single, Joint and SepNorm") if which == "baselines" else (
        "III",
        "the comparison methods",
    )
    caption = (
        f"Columns: {_sites_legend(sites)}. Two-sided paired t-test (scipy.stats.ttest_rel) of {OURS.label} against {against}, runs paired by "
        "(fold, seed); 'pairs' counts the matched pairs per site. (+) ours has the higher mean, (-) the lower; "
        "'n/a' means fewer than 2 matched pairs. The paper reports one p-value per site without naming the "
        "metric, and only for the redesigned backbone."
    )
    return Table(f"Table {number}. p-values of ours against {against}", header, body, caption)


def _row(method: str, backbone: str = "covidnet_redesign") -> PaperRow:
    return next(r for r in ROWS if r.method == method and r.backbone == backbone)


# The paper's claims, each a list of (better, worse) rows whose test AUCs are compared per site.
CLAIMS: tuple[tuple[str, tuple[tuple[PaperRow, PaperRow], ...]], ...] = (
    ("the redesign beats the original COVID-Net", ((_row("single"), _row("single", "covidnet")),
                                                   (_row("joint"), _row("joint", "covidnet")))),
    ("Single beats Joint", ((_row("single"), _row("joint")),)),
    ("SepNorm beats Joint", ((_row("sepnorm"), _row("joint")),)),
    ("the contrastive term adds to SepNorm", ((OURS, _row("sepnorm")),)),
    ("ours beats every other row", tuple((OURS, r) for r in ROWS if r != OURS)),
)


def _test_train_ratio(runs: Sequence[RunResult]) -> float:
    """n_test / n_train of one run of the k-fold protocol: 1/k against (1 - 1/k)(1 - val_fraction)."""
    config = next((r.config for r in runs if r.config), {})
    k, val = int(config.get("folds", 4)), float(config.get("val_fraction", 0.2))
    return (1 / k) / ((1 - 1 / k) * (1 - val))


def claim_tests(runs: Sequence[RunResult], sites: Sequence[str], alpha: float = 0.05) -> list[dict[str, Any]]:
    """One entry per (claim, comparison, site) -- the paper's `CLAIMS`, then "X beats ours" for each row the runs
    hold beyond the paper's: mean AUC difference (better - worse, in %), pairs, the plain
    paired t-test's p, the corrected resampled t-test's p (Nadeau-Bengio), its Holm adjustment over every entry,
    and the verdict: confirmed / refuted (Holm-adjusted corrected p < ``alpha``, by the sign of the difference)
    or undecided. Collapsed runs are left out of the pairs."""
    ok = [r for r in runs if not r.collapsed]
    ratio = _test_train_ratio(ok)
    out = []
    # every row beyond the paper's (crosssite's recipe) is put to the test against ours, inside the same correction
    extra = tuple((f"{row.label} beats ours", ((row, OURS),)) for row in rows_for(runs)[len(ROWS):])
    for claim, pairs in CLAIMS + extra:
        for better, worse in pairs:
            for site in sites:
                a, b = _matched(runs_of(ok, better), runs_of(ok, worse), site, "auc")
                plain, corrected = paired_ttest(a, b), corrected_resampled_ttest(a, b, ratio)
                diff = 100.0 * float(np.nanmean(np.subtract(a, b))) if a else float("nan")
                out.append({"claim": claim, "better": better.label, "worse": worse.label, "site": site,
                            "diff": diff, "pairs": corrected.n, "p": plain.p, "p_corrected": corrected.p})
    # Holm over the distinct comparisons (one comparison may serve two claims: ours vs SepNorm)
    keys = list(dict.fromkeys((e["better"], e["worse"], e["site"]) for e in out))
    first = {(e["better"], e["worse"], e["site"]): e["p_corrected"] for e in reversed(out)}
    adjusted_of = dict(zip(keys, holm([first[k] for k in keys])))
    for entry in out:
        adjusted = entry["p_holm"] = adjusted_of[(entry["better"], entry["worse"], entry["site"])]
        significant = not math.isnan(adjusted) and adjusted < alpha
        entry["verdict"] = ("confirmed" if entry["diff"] > 0 else "refuted") if significant else "undecided"
    return out


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def claims_table(runs: Sequence[RunResult], sites: Sequence[str]) -> Table:
    """The paper's claims, one line per comparison and site, with the verdict (see `claim_tests`)."""
    tests = claim_tests(runs, sites)
    body = [[t["claim"], f"{t['better']} vs {t['worse']}", f"{site_letter(list(sites).index(t['site']))}",
             "n/a" if math.isnan(t["diff"]) else f"{t['diff']:+.2f}", str(t["pairs"]), _p(t["p"]),
             _p(t["p_corrected"]), _p(t["p_holm"]), t["verdict"]] for t in tests]
    header = ["Claim", "comparison", "site", "AUC diff (%)", "pairs", "p (paired t)", "p (corrected)", "p (Holm)",
              "verdict"]
    caption = (
        f"Columns: {_sites_legend(sites)}. Test AUC differences of runs paired by (fold, seed). 'p (paired t)': "
        "scipy.stats.ttest_rel, as in the paper; 'p (corrected)': Nadeau and Bengio's corrected resampled t-test "
        f"(variance x (1/J + n_test/n_train), n_test/n_train = {_test_train_ratio(runs):.3f}), since the folds "
        f"share training data; 'p (Holm)': the corrected p adjusted by Holm over the "
        f"{len({(t['better'], t['worse'], t['site']) for t in tests})} distinct comparisons. Verdict: "
        "confirmed / refuted when the Holm-adjusted p is below 0.05 (by the sign of the difference), else "
        "undecided. Collapsed runs are left out."
    )
    return Table("The paper's claims, tested", header, body, caption)


def claim_verdicts(tests: Sequence[dict[str, Any]], sites: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """Each claim's verdict per site from its comparisons (`claim_tests`): confirmed when every comparison is,
    refuted when any is, else undecided."""
    out = []
    for claim in dict.fromkeys(t["claim"] for t in tests):
        per_site = {}
        for site in sites:
            verdicts = [t["verdict"] for t in tests if t["claim"] == claim and t["site"] == site]
            per_site[site] = ("refuted" if "refuted" in verdicts else
                              "confirmed" if verdicts and set(verdicts) == {"confirmed"} else "undecided")
        out.append((claim, per_site))
    return out


def verdict_table(runs: Sequence[RunResult], sites: Sequence[str]) -> Table:
    """One line per claim: its verdict on each site (`claim_verdicts` over `claim_tests`)."""
    tests = claim_tests(runs, sites)
    body = [[claim, *(per_site[s] for s in sites)] for claim, per_site in claim_verdicts(tests, sites)]
    header = ["Claim", *(site_letter(i) for i in range(len(sites)))]
    caption = (f"Columns: {_sites_legend(sites)}. A claim is confirmed on a site when every comparison it "
               "makes there is (the table below: Holm-adjusted corrected p < 0.05, in its direction), refuted "
               "when any comparison goes significantly the other way, and undecided otherwise.")
    return Table("The paper's claims: verdicts", header, body, caption)


def interval_table(runs: Sequence[RunResult], sites: Sequence[str], n_boot: int = 200, seed: int = 0) -> Table:
    """Per row and site: the mean test AUC and the mean over runs of each run's 95% bootstrap interval, drawn
    over patients where the runs carry patient ids (site B), else over slices (site A has none)."""
    header = ["Method"] + [f"{site_letter(i)} AUC (95% CI)" for i in range(len(sites))]
    units = {}
    body = []
    for row in rows_for(runs):
        mine = [r for r in runs_of(runs, row) if not r.collapsed]
        cells = [row.label]
        for site in sites:
            results = [r.sites[site] for r in mine if site in r.sites and len(r.sites[site].y_true)]
            if not results:
                cells.append("–")
                continue
            lows, highs, aucs = [], [], []
            for res in results:
                low, high = bootstrap_ci(res.y_true, res.p_covid, n=n_boot, seed=seed, groups=res.patients)["auc"]
                lows.append(low)
                highs.append(high)
                aucs.append(res.metrics.get("auc", float("nan")))
                units.setdefault(site, set()).add("patients" if res.patients is not None else "slices")
            cells.append(f"{100 * np.nanmean(aucs):.2f} ({100 * np.nanmean(lows):.2f}-{100 * np.nanmean(highs):.2f})")
        body.append(cells)
    resampled = "; ".join(f"site {site_letter(i)}: {' and '.join(sorted(units.get(s, {'-'})))}"
                          for i, s in enumerate(sites))
    caption = (
        f"Columns: {_sites_legend(sites)}. Each run's test AUC with a stratified percentile bootstrap interval "
        f"({n_boot} resamples), averaged over the row's runs (collapsed runs left out). Resampled units: {resampled}. "
        "Where patient ids exist, whole patients are drawn (a cluster bootstrap): slices of one patient are not "
        "independent, and drawing slices would give intervals that are too narrow."
    )
    return Table("Test AUC with 95% bootstrap intervals", header, body, caption)


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
