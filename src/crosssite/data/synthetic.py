"""Synthetic CT-like sites: a built-in, seeded stand-in for real hospitals.

Each slice shows a body outline with two lung fields, a heart, a spine and ribs, and vessels branching out
from the hila. COVID slices carry two to six lesions inside the lungs, mostly peripheral: faint ground-glass
opacities with ragged edges and patchy insides, and denser consolidations, of widely varied size. Non-COVID slices sometimes carry a small
nodule, and both classes get a dependent (posterior) density gradient, so the task needs more than
"any bright pixel in the lungs".

A site's ``shift`` changes how its scanner renders the same anatomy: contrast, gamma and brightness, noise,
blur and resolution all move with it (``shift=0`` is a sharp, clean scanner). Two sites with different
shifts are different patient populations too: the anatomy is drawn from a generator seeded by
``(seed, shift)``. Every patient contributes ``SLICES_PER_PATIENT`` neighbouring slices, so patient-grouped
folds matter as they do on real data.

A site is written ``NAME=synthetic[:shift=0.5,n=200,seed=0,size=256]`` (``n`` images per class) and is
materialised once as PNG files under ``$CROSSSITE_CACHE/synthetic/<hash of the parameters>/``; the same
parameters always give the same pixels.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from crosssite.errors import SiteError
from crosssite.ioutil import atomic_folder, cache_root

__all__ = ["SyntheticParams", "SLICES_PER_PATIENT", "parse_synthetic_spec", "render_slice", "materialise"]

SLICES_PER_PATIENT = 4
_GENERATOR_VERSION = 2


@dataclass(frozen=True)
class SyntheticParams:
    """Parameters of one synthetic site: scanner ``shift``, ``n`` images per class, ``seed``, image ``size``."""

    shift: float = 0.5
    n: int = 200
    seed: int = 0
    size: int = 256

    def __post_init__(self) -> None:
        if self.n < 1:
            raise SiteError(f"synthetic site: n must be >= 1, got {self.n}")
        if self.size < 32:
            raise SiteError(f"synthetic site: size must be >= 32, got {self.size}")
        if not 0.0 <= self.shift <= 4.0:
            raise SiteError(f"synthetic site: shift must be in [0, 4], got {self.shift}")

    def digest(self) -> str:
        text = json.dumps({**asdict(self), "version": _GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def parse_synthetic_spec(text: str) -> SyntheticParams:
    """Parse ``synthetic[:key=value,...]`` (keys ``shift``, ``n``, ``seed``, ``size``)."""
    head, _, options = text.partition(":")
    if head != "synthetic":
        raise SiteError(f"{text!r}: a synthetic site is written synthetic[:shift=0.5,n=200,seed=0,size=256]")
    types = {"shift": float, "n": int, "seed": int, "size": int}
    values: dict[str, object] = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in types:
            raise SiteError(f"{text!r}: unknown synthetic option {item!r}; keys are {', '.join(types)}")
        try:
            values[key] = types[key](value)
        except ValueError:
            raise SiteError(f"{text!r}: {key}={value!r} is not a valid {types[key].__name__}") from None
    return SyntheticParams(**values)


# ---------------------------------------------------------------------------------------------- anatomy


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(axis, axis, indexing="xy")  # x: columns, y: rows (y grows downwards = posterior)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _anatomy(rng: np.random.Generator) -> dict[str, float]:
    """Per-patient body and lung geometry, shared by the patient's slices."""
    return {
        "body_ax": rng.uniform(0.78, 0.92), "body_ay": rng.uniform(0.55, 0.68), "body_cy": rng.uniform(0.0, 0.1),
        "lung_ax": rng.uniform(0.24, 0.32), "lung_ay": rng.uniform(0.36, 0.46), "lung_dx": rng.uniform(0.34, 0.42),
        "lung_cy": rng.uniform(-0.06, 0.04), "heart_r": rng.uniform(0.16, 0.24), "lung_hu": rng.uniform(0.05, 0.12),
        "gradient": rng.uniform(0.0, 0.12),
    }


def _paint_vessels(rng: np.random.Generator, size: int, hila: list[tuple[float, float]]) -> np.ndarray:
    """Branching vessel tree from each hilum plus vessel cross-sections, as a blurred density map."""
    from scipy import ndimage  # imported where used: reading and predicting never need scipy

    t = np.linspace(0.0, 1.0, 48)[None, :]  # position along a vessel, (1, 48)
    rows, cols, weights = [], [], []
    for hx, hy in hila:
        n = int(rng.integers(10, 16))
        angle = (rng.uniform(-1.3, 1.3, n) + (0.0 if hx > 0 else np.pi))[:, None]
        length = rng.uniform(0.2, 0.45, n)[:, None]
        bend = rng.normal(0.0, 0.25, n)[:, None]
        px = hx + np.cos(angle + bend * t) * length * t  # (n, 48)
        py = hy + np.sin(angle + bend * t) * length * t
        cols.append(np.clip(((px + 1) / 2 * size).astype(int), 0, size - 1).ravel())
        rows.append(np.clip(((py + 1) / 2 * size).astype(int), 0, size - 1).ravel())
        weights.append(np.broadcast_to(1.0 - 0.7 * t, px.shape).ravel())
    dots = rng.integers(0, size, size=(int(size * 0.25), 2))
    rows.append(dots[:, 0])
    cols.append(dots[:, 1])
    weights.append(rng.uniform(0.5, 1.0, len(dots)))
    flat = np.concatenate(rows) * size + np.concatenate(cols)
    canvas = np.bincount(flat, np.concatenate(weights), minlength=size * size).reshape(size, size)
    return ndimage.gaussian_filter(canvas.astype(np.float32), sigma=max(0.6, size / 256)) * 2.5


def _random_lung_point(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lungs: np.ndarray, peripheral: bool
) -> tuple[float, float]:
    """A random point inside the lungs; ``peripheral`` prefers the one farthest from the midline of three."""
    rows, cols = np.nonzero(lungs)
    picks = rng.integers(len(rows), size=3 if peripheral else 1)
    k = picks[np.argmax(np.abs(x[rows[picks], cols[picks]]))]
    return float(x[rows[k], cols[k]]), float(y[rows[k], cols[k]])


def _lesions(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, lungs: np.ndarray, count: int, kinds: tuple[str, ...]
) -> np.ndarray:
    """Sum of ground-glass (faint, large, ragged) and consolidation (dense, smaller) blobs in the lungs."""
    from scipy import ndimage
    from scipy.special import expit

    size = x.shape[0]
    rough = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma=size / 40)
    rough /= rough.std() + 1e-6
    out = np.zeros_like(x)
    for _ in range(count):
        kind = kinds[rng.integers(len(kinds))]
        cx, cy = _random_lung_point(rng, x, y, lungs, peripheral=kind != "nodule")
        if kind == "ggo":
            radius, amplitude, edge = rng.uniform(0.06, 0.24), rng.uniform(0.14, 0.32), 0.8
        elif kind == "consolidation":
            radius, amplitude, edge = rng.uniform(0.04, 0.12), rng.uniform(0.35, 0.55), 3.0
        else:  # nodule
            radius, amplitude, edge = rng.uniform(0.015, 0.04), rng.uniform(0.3, 0.5), 4.0
        stretch = rng.uniform(0.6, 1.6)
        d2 = ((x - cx) / (radius * stretch)) ** 2 + ((y - cy) / (radius / stretch)) ** 2
        blob = expit(-edge * 3.0 * (d2 - 1.0 + 0.5 * rough))
        if kind == "ggo":  # patchy inside, not a flat disc
            blob *= np.clip(0.75 + 0.25 * rough, 0.3, 1.0)
        out = np.maximum(out, amplitude * blob)
    return out * lungs


def render_slice(rng: np.random.Generator, anatomy: dict[str, float], covid: bool, size: int, z: float) -> np.ndarray:
    """One clean slice (before the scanner model), float32 (size, size) in [0, 1]; ``z`` in [-1, 1] moves
    the slice along the patient axis (lungs grow and shrink a little)."""
    from scipy import ndimage

    a = anatomy
    x, y = _grid(size)
    scale = 1.0 - 0.08 * z * z
    body = _ellipse(x, y, 0.0, a["body_cy"], a["body_ax"], a["body_ay"])
    fat = body & ~_ellipse(x, y, 0.0, a["body_cy"], a["body_ax"] - 0.06, a["body_ay"] - 0.05)
    lungs = np.zeros_like(body)
    for side in (-1.0, 1.0):
        lungs |= _ellipse(x, y, side * a["lung_dx"], a["lung_cy"], a["lung_ax"] * scale, a["lung_ay"] * scale)
    heart = _ellipse(x, y, 0.08, a["lung_cy"] + 0.12, a["heart_r"] * 1.2, a["heart_r"])
    lungs &= ~heart
    spine_y = a["body_cy"] + a["body_ay"] - 0.17
    spine = _ellipse(x, y, 0.0, spine_y, 0.09, 0.08)
    canal = _ellipse(x, y, 0.0, spine_y - 0.01, 0.035, 0.03)

    img = np.where(body, 0.55, 0.0).astype(np.float32)
    img[fat] = 0.42
    img[heart] = 0.6
    for k in range(10):  # ribs around the chest wall
        angle = np.pi * (0.12 + 0.76 * k / 9) + (0.0 if k % 2 else np.pi)
        rx, ry = np.cos(angle) * (a["body_ax"] - 0.1), a["body_cy"] + np.sin(angle) * (a["body_ay"] - 0.08)
        img[_ellipse(x, y, rx, ry, 0.035, 0.025)] = 0.9
    img[spine] = 0.95
    img[canal] = 0.5

    lung_tissue = a["lung_hu"] + a["gradient"] * np.clip(y - a["lung_cy"] + 0.4, 0.0, 1.0)
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma=size / 128)
    lung_img = lung_tissue + 0.015 * texture / (texture.std() + 1e-6)
    hila = [(-0.15, a["lung_cy"] + 0.02), (0.2, a["lung_cy"] + 0.02)]
    lung_img += 0.35 * np.clip(_paint_vessels(rng, size, hila), 0.0, 1.0)
    if covid:
        lung_img += _lesions(rng, x, y, lungs, int(rng.integers(2, 7)), ("ggo", "ggo", "consolidation"))
    elif rng.random() < 0.4:
        lung_img += _lesions(rng, x, y, lungs, int(rng.integers(1, 3)), ("nodule",))
    soft_lungs = ndimage.gaussian_filter(lungs.astype(np.float32), sigma=size / 200)
    img = img * (1.0 - soft_lungs) + lung_img * soft_lungs
    return np.clip(img, 0.0, 1.0)


def scanner(rng: np.random.Generator, image: np.ndarray, shift: float) -> np.ndarray:
    """Render a clean slice as a scanner of the given ``shift`` would: resolution, blur, gamma, contrast,
    brightness and noise all degrade or move with ``shift``."""
    from scipy import ndimage

    size = image.shape[0]
    if shift > 0:
        low = max(16, int(round(size / (1.0 + 0.75 * shift))))
        image = ndimage.zoom(ndimage.zoom(image, low / size, order=1), size / low, order=1)[:size, :size]
        image = ndimage.gaussian_filter(image, sigma=0.6 * shift * size / 256)
    image = np.clip(image, 0.0, 1.0) ** (1.0 + 0.5 * shift)
    image = 0.5 + (image - 0.5) * (1.0 - 0.3 * min(shift, 2.0)) + 0.06 * shift
    image = image + rng.normal(0.0, 0.01 + 0.04 * shift, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0)


def _generate(params: SyntheticParams, folder: Path) -> None:
    """Write ``n`` slices per class as PNG files plus ``manifest.csv`` (path, label, patient)."""
    from PIL import Image

    rows = []
    shift_key = int(round(params.shift * 1000))
    for label, class_dir in ((1, "COVID"), (0, "non-COVID")):
        (folder / class_dir).mkdir(parents=True)
        patients = -(-params.n // SLICES_PER_PATIENT)
        for p in range(patients):
            rng = np.random.default_rng([params.seed, shift_key, label, p])
            anatomy = _anatomy(rng)
            start = rng.uniform(-0.8, 0.2)
            for s in range(min(SLICES_PER_PATIENT, params.n - p * SLICES_PER_PATIENT)):
                clean = render_slice(rng, anatomy, bool(label), params.size, start + 0.2 * s)
                pixels = np.round(scanner(rng, clean, params.shift) * 255.0).astype(np.uint8)
                rel = f"{class_dir}/p{p:04d}_s{s}.png"
                Image.fromarray(pixels, mode="L").save(folder / rel)
                rows.append((rel, label, f"{class_dir}-{p:04d}"))
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient"])
        writer.writerows(rows)
    (folder / "params.json").write_text(json.dumps(asdict(params), indent=1))


def materialise(params: SyntheticParams, root: Path | None = None) -> Path:
    """Folder holding the site's PNG files and manifest, generated on first use (atomically)."""
    return atomic_folder((root or cache_root()) / "synthetic" / params.digest(), lambda tmp: _generate(params, tmp))
