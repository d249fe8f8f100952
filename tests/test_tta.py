"""Test-time flip averaging (``tta="flip"``): the averaging itself, the training run that validates and tests with
it, the model card that carries it, and the predictor, ONNX export and evaluation that honour it; and the
`crosssite` method (Table I v2's tenth row) that bundles it."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from crosssite.data import TTA_MODES, build_cache, eval_loader, load_sites, tta_average
from crosssite.errors import ConfigError
from crosssite.evaluation import EvaluationError, collect_probabilities
from crosssite.inference import InferenceError, Predictor, export_onnx
from crosssite.models import load, save
from crosssite.training import METHODS, TrainConfig, train
from crosssite.training.methods import method_recipe

from test_inference import FRAME, IMAGE_SIZE, real_files, save_tiny_model, site_images, slice_p


@pytest.fixture(scope="module")
def real(site_a_path: Path, site_b_path: Path) -> tuple:
    return real_files(site_a_path, site_b_path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory, real: tuple) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tta") / "model", site_images(real[2]))


def test_flip_averages_the_slice_and_its_left_right_mirror() -> None:
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    seen: list[torch.Tensor] = []

    def score(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x[:, 0, 0, 0]  # the top-left pixel: the mirror puts the top-right one there

    assert torch.equal(tta_average(score, images, "none"), images[:, 0, 0, 0])
    assert len(seen) == 1
    averaged = tta_average(score, images, "flip")
    assert torch.equal(averaged, (images[:, 0, 0, 0] + images[:, 0, 0, -1]) / 2)
    assert torch.equal(seen[-1], images)  # the slices as given run last (what a forward hook keeps)
    assert torch.equal(seen[-2], images.flip(-1))
    with pytest.raises(ConfigError, match="tta: 'rotate'"):
        tta_average(score, images, "rotate")
    assert TTA_MODES == ("none", "flip")


def test_collect_probabilities_with_flip_is_the_mean_over_both_views(model_path: Path, real: tuple) -> None:
    sites, indices, _ = real
    model, _ = load(model_path)
    cache = build_cache(sites, indices, IMAGE_SIZE, progress=False, frame=FRAME)
    loader = eval_loader(sites, indices, cache, IMAGE_SIZE, batch_size=3)
    plain = collect_probabilities(model, loader).p_covid
    flipped = collect_probabilities(model, loader, tta="flip").p_covid
    with torch.no_grad():
        mirrored = np.concatenate([
            torch.softmax(model(b["image"].flip(-1), b["site"]).logits, 1)[:, 1].double().numpy() for b in loader
        ])
    np.testing.assert_allclose(flipped, (plain + mirrored) / 2, rtol=0, atol=1e-6)
    assert np.abs(flipped - plain).max() > 1e-4, "a lung slice is not its own mirror: the views must differ"
    ensemble = collect_probabilities(model, loader, site_override="ensemble", num_sites=2, tta="flip").p_covid
    assert np.abs(ensemble - collect_probabilities(model, loader, site_override="ensemble", num_sites=2).p_covid
                  ).max() > 1e-4
    with pytest.raises(EvaluationError, match="tta must be one of none, flip"):
        collect_probabilities(model, loader, tta="hv")


def test_config_checks_tta() -> None:
    assert TrainConfig().tta == "none"  # the paper
    with pytest.raises(ConfigError, match="tta: 'mirror' is not one of none, flip"):
        TrainConfig(tta="mirror")


@pytest.fixture(scope="module")
def flip_run(tmp_path_factory: pytest.TempPathFactory, site_a_path: Path, site_b_path: Path) -> Path:
    """A tiny run of the `crosssite` method on 24 real slices per site: its recipe has ``tta="flip"``."""
    sites = load_sites([f"sars_cov2_ct={site_a_path}", f"covid_ct={site_b_path}"])
    config = TrainConfig(**method_recipe("crosssite"), method="crosssite", image_size=32, width=0.0625,
                         batch_per_site=4, folds=2, epochs=4, limit_per_site=24, lr=1e-2)
    out = tmp_path_factory.mktemp("flip_run")
    train(config, sites, out, progress=False)
    return out


def test_a_flip_run_records_tta_and_its_test_predictions_are_what_predict_gives(flip_run: Path) -> None:
    _, card = load(flip_run / "model")
    assert card["tta"] == "flip" and card["train_config"]["tta"] == "flip"
    with open(flip_run / "predictions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["part"] == "test" and r["site"] == "covid_ct"]
    assert len(rows) >= 8
    files = [Path(r["path"]) for r in rows]
    expected = np.array([float(r["p_covid"]) for r in rows])
    predictor = Predictor.from_file(flip_run / "model", site="covid_ct")
    assert predictor.tta == "flip"  # the card's
    np.testing.assert_allclose(slice_p(predictor.predict(files)), expected, rtol=0, atol=1e-6)
    plain = slice_p(Predictor.from_file(flip_run / "model", site="covid_ct", tta="none").predict(files))
    assert np.abs(plain - expected).max() > 1e-4  # without the mirror the numbers are not the run's


def test_onnx_export_carries_tta_and_the_predictor_applies_it(model_path: Path, real: tuple,
                                                             tmp_path: Path) -> None:
    model, card = load(model_path)
    save(model, tmp_path / "flip", dict(card, tta="flip"))
    files = real[2]
    torch_p = slice_p(Predictor.from_file(tmp_path / "flip", site="B").predict(files))
    onnx_predictor = Predictor.from_file(export_onnx(tmp_path / "flip", tmp_path / "flip.onnx", site="B"))
    assert onnx_predictor.tta == "flip"
    np.testing.assert_allclose(slice_p(onnx_predictor.predict(files)), torch_p, rtol=0, atol=1e-4)
    plain = slice_p(Predictor.from_file(model_path, site="B").predict(files))
    assert np.abs(plain - torch_p).max() > 1e-4
    with pytest.raises(InferenceError, match="test-time augmentation 'spin'"):
        Predictor.from_file(model_path, tta="spin")


def test_grad_cam_keeps_the_flip_averaged_probability(model_path: Path, real: tuple, tmp_path: Path) -> None:
    files = real[2]
    predictor = Predictor.from_file(model_path, site="A", tta="flip")
    with_cam = predictor.predict(files, cam_dir=tmp_path / "cams")
    np.testing.assert_allclose(slice_p(with_cam), slice_p(predictor.predict(files)), rtol=0, atol=1e-6)
    assert all(Path(r.cam).is_file() for r in with_cam)
    ood = [r.ood_score for r in with_cam]
    plain = Predictor.from_file(model_path, site="A").predict(files)
    np.testing.assert_allclose(ood, [r.ood_score for r in plain], rtol=1e-5)  # scored on the slices as given


def test_the_crosssite_method_is_the_papers_method_without_recalibration_and_with_flip_averaging() -> None:
    ours, mine = METHODS["sepnorm-contrastive"], METHODS["crosssite"]
    assert (mine.norm, mine.projection, mine.terms, mine.adapter, mine.aux_heads) == (
        ours.norm, ours.projection, ours.terms, ours.adapter, ours.aux_heads)
    assert method_recipe("crosssite") == {"tta": "flip", "bn_recalibrate": False}
    from crosssite.reporting.rows import rows_for

    runs = [SimpleNamespace(method="crosssite", backbone="covidnet_redesign")]  # rows_for reads these two only
    assert rows_for(runs)[-1].label == "crosssite: SepNorm + Contrastive, no recalibration, flip TTA"
