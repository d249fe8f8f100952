"""What a file becomes before the network sees it: the model card's preprocessing (`Preprocess`) and the decoding
of one slice into a model input (`Preprocess.load`), at the size the model needs.

The transform is the evaluation pipeline's, step for step, so a file gets the probability `evaluate` reports for
it: the slice is decoded with `crosssite.data.read_image` (lung window for DICOM / NIfTI) and goes through
`crosssite.data.eval_transform`, which takes a freshly decoded slice along the decode cache's path (short side
``short_side_for(image_size)``, rounded to uint8) before its own resize to ``image_size``, central square and
normalisation. ``image_size``, frame, mean and std come from the model card's ``preprocessing``.

With ``draft`` (opt-in: ``crosssite predict --draft-jpeg``), a JPEG much larger than the model input is decoded at
a reduced DCT scale (`crosssite.data.io.draft_scale`), several times faster; its model input moves by a few grey
levels, enough to move site B's test AUC by a quarter of a point (docs/PERFORMANCE.md), so evaluation and the default
prediction path decode in full. Every other format decodes in full either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosssite.data import DEFAULT_FRAME, DEFAULT_MEAN, DEFAULT_STD, eval_transform, preprocessing_transform, read_image
from crosssite.data.transforms import framed_view
from crosssite.errors import CheckpointError, ImageReadError
from crosssite.inference.inputs import SliceItem

__all__ = ["Preprocess"]


class Preprocess:
    """A decoded grey slice (H, W) in [0, 1] -> the model input (3, S, S), exactly as evaluation makes it:
    the card's frame (whole slice, padded, or central crop), image size and the training part's mean / std.
    ``draft``: `load` may decode JPEGs at a reduced scale (see the module docstring)."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
        frame: str = DEFAULT_FRAME,
        draft: bool = False,
    ):
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.frame = frame
        self.draft = draft
        self.transform = eval_transform(self.image_size, frame=frame, mean=self.mean, std=self.std)

    @classmethod
    def from_card(cls, card: dict[str, Any], where: object = "model card", draft: bool = False) -> Preprocess:
        """The card's preprocessing; a card without ``frame`` (the first format) was trained on central crops."""
        pre = card.get("preprocessing") or {}
        if "image_size" not in pre:
            raise CheckpointError(f"{where}: the model card has no preprocessing.image_size (the training image size)")
        try:
            transform = preprocessing_transform(pre)  # the one reading of a card's preprocessing
            return cls(transform.image_size, transform.normalise.mean, transform.normalise.std, transform.frame,
                       draft=draft)
        except ValueError as e:
            raise CheckpointError(f"{where}: invalid preprocessing in the model card ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "frame": self.frame, "mean": list(self.mean), "std": list(self.std)}

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.transform(image)

    def load(self, item: SliceItem, whole: set[tuple[Path, int | None]] | None = None
             ) -> torch.Tensor | ImageReadError:
        """The model input (3, S, S) of one slice, or the error that names why its file cannot be read. With
        ``whole``, the slice's (path, frame) is added to it when a canonical frame found no lung field in it and
        shows it whole."""
        draft = (self.transform.framed_size, self.frame) if self.draft else None
        try:
            image = read_image(item.ref.path, item.ref.frame, draft=draft)
        except ImageReadError as e:
            return e
        framed, shown_whole = framed_view(image, self.transform.framed_size, self.frame)
        if shown_whole and whole is not None:
            whole.add((item.ref.path, item.ref.frame))
        return self(framed)

    def grey(self, x: torch.Tensor) -> np.ndarray:
        """The grey slice (S, S) in [0, 1] a model input (3, S, S) was made from (for overlays)."""
        return (x[0] * self.std[0] + self.mean[0]).clamp(0.0, 1.0).cpu().numpy()
