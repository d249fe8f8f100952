"""Decode cache: cached pixels equal directly decoded ones; reuse, invalidation, bad files, pickling."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crosssite.data import Sample, SliceCache, load_site, read_image, resize_short_side
from crosssite.errors import ImageReadError


def _spread(site, count: int) -> list[Sample]:
    """``count`` samples spread over the whole site (both classes, every format it holds)."""
    idx = np.linspace(0, len(site.samples) - 1, count).round().astype(int)
    return [site.samples[i] for i in idx]


def _packs(folder: Path) -> list[Path]:
    return sorted(folder.glob("pack-*.json"))


def test_cached_pixels_equal_decoded_pixels(tmp_path: Path, site_a_path: Path, site_b_path: Path) -> None:
    site_a, site_b = load_site(f"A={site_a_path}"), load_site(f"B={site_b_path}")
    samples = _spread(site_a, 20) + _spread(site_b, 20)
    assert {s.path.suffix for s in samples} == {".png", ".jpg"}
    cache = SliceCache(samples, short_side=256, cache_dir=tmp_path, progress=False)
    assert len(cache) == 40 and cache.valid.all() and not cache.skipped
    for i, sample in enumerate(samples):
        expected = resize_short_side(read_image(sample.path), 256)
        assert min(cache[i].shape) == 256
        np.testing.assert_array_equal(cache[i], expected, err_msg=str(sample.path))
    assert cache.slot_of(samples[7]) == 7

    # A second cache over the same files decodes nothing and maps the same pixels.
    packs = _packs(tmp_path)
    again = SliceCache(samples[::-1], short_side=256, cache_dir=tmp_path, progress=False)
    assert _packs(tmp_path) == packs
    np.testing.assert_array_equal(again[0], cache[39])

    # A different short side is a different entry.
    small = SliceCache(samples[:2], short_side=64, cache_dir=tmp_path, progress=False)
    assert min(small[0].shape) == 64 and len(_packs(tmp_path)) == len(packs) + 1


def test_changed_file_is_decoded_again(tmp_path: Path) -> None:
    path = tmp_path / "img (1).png"
    Image.fromarray(np.full((20, 30), 10, np.uint8)).save(path)
    sample = Sample(path, 1)
    first = SliceCache([sample], short_side=16, cache_dir=tmp_path / "c", progress=False)
    assert first[0].shape == (16, 24) and (first[0] == 10).all()
    Image.fromarray(np.full((30, 20), 200, np.uint8)).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = SliceCache([sample], short_side=16, cache_dir=tmp_path / "c", progress=False)
    assert second[0].shape == (24, 16) and (second[0] == 200).all()


def test_identical_files_share_one_entry(tmp_path: Path) -> None:
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "b.png")
    cache = SliceCache([Sample(tmp_path / "a.png", 0), Sample(tmp_path / "b.png", 1)], 8, tmp_path / "c",
                       progress=False)
    (pack,) = _packs(tmp_path / "c")
    assert len(json.loads(pack.read_text())) == 1
    np.testing.assert_array_equal(cache[0], cache[1])


def test_corrupt_file_stops_or_is_recorded(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.full((8, 8), 50, np.uint8)).save(good)
    bad = tmp_path / "bad (2).png"
    bad.write_bytes(good.read_bytes()[:40])
    missing = tmp_path / "gone.png"
    samples = [Sample(good, 0), Sample(bad, 1), Sample(missing, 1)]
    with pytest.raises(ImageReadError) as info:
        SliceCache(samples[:2], 8, tmp_path / "c", progress=False)
    assert info.value.path == bad
    with pytest.raises(ImageReadError, match="gone.png"):
        SliceCache(samples, 8, tmp_path / "c", progress=False)

    cache = SliceCache(samples, 8, tmp_path / "c", skip_bad=True, progress=False)
    assert cache.valid.tolist() == [True, False, False]
    assert sorted(s.path.name for s, _ in cache.skipped) == ["bad (2).png", "gone.png"]
    with pytest.raises(ImageReadError, match="skipped"):
        cache[1]
    assert cache.write_skipped(tmp_path / "skipped.json") == 2
    rows = json.loads((tmp_path / "skipped.json").read_text())
    assert {Path(r["path"]).name for r in rows} == {"bad (2).png", "gone.png"} and all(r["reason"] for r in rows)


def test_frames_cached_separately_and_pickling(tmp_path: Path) -> None:
    import nibabel as nib

    volume = np.stack([np.full((8, 8), v, np.int16) for v in (-1000, -600, 0)], axis=-1)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    samples = [Sample(path, 0, "v", frame=k) for k in range(3)]
    cache = SliceCache(samples, 6, tmp_path / "c", progress=False)
    means = [float(cache[k].mean()) for k in range(3)]
    np.testing.assert_allclose(means, [round((hu + 1350) / 1500 * 255) for hu in (-1000, -600, 0)], atol=0.5)
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 10_000  # the pixels stay in the memory-mapped file
    np.testing.assert_array_equal(clone[2], cache[2])
