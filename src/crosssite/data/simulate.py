"""Simulated hospitals: a real site's slices re-rendered as another hospital's CT export would show them.

What differs between hospitals' exported slices, even of the same anatomy, is mostly the export, not the
scanner: the display window, the field of view, the matrix and kernel, the noise, the file format. A
`HospitalSettings` holds one draw of all of these; `draw_hospital(rng)` draws one from a family chosen to
cover what public COVID-CT collections and PACS exports show; `render(slice, settings, rng)` applies it to one
decoded slice:

1. **window** (``window_kind``): the source slices are already 8-bit lung-window renderings, so a window here is a
   re-mapping of their grey levels: ``(g - (level - width / 2)) / width``, clipped. ``lung`` stays near the
   source's window, ``wide`` (width > 1) compresses the grey range as a wide soft-tissue / "body" window does, and
   ``narrow`` (high level, width < 1) darkens the lungs as a mediastinal-leaning window does; then ``gamma``.
2. **field of view** (``fov``): ``native``; ``thorax``, a zoom of ``zoom`` > 1 about the centre (the chest wall
   and part of the lateral lungs leave the frame); ``body``, the slice shrunk by ``zoom`` < 1 into a larger
   field with the patient ``table`` below it and the scanner's circular reconstruction field (outside it a
   constant ``circle_value``).
3. **matrix and kernel**: the whole frame resampled by ``scale`` (the export's pixel count), detail lost by a
   down-and-up resampling by ``resolution``, then a softer (``blur``, Gaussian sigma in output pixels) or a
   sharper kernel (``sharpen``, unsharp-mask amount); then Gaussian ``noise`` (std in grey units); then ``pad``
   (a fraction of the long side on each side) of grey ``pad_value``, added by the export, so noise-free.
4. **grey range**: ``invert`` (MONOCHROME1-like, white air), then the output squeezed into
   ``[grey_low, grey_high]`` (an export that does not use the full range).
5. **burnt-in overlays**: ``annotations`` (text in the corners: orientation, window, a scale) and a ``border``
   of ``border`` pixels of grey ``border_value``.
6. **file**: ``bit_depth`` 8 or 16, ``rgb`` (a screenshot: three equal channels, annotations in colour), and
   ``jpeg_quality`` (0: PNG; else a JPEG of that quality; 16-bit files are always PNG).

A simulated hospital is one draw applied to every slice of a real site (`materialise`), written once as image files
under ``$CROSSSITE_CACHE/simulated/<hash>/`` with a manifest that keeps the source's labels and patient ids; as a
site it is written ``NAME=simulated:SOURCE,hospital=K,seed=S[,limit=N]`` (`crosssite.data.sites`). The same
source, ``hospital``, ``seed`` and ``limit`` always give the same files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from crosssite.errors import SiteError
from crosssite.ioutil import atomic_folder, cache_root

__all__ = [
    "WINDOW_KINDS",
    "FOV_KINDS",
    "HospitalSettings",
    "SimulatedSpec",
    "SourceItem",
    "draw_hospital",
    "render",
    "encode",
    "rendered_grey",
    "parse_simulated_spec",
    "materialise",
]

_SIMULATOR_VERSION = 1
WINDOW_KINDS = ("lung", "wide", "narrow")
FOV_KINDS = ("native", "thorax", "body")


@dataclass(frozen=True)
class HospitalSettings:
    """One hospital's export (see the module docstring for what each field does and in which order)."""

    window_kind: str = "lung"
    level: float = 0.5
    width: float = 1.0
    gamma: float = 1.0
    fov: str = "native"
    zoom: float = 1.0
    table: bool = False
    circle: bool = False
    circle_value: float = 0.0
    pad: float = 0.0
    pad_value: float = 0.0
    scale: float = 1.0
    resolution: float = 1.0
    blur: float = 0.0
    sharpen: float = 0.0
    noise: float = 0.0
    invert: bool = False
    grey_low: float = 0.0
    grey_high: float = 1.0
    annotations: bool = False
    border: int = 0
    border_value: float = 1.0
    bit_depth: int = 8
    rgb: bool = False
    jpeg_quality: int = 0

    def __post_init__(self) -> None:
        if self.window_kind not in WINDOW_KINDS:
            raise ValueError(f"window_kind must be one of {', '.join(WINDOW_KINDS)}, got {self.window_kind!r}")
        if self.fov not in FOV_KINDS:
            raise ValueError(f"fov must be one of {', '.join(FOV_KINDS)}, got {self.fov!r}")
        if self.width <= 0 or self.gamma <= 0 or self.zoom <= 0 or self.scale <= 0:
            raise ValueError("width, gamma, zoom and scale must be positive")
        if not 0.0 < self.resolution <= 1.0:
            raise ValueError(f"resolution must lie in (0, 1], got {self.resolution}")
        if not 0.0 <= self.grey_low < self.grey_high <= 1.0:
            raise ValueError(f"need 0 <= grey_low < grey_high <= 1, got {self.grey_low}, {self.grey_high}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        if not (self.jpeg_quality == 0 or 1 <= self.jpeg_quality <= 100):
            raise ValueError(f"jpeg_quality must be 0 (PNG) or 1-100, got {self.jpeg_quality}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def draw_hospital(rng: np.random.Generator) -> HospitalSettings:
    """One hospital's export settings, drawn from the family in the module docstring.

    Every setting is drawn independently, so a few hundred draws cover the combinations; the probabilities keep
    most draws plausible for a chest-CT export (a lung-like window, a modest field-of-view change) while a fifth
    or so of them reach the harder cases (inverted or compressed greys, a whole-body field, a coarse matrix).
    """
    kind = str(rng.choice(WINDOW_KINDS, p=[0.55, 0.3, 0.15]))
    if kind == "lung":
        level, width = rng.uniform(0.42, 0.58), rng.uniform(0.8, 1.2)
    elif kind == "wide":
        level, width = rng.uniform(0.45, 0.65), rng.uniform(1.3, 2.2)
    else:
        level, width = rng.uniform(0.6, 0.72), rng.uniform(0.55, 0.8)
    fov = str(rng.choice(FOV_KINDS, p=[0.4, 0.3, 0.3]))
    zoom = {"native": 1.0, "thorax": rng.uniform(1.1, 1.35), "body": rng.uniform(0.6, 0.85)}[fov]
    body = fov == "body"
    sharpen = rng.uniform(0.3, 1.5) if rng.random() < 0.3 else 0.0
    return HospitalSettings(
        window_kind=kind, level=float(level), width=float(width), gamma=float(np.exp(rng.uniform(-0.35, 0.35))),
        fov=fov, zoom=float(zoom), table=bool(body and rng.random() < 0.8), circle=bool(body and rng.random() < 0.7),
        circle_value=float(0.0 if rng.random() < 0.6 else rng.uniform(0.1, 0.35)),
        pad=float(rng.uniform(0.03, 0.15) if rng.random() < 0.25 else 0.0),
        pad_value=float(0.0 if rng.random() < 0.7 else rng.uniform(0.5, 1.0)),
        scale=float(np.exp(rng.uniform(np.log(0.5), np.log(1.6)))),
        resolution=float(rng.uniform(0.4, 1.0) if rng.random() < 0.5 else 1.0),
        blur=float(0.0 if sharpen else rng.uniform(0.0, 1.5)), sharpen=float(sharpen),
        noise=float(rng.uniform(0.0, 0.04)),
        invert=bool(rng.random() < 0.1),
        grey_low=float(rng.uniform(0.0, 0.15) if rng.random() < 0.3 else 0.0),
        grey_high=float(rng.uniform(0.8, 0.95) if rng.random() < 0.3 else 1.0),
        annotations=bool(rng.random() < 0.4),
        border=int(rng.integers(2, 24) if rng.random() < 0.25 else 0),
        border_value=float(rng.choice([0.0, 1.0, 0.5])),
        bit_depth=int(16 if rng.random() < 0.15 else 8),
        rgb=bool(rng.random() < 0.25),
        jpeg_quality=int(rng.integers(30, 96) if rng.random() < 0.45 else 0),
    )


# --------------------------------------------------------------------------------------------- rendering


def _grey01(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float (H, W) -> float (height, width), bilinear (antialiased when shrinking)."""
    if image.shape == (height, width):
        return image
    out = Image.fromarray(image.astype(np.float32, copy=False), mode="F").resize((width, height), Image.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def _field_of_view(g: np.ndarray, s: HospitalSettings) -> np.ndarray:
    h, w = g.shape
    if s.fov == "thorax":
        ch, cw = max(8, round(h / s.zoom)), max(8, round(w / s.zoom))
        top, left = (h - ch) // 2, (w - cw) // 2
        return g[top : top + ch, left : left + cw]
    if s.fov != "body":
        return g
    side = max(h, w)  # the reconstruction field is square; the slice shrinks into its upper middle
    canvas = np.zeros((side, side), dtype=np.float32)
    sh, sw = max(8, round(h * s.zoom)), max(8, round(w * s.zoom))
    top, left = max(0, round((side - sh) * 0.4)), (side - sw) // 2
    canvas[top : top + sh, left : left + sw] = _resize(g, sh, sw)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    if s.table:  # a curved couch under the patient: a bright band that follows a wide arc
        y0 = min(side - 4, top + sh + max(2, side // 40))
        arc = y0 + ((xx - side / 2) / (0.6 * side)) ** 2 * side * 0.08
        band = (yy >= arc) & (yy <= arc + max(2, side // 30)) & (np.abs(xx - side / 2) < 0.42 * side)
        canvas[band] = 0.75
    if s.circle:
        outside = (xx - side / 2 + 0.5) ** 2 + (yy - side / 2 + 0.5) ** 2 > (side / 2) ** 2
        canvas[outside] = s.circle_value
    return canvas


def _annotate(image: Image.Image, s: HospitalSettings, rng: np.random.Generator) -> Image.Image:
    """Text burnt into the corners, as a viewer's overlay or a screenshot carries it."""
    draw = ImageDraw.Draw(image)
    w, h = image.size
    font = ImageFont.load_default(size=max(8, min(w, h) // 24))
    colour = (255, 255, 80) if image.mode == "RGB" else 255
    lines = [
        (0.02, 0.02, f"W:{int(rng.integers(350, 1700))} L:{int(rng.integers(-700, 60))}"),
        (0.02, 0.92, f"{int(rng.integers(1, 400))}/{int(rng.integers(200, 600))}"),
        (0.9, 0.45, "L"), (0.03, 0.45, "R"),
        (0.7, 0.92, f"{rng.uniform(0.5, 5):.1f} mm"),
    ]
    for fx, fy, text in lines:
        draw.text((fx * w, fy * h), text, fill=colour, font=font)
    return image


def render(slice_: np.ndarray, settings: HospitalSettings, rng: np.random.Generator) -> np.ndarray:
    """One decoded slice (H, W), uint8 or float in [0, 1], as the hospital's export: uint8 or uint16 pixels,
    (H', W') or (H', W', 3) for an RGB export (before `encode`'s JPEG compression). ``rng`` draws the noise and
    the annotation text."""
    from scipy import ndimage  # here: loading a site (sites.py imports this module) needs no SciPy

    s = settings
    g = _grey01(slice_)
    g = np.clip((g - (s.level - s.width / 2)) / s.width, 0.0, 1.0) ** s.gamma
    g = _field_of_view(g, s)
    h, w = g.shape
    h, w = max(16, round(h * s.scale)), max(16, round(w * s.scale))
    g = _resize(g, h, w)
    if s.resolution < 1.0:
        g = _resize(_resize(g, max(8, round(h * s.resolution)), max(8, round(w * s.resolution))), h, w)
    g = np.clip(g, 0.0, 1.0)
    if s.blur > 0:
        g = ndimage.gaussian_filter(g, sigma=s.blur)
    if s.sharpen > 0:  # unsharp mask
        g = g + s.sharpen * (g - ndimage.gaussian_filter(g, sigma=1.5))
    if s.noise > 0:
        g = g + rng.normal(0.0, s.noise, g.shape).astype(np.float32)
    g = np.clip(g, 0.0, 1.0)
    if s.pad > 0:  # added by the export, after reconstruction: no noise in it
        g = np.pad(g, max(1, round(s.pad * max(h, w))), constant_values=s.pad_value)
        h, w = g.shape
    if s.invert:
        g = 1.0 - g
    g = s.grey_low + (s.grey_high - s.grey_low) * g
    if s.border > 0:
        b = min(s.border, h // 4, w // 4)
        g[:b], g[-b:], g[:, :b], g[:, -b:] = s.border_value, s.border_value, s.border_value, s.border_value
    if s.bit_depth == 16:
        pixels16 = np.round(g * 65535.0).astype(np.uint16)
        if s.annotations:  # 16-bit PIL images take text through a 32-bit integer image
            canvas = _annotate(Image.fromarray(pixels16.astype(np.int32), mode="I"), s, rng)
            text = np.asarray(canvas) != pixels16
            pixels16[text] = 65535
        return pixels16
    pixels = np.round(g * 255.0).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L")
    if s.rgb:
        image = image.convert("RGB")
    if s.annotations:
        image = _annotate(image, s, rng)
    return np.asarray(image)


def encode(pixels: np.ndarray, settings: HospitalSettings) -> tuple[bytes, str]:
    """The rendered pixels as the hospital's file: (bytes, suffix), JPEG at ``jpeg_quality`` or PNG."""
    buffer = io.BytesIO()
    if pixels.dtype == np.uint16:
        Image.fromarray(pixels).save(buffer, format="PNG")  # PIL writes uint16 grey as a 16-bit PNG
        return buffer.getvalue(), ".png"
    image = Image.fromarray(pixels)
    if settings.jpeg_quality:
        image.save(buffer, format="JPEG", quality=settings.jpeg_quality)
        return buffer.getvalue(), ".jpg"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), ".png"


def rendered_grey(slice_: np.ndarray, settings: HospitalSettings, rng: np.random.Generator) -> np.ndarray:
    """The slice as the hospital's file reads back: float32 (H', W') in [0, 1] (render, encode, decode, grey)."""
    data, _ = encode(render(slice_, settings, rng), settings)
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    top = 255.0 if array.dtype == np.uint8 else 65535.0  # a 16-bit PNG reads back as uint16 or int32
    grey = array.mean(axis=2) if array.ndim == 3 else array
    return np.clip(grey.astype(np.float32) / top, 0.0, 1.0)


# ------------------------------------------------------------------------------------------ a hospital site


@dataclass(frozen=True)
class SimulatedSpec:
    """``simulated:SOURCE,hospital=K,seed=S[,limit=N]``: the source site (a path, optionally ``:LAYOUT``), the
    hospital's index and seed (together they fix the draw), and at most ``limit`` slices per class (0: all)."""

    source: str
    hospital: int = 0
    seed: int = 0
    limit: int = 0

    def __post_init__(self) -> None:
        if not self.source:
            raise SiteError("simulated site: no source site given (simulated:SOURCE,hospital=K,seed=S)")
        if self.hospital < 0 or self.seed < 0 or self.limit < 0:
            raise SiteError(f"simulated site {self.source!r}: hospital, seed and limit must be >= 0")

    def settings(self) -> HospitalSettings:
        """This hospital's draw."""
        return draw_hospital(np.random.default_rng([self.seed, self.hospital, 7]))


def parse_simulated_spec(text: str) -> SimulatedSpec:
    """Parse ``simulated:SOURCE,hospital=K,seed=S[,limit=N]`` (options after the source, comma-separated)."""
    head, colon, rest = text.partition(":")
    if head != "simulated" or not colon:
        raise SiteError(f"{text!r}: a simulated site is written simulated:SOURCE,hospital=K,seed=S[,limit=N]")
    types = {"hospital": int, "seed": int, "limit": int}
    parts = rest.split(",")
    values: dict[str, int] = {}
    while len(parts) > 1 and "=" in parts[-1]:
        key, _, value = parts.pop().strip().partition("=")
        if key not in types:
            raise SiteError(f"{text!r}: unknown simulated option {key!r}; keys are {', '.join(types)}")
        try:
            values[key] = types[key](value)
        except ValueError:
            raise SiteError(f"{text!r}: {key}={value!r} is not an integer") from None
    return SimulatedSpec(source=",".join(parts).strip(), **values)


class SourceItem(NamedTuple):
    """One slice of the source site: its file, frame (multi-slice files), label and patient id."""

    path: Path
    frame: int | None
    label: int
    patient: str | None


def _limited(items: Sequence[SourceItem], limit: int) -> list[SourceItem]:
    """At most ``limit`` items per class, evenly spaced through each class's list (0: all)."""
    if limit <= 0:
        return list(items)
    out = []
    for label in sorted({i.label for i in items}):
        of_class = [i for i in items if i.label == label]
        picks = np.linspace(0, len(of_class) - 1, min(limit, len(of_class))).round().astype(int)
        out += [of_class[k] for k in sorted(set(picks.tolist()))]
    return out


def _digest(spec: SimulatedSpec, items: Sequence[SourceItem]) -> str:
    listing = hashlib.sha1()
    for item in items:
        st = item.path.stat()
        listing.update(f"{item.path.resolve()}|{item.frame}|{item.label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    text = json.dumps({"hospital": spec.hospital, "seed": spec.seed, "limit": spec.limit,
                       "version": _SIMULATOR_VERSION, "items": listing.hexdigest()}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _generate(spec: SimulatedSpec, items: Sequence[SourceItem], folder: Path) -> None:
    from crosssite.data.io import read_image

    settings = spec.settings()
    (folder / "slices").mkdir()
    rows = []
    for k, item in enumerate(items):
        rng = np.random.default_rng([spec.seed, spec.hospital, k])
        data, suffix = encode(render(read_image(item.path, item.frame), settings, rng), settings)
        rel = f"slices/{k:05d}{suffix}"
        (folder / rel).write_bytes(data)
        rows.append((rel, item.label, item.patient or "", str(item.path)))
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient", "source"])
        writer.writerows(rows)
    (folder / "settings.json").write_text(json.dumps({"spec": asdict(spec), "settings": settings.to_dict()},
                                                     indent=1))


def materialise(spec: SimulatedSpec, items: Sequence[SourceItem], root: Path | None = None) -> Path:
    """Folder holding the simulated hospital's files and ``manifest.csv`` (path, label, patient, source), made on
    first use (atomically, so concurrent users never see half a folder)."""
    items = _limited(items, spec.limit)
    folder = (root or cache_root()) / "simulated" / _digest(spec, items)
    return atomic_folder(folder, lambda tmp: _generate(spec, items, tmp))
