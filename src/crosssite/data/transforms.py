"""Framing, augmentation and normalisation of grey slices, on numpy / torch (no torchvision).

The paper: "all images are first resized to 224 x 224" -- the whole slice. A slice is first *framed* at
``short_side_for(image_size)`` (256 for 224), the size the decode cache stores (`frame_slice`):

* ``"pad"`` (default): the whole slice padded to a square with the median grey of its border, then resized to
  256 x 256 (the aspect ratio is kept; chosen on validation over ``"resize"``, docs/METHODS.md);
* ``"resize"``: the whole slice resized to a 256 x 256 square (the aspect ratio is not kept);
* ``"crop"``: the short side resized to 256, the long side kept; training crops at random along it and
  evaluation keeps the central square (the authors' release; kept so models trained with it stay reproducible,
  though 26-30% of a landscape slice's width, the lateral lungs, is never seen at evaluation);
* ``"canonical"``: the slice's canonical view (`crosssite.data.canonical`: the lung field with a margin, what lies
  outside the body blanked, greys mapped from the lung and tissue medians), then framed as ``"pad"`` (padded with
  the canonical background, 0); a slice without a found lung field is framed as ``"pad"`` as it is;
* ``"canonical-aerated"``: the same, greys anchored on the lungs' aerated part (their 10th percentile) instead of
  their median, so ground glass that raises the median is not mapped away;
* ``"canonical-lungs"``: as ``"canonical-aerated"``, with only the lung fields and a thin rim around them in view;
* ``"canonical-equalised"``: the canonical crop with the body's greys histogram-equalised instead of mapped
  affinely (the same view under any monotone change of the export's grey levels).

Training (the paper's augmentation inside that frame): a random ``image_size`` square of the framed slice,
flipped horizontally and vertically, each with probability 1/2. Evaluation: the framed square resized to
``image_size`` (``"resize"`` / ``"pad"``: every pixel of the slice is in view), or, with ``"crop"``, the short
side resized to ``image_size`` and the central square kept.

With ``scanner > 0`` the training transform first applies scanner-style augmentation to the framed slice
(`crosssite.data.augment.ScannerAugment`, each transform with probability ``scanner``). With ``hospital > 0`` a
slice is first, with that probability, re-rendered by a random simulated hospital and framed again
(`crosssite.data.augment.HospitalAugment`); with ``randconv > 0`` the normalised input goes, with that probability,
through a random shallow convolution (`crosssite.data.augment.RandConv`).

Both end with float conversion, the grey slice repeated to three channels and per-channel normalisation
(`Normalise`): output float32 (3, image_size, image_size). Each transform is a geometric part, ``crop``
(uint8 in, uint8 out), followed by ``normalise``.

Test-time augmentation (`tta_average`): ``"flip"`` averages a model's output over the evaluation view and its
left-right mirror, the flip the training augmentation draws; ``"none"`` uses the evaluation view alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from crosssite.data.augment import HospitalAugment, RandConv, ScannerAugment
from crosssite.errors import ConfigError

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "CANONICAL_FRAMES",
    "FRAMES",
    "DEFAULT_FRAME",
    "frame_slice",
    "framed_view",
    "WHOLE_SLICE",
    "frame_tag",
    "short_side_for",
    "resize_short_side",
    "to_uint8",
    "resize_to",
    "pad_to_square",
    "is_framed",
    "Normalise",
    "TrainTransform",
    "EvalTransform",
    "TTA_MODES",
    "card_tta",
    "tta_average",
    "preprocessing_transform",
    "train_transform",
    "eval_transform",
]

# Fallback normalisation only (tests, a model card without its own values): a trained model normalises with
# the mean and standard deviation of its own run's training part, stored in its card (`training.data`).
# These are the pixel mean and std (in [0, 1]) of both real sites together (3227 slices, short side 256):
# 0.630 and 0.287 (site A alone 0.640 / 0.273, site B 0.599 / 0.326); the same for the three channels because
# the slices are grey.
DEFAULT_MEAN: tuple[float, float, float] = (0.63, 0.63, 0.63)
DEFAULT_STD: tuple[float, float, float] = (0.29, 0.29, 0.29)


# canonical frames -> their grey map, its lung anchor and what stays in view (crosssite.data.canonical)
CANONICAL_FRAMES = {"canonical": {"anchor": "median", "keep": "body"},
                    "canonical-aerated": {"anchor": "aerated", "keep": "body"},
                    "canonical-lungs": {"anchor": "aerated", "keep": "lungs"},
                    "canonical-equalised": {"grey": "equalise", "keep": "body"}}
FRAMES = ("resize", "pad", "crop", *CANONICAL_FRAMES)
DEFAULT_FRAME = "pad"


def _check_frame(frame: str) -> None:
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {', '.join(FRAMES)}, got {frame!r}")


def short_side_for(image_size: int) -> int:
    """Short side an image is resized to before a random ``image_size`` crop (256 for 224, as the paper)."""
    return int(round(image_size * 256 / 224))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 (rounded); uint8 is returned unchanged."""
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """Resize (bilinear, antialiased when shrinking) so that min(H, W) == ``short_side``; returns uint8.

    A float image in [0, 1] is resized in float and rounded once, so no precision is lost to a second
    rounding.
    """
    h, w = image.shape
    if h <= w:
        return resize_to(image, short_side, max(1, int(round(w * short_side / h))))
    return resize_to(image, max(1, int(round(h * short_side / w))), short_side)


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (bilinear, antialiased when shrinking) to exactly ``(height, width)``; returns uint8.

    A float image in [0, 1] is resized in float and rounded once.
    """
    if image.dtype == np.uint8:
        if image.shape == (height, width):
            return image
        return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    resized = Image.fromarray(image.astype(np.float32, copy=False), mode="F").resize((width, height), Image.BILINEAR)
    return to_uint8(np.asarray(resized))


def pad_to_square(image: np.ndarray, fill: float | None = None) -> np.ndarray:
    """The slice centred on a square canvas filled with ``fill``, by default the median of its border pixels
    (same dtype)."""
    h, w = image.shape
    side = max(h, w)
    if h == w:
        return image
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    canvas = np.full((side, side), np.median(border) if fill is None else fill, dtype=image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = image
    return canvas


def frame_slice(image: np.ndarray, size: int, frame: str = DEFAULT_FRAME) -> np.ndarray:
    """A decoded slice (H, W), uint8 or float in [0, 1], framed as the decode cache stores it; uint8.

    ``"resize"``: (size, size), the whole slice; ``"pad"``: padded to a square, then (size, size);
    ``"crop"``: short side ``size``, aspect ratio kept; the canonical frames: the canonical view, padded with 0 to
    a square, then (size, size) (see the module docstring).
    """
    return framed_view(image, size, frame)[0]


WHOLE_SLICE = "no lung field found: the whole slice was used"
"""The note on a slice that a canonical frame showed whole (`framed_view`)."""


def framed_view(image: np.ndarray, size: int, frame: str = DEFAULT_FRAME) -> tuple[np.ndarray, bool]:
    """`frame_slice`'s output, and whether a canonical frame found no lung field and so shows the whole slice,
    framed as ``"pad"`` (always False for the other frames), so that callers can count and report it."""
    _check_frame(frame)
    if frame == "crop":
        return resize_short_side(image, size), False
    whole = False
    if frame in CANONICAL_FRAMES:
        from crosssite.data.canonical import canonical_view  # here: SciPy and scikit-image only for this frame

        view = canonical_view(image, **CANONICAL_FRAMES[frame])
        if view.found:
            return resize_to(pad_to_square(view.image, fill=0.0), size, size), False
        frame, whole = "pad", True
    if frame == "pad":
        image = pad_to_square(image)
    return resize_to(image, size, size), whole


def frame_tag(frame: str) -> str:
    """The name under which slices framed with ``frame`` are cached: the canonical view carries its version, so a
    changed view is never read from slices an earlier one cached."""
    if frame not in CANONICAL_FRAMES:
        return frame
    from crosssite.data.canonical import CANONICAL_VERSION

    return f"{frame}-v{CANONICAL_VERSION}"


def is_framed(image: np.ndarray, size: int, frame: str) -> bool:
    """Whether ``image`` already is a uint8 slice framed at ``size`` (as `frame_slice` returns it)."""
    if image.dtype != np.uint8:
        return False
    return min(image.shape) == size if frame == "crop" else image.shape == (size, size)


class Normalise:
    """uint8 grey (H, W) -> float32 (3, H, W): the slice repeated to three channels, channel ``c`` mapped to
    ``(x / 255 - mean[c]) / std[c]``.

    Computed in numpy, per image, inside the loader's workers: for one image torch's intra-op threads cost
    more than they save, and a worker hands over a finished tensor.
    """

    def __init__(self, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (one per channel), got {mean} and {std}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.mean, self.std = tuple(mean), tuple(std)
        # Fold 1/255 into the affine map: out = x * scale + bias.
        self.scale = [np.float32(1.0 / (255.0 * s)) for s in std]
        self.bias = [np.float32(-m / s) for m, s in zip(mean, std)]

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        if pixels.dtype != np.uint8 or pixels.ndim != 2:
            raise ValueError(f"expected uint8 (H, W) pixels, got {pixels.dtype} {pixels.shape}")
        grey = pixels.astype(np.float32)
        out = np.empty((3, *grey.shape), dtype=np.float32)
        for c in range(3):
            np.multiply(grey, self.scale[c], out=out[c])
            out[c] += self.bias[c]
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class TrainTransform:
    """Random ``image_size`` crop of the slice framed at ``short_side``, random h/v flips, normalisation.

    Input: a uint8 or float [0, 1] slice (H, W); a slice not yet framed at ``short_side`` is framed first
    (`frame_slice`; slices from `SliceCache` already are). `crop` is the geometric part (uint8 out),
    `normalise` the rest. ``scanner`` > 0: `ScannerAugment(scanner)` on the framed slice before the crop (0: not
    applied, no random number drawn); ``hospital`` > 0: `HospitalAugment(hospital)` before that, the rendering
    framed again; ``randconv`` > 0: `RandConv(randconv)` on the normalised output. Randomness comes from torch's
    global generator, which a `DataLoader` seeds in each worker.
    """

    def __init__(
        self,
        image_size: int,
        short_side: int | None = None,
        flips: bool = True,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
        frame: str = DEFAULT_FRAME,
        scanner: float = 0.0,
        hospital: float = 0.0,
        randconv: float = 0.0,
    ) -> None:
        _check_frame(frame)
        self.image_size = image_size
        self.scanner = ScannerAugment(scanner) if scanner > 0 else None
        self.hospital = HospitalAugment(hospital) if hospital > 0 else None
        self.randconv = RandConv(randconv) if randconv > 0 else None
        self.short_side = short_side or short_side_for(image_size)
        if self.short_side < image_size:
            raise ValueError(f"short side {self.short_side} is smaller than the crop {image_size}")
        self.flips = flips
        self.frame = frame
        self.normalise = Normalise(mean, std)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """uint8 (image_size, image_size): random crop, then random vertical and horizontal flips."""
        if not is_framed(image, self.short_side, self.frame):
            image = frame_slice(image, self.short_side, self.frame)
        if self.hospital is not None:
            rendered = self.hospital(image)
            if rendered is not image:
                image = frame_slice(rendered, self.short_side, self.frame)
        if self.scanner is not None:
            image = self.scanner(image)
        h, w = image.shape
        s = self.image_size
        top = int(torch.randint(h - s + 1, ()))
        left = int(torch.randint(w - s + 1, ()))
        crop = image[top : top + s, left : left + s]
        if self.flips:
            flip_h, flip_v = (bool(v) for v in torch.rand(2) < 0.5)
            crop = crop[::-1 if flip_v else 1, ::-1 if flip_h else 1]
        return np.ascontiguousarray(crop)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        x = self.normalise(self.crop(image))
        return x if self.randconv is None else self.randconv(x)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, short_side={self.short_side}, "
                f"flips={self.flips}, frame={self.frame!r}, scanner={self.scanner}, hospital={self.hospital}, "
                f"randconv={self.randconv})")


class EvalTransform:
    """Deterministic: the slice framed at ``short_side_for(image_size)`` (as the decode cache stores it), then
    resized to ``image_size`` x ``image_size`` (``frame="resize"`` / ``"pad"``: the whole slice), or with
    ``frame="crop"`` its short side resized to ``image_size`` and the central square kept; normalised.

    Input: a uint8 slice from `SliceCache`, or any decoded slice (uint8 or float [0, 1], e.g. from
    `read_image`), which is framed exactly as the decode cache frames it first, so both give the same tensor.
    """

    def __init__(
        self,
        image_size: int,
        frame: str = DEFAULT_FRAME,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
    ) -> None:
        _check_frame(frame)
        self.image_size = image_size
        self.frame = frame
        self.framed_size = short_side_for(image_size)
        self.normalise = Normalise(mean, std)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """uint8 (image_size, image_size): the framed slice, resized (and, for ``"crop"``, centred)."""
        if not is_framed(image, self.framed_size, self.frame):  # a freshly decoded slice: the cache's path first
            image = frame_slice(image, self.framed_size, self.frame)
        s = self.image_size
        if self.frame != "crop":
            return np.ascontiguousarray(resize_to(image, s, s))
        image = resize_short_side(image, s)
        h, w = image.shape
        top, left = (h - s) // 2, (w - s) // 2
        return np.ascontiguousarray(image[top : top + s, left : left + s])

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.normalise(self.crop(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, frame={self.frame!r})"


def preprocessing_transform(preprocessing: dict) -> EvalTransform:
    """The evaluation transform a model card's ``preprocessing`` entry describes: ``image_size``, ``frame`` and
    the training part's ``mean`` / ``std`` (a card without ``frame`` predates the choice of frame, and was trained
    on ``"crop"``)."""
    return EvalTransform(int(preprocessing["image_size"]), frame=preprocessing.get("frame", "crop"),
                         mean=preprocessing.get("mean", DEFAULT_MEAN), std=preprocessing.get("std", DEFAULT_STD))


def train_transform(image_size: int = 224, **kwargs) -> TrainTransform:
    """The paper's training augmentation at ``image_size`` (see `TrainTransform`)."""
    return TrainTransform(image_size, **kwargs)


def eval_transform(image_size: int = 224, **kwargs) -> EvalTransform:
    """The evaluation transform at ``image_size`` (see `EvalTransform`)."""
    return EvalTransform(image_size, **kwargs)


TTA_MODES = ("none", "flip")  # test-time augmentation: the evaluation view alone, or averaged with its mirror
_P = TypeVar("_P")


def card_tta(card: dict) -> str:
    """The test-time augmentation a model card records (``"none"`` for a card from before crosssite had it)."""
    return str(card.get("tta", "none"))


def tta_average(probabilities: Callable[[torch.Tensor], _P], images: torch.Tensor, tta: str = "none") -> _P:
    """``probabilities(images)`` averaged over the views of test-time augmentation ``tta`` (`TTA_MODES`):
    ``"none"``, the images as given; ``"flip"``, the images and their left-right mirrors (B, C, H, W flipped
    along W). The images as given run last, so a forward hook that keeps the latest pass (the out-of-distribution
    score, `crosssite.models.adaptation.FirstNormShift`) describes them."""
    if tta == "none":
        return probabilities(images)
    if tta == "flip":
        mirrored = probabilities(images.flip(-1))
        return (mirrored + probabilities(images)) / 2
    raise ConfigError(f"tta: {tta!r} is not one of {', '.join(TTA_MODES)}")
