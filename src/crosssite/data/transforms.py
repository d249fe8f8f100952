"""Resizing, augmentation and normalisation of grey slices, on numpy / torch (no torchvision).

Training (the paper): the slice is resized so its short side is ``short_side_for(image_size)``
(256 for 224), a random ``image_size`` square is cropped, and it is flipped horizontally and vertically,
each with probability 1/2.

Evaluation, "resize to 224" in the paper, read without distorting the aspect ratio: the short side is
resized to ``image_size`` and the central ``image_size`` square is kept (``mode="resize"``, default; the
whole field of view of a square slice). ``mode="crop"`` instead keeps the training scale: short side
``short_side_for(image_size)``, then the central square.

Both end with float conversion, the grey slice repeated to three channels and per-channel normalisation
(`Normalise`): output float32 (3, image_size, image_size). Each transform is a geometric part, ``crop``
(uint8 in, uint8 out), followed by ``normalise``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "short_side_for",
    "resize_short_side",
    "to_uint8",
    "Normalise",
    "TrainTransform",
    "EvalTransform",
    "train_transform",
    "eval_transform",
]

# Mean and standard deviation of all pixels (in [0, 1]) of both real sites together (3227 slices, short
# side 256): 0.630 and 0.287 (site A alone 0.640 / 0.273, site B 0.599 / 0.326). The same for the three
# channels because the slices are grey.
DEFAULT_MEAN: tuple[float, float, float] = (0.63, 0.63, 0.63)
DEFAULT_STD: tuple[float, float, float] = (0.29, 0.29, 0.29)


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
        size = (max(1, int(round(w * short_side / h))), short_side)
    else:
        size = (short_side, max(1, int(round(h * short_side / w))))
    if image.dtype == np.uint8:
        if (w, h) == size:
            return image
        return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    resized = np.asarray(Image.fromarray(image.astype(np.float32, copy=False), mode="F").resize(size, Image.BILINEAR))
    return to_uint8(resized)


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
    """Random ``image_size`` crop of the short-side-``short_side`` slice, random h/v flips, normalisation.

    Input: a uint8 or float [0, 1] slice (H, W); a slice whose short side is not ``short_side`` is resized
    first (slices from `SliceCache` already are). `crop` is the geometric part (uint8 out), `normalise`
    the rest. Randomness comes from torch's global generator, which a `DataLoader` seeds in each worker.
    """

    def __init__(
        self,
        image_size: int,
        short_side: int | None = None,
        flips: bool = True,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
    ) -> None:
        self.image_size = image_size
        self.short_side = short_side or short_side_for(image_size)
        if self.short_side < image_size:
            raise ValueError(f"short side {self.short_side} is smaller than the crop {image_size}")
        self.flips = flips
        self.normalise = Normalise(mean, std)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """uint8 (image_size, image_size): random crop, then random vertical and horizontal flips."""
        if min(image.shape) != self.short_side or image.dtype != np.uint8:
            image = resize_short_side(image, self.short_side)
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
        return self.normalise(self.crop(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, short_side={self.short_side}, flips={self.flips})"


class EvalTransform:
    """Deterministic: resize the short side (to ``image_size`` or, with ``mode="crop"``, to
    ``short_side_for(image_size)``), keep the central square, normalise.

    Input: a uint8 slice (from `SliceCache`) or a float [0, 1] slice (from `read_image`). A float slice is
    first resized and rounded exactly as the decode cache does (short side ``short_side_for(image_size)``),
    so both give the same tensor.
    """

    def __init__(
        self,
        image_size: int,
        mode: str = "resize",
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
    ) -> None:
        if mode not in ("resize", "crop"):
            raise ValueError(f"eval mode must be 'resize' or 'crop', got {mode!r}")
        self.image_size = image_size
        self.mode = mode
        self.short_side = image_size if mode == "resize" else short_side_for(image_size)
        self.normalise = Normalise(mean, std)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """uint8 (image_size, image_size): resized, central square."""
        if image.dtype != np.uint8:  # a freshly decoded slice: take the decode cache's path first
            image = resize_short_side(image, short_side_for(self.image_size))
        image = resize_short_side(image, self.short_side)
        h, w = image.shape
        s = self.image_size
        top, left = (h - s) // 2, (w - s) // 2
        return np.ascontiguousarray(image[top : top + s, left : left + s])

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.normalise(self.crop(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, mode={self.mode!r})"


def train_transform(image_size: int = 224, **kwargs) -> TrainTransform:
    """The paper's training augmentation at ``image_size`` (see `TrainTransform`)."""
    return TrainTransform(image_size, **kwargs)


def eval_transform(image_size: int = 224, **kwargs) -> EvalTransform:
    """The evaluation transform at ``image_size`` (see `EvalTransform`)."""
    return EvalTransform(image_size, **kwargs)
