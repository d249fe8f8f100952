"""The training fast path: the static site layout, fused Adam, compile with its eager fallback, recalibration in
large batches -- each computing what the plain path computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crosssite import models
from crosssite.data import load_sites
from crosssite.models import SiteLayout
from crosssite.models.norms import per_site
from crosssite.training import TrainConfig, train
from crosssite.training.data import build_run_data
from crosssite.training.step import CompiledForward, batch_sites, make_optimizer

TINY = dict(image_size=32, width=0.0625, batch_per_site=4, folds=2, epochs=1, lr=1e-3, ckpt_every=0)


@pytest.fixture(scope="module")
def real_sites(site_a_path: Path, site_b_path: Path):
    return load_sites([f"A={site_a_path}", f"B={site_b_path}"])


def test_site_layout_round_trips_a_tensor_and_rejects_interleaved_sites() -> None:
    site = torch.tensor([0, 0, 0, 1, 1, 2])
    layout = SiteLayout.of(site)
    assert layout.runs == ((0, 3), (1, 2), (2, 1)) and layout.batch_size == 6
    assert torch.equal(layout.tensor(), site)
    with pytest.raises(ValueError, match="contiguous"):
        SiteLayout.of(torch.tensor([0, 1, 0]))


def test_per_site_with_a_layout_never_reads_the_site_tensor(monkeypatch) -> None:
    x = torch.randn(6, 3)
    fn = lambda xs, s: xs * (s + 1)  # noqa: E731
    expected = per_site(x, torch.tensor([0, 0, 0, 1, 1, 1]), fn)

    def no_sync(*args, **kwargs):
        raise AssertionError("per_site read the site tensor")

    monkeypatch.setattr(torch, "unique_consecutive", no_sync)
    assert torch.equal(per_site(x, SiteLayout(((0, 3), (1, 3))), fn), expected)


def test_a_layout_gives_the_same_training_forward_as_the_site_tensor() -> None:
    torch.manual_seed(0)
    model = models.create_model("covidnet_redesign", num_sites=2, norm="site", projection=True, width=0.0625,
                                image_size=32, aux_heads=True)
    x, site = torch.randn(8, 3, 32, 32), torch.tensor([0] * 5 + [1] * 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    by_tensor = model(x, site)
    after_tensor = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    by_layout = model(x, SiteLayout(((0, 5), (1, 3))))
    for a, b in zip(by_tensor, by_layout):
        assert torch.equal(a, b)
    assert all(torch.equal(v, after_tensor[k]) for k, v in model.state_dict().items())  # same BN updates
    with pytest.raises(ValueError, match="does not fit"):
        model(x, SiteLayout(((0, 5), (1, 2))))
    with pytest.raises(ValueError, match="does not fit"):
        model(x, SiteLayout(((0, 5), (2, 3))))


def test_training_batches_carry_their_site_runs(real_sites) -> None:
    config = TrainConfig(**TINY, limit_per_site=64)
    data = build_run_data(config, real_sites, Path("/nonexistent/split.json"), reuse_split=False)
    batch = next(iter(data.train))
    assert batch["site_runs"] == ((0, 4), (1, 4))
    assert torch.equal(SiteLayout(batch["site_runs"]).tensor(), batch["site"])
    assert isinstance(batch_sites(batch, config, torch.device("cpu")), SiteLayout)
    assert torch.equal(batch_sites(batch, config.replace(static_layout=False), torch.device("cpu")), batch["site"])


def test_fused_adam_takes_the_steps_of_the_loop_up_to_rounding() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(64, 8)
    b = torch.nn.Linear(64, 8)
    b.load_state_dict(a.state_dict())
    fused, loop = make_optimizer(a, TrainConfig(**TINY)), make_optimizer(b, TrainConfig(**TINY, fused_adam=False))
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for _ in range(20):
        x = torch.randn(16, 64)
        for model, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and not torch.equal(a.weight, torch.zeros_like(a.weight))


def test_compiled_forward_falls_back_to_eager_with_one_line(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise torch._dynamo.exc.InternalTorchDynamoError("no compiler here")

    monkeypatch.setattr(torch, "compile", lambda module: broken)
    lines: list[str] = []
    model = torch.nn.Linear(4, 2)
    forward = CompiledForward(model, log=lines.append)
    x = torch.randn(3, 4)
    assert torch.equal(forward(x), model(x)) and torch.equal(forward(x), model(x))
    assert len(lines) == 1 and "torch.compile failed" in lines[0] and "running eagerly" in lines[0]


def test_the_fast_path_trains_like_the_plain_path(real_sites, tmp_path: Path) -> None:
    """One epoch on real slices: channels_last + static layout + fused Adam + recalibration in large batches
    against everything off; the same steps, losses equal up to rounding in the first steps."""
    common = dict(TINY, limit_per_site=96, bn_recalibrate=True, epochs=1, method="sepnorm-contrastive")
    fast = train(TrainConfig(**common), real_sites, tmp_path / "fast", progress=False)
    plain = train(TrainConfig(**common, channels_last=False, static_layout=False, fused_adam=False,
                              bn_recalibrate_images=0), real_sites, tmp_path / "plain", progress=False)
    assert fast["steps"] == plain["steps"] > 0
    import csv

    rows = [list(csv.DictReader(open(tmp_path / run / "log.csv"))) for run in ("fast", "plain")]
    assert float(rows[0][0]["ce"]) == pytest.approx(float(rows[1][0]["ce"]), rel=0.05)
    for site in ("A", "B"):
        assert abs(fast["sites"][site]["val"]["auc"] - plain["sites"][site]["val"]["auc"]) < 0.2
