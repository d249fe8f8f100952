"""Transforms and loaders: crops, flips, normalisation, batch dicts, site composition, bad files left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crosssite.data import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    Sample,
    Site,
    build_cache,
    eval_loader,
    eval_transform,
    load_sites,
    read_image,
    resize_short_side,
    short_side_for,
    train_loader,
    train_transform,
)
from crosssite.errors import SiteError


def _denormalise(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> uint8 (H, W), checking the three channels are the same grey."""
    mean = torch.tensor(DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(DEFAULT_STD).view(3, 1, 1)
    grey = (x * std + mean) * 255.0
    assert torch.allclose(grey[0], grey[1], atol=1e-3) and torch.allclose(grey[0], grey[2], atol=1e-3)
    return grey[0].round().to(torch.uint8).numpy()


def test_short_side_for() -> None:
    assert short_side_for(224) == 256
    assert short_side_for(112) == 128
    assert short_side_for(64) == 73


def test_train_transform_is_a_crop_with_flips() -> None:
    image = np.random.default_rng(0).integers(0, 256, (37, 45), dtype=np.uint8)
    transform = train_transform(32, frame="crop")
    assert transform.short_side == 37
    seen_flips = set()
    for _ in range(12):
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        crop = _denormalise(out)
        matches = [
            (fv, fh)
            for top in range(6)
            for left in range(14)
            for fv in (False, True)
            for fh in (False, True)
            if np.array_equal(crop, image[top : top + 32, left : left + 32][:: -1 if fv else 1, :: -1 if fh else 1])
        ]
        assert len(matches) == 1
        seen_flips.add(matches[0])
    assert len(seen_flips) > 1


def test_eval_transform_crop_frame_resizes_then_centres() -> None:
    image = np.random.default_rng(1).integers(0, 256, (256, 300), dtype=np.uint8)
    out = eval_transform(224, frame="crop")(image)
    resized = resize_short_side(image, 224)
    left = (resized.shape[1] - 224) // 2
    np.testing.assert_array_equal(_denormalise(out), resized[:, left : left + 224])
    assert torch.equal(eval_transform(224, frame="crop")(image), out)  # deterministic


def _marked_slice() -> np.ndarray:
    """300 px wide, 200 px high, mid grey, with white markers in the leftmost and rightmost 8 columns."""
    image = np.full((200, 300), 100, dtype=np.uint8)
    image[:, :8] = 255
    image[:, -8:] = 255
    return image


@pytest.mark.parametrize("frame", ["resize", "pad"])
def test_whole_slice_frames_keep_both_lateral_edges(frame: str) -> None:
    image = _marked_slice()
    for size in (64, 224):
        seen = _denormalise(eval_transform(size, frame=frame)(image))
        assert seen.shape == (size, size)
        rows = seen[size // 4 : 3 * size // 4]  # inside the slice (pad adds bands above and below)
        assert rows[:, 0].min() > 200 and rows[:, -1].min() > 200, (frame, size)
    # the central crop of crosssite 0.1 loses both markers
    cropped = _denormalise(eval_transform(64, frame="crop")(image))
    assert cropped.max() < 150


def test_pad_frame_keeps_the_aspect_ratio() -> None:
    image = _marked_slice()
    seen = _denormalise(eval_transform(60, frame="pad")(image))
    # 300 x 200 padded to 300 x 300 with the border's median (the markers are a minority of the border)
    assert abs(int(seen[0, 30]) - 100) <= 1 and abs(int(seen[-1, 30]) - 100) <= 1
    content = np.flatnonzero(seen[:, 0] > 200)
    assert 35 <= len(content) <= 45  # 200 / 300 of 60 rows hold the slice


def test_train_crops_lie_inside_the_whole_slice_frame() -> None:
    image = _marked_slice()
    transform = train_transform(56, frame="resize")  # frame 64 x 64, random 56 crop
    hits = 0
    for _ in range(20):
        crop = _denormalise(transform(image))
        assert crop.shape == (56, 56)
        hits += int(crop[:, 0].min() > 200 or crop[:, -1].min() > 200)
    assert hits > 0  # the lateral edge is reachable by training crops


def test_normalisation_of_the_mean_grey_is_zero() -> None:
    grey = np.full((20, 20), round(DEFAULT_MEAN[0] * 255), dtype=np.uint8)
    assert eval_transform(16)(grey).abs().max() < 0.01
    float_input = eval_transform(16)(grey.astype(np.float32) / 255.0)  # float slices are accepted too
    assert float_input.abs().max() < 0.01


@pytest.fixture(scope="module")
def synthetic_sites() -> list[Site]:
    return load_sites(["S0=synthetic:shift=0,n=10,size=48", "S1=synthetic:shift=1,n=2,size=40"])


def test_train_loader_batches(synthetic_sites: list[Site]) -> None:
    indices = [np.arange(0, 20, 2), None]
    cache = build_cache(synthetic_sites, indices, image_size=32, progress=False)
    loader = train_loader(synthetic_sites, indices, cache, 32, batch_per_site=4, seed=0)
    assert len(loader) == max(-(-10 // 4), -(-4 * 4 // 4))  # site 1 (4 < 10 / 2) is repeated 4 times
    batches = list(loader)
    assert len(batches) == len(loader)
    for batch in batches:
        assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
        for key in ("label", "site", "index"):
            assert batch[key].shape == (8,) and batch[key].dtype == torch.long
        assert batch["site"].tolist() == [0] * 4 + [1] * 4
        for s, i, y in zip(batch["site"].tolist(), batch["index"].tolist(), batch["label"].tolist()):
            assert synthetic_sites[s].samples[i].label == y
            if s == 0:
                assert i in indices[0]
    loader.batch_sampler.set_epoch(1)
    assert [b["index"].tolist() for b in loader] != [b["index"].tolist() for b in batches]


def test_eval_loader_is_ordered_and_complete(synthetic_sites: list[Site]) -> None:
    cache = build_cache(synthetic_sites, image_size=32, progress=False)
    loader = eval_loader(synthetic_sites, None, cache, 32, batch_size=7)
    batches = list(loader)
    sites = torch.cat([b["site"] for b in batches]).tolist()
    index = torch.cat([b["index"] for b in batches]).tolist()
    assert list(zip(sites, index)) == [(s, i) for s, site in enumerate(synthetic_sites) for i in range(len(site))]
    first = batches[0]["image"][0]
    assert torch.equal(first, eval_transform(32)(cache[0]))
    # A slice read directly gives the same tensor as the cached one.
    direct = read_image(synthetic_sites[0].samples[0].path)
    assert torch.equal(eval_transform(32)(direct), first)
    in_workers = list(eval_loader(synthetic_sites, None, cache, 32, batch_size=7, workers=1))
    assert torch.equal(in_workers[-1]["image"], batches[-1]["image"])


def test_loader_leaves_out_skipped_files(tmp_path: Path) -> None:
    for name, value in (("a.png", 10), ("b.png", 20), ("c.png", 30)):
        Image.fromarray(np.full((40, 40), value, np.uint8)).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    samples = [Sample(tmp_path / n, i % 2) for i, n in enumerate(["a.png", "bad.png", "b.png", "c.png"])]
    site = Site("T", "csv", tmp_path, samples, False)
    cache = build_cache([site], image_size=32, skip_bad=True, progress=False, cache_dir=tmp_path / "c")
    loader = eval_loader([site], None, cache, 32, batch_size=8)
    assert loader.dataset.skipped == [samples[1]]
    (batch,) = list(loader)
    assert batch["index"].tolist() == [0, 2, 3]


def test_train_loader_refuses_a_site_without_slices(synthetic_sites: list[Site]) -> None:
    indices = [np.arange(4), np.zeros(0, dtype=np.int64)]
    cache = build_cache(synthetic_sites, indices, image_size=32, progress=False)
    with pytest.raises(SiteError, match="S1"):
        train_loader(synthetic_sites, indices, cache, 32, batch_per_site=2)
