"""Every registered model answers the same questions: config, forward, backward, named layers, new classifier."""

from __future__ import annotations

import pytest
import torch

from crosssite.models import create_model, list_models, model_config


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("norm", ["batch", "site"])
def test_every_registered_model_trains_one_step(name: str, norm: str) -> None:
    config = model_config(name)
    assert config.input_size == 224 and len(config.mean) == len(config.std) == 3
    model = create_model(name, num_sites=2, width=0.0625, image_size=32, norm=norm if config.has_norm else "none",
                         projection=True, aux_heads=config.has_norm)
    x, site = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])
    out = model(x, site)
    assert out.logits.shape == (4, 2) and out.projection is not None
    loss = out.logits.square().sum() + out.projection.sum() + (out.aux_logits.sum() if out.aux_logits is not None else 0)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing  # every parameter takes part in the forward and gets a finite gradient
    classifier = model
    for part in config.classifier.split("."):
        classifier = getattr(classifier, part)
    assert classifier is model.get_classifier()
    feats = model.forward_features(x, site)
    assert model.forward_head(feats, site).shape == (4, 2)
    assert model.forward_head(feats, site, pre_logits=True).shape == out.embedding.shape


@pytest.mark.parametrize("name", list_models())
def test_reset_classifier_gives_new_outputs_and_keeps_the_trunk(name: str) -> None:
    model = create_model(name, num_sites=2, width=0.0625, image_size=32, aux_heads=model_config(name).has_norm,
                         norm="site" if model_config(name).has_norm else "none").eval()
    x, site = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    before = model.forward_features(x, site)
    model.reset_classifier(3)
    out = model(x, site)
    assert out.logits.shape == (2, 3) and torch.equal(out.logits, torch.zeros(2, 3))
    if out.aux_logits is not None:
        assert out.aux_logits.shape == (2, 3)
    assert torch.equal(model.forward_features(x, site), before)
    assert model.model_kwargs["num_classes"] == 3


def test_mixstyle_mixes_feature_statistics_in_training_only() -> None:
    from crosssite.models.covidnet import MixStyle

    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5) * torch.arange(1, 7).view(6, 1, 1, 1) + torch.arange(6).view(6, 1, 1, 1)
    mix = MixStyle(p=1.0)
    mixed = mix.train()(x)
    assert not torch.allclose(mixed, x)
    # each sample keeps its normalised content: the per-sample, per-channel standardised maps are unchanged
    def standardised(t):
        return (t - t.mean((2, 3), keepdim=True)) / t.std((2, 3), keepdim=True)
    torch.testing.assert_close(standardised(mixed), standardised(x), atol=1e-4, rtol=1e-4)
    assert torch.equal(mix.eval()(x), x) and torch.equal(MixStyle(p=0.0).train()(x), x)
    model = create_model("covidnet_redesign", num_sites=2, width=0.0625, norm="site", mixstyle=1.0).train()
    out = model(torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1]))
    out.logits.sum().backward()
    assert model.model_kwargs["mixstyle"] == 1.0
