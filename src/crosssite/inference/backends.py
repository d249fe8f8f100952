"""What runs the network for `Predictor`: model inputs (B, 3, S, S) -> P(COVID) (B,).

`TorchBackend` runs a crosssite model under a fixed normalisation -- a known site, the mean of the known sites
(site None), an adapted slot, or several sites averaged (the ensemble) -- and makes Grad-CAM maps; the ONNX Runtime
backend (`crosssite.inference.onnx_runtime.OnnxBackend`) and the service's micro-batcher
(`crosssite.serve.batching.BatchedBackend`) answer the same `probabilities` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from crosssite.models.adaptation import Adapted

__all__ = ["Backend", "TorchBackend"]


class Backend(Protocol):
    """Runs the network: model inputs (B, 3, S, S) -> P(COVID) (B,)."""

    def probabilities(self, images: torch.Tensor) -> np.ndarray: ...


class TorchBackend:
    """A crosssite model normalised with ``site`` (a site index, None for the mean of the known sites, or several
    indices whose P(COVID) is averaged; the Grad-CAM maps of several are those of the mean of the sites).

    The model is kept channels-last (its weights' memory layout only): oneDNN's convolutions run about twice as
    fast on a small model that way (docs/PERFORMANCE.md), with the same values to float32 rounding."""

    def __init__(self, model: nn.Module, site: int | None | Sequence[int | None] = None,
                 device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.sites = tuple(site) if isinstance(site, (tuple, list)) else (site,)
        self.site = self.sites[0] if len(self.sites) == 1 else None
        self.device = torch.device(device)
        self.adapted = Adapted(self.model, self.sites)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.adapted.probabilities(images).cpu().double().numpy()

    def grad_cam(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(p_covid (B,), maps (B, S, S))`` of the predicted class."""
        from crosssite.gradcam import grad_cam

        images = images.to(self.device)
        site = None if self.site is None else torch.full((len(images),), self.site, dtype=torch.long,
                                                         device=self.device)
        out = grad_cam(self.model, images, site)
        p = out.p_covid.cpu().double().numpy() if len(self.sites) == 1 else self.probabilities(images)
        return p, out.cam.cpu().numpy()
