"""``crosssite add-site``: a new site slot appended and used, the known sites untouched, labels from folders or a
CSV (grouped by patient), the unlabelled path, clear errors, and the learning-curve command on a tiny setting."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crosssite import models
from crosssite.cli import app
from crosssite.data import load_site
from crosssite.inference.predictor import Preprocess
from crosssite.training.add_site import add_site, decode_site, site_probabilities, slot_parameters, split_labelled

REPO = Path(__file__).resolve().parents[1]
CARD = {"site_names": ["A", "B"], "method": "sepnorm-contrastive",
        "preprocessing": {"image_size": 32, "frame": "pad", "mean": [0.4] * 3, "std": [0.3] * 3}}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = models.create_model("covidnet_redesign", num_sites=2, norm="site", projection=True, width=0.0625,
                                image_size=32)
    stem = tmp_path_factory.mktemp("model") / "base"
    models.save(model.eval(), stem, CARD)
    return stem


@pytest.fixture(scope="module")
def hospital(site_b_path: Path, tmp_path_factory) -> Path:
    """48 + 48 real site-B slices in class folders, and labels.csv naming them with their patients."""
    root = tmp_path_factory.mktemp("hospital")
    site = load_site(f"B={site_b_path}")
    rows = []
    for label, folder in ((1, "COVID"), (0, "non-COVID")):
        (root / folder).mkdir()
        for sample in [s for s in site.samples if s.label == label][:48]:
            target = root / folder / sample.path.name
            shutil.copy(sample.path, target)
            rows.append({"path": f"{folder}/{target.name}", "label": folder, "patient": sample.patient})
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def _known_probabilities(stem: Path, images: torch.Tensor) -> list[np.ndarray]:
    model, _ = models.load(stem)
    return [site_probabilities(model, images, s) for s in (0, 1)]


def _images(hospital: Path) -> torch.Tensor:
    return decode_site(load_site(f"h={hospital}"), Preprocess.from_card(CARD)).images


def test_add_site_with_label_folders_appends_a_slot_and_leaves_known_sites_alone(base_model, hospital, tmp_path):
    out = tmp_path / "with_h"
    result = CliRunner().invoke(app, ["add-site", str(base_model), "--site", f"hosp={hospital}", "--labels",
                                      "folders", "--out", str(out), "--steps", "30"])
    assert result.exit_code == 0, result.output
    assert "fine-tuned" in result.output and "validation AUC" in result.output
    new, card = models.load(out)
    assert card["site_names"] == ["A", "B", "hosp"] and new.num_sites == 3
    (report,) = card["added_sites"]
    assert report["mode"] == "finetune" and report["train"] + report["val"] == 96 and report["val"] >= 20
    assert report["known_sites_unchanged"] and report["tuned_parameters"] > 0
    images = _images(hospital)
    before = _known_probabilities(base_model, images)
    after = [site_probabilities(new, images, s) for s in (0, 1)]
    for b, a in zip(before, after):
        assert np.array_equal(a, b)  # bit for bit: the known slots are never touched
    old, _ = models.load(base_model)
    old_state, new_state = old.state_dict(), new.state_dict()
    assert all(torch.equal(v, new_state[k]) for k, v in old_state.items())  # every old tensor as it was
    assert set(new_state) - set(old_state)  # and the new slot's tensors exist
    assert not np.array_equal(site_probabilities(new, images, 2), after[0])  # the new slot is used


def test_labels_from_a_csv_are_split_by_patient(base_model, hospital):
    site = load_site(("h", hospital / "labels.csv", "csv"))
    data = decode_site(site, Preprocess.from_card(CARD))
    assert len(data) == 96 and all(p is not None for p in data.patients)
    train, val, grouped = split_labelled(data, 0.25, seed=0)
    assert grouped == "patients"
    assert not {data.patients[i] for i in train} & {data.patients[i] for i in val}
    assert set(data.labels[val].tolist()) == {0, 1}
    small = data.subset(np.r_[0:6, 48:54])  # 12 slices: a validation part would be noise
    assert len(split_labelled(small, 0.25, seed=0)[1]) == 0 and split_labelled(small, 0.25, seed=0)[2] == "none"
    model, card = models.load(base_model)
    new, new_card, report = add_site(model, card, "h", labelled=data, steps=10)
    assert report.grouped_by == "patients" and new_card["site_names"][-1] == "h"
    tuned = {id(p) for p in slot_parameters(new, 2)}
    assert tuned and all(id(p) not in tuned for p in slot_parameters(new, 0))


def test_unlabelled_slices_add_an_adabn_slot(base_model, hospital, tmp_path):
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(hospital / "COVID", unlabelled)
    result = CliRunner().invoke(app, ["add-site", str(base_model), "--site", f"u={unlabelled}", "--out",
                                      str(tmp_path / "with_u")])
    assert result.exit_code == 0, result.output
    assert "estimated on 48 slices (AdaBN)" in result.output
    new, card = models.load(tmp_path / "with_u")
    assert card["added_sites"][0]["mode"] == "adabn"
    stem_bn = next(m for m in new.modules() if isinstance(m, models.SiteBatchNorm))
    assert not torch.equal(stem_bn.sites[2].running_mean, torch.zeros_like(stem_bn.sites[2].running_mean))


def test_add_site_errors_name_the_problem(base_model, hospital, tmp_path):
    runner = CliRunner()
    known = runner.invoke(app, ["add-site", str(base_model), "--site", f"A={hospital}", "--out", str(tmp_path / "x")])
    assert known.exit_code != 0 and "already known" in known.output
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,label\nmissing.png,COVID\n")
    missing = runner.invoke(app, ["add-site", str(base_model), "--site", f"h={hospital}", "--labels", str(bad_csv),
                                  "--out", str(tmp_path / "y")])
    assert missing.exit_code != 0 and "missing.png" in missing.output and "does not exist" in missing.output
    torch.manual_seed(0)
    shared = models.create_model("covidnet_redesign", num_sites=2, norm="batch", width=0.0625, image_size=32)
    models.save(shared, tmp_path / "joint", {**CARD, "method": "joint"})
    joint = runner.invoke(app, ["add-site", str(tmp_path / "joint"), "--site", f"h={hospital}", "--out",
                                str(tmp_path / "z")])
    assert joint.exit_code != 0 and "site-specific layers" in joint.output
    few = tmp_path / "few"
    few.mkdir()
    for png in sorted((hospital / "COVID").iterdir())[:5]:
        shutil.copy(png, few)
    too_few = runner.invoke(app, ["add-site", str(base_model), "--site", f"f={few}", "--out", str(tmp_path / "w")])
    assert too_few.exit_code != 0 and "at least 8 readable slices, got 5" in too_few.output
    assert "Traceback" not in known.output + missing.output + joint.output + too_few.output


def test_learning_curve_command_runs_on_a_tiny_setting(site_a_path, site_b_path, tmp_path):
    out = tmp_path / "curve"
    cmd = [sys.executable, str(REPO / "scripts" / "add_site_curve.py"), "run", "--out", str(out), "--tiny"]
    env = {**os.environ, "CROSSSITE_DATA": str(site_a_path.parent)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert {r["k"] for r in rows} == {0, 2} and {r["method"] for r in rows} == {"adabn", "slot", "slot+head", "all", "scratch"}
    assert all(0.0 <= r["auc"] <= 1.0 and r["n_eval"] > 0 for r in rows)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)  # resumes: nothing to do
    assert again.returncode == 0 and "0 to run" in again.stdout
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "add_site_curve.py"), "table", "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert table.returncode == 0 and "| k |" in table.stdout


def test_a_diverging_or_invalid_learning_rate_writes_no_model(base_model, hospital, tmp_path):
    """``--lr 1e9`` drives the slot's weights to NaN: the one model writer refuses them (no file, a named line);
    ``--lr nan`` is refused before any work; a missing folder is said to be missing."""
    runner = CliRunner()
    out = tmp_path / "diverged"
    huge = runner.invoke(app, ["add-site", str(base_model), "--site", f"h={hospital}", "--labels", "folders",
                               "--out", str(out), "--steps", "10", "--lr", "1e9"])
    assert huge.exit_code == 1 and "NaN or infinite" in huge.output and "no model written" in huge.output
    assert not out.with_suffix(".safetensors").exists() and not out.with_suffix(".json").exists()
    nan = runner.invoke(app, ["add-site", str(base_model), "--site", f"h={hospital}", "--labels", "folders",
                              "--out", str(out), "--lr", "nan"])
    assert nan.exit_code == 1 and "--lr" in nan.output and "positive finite" in nan.output
    missing = runner.invoke(app, ["add-site", str(base_model), "--site", f"new={tmp_path / 'missing'}",
                                  "--out", str(out)])
    assert missing.exit_code == 1 and "does not exist" in missing.output and "unreadable" not in missing.output
    assert "Traceback" not in huge.output + nan.output + missing.output


def test_save_refuses_non_finite_weights(tmp_path):
    from crosssite.errors import NonFiniteModelError

    torch.manual_seed(0)
    model = models.create_model("covidnet_redesign", num_sites=2, norm="site", width=0.0625, image_size=32)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("inf"))
    with pytest.raises(NonFiniteModelError, match="1 weight tensor"):
        models.save(model, tmp_path / "m", CARD)
    assert list(tmp_path.iterdir()) == []
    from safetensors.torch import save_file

    with torch.no_grad():
        next(model.parameters())[0].zero_()
    models.save(model, tmp_path / "m", CARD)  # finite: written; then its weights replaced by hand, as elsewhere
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    with pytest.raises(NonFiniteModelError, match="m.safetensors: 1 weight tensor.* the model is broken"):
        models.load(tmp_path / "m")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "m"), str(tmp_path / "m.json")])
    assert result.exit_code == 1 and "NaN or infinite" in result.output and "Traceback" not in result.output
