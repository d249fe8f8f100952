"""Metrics against scikit-learn, bootstrap intervals, paired t-tests, probability collection."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm

from crosssite.evaluation import (
    CLASS_NAMES,
    METRICS,
    EvaluationError,
    binary_metrics,
    bootstrap_ci,
    collect_probabilities,
    confusion_matrix,
    paired_ttest,
)
from crosssite.evaluation.metrics import _metrics_from_counts



def _random_predictions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0.0, 1.0)
    return y, p


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_metrics_equal_sklearn(seed: int, threshold: float) -> None:
    y, p = _random_predictions(300, seed)
    pred = (p >= threshold).astype(int)
    expected = {
        "accuracy": skm.accuracy_score(y, pred),
        "f1": skm.f1_score(y, pred),
        "recall": skm.recall_score(y, pred),
        "specificity": skm.recall_score(y, pred, pos_label=0),
        "precision": skm.precision_score(y, pred),
        "auc": skm.roc_auc_score(y, p),
    }
    got = binary_metrics(y, p, threshold=threshold)
    assert set(got) == set(METRICS)
    for name in METRICS:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name


def test_confusion_matrix_by_hand() -> None:
    # true:       0    0    0    1    1    1    1
    # predicted:  0    1    0    1    1    0    1   (threshold 0.5)
    y = [0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.7, 0.49, 0.5, 0.9, 0.2, 0.8]
    cm = confusion_matrix(y, p)
    # rows: true non-COVID (2 right, 1 called COVID), true COVID (1 missed, 3 found)
    assert cm.counts.tolist() == [[2, 1], [1, 3]]
    assert cm.labels == CLASS_NAMES == ("non-COVID", "COVID")
    assert cm.to_dict() == {
        "rows": "true",
        "columns": "predicted",
        "labels": ["non-COVID", "COVID"],
        "counts": [[2, 1], [1, 3]],
    }
    assert cm.to_csv().splitlines() == ["true \\ predicted,non-COVID,COVID", "non-COVID,2,1", "COVID,1,3"]
    m = binary_metrics(y, p)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(5 / 7)


def test_missing_class_gives_nan_auc_with_warning() -> None:
    with pytest.warns(UserWarning, match="no non-COVID case"):
        m = binary_metrics([1, 1, 1], [0.2, 0.6, 0.9])
    assert np.isnan(m["auc"]) and np.isnan(m["specificity"])
    assert m["recall"] == pytest.approx(2 / 3)
    with pytest.warns(UserWarning, match="no COVID case"):
        m = binary_metrics([0, 0], [0.2, 0.3])
    assert np.isnan(m["auc"]) and np.isnan(m["recall"]) and np.isnan(m["precision"])
    assert m["specificity"] == 1.0


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        ([0, 1], [0.5], "2 labels but p_covid has 1"),
        ([0, 2], [0.5, 0.5], "must hold 0"),
        ([0, 1], [0.5, 1.5], r"\[0, 1\]"),
        ([], [], "empty"),
    ],
)
def test_bad_inputs_raise(y: list, p: list, match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        binary_metrics(y, p)


def test_count_metrics_match_sklearn_on_the_original_sample() -> None:
    y, p = _random_predictions(200, 5)
    p = np.round(p, 2)  # ties between classes exercise the 1/2 credit of the AUC
    values, codes = np.unique(p, return_inverse=True)
    pos = np.bincount(codes[y == 1], minlength=len(values))[None]
    neg = np.bincount(codes[y == 0], minlength=len(values))[None]
    got = _metrics_from_counts(pos, neg, values >= 0.5)
    expected = binary_metrics(y, p)
    for name in METRICS:
        assert got[name][0] == pytest.approx(expected[name], abs=1e-12), name


def test_bootstrap_contains_point_estimate_and_narrows() -> None:
    y_small, p_small = _random_predictions(80, 3)
    y_big, p_big = _random_predictions(2000, 3)
    ci_small = bootstrap_ci(y_small, p_small, n=500, seed=0)
    ci_big = bootstrap_ci(y_big, p_big, n=500, seed=0)
    for y, p, ci in ((y_small, p_small, ci_small), (y_big, p_big, ci_big)):
        point = binary_metrics(y, p)
        for name in METRICS:
            low, high = ci[name]
            assert low <= point[name] <= high, name
    for name in METRICS:
        assert np.diff(ci_big[name])[0] < np.diff(ci_small[name])[0], name
    assert bootstrap_ci(y_small, p_small, n=200, seed=7) == bootstrap_ci(y_small, p_small, n=200, seed=7)


def test_bootstrap_chunking_does_not_change_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    import crosssite.evaluation.metrics as evaluation

    y, p = _random_predictions(300, 4)
    whole = bootstrap_ci(y, p, n=100)
    monkeypatch.setattr(evaluation, "_BOOTSTRAP_CELLS", 300 * 7)  # 7 resamples per pass
    assert bootstrap_ci(y, p, n=100) == whole


def test_bootstrap_is_stratified() -> None:
    # One COVID case among many: an unstratified resample would often draw none and lose the AUC.
    y = np.array([1] + [0] * 30)
    p = np.linspace(0.9, 0.0, 31)
    ci = bootstrap_ci(y, p, n=300)
    assert ci["auc"] == (1.0, 1.0)
    assert ci["recall"] == (1.0, 1.0)


def test_bootstrap_with_one_class_is_nan_not_crash() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = bootstrap_ci([0, 0, 0, 0], [0.1, 0.2, 0.7, 0.3], n=50)
    assert all(np.isnan(v) for v in ci["auc"])
    assert ci["specificity"][0] <= 0.75 <= ci["specificity"][1]


def test_paired_ttest_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    ours = 0.9 + 0.02 * rng.standard_normal(12)
    other = ours - 0.03 + 0.02 * rng.standard_normal(12)
    expected = stats.ttest_rel(ours, other)
    got = paired_ttest(ours, other)
    assert got.t == pytest.approx(expected.statistic)
    assert got.p == pytest.approx(expected.pvalue)
    assert got.n == 12


def test_paired_ttest_edge_cases() -> None:
    assert np.isnan(paired_ttest([0.9], [0.8]).p)
    res = paired_ttest([0.9, np.nan, 0.8, 0.7], [0.8, 0.8, 0.75, 0.7])
    assert res.n == 3
    assert res.p == pytest.approx(stats.ttest_rel([0.9, 0.8, 0.7], [0.8, 0.75, 0.7]).pvalue)
    with pytest.raises(EvaluationError, match="equal length"):
        paired_ttest([1.0, 2.0], [1.0])


class _SiteShift(torch.nn.Module):
    """Logits (0, x.mean() + site): the site argument visibly changes the output."""

    def forward(self, x: torch.Tensor, site: torch.Tensor | None) -> torch.Tensor:
        shift = torch.zeros(len(x)) if site is None else site.float()
        score = x.mean(dim=(1, 2, 3)) + shift
        return torch.stack([torch.zeros_like(score), score], dim=1)


def _loader(n: int = 10, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 8, 8, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    sites = torch.arange(n) % 2
    return [
        {"image": images[i : i + batch], "label": labels[i : i + batch], "site": sites[i : i + batch],
         "index": torch.arange(i, min(i + batch, n))}
        for i in range(0, n, batch)
    ]


def test_collect_probabilities_softmax_and_site_override() -> None:
    loader = _loader()
    model = _SiteShift().train()
    images = torch.cat([b["image"] for b in loader])
    means = images.mean(dim=(1, 2, 3)).double()
    out = collect_probabilities(model, loader)
    assert model.training  # mode restored
    assert out.index.tolist() == list(range(10))
    assert out.site.tolist() == [i % 2 for i in range(10)]
    assert out.label.tolist() == torch.cat([b["label"] for b in loader]).tolist()
    np.testing.assert_allclose(out.p_covid, torch.sigmoid(means + torch.from_numpy(out.site)).numpy(), rtol=1e-6)
    forced = collect_probabilities(model, loader, site_override=1)
    np.testing.assert_allclose(forced.p_covid, torch.sigmoid(means + 1).numpy(), rtol=1e-6)
    assert forced.site.tolist() == out.site.tolist()  # the items' own sites are still reported
    mean = collect_probabilities(model, loader, site_override="mean-of-sites")
    np.testing.assert_allclose(mean.p_covid, torch.sigmoid(means).numpy(), rtol=1e-6)
    with pytest.raises(EvaluationError, match="site_override"):
        collect_probabilities(model, loader, site_override="first")


# ------------------------------------------------------------------ evaluate_model and `crosssite evaluate`
def _tiny_model(norm: str) -> torch.nn.Module:
    from crosssite.models import create_model

    model = create_model("covidnet_redesign", num_sites=2, width=0.0625, norm=norm, image_size=32)
    with torch.no_grad():  # realistic running statistics, different per site
        model.train()(torch.cat([torch.randn(8, 3, 32, 32), 2 + torch.randn(8, 3, 32, 32)]), torch.tensor([0] * 8 + [1] * 8))
    return model.eval()


def test_evaluate_model_strategies_and_no_side_effects() -> None:
    from crosssite.evaluation import evaluate_model
    from crosssite.models import adapt_norm

    model = _tiny_model("site")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = _loader(n=12, batch=5)
    for b in loader:
        b["image"] = torch.nn.functional.interpolate(b["image"], size=32)
        b["site"] = torch.zeros_like(b["site"])
    results = evaluate_model(model, ["a", "b"], {"b": loader}, {"x": loader}, n_boot=50)
    assert [(r.site, r.strategy) for r in results] == [
        ("b", "own"), ("x", "site:a"), ("x", "site:b"), ("x", "mean-of-sites"), ("x", "adabn"),
    ]  # fmt: skip
    own = collect_probabilities(model, loader, site_override=1)
    assert results[0].metrics == binary_metrics(own.label, own.p_covid)
    assert results[0].n == 12 and results[0].confusion.counts.sum() == 12
    assert results[2].metrics == results[0].metrics  # site b's statistics either way
    with_a = collect_probabilities(model, loader, site_override=0)
    assert not np.allclose(with_a.p_covid, own.p_covid)  # the strategy matters
    assert results[1].metrics == binary_metrics(with_a.label, with_a.p_covid)
    adapted = copy.deepcopy(model)
    new = adapt_norm(adapted, loader)
    ada = collect_probabilities(adapted, loader, site_override=new)
    assert results[4].metrics == binary_metrics(ada.label, ada.p_covid)
    assert model.num_sites == 2  # AdaBN worked on a copy
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    d = results[-1].to_dict()
    assert d["strategy"] == "adabn" and "AdaBN" in d["description"] and d["ci_level"] == 0.95
    assert set(d["ci"]) == set(METRICS)
    with pytest.raises(EvaluationError, match="external"):
        evaluate_model(model, ["a", "b"], {"c": loader})
    shared = evaluate_model(_tiny_model("batch"), ["a", "b"], {}, {"x": loader}, n_boot=10)
    assert [r.strategy for r in shared] == ["shared"]


@pytest.fixture()
def run_dir(tmp_path: Path) -> tuple[Path, list[str]]:
    """A run directory as the training engine leaves it: model files and split.json of two synthetic sites."""
    from crosssite.data import load_site, split_fold
    from crosssite.models import save
    from crosssite.rundir import save_splits

    specs = ["a=synthetic:n=16,size=40,seed=1", "b=synthetic:n=16,size=40,seed=2,shift=1.0"]
    sites = [load_site(s) for s in specs]
    splits = [split_fold(s, 0, 2, 0, 0.25) for s in sites]
    save_splits(tmp_path / "split.json", sites, splits)
    save(_tiny_model("site"), tmp_path / "model", {"site_names": ["a", "b"], "preprocessing": {"image_size": 32}})
    return tmp_path, specs


def test_evaluate_command(run_dir: tuple[Path, list[str]], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from crosssite.cli import app
    from crosssite.data import load_site, split_fold

    path, specs = run_dir
    runner = CliRunner()
    ext = "x=synthetic:n=10,size=40,seed=3,shift=2.0"
    res = runner.invoke(app, ["evaluate", str(path), "--site", specs[1], "--external", ext, "--json",
                              "--bootstrap", "50", "--out", str(tmp_path / "ev")])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    rows = report["results"]
    assert [(r["site"], r["strategy"], r["part"]) for r in rows] == [
        ("b", "own", "test"), ("x", "site:a", "all"), ("x", "site:b", "all"), ("x", "mean-of-sites", "all"),
        ("x", "adabn", "all"), ("x", "standardise", "all"),
    ]  # fmt: skip
    assert [r["strategy"] for r in rows if r["default"]] == ["standardise"]  # an unseen site's default
    test_size = len(split_fold(load_site(specs[1]), 0, 2, 0, 0.25).test)
    assert rows[0]["n"] == test_size and sum(map(sum, rows[0]["confusion_matrix"]["counts"])) == test_size
    assert rows[1]["n"] == 20
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved == report
    assert len(list((tmp_path / "ev").glob("confusion_*.csv"))) == 6
    every = runner.invoke(app, ["evaluate", str(path), "--site", specs[1], "--all", "--json", "--bootstrap", "20"])
    assert json.loads(every.output)["results"][0]["n"] == 32
    table = runner.invoke(app, ["evaluate", str(path), "--site", specs[0], "--bootstrap", "20"])
    assert table.exit_code == 0 and "confusion matrix" in table.output and "auc" in table.output
    bad = runner.invoke(app, ["evaluate", str(path), "--site", ext])
    assert bad.exit_code == 1
    assert bad.output.startswith("error: site 'x' is not one") and bad.output.count("\n") == 1
    missing = runner.invoke(app, ["evaluate", str(tmp_path / "nothing"), "--site", specs[0]])
    assert missing.exit_code == 1 and missing.output.startswith("error:")


def test_evaluate_single_run_uses_each_sites_own_model(run_dir: tuple[Path, list[str]], tmp_path: Path) -> None:
    """A `single` run holds one model per site in a folder named after the site."""
    from typer.testing import CliRunner

    from crosssite.cli import app
    from crosssite.models import create_model, save

    path, specs = run_dir
    single = tmp_path / "single"
    for name in ("a", "b"):
        (single / name).mkdir(parents=True)
        (single / name / "split.json").write_text((path / "split.json").read_text())
        model = create_model("covidnet_redesign", num_sites=1, width=0.0625, image_size=32)
        save(model.eval(), single / name / "model", {"site_names": [name], "preprocessing": {"image_size": 32}})
    res = CliRunner().invoke(app, ["evaluate", str(single), "--site", specs[0], "--site", specs[1], "--json",
                                   "--bootstrap", "10"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["results"]
    assert [(r["model"], r["site"], r["strategy"]) for r in rows] == [("a", "a", "own"), ("b", "b", "own")]
    bad = CliRunner().invoke(app, ["evaluate", str(path)])
    assert bad.exit_code == 1 and "--site or --external" in bad.output
