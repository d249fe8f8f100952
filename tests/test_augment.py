"""Scanner-style augmentation (`crosssite.data.augment`) on real slices of both sites, and its wiring into
`TrainTransform` and `build_run_data`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crosssite.data import frame_slice, read_image, train_transform
from crosssite.data.augment import SCANNER_TRANSFORMS, ScannerAugment
from crosssite.errors import ConfigError
from crosssite.training.config import TrainConfig

FRAMED = 73  # short_side_for(64)


@pytest.fixture(scope="module")
def slices(site_a, site_b) -> list[np.ndarray]:
    """Two framed uint8 slices of each real site (padded frame) and one of site A in the landscape crop frame."""
    out = [frame_slice(read_image(s.samples[i].path), FRAMED, "pad") for s in (site_a, site_b) for i in (0, 7)]
    out.append(frame_slice(read_image(site_a.samples[3].path), FRAMED, "crop"))
    return out


@pytest.mark.parametrize("name", sorted(SCANNER_TRANSFORMS))
def test_each_transform_keeps_shape_and_dtype_is_seeded_and_changes_pixels(name: str, slices: list) -> None:
    fn = SCANNER_TRANSFORMS[name]
    for x in slices:
        torch.manual_seed(3)
        y = fn(x)
        torch.manual_seed(3)
        again = fn(x)
        assert y.dtype == np.uint8 and y.shape == x.shape, (name, y.dtype, y.shape)
        np.testing.assert_array_equal(y, again)
        changed = np.abs(y.astype(int) - x.astype(int))
        assert (changed > 0).mean() > 0.05, (name, (changed > 0).mean())


def test_strengths_are_random_per_call(slices: list) -> None:
    torch.manual_seed(0)
    a, b = SCANNER_TRANSFORMS["gamma"](slices[0]), SCANNER_TRANSFORMS["gamma"](slices[0])
    assert not np.array_equal(a, b)


def test_probability_one_applies_all_zero_none(slices: list) -> None:
    x = slices[1]
    assert ScannerAugment(0.0)(x) is x
    torch.manual_seed(1)
    every = ScannerAugment(1.0)(x)
    torch.manual_seed(1)
    expected = x
    for fn in SCANNER_TRANSFORMS.values():
        torch.rand(())  # the draw that decides the transform
        expected = fn(expected)
    np.testing.assert_array_equal(every, expected)
    with pytest.raises(ValueError, match="augment_scanner"):
        ScannerAugment(1.5)
    with pytest.raises(ValueError, match="uint8"):
        ScannerAugment(0.5)(x.astype(np.float32))


def test_train_transform_with_p0_is_bit_identical_and_p_gt_0_differs(slices: list) -> None:
    plain = train_transform(64)
    off = train_transform(64, scanner=0.0)
    on = train_transform(64, scanner=0.8)
    for x in slices[:4]:
        torch.manual_seed(5)
        reference = plain(x)
        torch.manual_seed(5)
        assert torch.equal(off(x), reference)
        torch.manual_seed(5)
        augmented = on(x)
        assert augmented.shape == reference.shape and augmented.dtype == reference.dtype
        assert not torch.equal(augmented, reference)
        torch.manual_seed(5)
        assert torch.equal(on(x), augmented)


def test_config_key_and_run_data_wiring(tmp_path) -> None:
    from crosssite.data import SyntheticParams, synthetic_site
    from crosssite.training.data import build_run_data

    with pytest.raises(ConfigError, match="augment_scanner"):
        TrainConfig(augment_scanner=-0.1)
    assert TrainConfig().augment_scanner == 0.0
    sites = [synthetic_site("s", SyntheticParams(n=24, size=32))]
    config = TrainConfig(image_size=32, augment_scanner=0.5, batch_per_site=4)
    data = build_run_data(config, sites, tmp_path / "split.json", reuse_split=False)
    assert data.train.dataset.transform.scanner.p == 0.5
    assert all(loader.dataset.transform.__class__.__name__ == "EvalTransform" for loader in data.eval.values())
    plain = build_run_data(TrainConfig(image_size=32, batch_per_site=4), sites, tmp_path / "s2.json", reuse_split=False)
    assert plain.train.dataset.transform.scanner is None
