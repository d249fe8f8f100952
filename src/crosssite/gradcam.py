"""Grad-CAM (Selvaraju et al., ICCV 2017) on the last convolutional feature map or an earlier stage's, and
heat-map overlays.

Every model of the registry splits its forward pass into `forward_features(x, site)`, which returns the
last convolutional feature map (B, C, h, w), and `forward_head(feats, site)`, which maps it to logits.
Grad-CAM needs exactly that seam: the gradient of a class score with respect to the feature map gives one
weight per channel (its spatial mean), and the ReLU of the channel-weighted sum of the map shows where
the evidence for the class lies. The gradient only has to flow through the head, so the trunk runs once,
without a graph, and any backbone works without module hooks.

A small input leaves a coarse last map (2 x 2 cells at 64 px for the redesign, against the paper's 7 x 7 at
224 px). ``stage=k`` explains the output of stage ``k`` of a staged backbone (`model.stages`) instead, read by a
forward hook, with the gradient flowing through the later stages; `finest_stage` picks the deepest stage whose map
has at least ``min_cells`` cells per side.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from crosssite.ioutil import atomic_write

__all__ = ["GradCamOutput", "grad_cam", "finest_stage", "overlay", "save_png"]


class GradCamOutput(NamedTuple):
    """Heat maps and what the model predicted for the same images."""

    cam: torch.Tensor  # (B, H, W) float in [0, 1], input resolution
    p_covid: torch.Tensor  # (B,) softmax(logits)[:, 1]
    target: torch.Tensor  # (B,) class whose score was explained


def _site_tensor(site: int | torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    if site is None or isinstance(site, torch.Tensor):
        return site
    return torch.full((batch,), int(site), dtype=torch.long, device=device)


def _normalise(cam: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map of (B, H, W) to [0, 1]. A map without spatial contrast (constant up to float
    rounding, e.g. the upsampled 1x1 feature map of a small input) becomes all zeros rather than noise."""
    flat = cam.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    high = flat.max(dim=1).values[:, None, None]
    span = high - low
    flat_map = span <= 1e-5 * high.abs().clamp_min(1e-12)
    return torch.where(flat_map, torch.zeros_like(cam), ((cam - low) / span.clamp_min(1e-12)).clamp(0.0, 1.0))


def _stages(model: torch.nn.Module) -> torch.nn.ModuleList:
    stages = getattr(model, "stages", None)
    if not isinstance(stages, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no stages to explain; use the last feature map (stage=None)")
    return stages


def finest_stage(model: torch.nn.Module, image_size: int, min_cells: int = 7) -> int | None:
    """The deepest stage of ``model`` whose output at ``image_size`` has at least ``min_cells`` cells per side
    (the paper's last map is 7 x 7), or None when the last feature map already has them (or the model has no
    stages)."""
    stages = getattr(model, "stages", None)
    if not isinstance(stages, torch.nn.ModuleList):
        return None
    sides: list[int] = []
    hooks = [stage.register_forward_hook(lambda m, i, out: sides.append(out[0].shape[-1])) for stage in stages]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model.forward_features(torch.zeros(1, 3, image_size, image_size, device=device), _site_tensor(0, 1, device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    if sides[-1] >= min_cells:
        return None
    fine = [k for k, side in enumerate(sides) if side >= min_cells]
    return fine[-1] if fine else 0


def grad_cam(
    model: torch.nn.Module,
    images: torch.Tensor,
    site: int | torch.Tensor | None,
    target: int | torch.Tensor | None = None,
    stage: int | None = None,
) -> GradCamOutput:
    """Grad-CAM maps of a batch.

    Args:
        model: a registry model exposing `forward_features(x, site)` and `forward_head(feats, site)`.
        images: (B, 3, H, W) model inputs (already transformed).
        site: site index of every image (int), per image (LongTensor (B,)), or None (mean statistics).
        target: class to explain, per batch (int) or per image (LongTensor (B,)); None = predicted class.
        stage: explain the output of ``model.stages[stage]`` instead of the last feature map (see the module).
    Returns:
        `GradCamOutput` with maps (B, H, W) bilinearly resized to the input size and normalised per image.
    """
    was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    hook = None
    if stage is not None:
        hook = _stages(model)[stage].register_forward_hook(lambda m, i, out: captured.append(out[0]))
    try:
        site_t = _site_tensor(site, len(images), images.device)
        with torch.no_grad() if stage is None else torch.enable_grad():
            # with a stage, the graph must reach its output even when the weights are frozen: through the input
            feats = model.forward_features(images if stage is None else images.detach().requires_grad_(True), site_t)
        if stage is None:
            feats = feats.detach().requires_grad_(True)
        with torch.enable_grad():
            out = model.forward_head(feats, site_t)
            logits = getattr(out, "logits", out)  # (B, num_classes)
            if target is None:
                target_t = logits.argmax(dim=1)
            else:
                target_t = torch.as_tensor(target, dtype=torch.long, device=logits.device).expand(len(images))
            score = logits.gather(1, target_t[:, None]).sum()
            if stage is not None:
                feats = captured[0]  # (B, C, h, w) of the chosen stage
            (grads,) = torch.autograd.grad(score, feats)  # (B, C, h, w)
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((weights * feats.detach()).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    p_covid = torch.softmax(logits.detach().float(), dim=1)[:, 1]
    return GradCamOutput(cam=_normalise(cam), p_covid=p_covid, target=target_t.detach())


def overlay(image_grey: np.ndarray, cam: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map over a grey slice.

    Args:
        image_grey: (H, W) grey image, float in [0, 1] or uint8.
        cam: (h, w) map in [0, 1]; resized bilinearly to (H, W) when the sizes differ.
        alpha: weight of the heat map.
        cmap: matplotlib colormap name.
    Returns:
        (H, W, 3) uint8 RGB image.
    """
    grey = np.asarray(image_grey, dtype=np.float64)
    if np.asarray(image_grey).dtype == np.uint8:
        grey = grey / 255.0
    heat = np.asarray(cam, dtype=np.float64)
    if grey.ndim != 2 or heat.ndim != 2:
        raise ValueError(f"overlay needs 2-D image and map, got shapes {grey.shape} and {heat.shape}")
    if heat.shape != grey.shape:
        t = torch.from_numpy(heat)[None, None]
        heat = F.interpolate(t, size=grey.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    colours = colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3]  # (H, W, 3)
    rgb = (1.0 - alpha) * np.clip(grey, 0.0, 1.0)[..., None] + alpha * colours
    return np.round(255.0 * rgb).astype(np.uint8)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 image as PNG (atomically), creating the folder; returns the path."""
    image = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), "Grad-CAM overlay")
