"""Models: every registered network, site-specific norms and adapters, dense wiring, size, save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from crosssite.errors import CheckpointError, ConfigError
from crosssite.models import (
    BatchNorm,
    SiteBatchNorm,
    SiteConv1x1,
    adapt_norm,
    create_model,
    list_models,
    load,
    model_paths,
    save,
)
from crosssite.models.heads import SiteHeads

SMALL = dict(width=0.125, image_size=64)

# (norm, adapter, aux_heads, projection): what the methods of Table I build
CONFIGS = [
    ("batch", None, False, False),
    ("none", None, False, False),
    ("site", None, False, True),
    ("site", "series", False, False),
    ("site", "parallel", False, False),
    ("site", None, True, False),
]


def _small(name: str, num_sites: int, norm: str, adapter=None, aux=False, proj=False, **kw) -> nn.Module:
    return create_model(
        name, num_sites=num_sites, norm=norm, adapter=adapter, aux_heads=aux, projection=proj, **SMALL, **kw
    )


def _perturb(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """Move every parameter off its initial value (zero adapters, unit BN) so that sites differ."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def _loss(out) -> torch.Tensor:
    return sum(t.square().sum() for t in out if t is not None)


def _slot_params(model: nn.Module, s: int) -> set[int]:
    """ids of the parameters that belong to site slot ``s`` of every site-specific module."""
    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, SiteBatchNorm):
            ids |= {id(p) for p in m.sites[s].parameters()}
        elif isinstance(m, SiteConv1x1):
            ids.add(id(m.weights[s]))
        elif isinstance(m, SiteHeads):
            ids |= {id(p) for p in m.heads[s].parameters()}
    return ids


def test_registry_lists_both_networks():
    assert {"covidnet", "covidnet_redesign"} <= set(list_models())
    with pytest.raises(ConfigError, match="resnet"):
        create_model("resnet", num_sites=1)
    with pytest.raises(ConfigError, match="norm"):
        create_model("covidnet_redesign", num_sites=1, norm="group")
    with pytest.raises(ConfigError, match="adapter"):
        create_model("covidnet_redesign", num_sites=1, adapter="lora")


@pytest.mark.parametrize("name", ["covidnet", "covidnet_redesign"])
@pytest.mark.parametrize("num_sites", [1, 2, 3])
@pytest.mark.parametrize("norm,adapter,aux,proj", CONFIGS)
def test_forward_backward_every_parameter_gets_a_gradient(name, num_sites, norm, adapter, aux, proj):
    model = _small(name, num_sites, norm, adapter, aux, proj).train()
    # with three sites, site 1 is absent from the batch: its slots must receive no gradient at all
    present = [0, 2] if num_sites == 3 else list(range(num_sites))
    site = torch.tensor([present[i % len(present)] for i in range(5)])
    out = model(torch.randn(5, 3, 64, 64), site)
    assert out.logits.shape == (5, 2)
    assert (out.projection is not None) == proj and (out.aux_logits is not None) == aux
    if proj:
        assert out.projection.shape == (5, 16)
    if aux:
        assert out.aux_logits.shape == (5, 2)
    _loss(out).backward()
    absent = _slot_params(model, 1) if num_sites == 3 else set()
    for pname, p in model.named_parameters():
        if id(p) in absent:
            assert p.grad is None, pname
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_absent_site_slots_exist_for_site_models():
    model = _small("covidnet_redesign", 3, "site", "series", True, True)
    assert len(_slot_params(model, 1)) > 0
    norms = [m for m in model.modules() if isinstance(m, SiteBatchNorm)]
    assert len(norms) == 5 + 2 + 1  # stem + 4 shortcuts, 2 classifier BN1d, 1 projection BN1d


@pytest.mark.parametrize("adapter", ["series", "parallel"])
@pytest.mark.parametrize("name", ["covidnet", "covidnet_redesign"])
def test_mixed_batch_equals_per_site_sub_batches(name, adapter):
    torch.manual_seed(1)
    norm = "site" if name == "covidnet_redesign" else "none"
    model = _perturb(_small(name, 3, norm, adapter, aux=True, proj=True).double()).train()
    reference = copy.deepcopy(model)
    x = torch.randn(7, 3, 64, 64, dtype=torch.float64)
    site = torch.tensor([2, 0, 2, 1, 0, 0, 2])  # interleaved; site 1 has a single sample
    out = model(x, site)
    for s in range(3):
        idx = (site == s).nonzero().squeeze(1)
        sub = reference(x[idx], site[idx])
        for a, b in zip(out, sub):
            torch.testing.assert_close(a[idx], b, rtol=0, atol=1e-5)
    # running statistics were updated per site exactly as by the sub-batches
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=k)
    # and evaluation mode (running statistics) is per-site too
    model.eval(), reference.eval()
    out = model(x, site)
    for s in range(3):
        idx = (site == s).nonzero().squeeze(1)
        torch.testing.assert_close(out.logits[idx], reference(x[idx], site[idx]).logits, rtol=0, atol=1e-5)


def test_site_batchnorm_matches_torch_batchnorm_per_site():
    torch.manual_seed(2)
    norm = SiteBatchNorm(4, num_sites=2).double()
    refs = [nn.BatchNorm2d(4).double() for _ in range(2)]
    with torch.no_grad():
        for slot, ref in zip(norm.sites, refs):
            slot.weight.uniform_(0.5, 1.5), slot.bias.uniform_(-1, 1)
            ref.weight.copy_(slot.weight), ref.bias.copy_(slot.bias)
    for step in range(3):
        x = torch.randn(6, 4, 5, 5, dtype=torch.float64) * (step + 1) + step
        site = torch.tensor([1, 0, 1, 1, 0, 1])
        y = norm(x, site)
        for s, ref in enumerate(refs):
            torch.testing.assert_close(y[site == s], ref(x[site == s]), rtol=0, atol=1e-12)
    for slot, ref in zip(norm.sites, refs):
        torch.testing.assert_close(slot.running_mean, ref.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(slot.running_var, ref.running_var, rtol=0, atol=1e-12)  # unbiased
        assert int(slot.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_single_sample_site_in_bn1d_uses_running_statistics():
    norm = SiteBatchNorm(3, num_sites=2).train()
    with torch.no_grad():
        norm.sites[1].running_mean.fill_(2.0), norm.sites[1].running_var.fill_(4.0)
    x = torch.randn(4, 3)
    site = torch.tensor([0, 0, 0, 1])
    y = norm(x, site)
    torch.testing.assert_close(y[3], (x[3] - 2.0) / torch.sqrt(torch.tensor(4.0 + 1e-5)))
    torch.testing.assert_close(y[:3], F.batch_norm(x[:3], None, None, training=True))
    assert torch.equal(norm.sites[1].running_mean, torch.full((3,), 2.0))  # not updated by one sample
    assert int(norm.sites[1].num_batches_tracked) == 0 and int(norm.sites[0].num_batches_tracked) == 1
    shared = BatchNorm(3).train()
    assert shared(x[:1]).shape == (1, 3)  # a batch of one sample through a shared BN1d: defined, no crash


def test_site_none_uses_mean_of_site_statistics():
    norm = _perturb(SiteBatchNorm(3, num_sites=3)).eval()
    with torch.no_grad():
        for s, slot in enumerate(norm.sites):
            slot.running_mean.fill_(s), slot.running_var.fill_(1 + s)
    x = torch.randn(5, 3, 4, 4)
    weight = torch.stack([s.weight for s in norm.sites]).mean(0)
    bias = torch.stack([s.bias for s in norm.sites]).mean(0)
    expected = F.batch_norm(x, torch.ones(3), torch.full((3,), 2.0), weight, bias, False, 0.0, 1e-5)
    torch.testing.assert_close(norm(x, None), expected)
    with pytest.raises(ValueError, match="site"):
        norm.train()(x, None)


def test_model_with_site_none_equals_a_model_holding_the_mean_slot():
    torch.manual_seed(7)
    model = _perturb(_small("covidnet_redesign", 3, "site", "series", proj=True).double()).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SiteBatchNorm):
                for s, slot in enumerate(m.sites):
                    slot.running_mean.add_(0.1 * s), slot.running_var.mul_(1 + s)
    mean_model = copy.deepcopy(model)
    with torch.no_grad():
        for m in mean_model.modules():
            if isinstance(m, SiteBatchNorm):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(m.sites[0], name).copy_(torch.stack([getattr(t, name) for t in m.sites]).mean(0))
            elif isinstance(m, SiteConv1x1):
                m.weights[0].copy_(torch.stack(list(m.weights)).mean(0))
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out, ref = model(x, None), mean_model(x, torch.zeros(3, dtype=torch.long))
        assert not torch.allclose(out.logits, model(x, torch.zeros(3, dtype=torch.long)).logits)
    for a, b in zip(out, ref):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _reference_features(model: nn.Module, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
    """SPEC.md's dense wiring written plainly with lists, reusing the model's layers."""
    x = model.stem_pool(model.stem(x, site))
    for i, stage in enumerate(model.stages):
        pool = (lambda t: F.max_pool2d(t, 2)) if i > 0 else (lambda t: t)
        shortcut = pool(stage.shortcut(x, site))
        outputs: list[torch.Tensor] = []
        for k, block in enumerate(stage.blocks):
            block_input = pool(x) if k == 0 else shortcut + sum(outputs)
            outputs.append(block(block_input, site))
        x = shortcut + sum(outputs)  # the next stage's input: every output of this stage exactly once
    return outputs[-1]


@pytest.mark.parametrize("name", ["covidnet", "covidnet_redesign"])
def test_dense_wiring_matches_reference_and_every_block_matters(name):
    torch.manual_seed(3)
    model = _perturb(_small(name, 2, "site" if name == "covidnet_redesign" else "none").double()).eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    site = torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x, site), _reference_features(model, x, site))
        base = model(x, site).logits
        blocks = [b for stage in model.stages for b in stage.blocks]
        assert [len(s.blocks) for s in model.stages] == [3, 4, 6, 3]
        for i, block in enumerate(blocks):
            handle = block.register_forward_hook(lambda m, inp, out: out + torch.randn_like(out))
            changed = model(x, site).logits
            handle.remove()
            assert not torch.allclose(changed, base), f"block {i} does not reach the output"


def test_redesign_width1_size_and_flops():
    model = create_model("covidnet_redesign", num_sites=2, norm="site", projection=True).eval()
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 48.7e6) <= 0.01 * 48.7e6, params
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(torch.randn(1, 3, 224, 224), torch.tensor([1]))
    assert abs(counter.get_total_flops() - 12.3e9) <= 0.03 * 12.3e9, counter.get_total_flops()
    assert out.embedding.shape == (1, 8192) and out.projection.shape == (1, 128)


def test_original_covidnet_shapes_and_heads():
    with torch.device("meta"):
        model = create_model("covidnet", num_sites=1)  # width 1, 224 px: flatten 7x7x2048
    assert model.embed_dim == 7 * 7 * 2048
    assert not any(isinstance(m, (BatchNorm, SiteBatchNorm, nn.BatchNorm2d)) for m in model.modules())
    small = create_model("covidnet", num_sites=1, width=0.125, image_size=96)
    feats = small.forward_features(torch.randn(2, 3, 96, 96))
    assert feats.shape == (2, 256, 3, 3)
    emb = small.forward_head(feats, pre_logits=True)
    assert emb.shape == (2, 256 * 9) and small.forward_head(feats).shape == (2, 2)
    assert isinstance(small.get_classifier().fc, nn.Linear)  # raw logits, no Sigmoid
    relu = create_model("covidnet_redesign", num_sites=1, block_act="relu", width=0.125)
    assert isinstance(relu.stages[0].blocks[0].act, nn.ReLU)


def test_site_argument_is_checked():
    model = _small("covidnet_redesign", 2, "site").train()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="site"):
        model(x, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="LongTensor"):
        model(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="site"):
        model(x, None)  # training a multi-site model needs the sites


def test_channels_last_gives_the_same_output():
    torch.manual_seed(4)
    model = _perturb(_small("covidnet_redesign", 2, "site", "parallel", proj=True).double()).train()
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    site = torch.tensor([0, 0, 1, 1])
    for a, b in zip(model(x, site), fast(x.contiguous(memory_format=torch.channels_last), site)):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_adapt_norm_adds_a_site_with_its_own_statistics():
    torch.manual_seed(5)
    model = _perturb(_small("covidnet_redesign", 2, "site", "series", aux=True)).train()
    x = torch.randn(8, 3, 64, 64)
    model(x, torch.tensor([0, 1] * 4))
    model.eval()
    shifted = 2.0 * torch.randn(6, 3, 64, 64) + 1.0
    before = model(shifted, torch.zeros(6, dtype=torch.long)).logits
    new = adapt_norm(model, shifted, batch_size=3)
    assert new == 2 and model.num_sites == 3 and not model.training
    norms = [m for m in model.modules() if isinstance(m, SiteBatchNorm)]
    assert all(m.num_sites == 3 and m.momentum == 0.1 for m in norms)
    stem = model.stem.norm.sites
    with torch.no_grad():  # cumulative average of two equal batches = statistics of all six images
        torch.testing.assert_close(stem[2].running_mean, model.stem.conv(shifted).mean((0, 2, 3)))
    torch.testing.assert_close(stem[2].weight, (stem[0].weight + stem[1].weight) / 2)
    assert torch.equal(stem[0].running_mean, norms[0].sites[0].running_mean)
    after = model(shifted, torch.full((6,), new, dtype=torch.long))
    assert not torch.allclose(after.logits, before) and after.aux_logits.shape == (6, 2)
    mean_site = model(shifted, None)  # unknown site: mean of the three slots
    assert mean_site.logits.shape == (6, 2)
    with pytest.raises(ConfigError, match="site"):
        adapt_norm(_small("covidnet_redesign", 2, "batch"), shifted)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(6)
    model = _perturb(_small("covidnet_redesign", 2, "site", "parallel", aux=True, proj=True)).train()
    model(torch.randn(4, 3, 64, 64), torch.tensor([0, 0, 1, 1]))
    adapt_norm(model, torch.randn(4, 3, 64, 64))
    card = {"site_names": ["A", "B", "C"], "class_names": ["non-COVID", "COVID"], "threshold": 0.4}
    weights, card_path = save(model, tmp_path / "run" / "model.safetensors", card)
    assert (weights.name, card_path.name) == ("model.safetensors", "model.json")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.json", "model.safetensors"]  # no temp
    for path in (tmp_path / "run", tmp_path / "run" / "model", card_path):
        loaded, loaded_card = load(path)
        assert loaded_card["num_sites"] == 3 and loaded_card["architecture"] == "covidnet_redesign"
        assert loaded_card["site_names"] == ["A", "B", "C"] and loaded_card["threshold"] == 0.4
        state, loaded_state = model.state_dict(), loaded.state_dict()
        assert state.keys() == loaded_state.keys()
        assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    model.eval()
    x, site = torch.randn(3, 3, 64, 64), torch.tensor([2, 0, 1])
    for a, b in zip(model(x, site), loaded(x, site)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="site_names"):
        save(model, tmp_path / "bad", {"site_names": ["A"]})


def test_broken_files_raise_checkpoint_error(tmp_path):
    model = _small("covidnet", 1, "none")
    weights, card_path = save(model, tmp_path / "model", {})
    good_card = card_path.read_text()
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(tmp_path)
    weights.write_bytes(b"\x00" * 64)  # garbage
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "model")
    save(model, tmp_path / "model", {})
    card_path.write_text(json.dumps({**json.loads(good_card), "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version"):
        load(tmp_path)
    card_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="model.json"):
        load(tmp_path)
    card_path.unlink()
    with pytest.raises(CheckpointError, match="model card not found"):
        load(weights)
    card_path.write_text(good_card)
    good = json.loads(good_card)
    card_path.write_text(json.dumps({**good, "model_args": {**good["model_args"], "norm": "batch"}}))
    with pytest.raises(CheckpointError, match="do not fit"):
        load(tmp_path)
    assert model_paths(tmp_path / "x.json") == (tmp_path / "x.safetensors", tmp_path / "x.json")
