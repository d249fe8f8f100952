"""The protocol runner: a tiny 2-method x 2-fold grid on synthetic sites runs, resumes, and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from crosssite.cli import app
from crosssite.data import load_sites
from crosssite.experiment import RunKey, claim_run, finished_keys, grid, run_experiment
from crosssite.reporting import build_report

TINY = {"image_size": 32, "width": 0.0625, "epochs": 1, "batch_per_site": 4, "eval_every": 1, "ckpt_every": 0}
SITES = ("near=synthetic:shift=0.0,n=24,seed=3,size=48", "far=synthetic:shift=1.5,n=24,seed=4,size=48")
ROWS = [("joint", "covidnet_redesign"), ("sepnorm-contrastive", "covidnet_redesign")]


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exp")
    ran = run_experiment(load_sites(SITES), out, rows=ROWS, folds=2, overrides=TINY, progress=False, log=lambda _: None)
    assert ran == sorted(ran, key=lambda k: (k.seed, k.fold)) and len(ran) == 4
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_grid_order_fills_every_row_of_a_fold_first() -> None:
    keys = list(grid(ROWS, folds=2, seeds=[0, 1]))
    assert keys[:2] == [RunKey("joint", "covidnet_redesign", 0, 0), RunKey("sepnorm-contrastive", "covidnet_redesign", 0, 0)]
    assert len(keys) == len(set(keys)) == 8


def test_every_run_writes_one_complete_line(experiment_dir: Path) -> None:
    lines = _lines(experiment_dir / "results.jsonl")
    assert {(r["method"], r["fold"]) for r in lines} == {(m, f) for m, _ in ROWS for f in (0, 1)}
    for row in lines:
        assert row["site_order"] == ["near", "far"]
        assert row["site_info"]["near"]["has_patients"] is True
        assert row["git_commit"] and row["machine"]["cpu_count"] >= 1 and row["wall_s"] > 0
        assert row["machine"]["cpu"] not in ("", "unknown")  # the CPU's model name: wall times are quoted with it
        assert row["config"]["image_size"] == 32 and row["config"]["fold"] == row["fold"]
        for name in ("near", "far"):
            site = row["sites"][name]
            assert 0.0 <= site["auc"] <= 1.0
            assert len(site["y_true"]) == len(site["p_covid"]) > 0
            # the recorded predictions are the run's test part: same count as its split file
            split = json.loads((experiment_dir / row["run_dir"] / "split.json").read_text())
            assert len(site["y_true"]) == len(split["sites"][["near", "far"].index(name)]["test"]["indices"])


def test_finished_runs_are_skipped_and_a_deleted_line_reruns(experiment_dir: Path) -> None:
    results = experiment_dir / "results.jsonl"
    lines = results.read_text().splitlines()
    assert run_experiment(load_sites(SITES), experiment_dir, rows=ROWS, folds=2, overrides=TINY,
                          progress=False, log=lambda _: None) == []
    dropped = json.loads(lines[1])
    results.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    ran = run_experiment(load_sites(SITES), experiment_dir, rows=ROWS, folds=2, overrides=TINY,
                         progress=False, log=lambda _: None)
    key = RunKey(dropped["method"], dropped["backbone"], dropped["fold"], dropped["seed"])
    assert ran == [key]
    assert len(finished_keys(results)) == 4
    again = [r for r in _lines(results) if RunKey(r["method"], r["backbone"], r["fold"], r["seed"]) == key][0]
    # the finished run is resumed from its checkpoint, not retrained: the same test predictions come back
    assert again["sites"]["far"]["p_covid"] == dropped["sites"]["far"]["p_covid"]


def test_a_run_another_runner_holds_is_left_to_it_and_said(tmp_path: Path) -> None:
    first, second = RunKey("joint", "covidnet_redesign", 0, 0), RunKey("joint", "covidnet_redesign", 1, 0)
    logs: list[str] = []
    with claim_run(tmp_path / "runs" / first.dirname) as mine:
        assert mine
        ran = run_experiment(load_sites(SITES), tmp_path, rows=ROWS[:1], folds=2, overrides=TINY, progress=False,
                             log=logs.append)
    assert ran == [second] and finished_keys(tmp_path / "results.jsonl") == {second}
    assert any(line.startswith("1 run(s) left") and "joint fold 0 seed 0" in line for line in logs)
    # the claim ends with its holder: the next call runs the run
    assert run_experiment(load_sites(SITES), tmp_path, rows=ROWS[:1], folds=2, overrides=TINY, progress=False,
                          log=lambda _: None) == [first]


def test_runner_processes_share_a_grid_and_run_every_key_once(tmp_path: Path) -> None:
    import torch

    logs: list[str] = []
    ran = run_experiment(load_sites(SITES), tmp_path, rows=ROWS, folds=2, overrides=TINY, runners=2,
                         progress=False, log=logs.append)
    lines = _lines(tmp_path / "results.jsonl")
    keys = [RunKey(r["method"], r["backbone"], r["fold"], r["seed"]) for r in lines]
    assert len(keys) == len(set(keys)) == 4 and sorted(ran) == sorted(keys)
    threads = max(1, torch.get_num_threads() // 2)
    assert f"2 runner processes, {threads} torch thread(s) each" in logs
    assert {r["machine"]["torch_threads"] for r in lines} == {threads}  # each runner trained on its share
    assert run_experiment(load_sites(SITES), tmp_path, rows=ROWS, folds=2, overrides=TINY, runners=2,
                          progress=False, log=lambda _: None) == []


def test_report_writes_every_table_and_figure(experiment_dir: Path) -> None:
    out = build_report(experiment_dir)
    md = out.markdown.read_text()
    assert "Table I" in md and "Joint (Redesign)" in md and "SepNorm + Contrastive" in md
    assert "Tables II and III" in md
    html = out.html.read_text()
    assert "<table" in html and "data:image/png;base64," in html
    assert out.figures, "no figure written"
    for png in out.figures:
        with Image.open(png) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100


def test_experiment_cli_rejects_unknown_method(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["experiment", "--site", SITES[0], "--site", SITES[1], "--methods", "magic",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "unknown method 'magic'" in result.output


def test_an_undefined_metric_is_kept_as_null_and_read_back_as_nan(tmp_path: Path) -> None:
    """A model that calls every slice non-COVID has no precision; its line still names the metric (null), and
    the report reads it as NaN instead of rejecting the line."""
    import math

    from crosssite.experiment.runs import numbers as _numbers
    from crosssite.reporting import load_results

    metrics = {"accuracy": 0.5, "f1": 0.0, "recall": 0.0, "specificity": 1.0, "precision": None, "auc": 0.6}
    kept = _numbers(metrics | {"n": 10, "flag": True, "note": "x"})
    assert kept == metrics | {"n": 10}
    site = kept | {"y_true": [0, 1], "p_covid": [0.2, 0.4]}
    line = {"method": "joint", "backbone": "covidnet", "fold": 0, "seed": 0, "run_dir": "r", "sites": {"A": site}}
    (tmp_path / "results.jsonl").write_text(json.dumps(line) + "\n")
    (run,), _ = load_results(tmp_path / "results.jsonl")
    assert math.isnan(run.sites["A"].metrics["precision"]) and run.sites["A"].metrics["auc"] == 0.6


def test_a_terminated_grid_stops_its_runners_and_frees_their_runs(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    sets = [f"--set={k}={v}" for k, v in {**TINY, "epochs": 200}.items()]
    command = [sys.executable, "-m", "crosssite", "experiment", "--site", SITES[0], "--site", SITES[1],
               "--methods", "joint,sepnorm", "--folds", "2", "--out", str(tmp_path), "--runners", "2", "--no-report",
               "--quiet", *sets]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout is not None
    started = 0
    for line in proc.stdout:  # wait until both runners train
        started += line.startswith("[runner ") and "->" in line
        if started == 2:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted" in out
    held = sorted(tmp_path.glob("runs/*/.*.claim"))
    assert len(held) == 2
    for claim in held:  # both runners are gone: every run they held can be claimed again
        with claim_run(claim.parent / claim.name[1:-len(".claim")]) as mine:
            assert mine
    assert not (tmp_path / "results.jsonl").exists()  # neither run was finished


def test_a_failed_grid_leaves_no_claim_file(tmp_path: Path) -> None:
    """A run that fails (here: a configuration error raised once the run is claimed) gives up its claim and removes
    it, as a finished run does."""
    from crosssite.errors import CrossSiteError

    with pytest.raises(CrossSiteError):
        run_experiment(load_sites(SITES), tmp_path, rows=ROWS[:1], folds=2, overrides={**TINY, "lr_min": 1.0},
                       progress=False, log=lambda _: None)
    assert (tmp_path / "runs").is_dir() and not list(tmp_path.rglob(".*.claim"))
    run_experiment(load_sites(SITES), tmp_path, rows=ROWS[:1], folds=2, overrides=TINY, max_runs=1, progress=False,
                   log=lambda _: None)
    assert len(finished_keys(tmp_path / "results.jsonl")) == 1 and not list(tmp_path.rglob(".*.claim"))


def test_repeated_cross_validation_tests_a_new_partition_per_repeat(tmp_path: Path) -> None:
    """`repeats=2`: 2 partitions x 2 folds of one row, one model seed per partition (its own); each partition's
    folds split the site differently, the runs resume by their full key, and the report's claims pair by it."""
    keys = list(grid(ROWS[:1], folds=2, seeds=[0, 1, 2], repeats=2))
    assert [(k.fold, k.split_seed, k.seed) for k in keys] == [(0, 0, 0), (1, 0, 0), (0, 1, 1), (1, 1, 1)]
    assert keys[2].dirname.endswith("fold0_split1_seed1") and keys[0].dirname.endswith("fold0_seed0")
    out = tmp_path / "repeated"
    ran = run_experiment(load_sites(SITES), out, rows=ROWS[:1], folds=2, repeats=2, overrides=TINY, progress=False,
                         log=lambda _: None)
    assert sorted(ran) == sorted(keys) and finished_keys(out / "results.jsonl") == set(keys)
    lines = _lines(out / "results.jsonl")
    assert {(r["split_seed"], r["config"]["split_seed"], r["seed"]) for r in lines} == {(0, 0, 0), (1, 1, 1)}
    tests = {(r["split_seed"], r["fold"]): json.loads((out / r["run_dir"] / "split.json").read_text())["sites"][0]
             ["test"]["indices"] for r in lines}
    assert tests[(0, 0)] != tests[(1, 0)]  # another partition, not the same test set again
    assert run_experiment(load_sites(SITES), out, rows=ROWS[:1], folds=2, repeats=2, overrides=TINY,
                          progress=False, log=lambda _: None) == []


def test_corrected_interval_and_unit_means_test() -> None:
    """The row's interval for its mean is the t interval with the corrected variance: with n_test/n_train = 0 it
    is scipy's plain t interval, and a positive ratio widens it; partition means pair one value per partition."""
    import numpy as np
    from scipy import stats

    from crosssite.evaluation import corrected_mean_interval, paired_ttest
    from crosssite.reporting.claims import unit_means_ttest

    values = [0.91, 0.94, 0.90, 0.95, 0.93, 0.92]
    mean, low, high = corrected_mean_interval(values, 0.0)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and (low, high) == pytest.approx(expected)
    _, wide_low, wide_high = corrected_mean_interval(values, 0.42)
    assert wide_low < low and wide_high > high
    a, b, units = [0.9, 0.8, 0.7, 0.6], [0.85, 0.8, 0.6, 0.55], [0, 0, 1, 1]
    got, expected = unit_means_ttest(a, b, units), paired_ttest([0.85, 0.65], [0.825, 0.575])
    assert got.n == expected.n == 2 and (got.t, got.p) == pytest.approx((expected.t, expected.p))
