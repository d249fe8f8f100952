"""A backbone is its trunk: COVID-Net on the shared heads computes what it computed before, a ResNet-18-style trunk
trains with every method, an option a backbone does not take is refused by name, and a new backbone is one class
and one registration (docs/ARCHITECTURE.md, "Add a backbone")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from crosssite import models
from crosssite.models import (ModelConfig, SiteClassifier, UnsupportedOption, create_model, get_norm_layer,
                              register_model)
from crosssite.models.heads import channels
from crosssite.models.norms import Sites
from crosssite.models.registry import _MODELS
from crosssite.pretrained import shipped_model
from crosssite.training import METHODS, TrainConfig
from crosssite.training.config import with_recipe
from crosssite.training.methods import compute_loss
from crosssite.training.step import build_model

# Outputs of COVID-Net and of the shipped model, written by the code before the heads moved to models/heads.py.
REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "covidnet_reference.json").read_text())
CASES = {
    "redesign_site_proj": ("covidnet_redesign", dict(norm="site", projection=True)),
    "redesign_batch_aux": ("covidnet_redesign", dict(norm="batch", aux_heads=True)),
    "redesign_series": ("covidnet_redesign", dict(norm="site", adapter="series", block_act="relu")),
    "covidnet_plain": ("covidnet", dict(norm="none", init="fan_in")),
}
# float32 forward passes of a few thousand multiply-adds: oneDNN's kernels differ in the last bits across CPUs
ATOL = 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_covidnet_builds_the_same_network_with_the_same_numbers(case: str) -> None:
    name, options = CASES[case]
    torch.manual_seed(0)
    model = create_model(name, num_sites=2, num_classes=2, width=0.0625, image_size=32, **options).eval()
    expected = REFERENCE[case]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected["keys"]
    assert list(model.state_dict()) == list(expected["keys"])  # the same order too
    assert model.model_kwargs == expected["model_args"]  # the model card's model_args
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(out.logits, torch.tensor(expected["logits"]), atol=ATOL, rtol=1e-4)
    if expected["projection_sum"] is not None:
        assert float(out.projection.sum()) == pytest.approx(expected["projection_sum"], abs=1e-3)


def test_the_shipped_model_loads_and_predicts_as_before() -> None:
    model, _ = models.load(shipped_model())
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = REFERENCE["shipped"]
    with torch.no_grad():
        for site in (0, 1):
            logits = model(x, torch.full((4,), site, dtype=torch.long)).logits
            torch.testing.assert_close(logits, torch.tensor(expected[str(site)]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(x, None).logits, torch.tensor(expected["unknown"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_step_on_the_resnet(method: str) -> None:
    config = with_recipe(TrainConfig(method=method, backbone="resnet18", width=0.0625, image_size=32))
    torch.manual_seed(0)
    model = build_model(config, num_sites=2, device=torch.device("cpu")).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, site, labels = torch.randn(8, 3, 32, 32), torch.tensor([0] * 4 + [1] * 4), torch.tensor([0, 1] * 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, parts = compute_loss(model(x, site), labels, METHODS[method], config)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and set(parts) >= {"ce"}
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("head.") for k in changed) and any(k.startswith("blocks.") for k in changed)
    if METHODS[method].adapter:
        assert any(".adapter." in k for k in changed)  # the method's adapters sit in the trunk and learn


def test_an_option_a_backbone_does_not_take_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedOption, match="'resnet18' does not take mixstyle"):
        create_model("resnet18", num_sites=2, mixstyle=0.5)
    config = TrainConfig(method="sepnorm", backbone="resnet18", width=0.0625, image_size=32, standardise_input=True)
    with pytest.raises(UnsupportedOption, match="standardise_input"):
        build_model(config, num_sites=2, device=torch.device("cpu"))
    # an option at its off value asks nothing: the ResNet builds without COVID-Net's block_act
    build_model(config.replace(standardise_input=False), num_sites=2, device=torch.device("cpu"))


# ---- "Add a backbone" (docs/ARCHITECTURE.md): a trunk on SiteClassifier, its options, one registration ----


class TinyNet(SiteClassifier):
    """Two strided 3x3 convolutions with the method's norm, average-pooled."""

    def __init__(self, *, num_sites: int, num_classes: int = 2, width: float = 1.0, norm: str | None = None,
                 aux_heads: bool = False, projection: bool = False, image_size: int = 224) -> None:
        super().__init__()
        norm = norm or "batch"
        self.model_kwargs = dict(num_classes=num_classes, width=width, norm=norm, aux_heads=aux_heads,
                                 projection=projection, image_size=image_size)
        norm_layer, chs = get_norm_layer(norm, num_sites), channels(64, width)
        self.conv1, self.norm1 = nn.Conv2d(3, chs, 3, 2, 1), norm_layer(chs)
        self.conv2, self.norm2 = nn.Conv2d(chs, chs, 3, 2, 1), norm_layer(chs)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.build_heads(chs, num_classes=num_classes, num_sites=num_sites, hidden=(), norm=norm,
                         norm_layer=norm_layer, projection=(chs, chs) if projection else None, aux_heads=aux_heads)

    def forward_features(self, x: Tensor, site: Sites = None) -> Tensor:
        site = self.check_site(site, x.shape[0])
        x = torch.relu(self.norm1(self.conv1(x), site))
        return torch.relu(self.norm2(self.conv2(x), site))


@pytest.fixture
def tinynet():
    options = frozenset({"num_classes", "width", "norm", "aux_heads", "projection", "image_size"})  # no adapters

    @register_model(config=ModelConfig(options=options))
    def tinynet(*, num_sites: int, **kwargs) -> TinyNet:
        return TinyNet(num_sites=num_sites, **kwargs)

    yield "tinynet"
    del _MODELS["tinynet"]


def test_a_new_backbone_is_one_class_and_one_registration(tinynet: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from crosssite.cli import app

    sites = ["s0=synthetic:shift=0.0,n=16,size=40,seed=0", "s1=synthetic:shift=0.8,n=16,size=40,seed=1"]
    args = ["train", *(x for s in sites for x in ("--site", s)), "--method", "sepnorm-contrastive", "--backbone",
            tinynet, "--quiet", "--out", str(tmp_path / "run")]
    args += [x for kv in ("image_size=32", "width=0.125", "epochs=1", "batch_per_site=4", "folds=2")
             for x in ("--set", kv)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model, card = models.load(tmp_path / "run" / "model")  # the card rebuilds it
    assert card["architecture"] == tinynet and card["model_args"]["norm"] == "site" and model.projector is not None
    with pytest.raises(UnsupportedOption, match="does not take adapter"):  # it declared no adapters
        build_model(TrainConfig(method="series-adapter", backbone=tinynet), num_sites=2, device=torch.device("cpu"))


def test_models_lists_files_and_with_architectures_the_registries() -> None:
    from typer.testing import CliRunner

    from crosssite.cli import app

    result = CliRunner().invoke(app, ["models", "--architectures", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert set(listed["architectures"]) == set(models.list_models()) >= {"covidnet", "covidnet_redesign", "resnet18"}
    assert "mixstyle" not in listed["architectures"]["resnet18"]["options"] and set(listed["methods"]) == set(METHODS)
    files = CliRunner().invoke(app, ["models", "--help"])
    assert "trained model files" in " ".join(files.output.split())
