"""Leave one site out: a model per held-out site, every strategy scored on every slice of it, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crosssite.data import load_sites
from crosssite.errors import ConfigError
from crosssite.experiment import run_loso
from crosssite.reporting.loso import loso_summary, loso_table

SITES = ["a=synthetic:shift=0.0,n=16,seed=1,size=40", "b=synthetic:shift=1.2,n=16,seed=2,size=40",
         "c=synthetic:shift=0.6,n=16,seed=3,size=40"]
TINY = {"image_size": 32, "width": 0.0625, "epochs": 1, "batch_per_site": 4, "ckpt_every": 0}


@pytest.fixture(scope="module")
def loso_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loso")
    assert run_loso(load_sites(SITES), out, overrides=TINY, progress=False, log=lambda _: None) == 3
    return out


def test_every_held_out_site_is_scored_on_all_its_slices_by_every_strategy(loso_dir: Path) -> None:
    lines = [json.loads(x) for x in (loso_dir / "loso.jsonl").read_text().splitlines()]
    sites = load_sites(SITES)
    for site in sites:
        mine = [r for r in lines if r["held_out"] == site.name]
        assert {r["strategy"] for r in mine} >= {"mean-of-sites", "adabn", "standardise", "tent", "ensemble"}
        assert all(r["n"] == len(site.samples) for r in mine)  # every slice of the held-out site
        assert all(site.name not in r["trained_on"] and len(r["trained_on"]) == 2 for r in mine)
        assert all(r["ci_resampled"] == "patients" and r["config"]["protocol"] == "all" for r in mine)
        run = loso_dir / "runs" / "loso__sepnorm-contrastive__covidnet_redesign" / f"{site.name}_seed0"
        assert json.loads((run / "model.json").read_text())["site_names"] == mine[0]["trained_on"]


def test_finished_sites_are_skipped_and_the_table_marks_the_best_mean(loso_dir: Path) -> None:
    assert run_loso(load_sites(SITES), loso_dir, overrides=TINY, progress=False, log=lambda _: None) == 0
    held, summary = loso_summary(loso_dir / "loso.jsonl")
    assert held == ["a", "b", "c"] and {"site:1", "site:2"} <= set(summary)
    table = loso_table(loso_dir / "loso.jsonl")
    means = [float(row[-1]) for row in table.body]
    assert means == sorted(means, reverse=True) and table.body[0][0].startswith("**")


def test_one_site_is_not_enough(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least two sites"):
        run_loso(load_sites(SITES[:1]), tmp_path, overrides=TINY, progress=False)


def test_the_report_holds_the_leave_one_site_out_table(loso_dir: Path) -> None:
    from crosssite.reporting import build_report

    written = build_report(loso_dir, gradcam=False)
    text = written.markdown.read_text()
    assert "Leave one site out: AUC per test-time strategy" in text and "| strategy | a | b | c | mean |" in text
