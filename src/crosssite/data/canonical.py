"""The canonical view of a slice: the lung field, in grey levels fixed by the patient's own tissues.

Two hospitals' exports of one slice differ in what surrounds the patient (air, table, reconstruction circle,
padding, borders, burnt-in text), in how much of the chest is in the frame, and in how grey levels map to
tissue (window, gamma, inversion, compressed ranges). The canonical view removes the first two by cropping to the
lungs and blanking what lies outside the body, and the third by an affine grey map fixed by two tissues every
chest slice has: a percentile of the lung fields' greys goes to `LUNG_GREY` and the median grey of the rest of the
body (soft tissue, heart, bone) to `TISSUE_GREY`. Statistics of the frame as a whole would mostly measure its
background and borders, which is what differs between exports.

Which lung percentile is the anchor is the view's one choice (`LUNG_ANCHORS`): the median (``"median"``) or the
10th percentile (``"aerated"``). Ground glass and consolidation raise the lung median, so anchoring on it maps a
diseased lung to the same grey as a healthy one and erases part of what tells the classes apart; the 10th
percentile is the lung's aerated parenchyma, which keeps its grey in both classes while the disease stays brighter.
The grey map itself is the third (`GREY_MAPS`): the affine map above (``"affine"``), or histogram equalisation
over the body (``"equalise"``): each grey goes to its rank among the body's greys, so any monotone change of the
export's grey levels (window, level, gamma, a compressed range) gives the same view, at the price of absolute
density (the share of the body that is darker than a pixel, not its grey, is what the network sees). An inverted
export is equalised as its negative, told by its lungs being brighter than its tissue.
What stays in view is the other (`KEEP`): the whole body (``"body"``), or only the lung fields grown by
`LUNG_RIM` of the working copy's side (``"lungs"``), so the chest wall, mediastinum, fat and table (the patient's
build and the export's field of view) cannot become cues, while a lesion against the pleura stays in view.

Segmentation is classical (`segment`), on a copy whose long side is at most `WORK_SIDE` pixels:

1. uniform lines that frame the slice (a border, padding, a figure's frame) are trimmed off;
2. after a Gaussian blur, Otsu's threshold of the frame splits dark (air, lungs, airways) from bright; the dark
   components that are air around the patient are background: those that reach a band along the edges over a
   long stretch for their size and are flat (air has no vessels, a lung cut by a zoomed field keeps its holes),
   and those that enclose much more than themselves (the ring of air inside a figure's frame). Where the dark
   class covers under half of the band the patient fills the frame, and nothing is background for touching it;
3. the body: the largest connected part of what is not background, holes filled;
4. the lungs: Otsu's threshold of the body's own greys (around a small patient the frame's threshold only
   separates background from everything else), then the two largest dark components inside the body, each above
   `MIN_LUNG` of the frame (the second only when at least `SECOND_LUNG` of the first), that enclose nothing much,
   are bounded by the chest rather than by the frame, and are not as tall and wide as the body (its wall, seen
   inverted); they must show a step from lung to tissue of `_CONTRAST` times their own spread, which a grey ramp
   or noise cut by a threshold does not; vessels and lesions inside them are filled in.

An inverted export (white air) is segmented as its negative when that finds clearly more lung (`segment` tries
the negative where the edges are bright or nothing was found); the grey map needs no such care, since the lung
and tissue medians swap and its slope changes sign. Where no lung is found the view is the whole slice as given,
with ``found=False`` so callers can count it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk

__all__ = ["LUNG_GREY", "TISSUE_GREY", "WORK_SIDE", "CANONICAL_VERSION", "LUNG_ANCHORS", "KEEP", "GREY_MAPS", "Segmentation",
           "CanonicalView", "segment", "canonical_view"]

CANONICAL_VERSION = 1  # part of the decode cache's key: a change to the view below must bump it
LUNG_GREY, TISSUE_GREY = 0.25, 0.75
LUNG_ANCHORS = {"median": 50.0, "aerated": 10.0}  # percentile of the lung fields' greys mapped to LUNG_GREY
KEEP = ("body", "lungs")  # what of the crop stays in view; the rest is 0
GREY_MAPS = ("affine", "equalise")
_LEVELS = np.linspace(0.0, 1.0, 257)  # quantiles of the body's greys that histogram equalisation interpolates
LUNG_RIM = 0.02  # of the working copy's long side: how far the kept lung fields reach beyond their masks
WORK_SIDE = 256
MIN_LUNG = 0.01  # of the frame's area
SECOND_LUNG = 0.15  # of the larger lung's area
MARGIN = 0.08  # of the lung box's height / width, added on each side of the crop
_EDGE_CONTACT = 1.0  # pixels in the edge band per (band width x sqrt(area)) above which air reaches the edges
_ENCLOSURE = 1.6  # filled area / area above which a dark component is a ring around something, not a lung
_LUNG_HOLES = 0.02  # share of vessels (holes) above which a dark component reaching the edges is a lung
_OUTLINE_ON_EDGE = 0.5  # share of a dark component's outline along the frame's edges above which it is no lung
_CONTRAST = 3.0  # lung-to-tissue step over the lungs' own spread (median absolute deviation) a lung field shows
_SPAN = 0.95  # of the body's height and width: a dark component this tall and wide is the body's wall


@dataclass(frozen=True)
class Segmentation:
    """Masks on the working copy (long side <= `WORK_SIDE`): ``body`` and ``lungs`` bool (h, w); ``inverted``:
    found on the negative of the slice."""

    body: np.ndarray
    lungs: np.ndarray
    inverted: bool

    @property
    def found(self) -> bool:
        return bool(self.lungs.any())


@dataclass(frozen=True)
class CanonicalView:
    """``image``: float32 (h, w) in [0, 1], the lung field in canonical greys with what lies outside the kept region
    (the body, or the lungs and their rim) at 0,
    or the whole slice as given where ``found`` is False. ``box``: (top, left, bottom, right) of the crop in the
    input slice's pixels. ``lungs``: the lung mask on the input slice, bool (H, W)."""

    image: np.ndarray
    found: bool
    box: tuple[int, int, int, int]
    lungs: np.ndarray


def _grey01(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32, copy=False), 0.0, 1.0)


def _work_copy(g: np.ndarray) -> np.ndarray:
    h, w = g.shape
    f = min(1.0, WORK_SIDE / max(h, w))
    if f == 1.0:
        return g
    size = (max(8, round(w * f)), max(8, round(h * f)))
    return np.asarray(Image.fromarray(g, mode="F").resize(size, Image.BILINEAR), dtype=np.float32)


def _dark_components(smooth: np.ndarray, threshold: float, where: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    h, w = smooth.shape
    dark = smooth < threshold
    if where is not None:
        dark &= where
    dark = ndimage.binary_opening(dark, structure=disk(max(1, round(max(h, w) / 128))))
    return ndimage.label(dark)


def _band_width(shape: tuple[int, ...]) -> int:
    return max(1, round(0.03 * max(shape)))


def _edge_band(shape: tuple[int, ...]) -> np.ndarray:
    """The pixels within `_band_width` of the frame's edges."""
    d = _band_width(shape)
    band = np.ones(shape, dtype=bool)
    band[d:-d, d:-d] = False
    return band


def _body(smooth: np.ndarray) -> np.ndarray:
    """Steps 2-3: what is not background air, its largest connected part, holes filled."""
    labels, n = _dark_components(smooth, threshold_otsu(smooth))
    areas = np.bincount(labels.ravel(), minlength=n + 1).astype(float)
    # contact with a band along the edges rather than the outermost pixels, so a frame line a few pixels wide
    # does not hide the air outside the patient
    band = _edge_band(smooth.shape)
    d = _band_width(smooth.shape)
    edge_contact = np.bincount(labels[band], minlength=n + 1) > _EDGE_CONTACT * d * np.sqrt(areas)
    if (labels[band] > 0).mean() < 0.5:  # the patient fills the frame (a zoomed field): dark at the edges is lung
        edge_contact[:] = False
    background = np.zeros(n + 1, dtype=bool)
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        holes = ndimage.binary_fill_holes(labels[where] == k).sum() / areas[k] - 1.0
        # air outside the patient is flat, a lung is full of vessels (holes in its dark mask): a lung cut by a
        # zoomed field of view reaches the edges too, and keeps its holes
        background[k] = (edge_contact[k] and holes < _LUNG_HOLES) or holes > _ENCLOSURE - 1.0
    background[0] = False
    parts, m = ndimage.label(~background[labels])
    if m == 0:
        return np.zeros_like(smooth, dtype=bool)
    sizes = np.bincount(parts.ravel(), minlength=m + 1)[1:]
    return ndimage.binary_fill_holes(parts == 1 + int(np.argmax(sizes)))


def _segment_dark(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(body, lungs) when the lungs are the dark class of ``g`` (working copy, float)."""
    h, w = g.shape
    smooth = ndimage.gaussian_filter(g, sigma=max(1.0, max(h, w) / 256))
    empty = np.zeros_like(g, dtype=bool)
    if float(smooth.max() - smooth.min()) < 1e-3:
        return empty, empty
    body = _body(smooth)
    inside = smooth[body]
    if inside.size < MIN_LUNG * h * w or float(inside.max() - inside.min()) < 1e-3:
        return body, empty
    # step 4, with a threshold of the body's own greys: around a small patient the frame's threshold separates
    # background air from everything else and leaves the lungs in the bright class
    labels, n = _dark_components(smooth, threshold_otsu(inside), body)
    band = _edge_band(g.shape)
    rows, cols = np.nonzero(body)
    body_h, body_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    candidates = []
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        span_h, span_w = where[0].stop - where[0].start, where[1].stop - where[1].start
        if areas[k] < MIN_LUNG * h * w or (span_h >= _SPAN * body_h and span_w >= _SPAN * body_w):
            continue  # too small, or as tall and wide as the body: its own wall, seen inverted
        component = labels[where] == k
        if ndimage.binary_fill_holes(component).sum() > _ENCLOSURE * areas[k]:
            continue
        outline = component & ~ndimage.binary_erosion(component, border_value=1)
        if band[where][outline].mean() > _OUTLINE_ON_EDGE:
            continue  # mostly bounded by the frame, not by the chest wall and mediastinum
        candidates.append((int(areas[k]), k))
    candidates = sorted(candidates, reverse=True)[:2]
    if len(candidates) == 2 and candidates[1][0] < SECOND_LUNG * candidates[0][0]:
        candidates = candidates[:1]
    lungs = np.isin(labels, [k for _, k in candidates])
    if lungs.any():
        # air in a lung is one grey but for vessels: its spread is small against the step to the tissue around it,
        # which a ramp or noise split in two by a threshold does not show
        lung_greys = g[lungs]
        spread = float(np.median(np.abs(lung_greys - np.median(lung_greys))))
        step = float(np.median(g[body & ~lungs]) - np.median(lung_greys))
        if step < _CONTRAST * spread:
            lungs[:] = False
    return body, ndimage.binary_fill_holes(lungs)  # vessels and lesions inside a lung are lung


def _flat(line: np.ndarray) -> bool:
    """Whether a row or column is one grey but for a few pixels (burnt-in text may cross a border)."""
    return bool(np.mean(np.abs(line - np.median(line)) < 0.02) > 0.9)


def _inner_box(g: np.ndarray, max_fraction: float = 0.25) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) inside the uniform lines that frame ``g`` (a border, padding, a figure's frame):
    rows and columns at the edges of one grey, at most ``max_fraction`` of each side."""
    h, w = g.shape
    top, left, bottom, right = 0, 0, h, w
    while top < max_fraction * h and _flat(g[top, left:right]):
        top += 1
    while h - bottom < max_fraction * h and _flat(g[bottom - 1, left:right]):
        bottom -= 1
    while left < max_fraction * w and _flat(g[top:bottom, left]):
        left += 1
    while w - right < max_fraction * w and _flat(g[top:bottom, right - 1]):
        right -= 1
    return top, left, bottom, right


def segment(image: np.ndarray) -> Segmentation:
    """Body and lung masks of a decoded slice (H, W), uint8 or float in [0, 1], on its working copy."""
    full = _work_copy(_grey01(image))
    top, left, bottom, right = _inner_box(full)
    g = full[top:bottom, left:right]
    seg = _segment_polarity(g)
    pad = ((top, full.shape[0] - bottom), (left, full.shape[1] - right))
    return Segmentation(np.pad(seg.body, pad), np.pad(seg.lungs, pad), seg.inverted)


def _segment_polarity(g: np.ndarray) -> Segmentation:
    body, lungs = _segment_dark(g)
    edge = g[_edge_band(g.shape)]
    # the negative is tried where the edges are bright (white air of an inverted export, or a chest wall filling
    # a tight crop) or nothing was found; air around a patient at the edges settles the polarity
    if not lungs.any() or np.median(edge) > threshold_otsu(g):
        inv_body, inv_lungs = _segment_dark(1.0 - g)
        if inv_lungs.sum() > 1.5 * lungs.sum():
            return Segmentation(inv_body, inv_lungs, inverted=True)
    return Segmentation(body, lungs, inverted=False)


def _upsample(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    out = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(out) > 127


def _equalised(crop: np.ndarray, body_greys: np.ndarray, inverted: bool) -> np.ndarray:
    """``crop``'s greys as their rank (0-1) among ``body_greys``; a grey level that many body pixels share (a
    clipped window) goes to the middle of its ranks. ``inverted``: ranked as the negative (air bright)."""
    if inverted:
        crop, body_greys = 1.0 - crop, 1.0 - body_greys
    q = np.quantile(body_greys, _LEVELS)
    levels, tie = np.unique(q, return_inverse=True)
    ranks = np.bincount(tie, weights=_LEVELS) / np.bincount(tie)
    if len(levels) < 2:
        return np.full_like(crop, 0.5)
    return np.interp(crop, levels, ranks).astype(np.float32)


def canonical_view(image: np.ndarray, margin: float = MARGIN, anchor: str = "median",
                   keep: str = "body", grey: str = "affine") -> CanonicalView:
    """The canonical view of a decoded slice (H, W), uint8 or float in [0, 1], its lung greys anchored at the
    percentile ``LUNG_ANCHORS[anchor]``, with ``keep`` (the body, or the lung fields and their rim) in view (see
    the module docstring)."""
    if anchor not in LUNG_ANCHORS:
        raise ValueError(f"anchor must be one of {', '.join(LUNG_ANCHORS)}, got {anchor!r}")
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
    if grey not in GREY_MAPS:
        raise ValueError(f"grey must be one of {', '.join(GREY_MAPS)}, got {grey!r}")
    g = _grey01(image)
    h, w = g.shape
    seg = segment(g)
    if not seg.found:
        return CanonicalView(g, False, (0, 0, h, w), np.zeros((h, w), dtype=bool))
    work = _work_copy(g)
    lung_grey = float(np.percentile(work[seg.lungs], LUNG_ANCHORS[anchor]))
    tissue = seg.body & ~ndimage.binary_dilation(seg.lungs, iterations=2)
    tissue_grey = float(np.median(work[tissue])) if tissue.any() else lung_grey
    if abs(tissue_grey - lung_grey) < 0.02:  # no contrast between lung and tissue: nothing to anchor a map on
        return CanonicalView(g, False, (0, 0, h, w), np.zeros((h, w), dtype=bool))
    lungs = _upsample(seg.lungs, (h, w))
    if keep == "lungs":
        rim = disk(max(1, round(LUNG_RIM * max(seg.lungs.shape))))
        body = _upsample(ndimage.binary_dilation(seg.lungs, structure=rim) & seg.body, (h, w))
    else:
        body = _upsample(seg.body, (h, w))
    rows, cols = np.nonzero(lungs)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    dy, dx = round(margin * (bottom - top)), round(margin * (right - left))
    box = (max(0, top - dy), max(0, left - dx), min(h, bottom + dy), min(w, right + dx))
    crop = g[box[0] : box[2], box[1] : box[3]]
    if grey == "equalise":
        mapped = _equalised(crop, work[seg.body], inverted=tissue_grey < lung_grey)
    else:
        slope = (TISSUE_GREY - LUNG_GREY) / (tissue_grey - lung_grey)
        mapped = np.clip(LUNG_GREY + (crop - lung_grey) * slope, 0.0, 1.0)
    mapped[~body[box[0] : box[2], box[1] : box[3]]] = 0.0
    return CanonicalView(mapped.astype(np.float32), True, box, lungs)
