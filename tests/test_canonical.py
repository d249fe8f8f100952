"""The canonical view (`crosssite.data.canonical`) on real slices of both sites: lung masks against hand-drawn
outlines, crops that keep both lungs, the fallback, invariance across simulated hospitals, and the ``"canonical"``
frame through the decode cache, the evaluation transform, a model card and predict's preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import polygon

from crosssite.data import SliceCache, eval_transform, frame_slice, preprocessing_transform, read_image
from crosssite.data.canonical import LUNG_GREY, TISSUE_GREY, canonical_view
from crosssite.data.simulate import HospitalSettings, draw_hospital, rendered_grey
from crosssite.inference.predictor import Preprocess

OUTLINES = json.loads((Path(__file__).parent / "data" / "lung_outlines.json").read_text())["slices"]
MIN_IOU = 0.65  # coarse hand outlines (about 20 vertices a lung) against pixel masks: measured 0.71-0.86


def _hand_mask(entry: dict, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    mask = np.zeros(shape, dtype=bool)
    for poly in entry["lungs"]:
        p = np.asarray(poly, dtype=float)
        rows, cols = polygon(p[:, 1] * h / 100, p[:, 0] * w / 100, shape)
        mask[rows, cols] = True
    return mask


@pytest.mark.parametrize("entry", OUTLINES, ids=[Path(e["path"]).name for e in OUTLINES])
def test_lung_masks_match_hand_outlines_and_the_crop_keeps_both_lungs(entry: dict, data_root: Path) -> None:
    image = read_image(data_root / entry["path"])
    hand = _hand_mask(entry, image.shape)
    view = canonical_view(image)
    assert view.found
    iou = (hand & view.lungs).sum() / (hand | view.lungs).sum()
    assert iou > MIN_IOU, iou
    top, left, bottom, right = view.box
    for poly in entry["lungs"]:  # each hand-drawn lung, one at a time, is found and lies in the crop
        one = _hand_mask({"lungs": [poly]}, image.shape)
        assert (one & view.lungs).sum() / one.sum() > 0.7
        assert one[top:bottom, left:right].sum() / one.sum() > 0.98
    assert view.image.shape == (bottom - top, right - left)
    # the grey map puts the lungs' and the body's medians where the canonical rendering wants them
    lungs_in_crop = view.lungs[top:bottom, left:right]
    assert np.median(view.image[lungs_in_crop]) == pytest.approx(LUNG_GREY, abs=0.05)
    assert LUNG_GREY + 0.2 < np.median(view.image[~lungs_in_crop & (view.image > 0)]) < TISSUE_GREY + 0.15


def test_an_inverted_export_gives_the_same_lungs_and_greys(data_root: Path) -> None:
    image = read_image(data_root / OUTLINES[0]["path"])
    straight, inverted = canonical_view(image), canonical_view(1.0 - image)
    assert inverted.found
    iou = (straight.lungs & inverted.lungs).sum() / (straight.lungs | inverted.lungs).sum()
    assert iou > 0.9
    if straight.box == inverted.box:
        inside = straight.image > 0
        assert np.abs(straight.image[inside] - inverted.image[inside]).mean() < 0.05


@pytest.mark.parametrize("make", [
    lambda: np.full((120, 160), 0.4, dtype=np.float32),  # one grey
    lambda: np.tile(np.linspace(0, 1, 160, dtype=np.float32), (120, 1)),  # a ramp
    lambda: np.random.default_rng(0).random((120, 160)).astype(np.float32),  # noise
    lambda: np.pad(np.ones((60, 80), np.float32), ((30, 30), (40, 40))),  # a bright box, no lungs in it
])
def test_fallback_is_the_whole_slice_flagged(make) -> None:
    image = make()
    view = canonical_view(image)
    assert not view.found and not view.lungs.any()
    assert view.box == (0, 0, *image.shape)
    np.testing.assert_array_equal(view.image, image)
    np.testing.assert_array_equal(frame_slice(image, 73, "canonical"), frame_slice(image, 73, "pad"))


# Two exports far apart (a wide window, whole body with table, circle and overlays; a narrow inverted window,
# zoomed, JPEG, a border) and four random pairs of the simulator's draws.
_HOSPITAL_PAIRS = [
    (HospitalSettings(window_kind="wide", level=0.55, width=1.8, gamma=1.2, fov="body", zoom=0.7, table=True,
                      circle=True, annotations=True, noise=0.02, scale=0.8),
     HospitalSettings(window_kind="narrow", level=0.62, width=0.7, gamma=0.8, fov="thorax", zoom=1.2, invert=True,
                      jpeg_quality=50, border=6, blur=0.8, grey_low=0.1, grey_high=0.9)),
    *[(draw_hospital(np.random.default_rng([1, k])), draw_hospital(np.random.default_rng([2, k]))) for k in range(4)],
]


def test_the_canonical_view_of_one_slice_is_closer_across_hospitals_than_its_renderings(data_root: Path) -> None:
    """Mean absolute grey difference (64 px frames) between two hospitals' renderings of the same slice, raw
    (padded frame) and canonical: the canonical views must sit clearly closer, over both sites' slices."""
    raw, canonical = [], []
    for i, entry in enumerate(OUTLINES):
        image = read_image(data_root / entry["path"])
        for first, second in _HOSPITAL_PAIRS:
            one, two = (rendered_grey(image, s, np.random.default_rng(i)) for s in (first, second))
            for frame, out in (("pad", raw), ("canonical", canonical)):
                a, b = (frame_slice(x, 64, frame).astype(np.float32) / 255 for x in (one, two))
                out.append(float(np.abs(a - b).mean()))
    assert np.mean(canonical) < 0.8 * np.mean(raw), (np.mean(canonical), np.mean(raw))


def test_the_canonical_frame_through_the_cache_and_a_model_card(site_a, site_b, tmp_path: Path) -> None:
    samples = [site_a.samples[0], site_b.samples[0]]
    cache = SliceCache(samples, short_side=73, cache_dir=tmp_path, frame="canonical", progress=False)
    padded = SliceCache(samples, short_side=73, cache_dir=tmp_path, frame="pad", progress=False)
    view = eval_transform(64, frame="canonical")
    card_view = preprocessing_transform({"image_size": 64, "frame": "canonical"})
    predict_view = Preprocess.from_card({"preprocessing": {"image_size": 64, "frame": "canonical"}})
    for i, sample in enumerate(samples):
        decoded = read_image(sample.path)
        assert cache[i].shape == (73, 73)
        np.testing.assert_array_equal(cache[i], frame_slice(decoded, 73, "canonical"))
        assert not np.array_equal(cache[i], padded[i])  # a separate cache entry, not the padded slice
        np.testing.assert_array_equal(view(cache[i]).numpy(), view(decoded).numpy())
        np.testing.assert_array_equal(card_view(decoded).numpy(), view(decoded).numpy())
        np.testing.assert_array_equal(predict_view(decoded).numpy(), view(decoded).numpy())


def test_the_aerated_anchor_keeps_ground_glass_that_the_median_anchor_maps_away(data_root: Path) -> None:
    """Brighten the upper half of each lung, as ground glass does, on a real slice: the median anchor moves with
    it and darkens the untouched aerated lung below it, the 10th-percentile anchor keeps that lung's grey."""
    image = read_image(data_root / OUTLINES[0]["path"]).astype(np.float32)
    if image.max() > 1.0:
        image /= 255.0
    lungs = canonical_view(image).lungs
    rows = np.nonzero(lungs)[0]
    upper = lungs & (np.arange(image.shape[0])[:, None] < np.median(rows))
    glass = image.copy()
    glass[upper] = np.clip(glass[upper] + 0.12, 0.0, 1.0)
    lower = lungs & ~upper
    shift = {}
    for anchor in ("median", "aerated"):
        views = [canonical_view(x, anchor=anchor) for x in (image, glass)]
        assert all(v.found and v.box == views[0].box for v in views)
        top, left, bottom, right = views[0].box
        below = lower[top:bottom, left:right]
        shift[anchor] = float(np.median(views[1].image[below]) - np.median(views[0].image[below]))
    assert shift["median"] < -0.05  # the healthy lung drawn darker because its neighbour is diseased
    assert abs(shift["aerated"]) < 0.5 * abs(shift["median"])
    with pytest.raises(ValueError, match="anchor"):
        canonical_view(image, anchor="mean")


@pytest.mark.parametrize("entry", OUTLINES[:2], ids=[Path(e["path"]).name for e in OUTLINES[:2]])
def test_the_lungs_view_keeps_the_hand_drawn_lungs_and_blanks_the_chest_wall(entry: dict, data_root: Path) -> None:
    image = read_image(data_root / entry["path"])
    body, lungs = canonical_view(image, anchor="aerated"), canonical_view(image, anchor="aerated", keep="lungs")
    assert body.box == lungs.box
    top, left, bottom, right = lungs.box
    hand = _hand_mask(entry, image.shape)[top:bottom, left:right]
    assert (lungs.image[hand] > 0).mean() > 0.95  # the lungs stay in view (coarse hand outlines: 0.965 measured)
    np.testing.assert_array_equal(lungs.image[lungs.image > 0], body.image[lungs.image > 0])  # same greys
    # far less of the rest of the body: what remains is the rim along the lungs
    assert ((lungs.image > 0) & ~hand).sum() < 0.5 * ((body.image > 0) & ~hand).sum()


def test_the_cache_marks_and_the_run_reports_slices_shown_whole(site_a, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from crosssite.data.sites import Sample, Site
    from crosssite.rundir import WHOLE, write_run_files

    ramp = tmp_path / "ramp.png"  # no lung field in it: the canonical frame falls back to the whole slice
    Image.fromarray(np.tile(np.linspace(0, 255, 160).astype(np.uint8), (120, 1))).save(ramp)
    samples = [site_a.samples[0], Sample(ramp, 0, "p0")]
    cache = SliceCache(samples, short_side=73, cache_dir=tmp_path / "c", frame="canonical", progress=False)
    assert cache.whole.tolist() == [False, True] and cache.whole_samples() == [samples[1]]
    assert not SliceCache(samples, short_side=73, cache_dir=tmp_path / "c", frame="pad", progress=False).whole.any()
    # a pack written before the flag was stored is decoded again for a canonical frame, not read as "found"
    for index in (tmp_path / "c").glob("pack-*.json"):
        table = json.loads(index.read_text())
        index.write_text(json.dumps({k: v[:3] for k, v in table.items()}))
    again = SliceCache(samples, short_side=73, cache_dir=tmp_path / "c", frame="canonical", progress=False)
    assert again.whole.tolist() == [False, True]
    site = Site("mixed", "folder", tmp_path, samples, has_patients=True)
    write_run_files(tmp_path / "run", [site], [], again, new_split=False)
    assert "no lung field found in 1 of 2 slice(s) (mixed 1): shown whole" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / WHOLE).read_text()) == [{"path": str(ramp), "frame": None}]


def test_the_equalised_view_is_the_same_under_a_monotone_grey_change(data_root: Path) -> None:
    """A gamma moved every grey; ranks among the body's greys did not: the equalised views agree far better than
    the affine ones, which only undo an affine change (measured 0.0010 against 0.0072). A window that clips is not
    strictly monotone: the clipped greys share one rank, and there the equalised view moves more (0.085 against
    0.059 with this gamma and a clipping window)."""
    image = read_image(data_root / OUTLINES[1]["path"]).astype(np.float32)
    if image.max() > 1.0:
        image /= 255.0
    changed = image ** 0.6
    gap = {}
    for grey in ("affine", "equalise"):
        one, two = (canonical_view(x, grey=grey) for x in (image, changed))
        assert one.found and one.box == two.box
        inside = one.image > 0
        gap[grey] = float(np.abs(one.image[inside] - two.image[inside]).mean())
    assert gap["equalise"] < 0.005 and gap["equalise"] < 0.5 * gap["affine"], gap
    with pytest.raises(ValueError, match="grey"):
        canonical_view(image, grey="clahe")
