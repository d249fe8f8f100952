"""The model shipped in the package: small, documented, loadable, and the default of predict, serve and models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crosssite.cli import app
from crosssite.cli.predict import split_model_argument
from crosssite.errors import CrossSiteError
from crosssite.models.adaptation import DEFAULT_STRATEGY
from crosssite.inference import Predictor
from crosssite.models import create_model, load, save
from crosssite.pretrained import shipped_model


def test_the_shipped_model_is_small_documented_and_loads() -> None:
    stem = shipped_model()
    weights = stem.with_suffix(".safetensors")
    assert weights.stat().st_size <= 8 * 2**20
    card = json.loads(stem.with_suffix(".json").read_text())
    assert card["train_config"]["protocol"] == "all" and card["weights_dtype"] == "float16"
    assert card["training_command"].startswith("crosssite train") and card["git_commit"]
    assert "non-commercial" in card["licence"]["weights"] and "CC BY-NC-SA" in card["licence"]["sars_cov2_ct"]
    assert set(card["validation_auc_float16"]) == set(card["site_names"]) == {"sars_cov2_ct", "covid_ct"}
    for site, auc in card["validation_auc_float16"].items():
        assert abs(auc - card["validation_auc_float32"][site]) < 0.005
    model, _ = load(stem)
    assert next(model.parameters()).dtype.is_floating_point and model.num_sites == 2


def test_predict_without_a_model_uses_the_shipped_one(site_a_path: Path) -> None:
    files = sorted((site_a_path / "COVID").glob("*.png"))[:2] + sorted((site_a_path / "non-COVID").glob("*.png"))[:2]
    result = CliRunner().invoke(app, ["predict", *map(str, files)])
    assert result.exit_code == 0, result.output
    assert str(shipped_model()) in result.output
    expected = Predictor.from_file(shipped_model(), adapt=DEFAULT_STRATEGY).predict(files)  # predict's default
    assert all(f"{r.p_covid:.4f}" in result.output for r in expected)


def test_the_first_path_is_a_model_only_when_it_names_one(tmp_path: Path, site_a_path: Path) -> None:
    model = create_model("covidnet_redesign", num_sites=1, width=0.0625)
    save(model, tmp_path / "mine", {"site_names": ["x"], "preprocessing": {"image_size": 32}})
    image = next((site_a_path / "COVID").glob("*.png"))
    assert split_model_argument([tmp_path / "mine.safetensors", image]) == (tmp_path / "mine.safetensors", [image])
    assert split_model_argument([image]) == (shipped_model(), [image])
    with pytest.raises(CrossSiteError, match="no inputs"):
        split_model_argument([tmp_path / "mine.safetensors"])


def test_models_lists_the_shipped_and_the_local_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CROSSSITE_MODELS", str(tmp_path))
    model = create_model("covidnet_redesign", num_sites=1, width=0.0625)
    save(model, tmp_path / "hospital" / "mine", {"site_names": ["x"], "metrics": {"val": {"x": {"auc": 0.9}}},
                                                "tta": "none"})
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert [m["name"] for m in listing["shipped"]] == [shipped_model().name]
    (local,) = listing["local"]
    assert local["name"] == "mine" and local["sites"] == ["x"] and local["val_auc"] == {"x": 0.9}
    shipped_card = json.loads(shipped_model().with_suffix(".json").read_text())
    assert local["tta"] == "none" and listing["shipped"][0]["tta"] == shipped_card["tta"] == "flip"
    text = CliRunner().invoke(app, ["models"]).output
    assert "shipped" in text and "local" in text and "val AUC x 90.0" in text
    # tta is shown where the model averages the mirror (the shipped one), not where it does not (the local one)
    assert "sites x  val AUC" in text and "tta flip" in text and text.count("tta ") == 1
