"""Grad-CAM: maps in [0, 1] at input size, peaking where the evidence is; overlays and PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crosssite.gradcam import finest_stage, grad_cam, overlay, save_png



class _BrightSpot(torch.nn.Module):
    """Features respond to bright pixels; the COVID logit is their spatial mean, scaled per site."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, :, 1, 1] = 1.0  # channel 0: brightness
            self.conv.weight[1, :, 1, 1] = -1.0  # channel 1: darkness
            self.conv.bias.copy_(torch.tensor([-1.0, 1.0]))
        self.site_scale = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

    def forward_features(self, x: torch.Tensor, site: torch.Tensor | None) -> torch.Tensor:
        return torch.relu(torch.nn.functional.max_pool2d(self.conv(x), 2))  # (B, 2, H/2, W/2)

    def forward_head(self, feats: torch.Tensor, site: torch.Tensor | None) -> torch.Tensor:
        scale = self.site_scale[site] if site is not None else self.site_scale.mean().expand(len(feats))
        pooled = feats.mean(dim=(2, 3))  # (B, 2)
        covid = 10.0 * scale * (pooled[:, 0] - 0.1 * pooled[:, 1])
        return torch.stack([torch.zeros_like(covid), covid], dim=1)

    def forward(self, x: torch.Tensor, site: torch.Tensor | None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, site), site)


def _squares(size: int = 32) -> tuple[torch.Tensor, list[tuple[slice, slice]]]:
    where = [(slice(2, 10), slice(3, 11)), (slice(20, 30), slice(18, 28)), (slice(12, 18), slice(24, 30))]
    images = torch.zeros(len(where), 3, size, size)
    for i, (rows, cols) in enumerate(where):
        images[i, :, rows, cols] = 3.0
    return images, where


def test_map_peaks_on_the_evidence() -> None:
    images, where = _squares()
    model = _BrightSpot()
    out = grad_cam(model, images, site=torch.tensor([0, 1, 0]), target=1)
    assert out.cam.shape == (3, 32, 32)
    assert out.cam.min() >= 0.0 and out.cam.max() <= 1.0
    for cam, (rows, cols) in zip(out.cam, where):
        assert cam.max() == pytest.approx(1.0)
        peak = np.unravel_index(int(cam.argmax()), cam.shape)
        assert rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop
        inside = torch.zeros_like(cam, dtype=torch.bool)
        inside[rows, cols] = True
        assert cam[inside].mean() > 0.5 > 0.05 > cam[~inside].mean()
    assert torch.equal(out.target, torch.ones(3, dtype=torch.long))
    assert (out.p_covid > 0.5).all()


def test_batched_equals_one_by_one_and_default_target() -> None:
    images, _ = _squares()
    model = _BrightSpot().train()
    batched = grad_cam(model, images, site=1)
    assert model.training  # mode restored
    for i in range(len(images)):
        single = grad_cam(model, images[i : i + 1], site=1)
        torch.testing.assert_close(single.cam[0], batched.cam[i])
    assert torch.equal(batched.target, (batched.p_covid > 0.5).long())


def test_one_by_one_feature_map_gives_zero_map_not_noise() -> None:
    model = _BrightSpot()
    images = torch.full((2, 3, 2, 2), 3.0)  # the feature map is 1x1: nothing to localise
    out = grad_cam(model, images, site=0, target=1)
    assert out.cam.shape == (2, 2, 2) and out.cam.max() == 0.0


def test_no_positive_evidence_gives_zero_map_not_nan() -> None:
    images, _ = _squares()
    out = grad_cam(_BrightSpot(), images, site=None, target=0)  # explain non-COVID: gradients all negative
    assert torch.isfinite(out.cam).all()
    assert out.cam.max() == 0.0


@pytest.mark.parametrize("options", [{}, {"norm": "site", "aux_heads": True, "projection": True}])
def test_registry_models_maps_have_input_size(options: dict) -> None:
    from crosssite.models import create_model, list_models

    images = torch.randn(2, 3, 64, 64)
    for name in list_models():
        model = create_model(name, num_sites=2, width=0.0625, image_size=64, **options)
        out = grad_cam(model, images, site=torch.tensor([0, 1]))
        assert out.cam.shape == (2, 64, 64), name
        assert out.cam.min() >= 0.0 and out.cam.max() <= 1.0, name
        assert torch.isfinite(out.cam).all(), name
        logits = model.eval()(images, torch.tensor([0, 1])).logits
        torch.testing.assert_close(out.p_covid, torch.softmax(logits, dim=1)[:, 1])


def test_overlay_and_png(tmp_path: Path) -> None:
    grey = np.linspace(0, 1, 40 * 30).reshape(40, 30)
    cam = np.zeros((10, 15))
    cam[:5, :5] = 1.0
    rgb = overlay(grey, cam, alpha=0.5)
    assert rgb.shape == (40, 30, 3) and rgb.dtype == np.uint8
    # where the map is 0 (blue end of jet) the blend is bluer than red; where it is 1, redder than blue
    assert rgb[39, 29, 2] > rgb[39, 29, 0]
    assert rgb[0, 0, 0] > rgb[0, 0, 2]
    grey_u8 = (grey * 255).astype(np.uint8)
    assert np.array_equal(overlay(grey_u8, cam, alpha=0.0)[..., 0], grey_u8)
    path = save_png(tmp_path / "sub" / "o.png", rgb)
    with Image.open(path) as im:
        assert im.size == (30, 40) and im.mode == "RGB"
    with pytest.raises(ValueError, match="2-D"):
        overlay(np.zeros((4, 4, 3)), cam)


class _Staged(torch.nn.Module):
    """Two stages: a brightness detector at full resolution, then a global pool to one cell (a coarse last map)."""

    def __init__(self) -> None:
        super().__init__()
        self.spot = _BrightSpot()

        class Detect(torch.nn.Module):
            def forward(inner, x: torch.Tensor, site) -> tuple[torch.Tensor, torch.Tensor]:
                y = torch.relu(self.spot.conv(x))
                return y, y

        class Pool(torch.nn.Module):
            def forward(inner, x: torch.Tensor, site) -> tuple[torch.Tensor, torch.Tensor]:
                y = x.amax(dim=(2, 3), keepdim=True)
                return y, y

        self.stages = torch.nn.ModuleList([Detect(), Pool()])

    def forward_features(self, x: torch.Tensor, site) -> torch.Tensor:
        for stage in self.stages:
            x, last = stage(x, site)
        return last

    def forward_head(self, feats: torch.Tensor, site) -> torch.Tensor:
        return self.spot.forward_head(feats, site)


def test_an_earlier_stage_localises_what_a_one_cell_last_map_cannot() -> None:
    images, where = _squares()
    model = _Staged()
    assert grad_cam(model, images, site=0, target=1).cam.max() == 0.0  # the last map is 1 x 1
    assert finest_stage(model, 32) == 0
    for p in model.parameters():
        p.requires_grad_(False)  # frozen weights: the gradient still reaches the stage's output
    out = grad_cam(model, images, site=0, target=1, stage=0)
    assert model.spot.site_scale.grad is None
    for cam, (rows, cols) in zip(out.cam, where):
        peak = np.unravel_index(int(cam.argmax()), cam.shape)
        assert rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop


def test_finest_stage_of_the_redesign_follows_the_input_size() -> None:
    from crosssite.models import create_model

    model = create_model("covidnet_redesign", num_sites=2, width=0.0625, image_size=64, norm="site")
    assert finest_stage(model, 224) is None  # 7 x 7 at the paper's size: the last map itself
    stage = finest_stage(model, 64)  # last map 2 x 2: the deepest stage with at least 7 x 7 cells
    sides = []
    hooks = [s.register_forward_hook(lambda m, i, o: sides.append(o[0].shape[-1])) for s in model.stages]
    model.eval().forward_features(torch.zeros(1, 3, 64, 64), torch.zeros(1, dtype=torch.long))
    for h in hooks:
        h.remove()
    assert sides[-1] == 2 and sides[stage] >= 7 and all(side < 7 for side in sides[stage + 1:])
    out = grad_cam(model, torch.randn(2, 3, 64, 64), site=1, stage=stage)
    assert out.cam.shape == (2, 64, 64) and torch.isfinite(out.cam).all()
