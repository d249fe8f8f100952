"""Grad-CAM overlays of predicted slices, written as PNG files named after their input."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from crosssite.inference.inputs import SliceItem
from crosssite.inference.preprocess import Preprocess

__all__ = ["save_cams"]


def save_cams(cam_dir: Path, start: int, items: Sequence[SliceItem], images: torch.Tensor, maps: np.ndarray,
              preprocess: Preprocess) -> list[Path]:
    """One overlay PNG per slice (``NNNNN_<stem>[_f<frame>].png``, numbered from ``start`` in input order)."""
    from crosssite.gradcam import overlay, save_png

    paths = []
    for i, (item, x, m) in enumerate(zip(items, images, maps)):
        frame = "" if item.ref.frame is None else f"_f{item.ref.frame}"
        name = f"{start + i:05d}_{item.ref.path.stem}{frame}.png"
        paths.append(save_png(cam_dir / name, overlay(preprocess.grey(x), m)))
    return paths
