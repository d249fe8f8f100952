"""The fast prediction path against the plain one, on real slices with the shipped model: batched forward passes
(both flip views in one), decoding ahead in threads, the out-of-distribution score read in the same pass, JPEG
draft decoding only where it stays close to a full decode, and the test-time strategy registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crosssite.data import load_site, read_image
from crosssite.data.io import DRAFT_MARGIN, draft_scale
from crosssite.evaluation import card_loader, evaluate_model
from crosssite.inference import Predictor, Preprocess
from crosssite.inference.inputs import SliceItem
from crosssite.inference.threads import free_cores, torch_threads, usable_cores
from crosssite.models import load
from crosssite.models.adaptation import STRATEGIES, Adapted, FirstNormShift, register_strategy, standardise_images
from crosssite.data import SliceRef
from crosssite.pretrained import shipped_model


@pytest.fixture(scope="module")
def shipped() -> tuple:
    return load(shipped_model())


@pytest.fixture(scope="module")
def files(site_a_path: Path, site_b_path: Path) -> list[Path]:
    """PNGs of both sites and site B's JPEGs (the only JPEGs of the real data)."""
    b = sorted((site_b_path / "CT_COVID").iterdir()) + sorted((site_b_path / "CT_NonCOVID").iterdir())
    jpegs = [p for p in b if p.suffix.lower() == ".jpg"][:6]
    pngs = [p for p in b if p.suffix.lower() == ".png"][:4]
    return jpegs + pngs + sorted((site_a_path / "COVID").iterdir())[:4] + sorted((site_a_path / "non-COVID").iterdir())[:3]


def _plain(model: torch.nn.Module, preprocess: Preprocess, file: Path, standardise: bool) -> tuple[float, float]:
    """P(COVID) and the out-of-distribution score of one slice alone, every step written out: full decode, the
    card's transform, the mirror and the slice as separate forward passes of one image, the mean of the sites."""
    x = preprocess(read_image(file))[None]  # (1, 3, S, S)
    with torch.no_grad(), FirstNormShift(model, 2) as shift:
        model.stem(x, None)
        score = float(shift.scores[0])
        if standardise:
            x = standardise_images(x)
        p = [torch.softmax(model(v, None).logits, dim=1)[0, 1].item() for v in (x.flip(-1), x)]
    return (p[0] + p[1]) / 2, score


@pytest.mark.parametrize("adapt", [None, "standardise"])
def test_fast_path_gives_the_plain_per_slice_probabilities(shipped: tuple, files: list[Path], adapt: str | None
                                                           ) -> None:
    model, card = shipped
    predictor = Predictor(model, card, adapt=adapt, batch_size=5, draft=False, workers=2)
    assert predictor.tta == "flip"  # the shipped model's card
    records = [r for r in predictor.predict(files) if r.kind == "slice"]
    assert [Path(r.path) for r in records] == files
    for r, file in zip(records, files):
        p, score = _plain(model, predictor.preprocess, file, adapt == "standardise")
        # float32 forward passes of 1 vs 10 images: oneDNN may block the sums differently, ~1e-7 apart
        assert r.p_covid == pytest.approx(p, abs=1e-5)
        assert r.ood_score == pytest.approx(score, abs=1e-4)


def test_a_jpeg_is_drafted_only_with_enough_pixels_left(tmp_path: Path) -> None:
    # pad frame: the long side counts; each step down keeps DRAFT_MARGIN decoded pixels per framed pixel
    assert draft_scale(512, 512, 73, "pad") == 2 and 512 / 2 >= DRAFT_MARGIN * 73 > 512 / 4
    assert draft_scale(1200, 600, 73, "pad") == 8
    assert draft_scale(1200, 600, 73, "crop") == 4  # crop: the short side counts
    assert draft_scale(200, 200, 73, "pad") == 1
    small = tmp_path / "small.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 180), dtype=np.uint8)).save(small)
    png = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (600, 600), dtype=np.uint8)).save(png)
    for path in (small, png):  # too small to reduce, or not a JPEG: exactly the full decode
        assert np.array_equal(read_image(path, draft=(73, "pad")), read_image(path))


def test_only_jpegs_that_draft_scale_reduces_decode_differently(shipped: tuple, site_b_path: Path) -> None:
    _, card = shipped
    jpegs = [p for p in sorted((site_b_path / "CT_NonCOVID").iterdir()) if p.suffix.lower() == ".jpg"][:24]
    full, drafted = Preprocess.from_card(card), Preprocess.from_card(card, draft=True)
    assert not Preprocess.from_card(card).draft  # the default decodes in full, as evaluation does
    reduced = 0
    for path in jpegs:
        with Image.open(path) as img:
            scale = draft_scale(*img.size, full.transform.framed_size, full.frame)
        item = SliceItem(SliceRef(path, None))
        same = torch.equal(full.load(item), drafted.load(item))
        assert same == (scale == 1), path
        reduced += scale > 1
    assert 0 < reduced < len(jpegs)  # both cases happen on real slices


calls: list[int] = []


@pytest.fixture
def toy_strategy():
    """A strategy registered the way a user would (one function, one registration), removed afterwards."""

    calls.clear()

    @register_strategy("second-site", "the second known site's statistics")
    def second_site(model, images, num_sites):
        calls.append(num_sites)
        return Adapted(model, sites=(1,))

    yield "second-site"
    del STRATEGIES["second-site"]


def test_a_registered_strategy_runs_through_predictor_and_evaluate_model(shipped: tuple, toy_strategy: str,
                                                                         site_b_path: Path, files: list[Path]) -> None:
    model, card = shipped
    second = card["site_names"][1]
    toy = Predictor(model, card, adapt=toy_strategy).predict(files[:6])
    known = Predictor(model, card, site=second).predict(files[:6])
    assert [r.p_covid for r in toy] == pytest.approx([r.p_covid for r in known], abs=1e-6)
    mean = Predictor(model, card).predict(files[:6])
    assert max(abs(a.p_covid - b.p_covid) for a, b in zip(toy, mean)) > 1e-3  # a choice that matters
    site = load_site(f"x={site_b_path}")
    site.samples = site.samples[:6] + site.samples[-6:]  # a small external site with both classes
    loader = card_loader(site, card, batch_size=8)
    rows = {r.strategy: r for r in evaluate_model(model, card["site_names"], {}, {"x": loader}, n_boot=10,
                                                  strategies=[toy_strategy])}
    assert list(rows) == [f"site:{card['site_names'][0]}", f"site:{second}", "mean-of-sites", "adabn", toy_strategy]
    assert rows[toy_strategy].metrics == pytest.approx(rows[f"site:{second}"].metrics)
    assert calls == [2, 2]  # built once by the Predictor, once for the external site
    with pytest.raises(Exception, match="registered already"):
        register_strategy(toy_strategy, "again")(lambda model, images, num_sites: Adapted(model))


def test_torch_runs_on_the_free_cores() -> None:
    assert 1 <= free_cores() <= usable_cores()
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
