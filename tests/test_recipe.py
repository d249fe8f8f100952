"""The training recipe's levers beyond the paper: label smoothing and the weight average (EMA), and the `crosssite`
method that bundles the recipe Table I v2 chose."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from crosssite.data import load_sites
from crosssite.errors import ConfigError
from crosssite.models import ModelOutput
from crosssite.training import METHODS, Method, TrainConfig, train
from crosssite.training import engine
from crosssite.training.checkpoint import load_checkpoint
from crosssite.training.methods import compute_loss

SPECS = [f"s{i}=synthetic:shift={shift},n=16,size=48,seed={i}" for i, shift in enumerate((0.0, 0.8))]
TINY = dict(image_size=32, width=0.0625, batch_per_site=2, folds=2, epochs=2, lr=1e-3, ckpt_every=1)


@pytest.fixture(scope="module")
def sites():
    return load_sites(SPECS)


def test_label_smoothing_is_cross_entropy_against_softened_targets() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 1.5], [-3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    config = TrainConfig(label_smoothing=0.2)
    out = ModelOutput(logits=logits, embedding=logits, projection=None, aux_logits=None)
    total, parts = compute_loss(out, labels, METHODS["joint"], config)
    log_p = logits.log_softmax(1)
    # (1 - e) on the true class plus e / 2 on each of the two classes: 0.9 / 0.1
    expected = -(0.9 * log_p[torch.arange(3), labels] + 0.1 * log_p[torch.arange(3), 1 - labels]).mean()
    assert math.isclose(float(parts["ce"]), float(expected), rel_tol=1e-6)
    hard, _ = compute_loss(out, labels, METHODS["joint"], TrainConfig())
    assert float(hard) < float(total)  # confident correct logits cost more once the targets are softened


@pytest.mark.parametrize("key", ["label_smoothing", "ema_decay"])
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_recipe_levers_are_range_checked(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=key):
        TrainConfig(**{key: value})


def _module_state(ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in ema_state.items() if k.startswith("module.")}


def test_ema_is_what_is_validated_and_saved(sites, tmp_path: Path) -> None:
    config = TrainConfig(**TINY, method="sepnorm", ema_decay=0.9, eval_every=2)  # one validation: the last epoch
    train(config, sites, tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    averaged = _module_state(ckpt["ema"])
    saved = load_file(tmp_path / "model.safetensors")
    assert averaged and set(saved) <= set(averaged)
    floats = [k for k in saved if saved[k].is_floating_point()]
    assert all(torch.equal(saved[k], averaged[k].contiguous()) for k in floats)  # the average, not the last step
    assert any(not torch.allclose(averaged[k], ckpt["model"][k]) for k in floats)
    assert int(ckpt["ema"]["n_averaged"]) == ckpt["state"]["global_step"]


def test_ema_resumes_where_it_stopped(sites, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig(**TINY, method="sepnorm-contrastive", ema_decay=0.8)
    train(config, sites, tmp_path / "ref", progress=False)
    reference = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")

    real_step, calls = engine.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == reference["state"]["global_step"] // 2 + 1:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config, sites, tmp_path / "cut", progress=False)
    monkeypatch.setattr(engine, "train_step", real_step)
    train(config, sites, tmp_path / "cut", resume=True, progress=False)
    resumed = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert resumed["state"]["global_step"] == reference["state"]["global_step"]
    assert all(torch.equal(resumed["ema"][k], reference["ema"][k]) for k in reference["ema"])


TOY = Method("toy-recipe", "sepnorm with a recipe", recipe=(("label_smoothing", 0.2), ("ema_decay", 0.5)))


@pytest.fixture()
def toy(monkeypatch: pytest.MonkeyPatch) -> Method:
    monkeypatch.setitem(METHODS, TOY.name, TOY)
    return TOY


def test_the_grid_trains_a_method_with_its_recipe_under_the_users_overrides(toy, sites, tmp_path: Path) -> None:
    from crosssite.experiment import run_experiment

    tiny = {k: v for k, v in TINY.items() if k != "ckpt_every"} | {"epochs": 1, "ema_decay": 0.0}
    run_experiment(sites, tmp_path, rows=[(toy.name, "covidnet_redesign")], folds=2, overrides=tiny, max_runs=1,
                   progress=False, log=lambda _: None)
    saved = yaml.safe_load((tmp_path / "runs" / f"{toy.name}__covidnet_redesign" / "fold0_seed0" / "config.yaml")
                           .read_text())
    assert saved["label_smoothing"] == 0.2 and saved["ema_decay"] == 0.0  # the recipe, then the override


def test_train_command_applies_the_recipe_of_the_method_it_is_given(toy, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from crosssite.cli import app

    sets = [x for k, v in TINY.items() if k != "epochs" for x in ("--set", f"{k}={v}")]
    args = ["train", "--site", SPECS[0], "--site", SPECS[1], "--method", toy.name, "--quiet", *sets, "--set", "epochs=1"]
    result = CliRunner().invoke(app, [*args, "--set", "label_smoothing=0", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["label_smoothing"] == 0.0 and saved["ema_decay"] == 0.5
    plain = CliRunner().invoke(app, [*args[:5], "--method", "sepnorm", *args[7:], "--out", str(tmp_path / "b")])
    assert plain.exit_code == 0, plain.output
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["label_smoothing"] == 0.0 and saved["ema_decay"] == 0.0  # the paper's rows carry no recipe


def test_a_standardising_model_ignores_each_images_intensity_scale(tmp_path: Path) -> None:
    from crosssite import models

    torch.manual_seed(0)
    kwargs = dict(num_sites=2, width=0.0625, image_size=32, norm="site")
    images, site = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])
    scale, shift = torch.tensor([2.5, 0.5, 1.0, 4.0]).view(4, 1, 1, 1), torch.tensor([-0.7, 0.3, 0.0, 2.0]).view(4, 1, 1, 1)

    def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # batch statistics (train-mode BN): an untrained net's output then varies with its input
            return model.train()(x, site).logits

    model = models.create_model("covidnet_redesign", standardise_input=True, **kwargs)
    reference = logits(model, images)
    assert (reference[0] - reference[1]).abs().max() > 1e-2
    torch.testing.assert_close(logits(model, scale * images + shift), reference, atol=1e-4, rtol=1e-4)
    models.save(model, tmp_path / "m", {"method": "sepnorm"})
    loaded, card = models.load(tmp_path / "m")
    assert card["model_args"]["standardise_input"] is True
    torch.testing.assert_close(logits(loaded, scale * images + shift), reference, atol=1e-4, rtol=1e-4)
    plain = models.create_model("covidnet_redesign", **kwargs)
    assert "standardise_input" not in plain.model_kwargs  # older cards stay as they were
    assert (logits(plain, scale * images + shift) - logits(plain, images)).abs().max() > 1e-2


def test_standardise_input_reaches_the_trained_model(sites, tmp_path: Path) -> None:
    config = TrainConfig(**{**TINY, "epochs": 1}, method="sepnorm", standardise_input=True)
    train(config, sites, tmp_path, progress=False)
    from crosssite import models

    model, card = models.load(tmp_path / "model")
    assert model.standardise_input and card["model_args"]["standardise_input"] is True


def test_train_defaults_to_the_row_table_i_v2_picks_with_its_recipe(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from crosssite.cli import app
    from crosssite.reporting import chosen_row, load_results, site_order

    runs, _ = load_results(Path(__file__).resolve().parents[1] / "results" / "cpu-v2" / "results.jsonl")
    chosen = chosen_row(runs, site_order(runs))
    assert chosen is not None and TrainConfig().method == chosen.method  # the default follows the committed grid
    sets = [x for k, v in TINY.items() if k != "epochs" for x in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(app, ["train", "--site", SPECS[0], "--site", SPECS[1], "--quiet", *sets,
                                      "--set", "epochs=1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"] == chosen.method
    assert all(saved[key] == value for key, value in METHODS[chosen.method].recipe)  # and its recipe with it


ENTRY = Method("toy-entry", "sepnorm with a recipe, federated", federated=True,
               recipe=(("label_smoothing", 0.1), ("bn_recalibrate", False), ("tta", "flip")))


def test_every_entry_point_trains_a_method_with_the_same_resolved_config(sites, monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """Python `train`, ``crosssite train``, the experiment grid (over the cpu preset, whose ``bn_recalibrate`` the
    recipe overrides) and a federated client write the same config.yaml for the same method and values; add-site
    keeps it in the card it writes."""
    from typer.testing import CliRunner

    from crosssite.cli import app
    from crosssite.cli.federated import _config
    from crosssite.experiment import run_experiment
    from crosssite.federated.client import SiteClient

    monkeypatch.setitem(METHODS, ENTRY.name, ENTRY)
    values = {k: v for k, v in TINY.items() if k != "ckpt_every"} | {"epochs": 1, "seed": 0, "fold": 0}
    sets = [f"{k}={v}" for k, v in values.items()]

    def saved(path: Path) -> dict:
        return yaml.safe_load((path / "config.yaml").read_text())

    train(TrainConfig(method=ENTRY.name, **values), sites, tmp_path / "python", progress=False)
    reference = saved(tmp_path / "python")
    assert (reference["label_smoothing"], reference["tta"]) == (0.1, "flip")  # the recipe reached the run

    result = CliRunner().invoke(app, ["train", "--site", SPECS[0], "--site", SPECS[1], "--method", ENTRY.name,
                                      "--quiet", *(x for s in sets for x in ("--set", s)),
                                      "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    run_experiment(sites, tmp_path / "grid", rows=[(ENTRY.name, "covidnet_redesign")], folds=values["folds"],
                   only_folds=[0], overrides=values, preset="cpu", progress=False, log=lambda _: None)
    client = SiteClient(_config(None, ENTRY.name, sets), sites[0], tmp_path / "federated", "fedbn")
    _ = client.data  # a client writes its config.yaml when it first splits its site
    for path in (tmp_path / "cli", tmp_path / "grid" / "runs" / f"{ENTRY.name}__covidnet_redesign" / "fold0_seed0",
                 tmp_path / "federated" / sites[0].name):
        config = saved(path)
        if path.parent.name == "federated":  # a client records precision as given ("auto"): it has no autocast
            config["precision"] = reference["precision"]
        assert {k: v for k, v in config.items() if config[k] != reference[k]} == {}, path
    # add-site carries on from the model card, which holds the resolved configuration and the recipe's tta
    from crosssite import models
    from crosssite.models.adaptation import MIN_ADAPT_IMAGES
    from crosssite.training.add_site import add_site

    model, card = models.load(tmp_path / "python" / "model")
    _, new_card, _ = add_site(model, card, "new", images=torch.rand(max(16, MIN_ADAPT_IMAGES), 3, 32, 32))
    assert new_card["train_config"] == reference and new_card["tta"] == "flip"
