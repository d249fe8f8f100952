"""Tests of the paper's claims on a grid's runs: Tables II-III (paired t-tests of the paper's method against the
baselines and the comparison methods) and every claim with a corrected resampled t-test and Holm's adjustment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from crosssite.evaluation import PairedTTest, corrected_resampled_ttest, holm, paired_ttest
from crosssite.reporting.results import PAPER_SITES, TABLE_METRICS, RunResult, site_layout
from crosssite.reporting.rows import BASELINES, COMPARISONS, PAPER_METHOD, ROWS, TableRow, row_of, rows_for, runs_of
from crosssite.reporting.tables import Table, holdout_ratio, metric_header, site_letter, sites_legend

__all__ = ["ttest_pvalues", "ttest_table", "CLAIMS", "claim_tests", "claims_table", "claim_verdicts",
           "verdict_table"]

def _matched(ours: Sequence[RunResult], other: Sequence[RunResult], site: str, metric: str) -> tuple[list, list]:
    a, b, _ = _matched_units(ours, other, site, metric)
    return a, b


def _matched_units(ours: Sequence[RunResult], other: Sequence[RunResult], site: str, metric: str
                   ) -> tuple[list, list, list]:
    """The two rows' scores of the runs that share a test set and a model seed, and each pair's unit: its partition
    where the runs span several (repeated cross-validation), else its fold (the seeds on one partition)."""
    theirs = {r.pair: r for r in other if site in r.sites}
    repeated = len({r.split_seed for r in ours}) > 1
    a, b, units = [], [], []
    for r in ours:
        match = theirs.get(r.pair)
        if match is not None and site in r.sites:
            a.append(r.sites[site].metrics.get(metric, float("nan")))
            b.append(match.sites[site].metrics.get(metric, float("nan")))
            units.append(r.split_seed if repeated else r.fold)
    return a, b, units


def unit_means_ttest(a: Sequence[float], b: Sequence[float], units: Sequence[int]) -> PairedTTest:
    """A paired t-test of the two rows' mean scores per unit (partition or fold): a test whose pairs share no test
    set, at the price of few pairs."""
    keys = sorted(set(units))
    mean = lambda values: [float(np.nanmean([v for v, u in zip(values, units) if u == k])) for k in keys]  # noqa: E731
    return paired_ttest(mean(a), mean(b))


def ttest_pvalues(
    runs: Sequence[RunResult], other: TableRow, site: str, metric: str, ours: TableRow = PAPER_METHOD
) -> tuple[float, float, int]:
    """(p, mean difference ours - other in %, pairs) of a paired t-test matched by (fold, partition, seed)."""
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
    header = metric_header(["Ours vs.", "pairs"], sites, "paper")
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
        f"Columns: {sites_legend(sites)}. Two-sided paired t-test (scipy.stats.ttest_rel) of {PAPER_METHOD.label} "
        f"against {against}, runs paired by (fold, partition, seed); 'pairs' counts the matched pairs per site. (+) ours has "
        "the higher mean, (-) the lower; 'n/a' means fewer than 2 matched pairs. The paper reports one p-value per "
        "site without naming the metric, and only for the redesigned backbone."
    )
    return Table(f"Table {number}. p-values of ours against {against}", header, body, caption)


# The paper's claims, each a list of (better, worse) rows whose test AUCs are compared per site.
CLAIMS: tuple[tuple[str, tuple[tuple[TableRow, TableRow], ...]], ...] = (
    ("the redesign beats the original COVID-Net", ((row_of("single"), row_of("single", "covidnet")),
                                                   (row_of("joint"), row_of("joint", "covidnet")))),
    ("Single beats Joint", ((row_of("single"), row_of("joint")),)),
    ("SepNorm beats Joint", ((row_of("sepnorm"), row_of("joint")),)),
    ("the contrastive term adds to SepNorm", ((PAPER_METHOD, row_of("sepnorm")),)),
    ("ours beats every other row", tuple((PAPER_METHOD, r) for r in ROWS if r != PAPER_METHOD)),
)


def claim_tests(runs: Sequence[RunResult], sites: Sequence[str], alpha: float = 0.05) -> list[dict[str, Any]]:
    """One entry per (claim, comparison, site) -- the paper's `CLAIMS`, then "X beats ours" for each row the runs
    hold beyond the paper's: mean AUC difference (better - worse, in %), pairs, the plain
    paired t-test's p, the corrected resampled t-test's p (Nadeau-Bengio), its Holm adjustment over every entry,
    and the verdict: confirmed / refuted (Holm-adjusted corrected p < ``alpha``, by the sign of the difference)
    or undecided. Collapsed runs are left out of the pairs."""
    ok = [r for r in runs if not r.collapsed]
    ratio = holdout_ratio(ok)
    out = []
    # every row beyond the paper's (crosssite's recipe) is put to the test against ours, inside the same correction
    extra = tuple((f"{row.label} beats ours", ((row, PAPER_METHOD),)) for row in rows_for(runs)[len(ROWS):])
    for claim, pairs in CLAIMS + extra:
        for better, worse in pairs:
            for site in sites:
                a, b, units = _matched_units(runs_of(ok, better), runs_of(ok, worse), site, "auc")
                plain, corrected = paired_ttest(a, b), corrected_resampled_ttest(a, b, ratio)
                by_unit = unit_means_ttest(a, b, units) if a else PairedTTest(float("nan"), float("nan"), 0)
                diff = 100.0 * float(np.nanmean(np.subtract(a, b))) if a else float("nan")
                out.append({"claim": claim, "better": better.label, "worse": worse.label, "site": site,
                            "diff": diff, "pairs": corrected.n, "p": plain.p, "p_corrected": corrected.p,
                            "p_units": by_unit.p, "units": by_unit.n})
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
             _p(t["p_corrected"]), _p(t["p_holm"]), t["verdict"], f"{_p(t['p_units'])} ({t['units']})"]
            for t in tests]
    repeated = len({r.split_seed for r in runs}) > 1
    unit = "partition" if repeated else "fold"
    header = ["Claim", "comparison", "site", "AUC diff (%)", "pairs", "p (paired t)", "p (corrected)", "p (Holm)",
              "verdict", f"p ({unit} means)"]
    caption = (
        f"Columns: {sites_legend(sites)}. Test AUC differences of runs paired by (fold, partition, seed). 'p (paired t)': "
        "scipy.stats.ttest_rel, as in the paper; 'p (corrected)': Nadeau and Bengio's corrected resampled t-test "
        f"(variance x (1/J + n_test/n_train), n_test/n_train = {holdout_ratio(runs):.3f}), since the folds "
        f"share training data; 'p (Holm)': the corrected p adjusted by Holm over the "
        f"{len({(t['better'], t['worse'], t['site']) for t in tests})} distinct comparisons. Verdict: "
        "confirmed / refuted when the Holm-adjusted p is below 0.05 (by the sign of the difference), else "
        "undecided. Collapsed runs are left out. With several partitions (repeated k-fold cross-validation, one "
        "model seed each) the corrected test is Bouckaert and Frank's corrected repeated k-fold t-test (J = "
        f"partitions x folds). 'p ({unit} means)': a paired t-test of the two rows' mean AUC per {unit} (how many "
        "in brackets), whose pairs share no test set; beside the verdict, not in it."
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
    caption = (f"Columns: {sites_legend(sites)}. A claim is confirmed on a site when every comparison it "
               "makes there is (the table below: Holm-adjusted corrected p < 0.05, in its direction), refuted "
               "when any comparison goes significantly the other way, and undecided otherwise.")
    return Table("The paper's claims: verdicts", header, body, caption)
