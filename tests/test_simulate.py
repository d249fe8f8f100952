"""Simulated hospitals (`crosssite.data.simulate`): the family of draws, what each setting does to a real slice,
and a simulated hospital as a site (`NAME=simulated:SOURCE,hospital=K,seed=S,limit=N`)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from crosssite.data import load_site, load_sites, read_image
from crosssite.data.simulate import (
    FOV_KINDS,
    WINDOW_KINDS,
    HospitalSettings,
    draw_hospital,
    encode,
    parse_simulated_spec,
    render,
    rendered_grey,
)
from crosssite.errors import SiteError
from crosssite.rundir import site_spec

PLAIN = HospitalSettings()  # the identity export: lung window, native field, no noise, 8-bit PNG


@pytest.fixture(scope="module")
def slice_a(site_a) -> np.ndarray:
    return read_image(site_a.samples[0].path)


def test_draws_cover_the_family_and_are_reproducible() -> None:
    draws = [draw_hospital(np.random.default_rng([0, k])) for k in range(300)]
    assert {d.window_kind for d in draws} == set(WINDOW_KINDS)
    assert {d.fov for d in draws} == set(FOV_KINDS)
    for flag in ("invert", "rgb", "annotations", "table", "circle"):
        share = np.mean([getattr(d, flag) for d in draws])
        assert 0.03 < share < 0.6, (flag, share)
    assert {d.bit_depth for d in draws} == {8, 16}
    assert any(d.jpeg_quality for d in draws) and any(not d.jpeg_quality for d in draws)
    assert any(d.border for d in draws) and any(d.pad for d in draws)
    assert all(d.width > 1.2 for d in draws if d.window_kind == "wide")
    assert all(d.zoom > 1 for d in draws if d.fov == "thorax") and all(d.zoom < 1 for d in draws if d.fov == "body")
    assert draw_hospital(np.random.default_rng([0, 5])) == draws[5]


def test_the_plain_export_gives_the_slice_back(slice_a: np.ndarray) -> None:
    out = render(slice_a, PLAIN, np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == slice_a.shape
    # one rounding to 8 bits on each side of [0, 1]
    assert np.abs(out.astype(np.float32) / 255 - slice_a).max() <= 1 / 255 + 1e-6


def test_window_inversion_and_grey_range(slice_a: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    base = render(slice_a, PLAIN, rng).astype(np.float32) / 255
    wide = render(slice_a, dataclasses.replace(PLAIN, window_kind="wide", width=2.0), rng).astype(np.float32) / 255
    assert wide.std() == pytest.approx(base.std() / 2, rel=0.05)  # a window twice as wide halves the contrast
    inverted = render(slice_a, dataclasses.replace(PLAIN, invert=True), rng).astype(np.float32) / 255
    np.testing.assert_allclose(inverted, 1 - base, atol=1.5 / 255)
    squeezed = render(slice_a, dataclasses.replace(PLAIN, grey_low=0.1, grey_high=0.8), rng)
    assert squeezed.min() >= round(0.1 * 255) - 1 and squeezed.max() <= round(0.8 * 255) + 1


def test_field_of_view_matrix_and_overlays(slice_a: np.ndarray) -> None:
    h, w = slice_a.shape
    rng = np.random.default_rng(0)
    thorax = render(slice_a, dataclasses.replace(PLAIN, fov="thorax", zoom=1.25), rng)
    assert thorax.shape == (round(h / 1.25), round(w / 1.25))
    body = render(slice_a, dataclasses.replace(PLAIN, fov="body", zoom=0.7, table=True, circle=True,
                                               circle_value=0.2), rng)
    side = max(h, w)
    assert body.shape == (side, side)
    assert body[0, 0] == round(0.2 * 255)  # outside the reconstruction circle
    scaled = render(slice_a, dataclasses.replace(PLAIN, scale=0.5), rng)
    assert scaled.shape == (round(h * 0.5), round(w * 0.5))
    padded = render(slice_a, dataclasses.replace(PLAIN, pad=0.1, pad_value=1.0, noise=0.03), rng)
    p = round(0.1 * max(h, w))
    assert padded.shape == (h + 2 * p, w + 2 * p) and (padded[:p] == 255).all()  # padding carries no noise
    bordered = render(slice_a, dataclasses.replace(PLAIN, border=5, border_value=0.0), rng)
    assert (bordered[:5] == 0).all() and (bordered[:, -5:] == 0).all()
    annotated = render(slice_a, dataclasses.replace(PLAIN, annotations=True), rng)
    changed = annotated != render(slice_a, PLAIN, rng)
    assert 0.001 < changed.mean() < 0.1  # text in the corners, the anatomy untouched
    assert not changed[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].any()


def test_noise_blur_and_sharpen_change_detail_as_intended(slice_a: np.ndarray) -> None:
    def roughness(settings: HospitalSettings) -> float:
        g = render(slice_a, settings, np.random.default_rng(1)).astype(np.float32)
        return float(np.abs(np.diff(g, axis=1)).mean())

    plain = roughness(PLAIN)
    assert roughness(dataclasses.replace(PLAIN, blur=1.5)) < 0.8 * plain
    assert roughness(dataclasses.replace(PLAIN, sharpen=1.5)) > 1.2 * plain
    assert roughness(dataclasses.replace(PLAIN, noise=0.04)) > 1.5 * plain
    assert roughness(dataclasses.replace(PLAIN, resolution=0.4)) < 0.8 * plain


def test_file_formats(slice_a: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    deep = dataclasses.replace(PLAIN, bit_depth=16)
    pixels = render(slice_a, deep, rng)
    data, suffix = encode(pixels, deep)
    assert pixels.dtype == np.uint16 and suffix == ".png"
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I")
    np.testing.assert_allclose(rendered_grey(slice_a, deep, rng), slice_a, atol=1e-4)
    deep_text = dataclasses.replace(deep, annotations=True)
    text = render(slice_a, deep_text, rng) != render(slice_a, deep, rng)
    assert 0.001 < text.mean() < 0.1  # burnt-in text reaches 16-bit exports too
    screenshot = dataclasses.replace(PLAIN, rgb=True, jpeg_quality=40)
    pixels = render(slice_a, screenshot, rng)
    data, suffix = encode(pixels, screenshot)
    assert pixels.shape == (*slice_a.shape, 3) and suffix == ".jpg"
    back = rendered_grey(slice_a, screenshot, rng)
    error = np.abs(back - slice_a)
    assert 0.002 < error.mean() < 0.03  # JPEG at quality 40 loses some detail, not the slice


def test_spec_parsing() -> None:
    spec = parse_simulated_spec("simulated:/data/x,y:folder,hospital=3,seed=2,limit=5")
    assert (spec.source, spec.hospital, spec.seed, spec.limit) == ("/data/x,y:folder", 3, 2, 5)
    with pytest.raises(SiteError, match="unknown simulated option 'colour'"):
        parse_simulated_spec("simulated:/data/x,colour=1")
    with pytest.raises(SiteError, match="no source site"):
        parse_simulated_spec("simulated:,hospital=1")
    assert parse_simulated_spec("simulated:/a,hospital=1").settings() != parse_simulated_spec(
        "simulated:/a,hospital=2").settings()


def test_a_simulated_hospital_is_a_site_with_the_sources_labels_and_patients(site_b_path, site_b) -> None:
    spec = f"simulated:{site_b_path},hospital=4,seed=1,limit=3"
    site = load_site(f"H={spec}")
    assert site.layout == "simulated" and len(site) == 6 and site.class_counts() == {"non-COVID": 3, "COVID": 3}
    assert site.has_patients
    rows = (site.root / "manifest.csv").read_text().splitlines()[1:]
    patient_of = {str(s.path): s.patient for s in site_b.samples}
    for sample, row in zip(site.samples, rows):
        source = row.rsplit(",", 1)[1]
        assert sample.patient == patient_of[source]
        assert sample.label == next(s.label for s in site_b.samples if str(s.path) == source)
        assert read_image(sample.path).ndim == 2
    again = load_site(f"H2={spec}")
    assert again.root == site.root  # materialised once
    reloaded = load_sites([(e["name"], e["path"], e["layout"]) for e in [site_spec(site)]])[0]
    assert [s.path for s in reloaded.samples] == [s.path for s in site.samples]
    other = load_site(f"H3=simulated:{site_b_path},hospital=5,seed=1,limit=3")
    assert other.root != site.root


def test_a_bad_source_is_named(tmp_path) -> None:
    with pytest.raises(SiteError, match="does not exist"):
        load_site(f"H=simulated:{tmp_path / 'missing'},hospital=1")
