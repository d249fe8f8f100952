"""Table I v2's statistics: the corrected resampled t-test, Holm's adjustment, and the claims table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from crosssite.evaluation import corrected_resampled_ttest, holm, paired_ttest
from crosssite.reporting.claims import claim_tests, claims_table
from crosssite.reporting.results import load_results, site_order

REPO = Path(__file__).resolve().parents[1]


def test_corrected_ttest_inflates_the_variance_by_the_test_train_ratio() -> None:
    a = np.array([0.91, 0.93, 0.90, 0.95, 0.92, 0.94])
    b = np.array([0.89, 0.92, 0.90, 0.91, 0.90, 0.93])
    d = a - b
    t = d.mean() / math.sqrt((1 / 6 + 0.5) * d.var(ddof=1))
    res = corrected_resampled_ttest(a, b, 0.5)
    assert res.t == pytest.approx(t) and res.n == 6
    assert res.p == pytest.approx(2 * stats.t.sf(abs(t), 5))
    assert res.p > paired_ttest(a, b).p  # more cautious than the plain paired test
    assert math.isnan(corrected_resampled_ttest(a[:1], b[:1], 0.5).p)


def test_holm_adjusts_step_down_and_keeps_nan() -> None:
    assert holm([0.01, 0.04, float("nan"), 0.03]) == pytest.approx([0.03, 0.06, float("nan"), 0.06], nan_ok=True)
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])


def test_claims_table_on_the_first_grid() -> None:
    runs, _ = load_results(REPO / "results" / "cpu-real" / "results.jsonl")
    sites = site_order(runs)
    tests = claim_tests(runs, sites)
    contrastive = [t for t in tests if t["claim"] == "the contrastive term adds to SepNorm"]
    assert [t["pairs"] for t in contrastive] == [4, 4]
    assert all(t["p_holm"] >= t["p_corrected"] >= t["p"] for t in tests if t["pairs"] >= 2)
    assert {t["verdict"] for t in tests} <= {"confirmed", "refuted", "undecided"}
    # the original COVID-Net rows of that grid all collapsed: nothing to pair, so undecided
    original = [t for t in tests if "COVID-Net)" in t["worse"]]
    assert original and all(t["pairs"] == 0 and t["verdict"] == "undecided" for t in original)
    assert "Nadeau and Bengio" in claims_table(runs, sites).caption


def test_a_row_beyond_the_papers_is_tested_against_ours() -> None:
    import dataclasses

    runs, _ = load_results(REPO / "results" / "cpu-real" / "results.jsonl")
    paper_only = claim_tests(runs, site_order(runs))
    recipe = [dataclasses.replace(r, method="recipe-x") for r in runs if r.method == "sepnorm"]
    tests = claim_tests([*runs, *recipe], site_order(runs))
    (claim,) = {t["claim"] for t in tests} - {t["claim"] for t in paper_only}
    mine = [t for t in tests if t["claim"] == claim]
    assert claim == "recipe-x (covidnet_redesign) beats ours" and [t["pairs"] for t in mine] == [4, 4]
    # the same runs as SepNorm's, so the same differences as "the contrastive term adds to SepNorm", negated
    adds = [t for t in tests if t["claim"] == "the contrastive term adds to SepNorm"]
    assert [t["diff"] for t in mine] == pytest.approx([-t["diff"] for t in adds])
    kept = [(t["p_holm"], s["p_holm"]) for t, s in zip(tests, paper_only) if not math.isnan(s["p_holm"])]
    assert kept and all(new >= old for new, old in kept)  # one more comparison to correct for


def test_rows_are_ranked_on_validation_over_the_pairs_they_share() -> None:
    import dataclasses
    import json

    from crosssite.reporting.choice import validation_ranking, validation_table

    path = REPO / "results" / "cpu-real" / "results.jsonl"
    runs, _ = load_results(path)
    sites = site_order(runs)
    ranked, pairs = validation_ranking(runs, sites)
    collapsed = {r.key for r in runs if r.collapsed}
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    for row, mean, per_site in ranked:  # the recorded validation AUCs, averaged per site and then over sites
        mine = [r for r in raw if (r["method"], r["backbone"]) == (row.method, row.backbone)
                and (r["method"], r["backbone"], r["fold"], r["seed"]) not in collapsed]
        assert per_site == pytest.approx([100 * np.mean([r["val"][s]["auc"] for r in mine]) for s in sites])
        assert mean == pytest.approx(np.mean(per_site))
    assert pairs == 4 and [m for _, m, _ in ranked] == sorted((m for _, m, _ in ranked), reverse=True)
    assert all("COVID-Net)" not in row.label for row, _, _ in ranked)  # collapsed in every run: not ranked
    # a row with one pair only: every row is then compared on that pair
    best = ranked[0][0]
    extra = [dataclasses.replace(r, method="recipe-x", val_auc={s: 1.0 for s in sites})
             for r in runs if r.method == best.method and r.backbone == best.backbone][:1]
    reranked, pairs = validation_ranking([*runs, *extra], sites)
    assert pairs == 1 and reranked[0][0].method == "recipe-x" and reranked[0][1] == pytest.approx(100.0)
    assert validation_table([*runs, *extra], sites).body[0][0] == "**recipe-x (covidnet_redesign)** (chosen)"
    # a per-site row on top is shown but not chosen: the chosen row is the best one that trains one model
    single = [dataclasses.replace(r, method="single", backbone="covidnet_redesign", val_auc={s: 1.0 for s in sites})
              for r in extra]
    body = validation_table([*runs, *single], sites).body
    assert body[0][:2] == ["Single (Redesign)", "no, one per site"]
    assert body[1][0].endswith("(chosen)") and body[1][1] == "yes"


def test_a_claim_is_confirmed_only_when_every_comparison_is() -> None:
    from crosssite.reporting.claims import claim_verdicts, verdict_table

    def entry(claim: str, site: str, verdict: str) -> dict:
        return {"claim": claim, "site": site, "verdict": verdict}

    tests = [entry("c1", "A", "confirmed"), entry("c1", "A", "confirmed"), entry("c1", "B", "confirmed"),
             entry("c1", "B", "undecided"), entry("c2", "A", "confirmed"), entry("c2", "A", "refuted"),
             entry("c2", "B", "undecided")]
    assert claim_verdicts(tests, ["A", "B"]) == [("c1", {"A": "confirmed", "B": "undecided"}),
                                                 ("c2", {"A": "refuted", "B": "undecided"})]
    runs, _ = load_results(REPO / "results" / "cpu-real" / "results.jsonl")
    table = verdict_table(runs, site_order(runs))
    assert [row[0] for row in table.body][:2] == ["the redesign beats the original COVID-Net", "Single beats Joint"]
    assert all(v == "undecided" for row in table.body for v in row[1:])  # the first grid: 4 pairs decide nothing
