"""Scanner-style augmentation: what another hospital's scanner, reconstruction and export change in a slice.

`ScannerAugment(p)` works on the uint8 framed slice (before `TrainTransform`'s random crop) and applies each of
its transforms, in a fixed order, with probability ``p``, each with its own random strength:

* ``window``: another display window: the grey values re-windowed with level ~ U(0.4, 0.6) and width ~
  U(0.7, 1.3) (in units of the [0, 1] grey range), clipped;
* ``gamma``: x ** g, log g ~ U(-0.4, 0.4);
* ``contrast``: (x - mean) * c + mean around the slice's mean grey, c ~ U(0.7, 1.3), clipped;
* ``blur``: Gaussian blur, sigma ~ U(0.3, 1.2) pixels of the framed slice (a softer reconstruction kernel);
* ``sharpen``: unsharp mask, radius 2, amount ~ U(50, 150)% (a sharper kernel);
* ``noise``: additive Gaussian noise, std ~ U(0.01, 0.05) of the grey range (dose, detector);
* ``resolution``: resized down by a factor ~ U(0.4, 0.8) and back up (bilinear): a coarser matrix or export;
* ``jpeg``: re-compressed as JPEG at quality ~ U{20, ..., 80} (Pillow);
* ``fov``: another field of view: zoom z ~ U(0.85, 1.15) about the centre, z > 1 crops and resizes back,
  z < 1 shrinks and pads with the median grey of the border, the frame's size kept.

Two appearance randomisations for invariance training sit beside it:

* `HospitalAugment(p)`: with probability ``p`` the framed slice is re-rendered by a freshly drawn simulated
  hospital (`crosssite.data.simulate`: window, field of view, matrix, kernel, noise, overlays, file format) and
  read back as grey; the caller frames the result again (`TrainTransform`), so with the ``"canonical"`` frame the
  network sees the canonical view of the re-rendered slice;
* `RandConv(p)`: with probability ``p`` the normalised network input (3, H, W) goes through a random shallow
  convolution (Xu et al., ICLR 2021, "Robust and generalizable visual representation learning via random
  convolutions"): one k x k convolution, k drawn from (1, 3, 5, 7), weights ~ N(0, 1 / (3 k^2)), its output
  standardised back to the input's per-channel mean and std and mixed with the input by a ~ U(0, 1).

Neither sees a label, so both classes are altered alike: no class can be told by its rendering.

Randomness comes from torch's global generator (as `TrainTransform`'s crop and flips), so a `DataLoader`
worker's seed fixes it. ``p = 0`` applies nothing and draws no random number.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from crosssite.data.simulate import draw_hospital, rendered_grey

__all__ = ["SCANNER_TRANSFORMS", "ScannerAugment", "HospitalAugment", "RandConv"]


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _grey(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def window(x: np.ndarray) -> np.ndarray:
    level, width = _uniform(0.4, 0.6), _uniform(0.7, 1.3)
    return _uint8((_grey(x) - (level - width / 2)) / width)


def gamma(x: np.ndarray) -> np.ndarray:
    return _uint8(_grey(x) ** float(np.exp(_uniform(-0.4, 0.4))))


def contrast(x: np.ndarray) -> np.ndarray:
    g = _grey(x)
    mean = float(g.mean())
    return _uint8((g - mean) * _uniform(0.7, 1.3) + mean)


def blur(x: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(_uniform(0.3, 1.2))))


def sharpen(x: np.ndarray) -> np.ndarray:
    amount = int(round(_uniform(50, 150)))
    return np.asarray(Image.fromarray(x).filter(ImageFilter.UnsharpMask(radius=2, percent=amount, threshold=0)))


def noise(x: np.ndarray) -> np.ndarray:
    std = _uniform(0.01, 0.05)
    return _uint8(_grey(x) + std * torch.randn(x.shape).numpy())


def resolution(x: np.ndarray) -> np.ndarray:
    h, w = x.shape
    f = _uniform(0.4, 0.8)
    small = Image.fromarray(x).resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)
    return np.asarray(small.resize((w, h), Image.BILINEAR))


def jpeg(x: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, format="JPEG", quality=int(torch.randint(20, 81, ())))
    return np.asarray(Image.open(buffer).convert("L"))


def fov(x: np.ndarray) -> np.ndarray:
    h, w = x.shape
    z = _uniform(0.85, 1.15)
    if z >= 1.0:
        ch, cw = max(1, round(h / z)), max(1, round(w / z))
        top, left = (h - ch) // 2, (w - cw) // 2
        return np.asarray(Image.fromarray(x[top : top + ch, left : left + cw]).resize((w, h), Image.BILINEAR))
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    canvas = np.full((h, w), np.median(border), dtype=np.uint8)
    sh, sw = max(1, round(h * z)), max(1, round(w * z))
    top, left = (h - sh) // 2, (w - sw) // 2
    canvas[top : top + sh, left : left + sw] = np.asarray(Image.fromarray(x).resize((sw, sh), Image.BILINEAR))
    return canvas


SCANNER_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "window": window, "gamma": gamma, "contrast": contrast, "blur": blur, "sharpen": sharpen, "noise": noise,
    "resolution": resolution, "jpeg": jpeg, "fov": fov,
}
"""Every transform, uint8 (H, W) -> uint8 (H, W), in the order `ScannerAugment` applies them."""


class ScannerAugment:
    """Each of `SCANNER_TRANSFORMS` applied with probability ``p`` to a uint8 (H, W) slice (see the module)."""

    def __init__(self, p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment_scanner (probability per transform) must lie in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.dtype != np.uint8 or image.ndim != 2:
            raise ValueError(f"expected uint8 (H, W) pixels, got {image.dtype} {image.shape}")
        if self.p == 0.0:
            return image
        for fn in SCANNER_TRANSFORMS.values():
            if float(torch.rand(())) < self.p:
                image = fn(image)
        return np.ascontiguousarray(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def _check_probability(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} (probability per slice) must lie in [0, 1], got {p}")
    return float(p)


class HospitalAugment:
    """With probability ``p``, a uint8 (H, W) slice re-rendered by a freshly drawn simulated hospital: float32
    (H', W') in [0, 1] (its size follows the hospital's field of view and matrix); otherwise the slice itself."""

    def __init__(self, p: float) -> None:
        self.p = _check_probability("augment_hospital", p)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.p == 0.0 or float(torch.rand(())) >= self.p:
            return image
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        return rendered_grey(image, draw_hospital(rng), rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandConv:
    """With probability ``p``, a random shallow convolution of a normalised input (3, H, W) (see the module)."""

    KERNEL_SIZES = (1, 3, 5, 7)

    def __init__(self, p: float) -> None:
        self.p = _check_probability("augment_randconv", p)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or float(torch.rand(())) >= self.p:
            return x
        k = self.KERNEL_SIZES[int(torch.randint(len(self.KERNEL_SIZES), ()))]
        weight = torch.randn(3, 3, k, k) / (3 * k * k) ** 0.5
        out = F.conv2d(x[None], weight, padding=k // 2)[0]  # (3, H, W)
        mean, std = x.mean(dim=(1, 2), keepdim=True), x.std(dim=(1, 2), keepdim=True)
        out = (out - out.mean(dim=(1, 2), keepdim=True)) / (out.std(dim=(1, 2), keepdim=True) + 1e-6) * std + mean
        a = float(torch.rand(()))
        return a * x + (1.0 - a) * out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"
