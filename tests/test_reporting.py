"""Reporting on a synthetic results.jsonl: tables hold the right rows and values, figures decode, HTML is
self-contained, Grad-CAM panels come from a saved model or are skipped with a reason."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from crosssite.data import eval_transform, read_image
from crosssite.evaluation import binary_metrics
from crosssite.reporting import ROWS, ReportError, build_report, load_results, site_order, table_one, ttest_table
from crosssite.reporting.report import _pick_cases


SITES = ("covid_ct", "sars_cov2_ct")  # sorted, as a runner writing sort_keys=True leaves them
QUALITY = {  # (method, backbone) -> how well the synthetic model separates the classes
    ("single", "covidnet"): 0.8,
    ("single", "covidnet_redesign"): 1.4,
    ("joint", "covidnet_redesign"): 1.0,
    ("ms-net", "covidnet_redesign"): 1.5,
    ("sepnorm-contrastive", "covidnet_redesign"): 1.8,
}
ONE_RUN_ONLY = ("ms-net", "covidnet_redesign")  # a row with a single (fold 0, seed 0) run


def _site_result(rng: np.random.Generator, quality: float, n: int) -> dict:
    y = rng.permutation(np.arange(n) % 2)
    p = 1.0 / (1.0 + np.exp(-(quality * (2 * y - 1) + rng.standard_normal(n))))
    return {**binary_metrics(y, p), "y_true": y.tolist(), "p_covid": p.round(6).tolist()}


@functools.cache
def _cached_rows() -> str:
    return json.dumps(_make_rows())


def _rows() -> list[dict]:
    return json.loads(_cached_rows())


def _make_rows() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for (method, backbone), q in QUALITY.items():
        for seed in (0, 1):
            for fold in (0, 1):
                if (method, backbone) == ONE_RUN_ONLY and (fold, seed) != (0, 0):
                    continue
                rows.append({
                    "method": method, "backbone": backbone, "fold": fold, "seed": seed,
                    "run_dir": f"runs/{method}__{backbone}/fold{fold}_seed{seed}",
                    "sites": {s: _site_result(rng, q, 40 + 10 * i) for i, s in enumerate(SITES)},
                    "val": {s: {"auc": 0.5 + q / 4 - 0.01 * fold} for s in SITES},  # ranks rows as QUALITY does
                    "config": {"folds": 2, "seed": seed, "image_size": 32, "width": 0.0625, "epochs": 1,
                               "val_fraction": 0.2, "protocol": "kfold", "batch_per_site": 4, "lr": 1e-4},
                    "git_commit": "abc123", "machine": {"host": "test", "cpu_count": 2, "processor": "x86_64"},
                    "wall_s": 12.5 + fold, "finished_at": "2026-01-01T00:00:00+00:00",
                })  # fmt: skip
    return rows


@pytest.fixture()
def experiment(tmp_path: Path) -> tuple[Path, list[dict]]:
    rows = _rows()
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return tmp_path, rows


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def test_load_results_and_site_order(experiment: tuple[Path, list[dict]]) -> None:
    exp, rows = experiment
    runs, notes = load_results(exp / "results.jsonl")
    assert len(runs) == len(rows) and notes == []
    assert site_order(runs) == ["sars_cov2_ct", "covid_ct"]  # the paper's A, B whatever the key order
    # a repeated run: the later line wins and the report says so
    again = dict(rows[0], wall_s=99.0)
    with open(exp / "results.jsonl", "a") as fh:
        fh.write(json.dumps(again) + "\n")
    runs, notes = load_results(exp / "results.jsonl")
    assert len(runs) == len(rows) and len(notes) == 1 and "repeats run" in notes[0]
    assert [r.wall_s for r in runs if r.key == ("single", "covidnet", 0, 0, 0)] == [99.0]  # fold 0, seed 0, partition 0


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "results.jsonl:2: not valid JSON"),
        ('{"method": "joint"}', "results.jsonl:2: missing backbone, fold, seed, sites"),
        ('{"method": "j", "backbone": "b", "fold": 0, "seed": 0, "sites": {"s": {"accuracy": 0.5}}}', "lacks f1"),
        (
            '{"method": "j", "backbone": "b", "fold": 0, "seed": 0, "sites": {"s": {"accuracy": 85, "f1": 0.5,'
            ' "recall": 0.5, "precision": 0.5, "auc": 0.5}}}',
            "not a fraction",
        ),
    ],
)
def test_bad_results_name_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    first = json.dumps(_rows()[0])
    (tmp_path / "results.jsonl").write_text(first + "\n" + line + "\n")
    with pytest.raises(ReportError, match=match):
        load_results(tmp_path / "results.jsonl")
    with pytest.raises(ReportError, match="no results file"):
        load_results(tmp_path / "missing.jsonl")


def test_table_one_rows_and_values(experiment: tuple[Path, list[dict]]) -> None:
    exp, rows = experiment
    runs, _ = load_results(exp / "results.jsonl")
    table = table_one(runs, ["sars_cov2_ct", "covid_ct"])
    assert [r[0] for r in table.body] == [row.label for row in ROWS]  # the paper's nine rows, its order
    assert table.header[2] == "A Accuracy" and table.header[8] == "B Accuracy"
    assert table.header[7] == "A AUC (paper)"
    assert "site A = sars_cov2_ct, site B = covid_ct" in table.caption
    by_label = {r[0]: r for r in table.body}
    for (method, backbone), _ in QUALITY.items():
        label = next(row.label for row in ROWS if (row.method, row.backbone) == (method, backbone))
        mine = [r for r in rows if (r["method"], r["backbone"]) == (method, backbone)]
        cells = by_label[label]
        assert cells[1] == str(len(mine))
        for s, site in enumerate(("sars_cov2_ct", "covid_ct")):
            for m, metric in enumerate(("accuracy", "f1", "recall", "precision", "auc")):
                values = [100 * r["sites"][site][metric] for r in mine]
                expected = f"{values[0]:.2f}" if len(values) == 1 else _cell(values)
                assert cells[2 + 6 * s + m] == expected, (label, site, metric)
    assert by_label["Single (COVID-Net)"][7] == "84.08" and by_label["Single (COVID-Net)"][13] == "71.09"
    assert by_label["SepNorm + Contrastive"][7] == "96.24"
    assert by_label["SepNorm"][1:] == ["0"] + ["–"] * 5 + ["94.57"] + ["–"] * 5 + ["83.94"]


def test_ttest_tables_match_scipy(experiment: tuple[Path, list[dict]]) -> None:
    exp, rows = experiment
    runs, _ = load_results(exp / "results.jsonl")
    sites = ["sars_cov2_ct", "covid_ct"]
    baselines = ttest_table(runs, sites, "baselines")
    assert [r[0] for r in baselines.body] == [
        "Single (COVID-Net)", "Single (Redesign)", "Joint (COVID-Net)", "Joint (Redesign)", "SepNorm",
    ]  # fmt: skip
    comparisons = ttest_table(runs, sites, "comparisons")
    assert [r[0] for r in comparisons.body] == ["Series Adapter", "Parallel Adapter", "MS-Net"]

    def runs_by_key(method: str, backbone: str) -> dict:
        return {(r["fold"], r["seed"]): r for r in rows if (r["method"], r["backbone"]) == (method, backbone)}

    ours = runs_by_key("sepnorm-contrastive", "covidnet_redesign")
    single = runs_by_key("single", "covidnet_redesign")
    row = next(r for r in baselines.body if r[0] == "Single (Redesign)")
    assert row[1] == "4/4"
    for s, site in enumerate(sites):
        for m, metric in enumerate(("accuracy", "f1", "recall", "precision", "auc")):
            keys = sorted(ours)
            a = [ours[k]["sites"][site][metric] for k in keys]
            b = [single[k]["sites"][site][metric] for k in keys]
            p = stats.ttest_rel(a, b).pvalue
            text = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
            sign = "+" if np.mean(a) > np.mean(b) else "-"
            assert row[2 + 6 * s + m] == f"{text} ({sign})", (site, metric)
    assert row[7] == "0.002" and row[13] == "0.004"  # the paper's p-values beside ours
    msnet = next(r for r in comparisons.body if r[0] == "MS-Net")
    assert msnet[1] == "1/1"
    assert msnet[2:7] == ["n/a"] * 5  # one matched pair: no test
    sepnorm = next(r for r in baselines.body if r[0] == "SepNorm")
    assert sepnorm[1] == "0/0" and sepnorm[2] == "n/a"


def test_validation_ranking_needs_validation_on_every_site(experiment: tuple[Path, list[dict]]) -> None:
    from crosssite.reporting import validation_table

    exp, rows = experiment
    for row in rows:
        del row["val"]["covid_ct"]  # e.g. results written before runs recorded validation for both sites
    (exp / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs, _ = load_results(exp / "results.jsonl")
    table = validation_table(runs, site_order(runs))
    assert table.body == [] and "nothing to rank" in table.caption


def test_report_files_without_models(experiment: tuple[Path, list[dict]], tmp_path: Path) -> None:
    exp, _ = experiment
    out = build_report(exp, tmp_path / "report")
    assert out.markdown.is_file() and out.html.is_file()
    assert len(out.figures) == 2
    for fig in out.figures:
        with Image.open(fig) as im:
            im.load()
            assert im.format == "PNG" and im.width > 500
    md = out.markdown.read_text()
    for needle in ("Table I.", "Table II.", "Table III.", "Site A (sars_cov2_ct)", "Site B (covid_ct)",
                   "may sit in both the training and the test part", "grouped by patient",
                   "Panels skipped: no run of ours kept its model.safetensors", "Series Adapter, Parallel Adapter"):
        assert needle in md, needle  # fmt: skip
    for row in ROWS:
        assert f"| {row.label} |" in md
    assert "figures/roc_siteA_sars_cov2_ct.png" in md
    # ranked on validation over the one pair every row has (MS-Net has one run); Single is shown, never chosen
    assert "| **SepNorm + Contrastive** (chosen) | yes | 95.00 | 95.00 | 95.00 |" in md
    assert "| MS-Net | yes | 87.50 |" in md and "| Single (Redesign) | no, one per site |" in md
    assert "Mean over the 1 (fold, seed) pairs" in md
    html = out.html.read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "src='figures" not in html and "<link" not in html and "<script" not in html
    assert "<td>Single (COVID-Net)</td>" in html


def test_pick_cases() -> None:
    labels = np.array([1, 1, 0, 0, 1, 0])
    p = np.array([0.9, 0.6, 0.1, 0.8, 0.2, 0.45])
    correct, failed = _pick_cases(labels, p, k=2)
    assert correct == [0, 1]  # confident COVID cases first
    assert failed == [3, 4]  # most confident mistakes first


def test_report_gradcam_panels_from_saved_model(experiment: tuple[Path, list[dict]]) -> None:
    from crosssite.models import create_model, save

    exp, rows = experiment
    run = next(r for r in rows if r["method"] == "sepnorm-contrastive")
    run_dir = exp / run["run_dir"]
    model = create_model("covidnet_redesign", num_sites=2, width=0.0625, norm="site", projection=True, image_size=32)
    with torch.no_grad():  # give the BN running statistics realistic values
        model.train()(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4))
    save(model.eval(), run_dir / "model", {"site_names": ["sars_cov2_ct", "covid_ct"],
                                            "preprocessing": {"image_size": 32}})  # fmt: skip
    rng = np.random.default_rng(0)
    transform = eval_transform(32)
    lines = ["site,path,frame,label,p_covid,part"]
    for i in range(6):  # only site A has test slices: site B's panels are skipped with the reason
        path = run_dir / "images" / f"slice {i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(path)
        with torch.no_grad():
            logits = model(transform(read_image(path))[None], torch.tensor([0])).logits
        p = float(torch.softmax(logits, 1)[0, 1])
        lines.append(f"sars_cov2_ct,{path},,{i % 2},{p:.6f},test")
        lines.append(f"sars_cov2_ct,{path},,{i % 2},{p:.6f},val")
    (run_dir / "predictions.csv").write_text("\n".join(lines) + "\n")
    out = build_report(exp, gradcam_cases=2)
    names = sorted(p.name for p in out.figures)
    assert [n for n in names if n.startswith("gradcam_")], names
    for fig in out.figures:
        with Image.open(fig) as im:
            im.load()
    md = out.markdown.read_text()
    assert "Fig. 4, Site A (sars_cov2_ct)" in md or "Fig. 5, Site A (sars_cov2_ct)" in md
    assert "Site B (covid_ct): panels skipped" in md and "no test slice of site 'covid_ct'" in md
    assert "warning" not in md  # the recomputed P(COVID) matches predictions.csv
    assert out.html.read_text().count("data:image/png;base64,") == len(out.figures)


def test_site_order_and_paper_columns_follow_recorded_layouts(tmp_path: Path) -> None:
    rows = [r for r in _rows() if r["method"] == "single"]
    for r in rows:  # sites named by the user, layouts recorded by the runner
        r["sites"] = {"hospital_b": r["sites"]["covid_ct"], "hospital_a": r["sites"]["sars_cov2_ct"]}
        r["site_info"] = {"hospital_a": {"layout": "sars_cov2_ct", "has_patients": False},
                          "hospital_b": {"layout": "covid_ct", "has_patients": True}}  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs, _ = load_results(tmp_path / "results.jsonl")
    assert site_order(runs) == ["hospital_a", "hospital_b"]
    first = table_one(runs, site_order(runs)).body[0]
    assert first[0] == "Single (COVID-Net)" and first[7] == "84.08" and first[13] == "71.09"


def test_busy_hours_count_overlapping_runs_once_and_skip_gaps() -> None:
    import dataclasses

    from crosssite.reporting.report import busy_hours
    from crosssite.reporting import load_results

    (run, *_), _ = load_results(Path(__file__).resolve().parents[1] / "results" / "cpu-real" / "results.jsonl")
    at = lambda text, wall: dataclasses.replace(run, finished_at=f"2026-12-01T{text}+00:00", wall_s=wall)  # noqa: E731
    # 10:00-11:00 and 10:30-11:30 side by side (1.5 h), a gap, then 13:00-13:30 alone
    runs = [at("11:00:00", 3600.0), at("11:30:00", 3600.0), at("13:30:00", 1800.0)]
    assert busy_hours(runs) == pytest.approx(2.0)
    assert busy_hours(runs[:1] * 2) == pytest.approx(1.0)  # the same interval twice counts once


def test_the_protocol_says_how_a_site_without_patients_was_grouped(tmp_path: Path) -> None:
    """Runs whose results record pseudo-patient grouping are described as grouped; older runs of the same layout
    (no "grouping" recorded: random folds) keep the warning that their numbers are optimistic."""
    from crosssite.reporting.report import PATIENT_GROUPING, PSEUDO_PATIENT_GROUPING, _grouping_text

    rows = [r for r in _rows() if r["method"] == "single"]
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rows:
        r["site_info"] = {"sars_cov2_ct": {"layout": "sars_cov2_ct", "has_patients": False,
                                           "grouping": "pseudo-patient"}}
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    old, _ = load_results(tmp_path / "old.jsonl")
    new, _ = load_results(tmp_path / "new.jsonl")
    assert _grouping_text(old, "sars_cov2_ct") == PATIENT_GROUPING["sars_cov2_ct"]
    assert _grouping_text(new, "sars_cov2_ct") == PSEUDO_PATIENT_GROUPING
