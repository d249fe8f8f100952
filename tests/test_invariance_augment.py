"""Training for invariance (`crosssite.data.augment.HospitalAugment`, `RandConv`) on real slices of both sites:
each is applied when asked, keeps shapes and labels, draws nothing when off, and is wired from `TrainConfig`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crosssite.data import frame_slice, read_image, train_transform
from crosssite.data.augment import HospitalAugment, RandConv
from crosssite.errors import ConfigError
from crosssite.training.config import TrainConfig

FRAMED = 73  # short_side_for(64)


@pytest.fixture(scope="module")
def slices(site_a, site_b) -> list[np.ndarray]:
    return [frame_slice(read_image(s.samples[i].path), FRAMED, "pad") for s in (site_a, site_b) for i in (0, 7)]


def test_hospital_augment_renders_when_drawn_and_passes_through_otherwise(slices: list) -> None:
    x = slices[0]
    state = torch.get_rng_state()
    assert HospitalAugment(0.0)(x) is x
    assert torch.equal(torch.get_rng_state(), state)  # off: no random number drawn
    torch.manual_seed(2)
    rendered = HospitalAugment(1.0)(x)
    torch.manual_seed(2)
    again = HospitalAugment(1.0)(x)
    assert rendered.dtype == np.float32 and rendered.ndim == 2 and 0.0 <= rendered.min() <= rendered.max() <= 1.0
    np.testing.assert_array_equal(rendered, again)
    torch.manual_seed(3)
    other = HospitalAugment(1.0)(x)
    assert rendered.shape != other.shape or not np.array_equal(rendered, other)  # a new hospital per call
    with pytest.raises(ValueError, match="augment_hospital"):
        HospitalAugment(1.5)


def test_randconv_keeps_shape_and_mean_and_changes_appearance(slices: list) -> None:
    x = train_transform(64)(slices[1])
    assert RandConv(0.0)(x) is x
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        y = RandConv(1.0)(x)
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
        # the convolution's output is matched to the input's channel means, so the mix keeps them
        torch.testing.assert_close(y.mean(dim=(1, 2)), x.mean(dim=(1, 2)), atol=1e-4, rtol=0)
        changed += int((y - x).abs().mean() > 0.01)
        torch.manual_seed(seed)
        assert torch.equal(RandConv(1.0)(x), y)
    assert changed >= 6  # only a mixing weight near 1 leaves the input almost as it was
    with pytest.raises(ValueError, match="augment_randconv"):
        RandConv(-0.1)


@pytest.mark.parametrize("frame", ["pad", "canonical"])
def test_train_transform_applies_each_and_keeps_the_view_shape(slices: list, frame: str) -> None:
    plain = train_transform(64, frame=frame)
    levers = {"hospital": train_transform(64, frame=frame, hospital=1.0),
              "randconv": train_transform(64, frame=frame, randconv=1.0)}
    for x in slices:
        framed = frame_slice(x, FRAMED, frame)
        torch.manual_seed(5)
        reference = plain(framed)
        for name, transform in levers.items():
            torch.manual_seed(5)
            out = transform(framed)
            assert out.shape == reference.shape == (3, 64, 64), name
            assert not torch.equal(out, reference), name


def test_config_keys_and_run_data_wiring_keep_labels(tmp_path) -> None:
    from crosssite.data import SyntheticParams, synthetic_site
    from crosssite.training.data import build_run_data, data_on_device

    for key in ("augment_hospital", "augment_randconv"):
        assert getattr(TrainConfig(), key) == 0.0
        with pytest.raises(ConfigError, match=key):
            TrainConfig(**{key: 1.5})
    sites = [synthetic_site("s", SyntheticParams(n=24, size=32))]
    config = TrainConfig(image_size=32, augment_hospital=0.5, augment_randconv=0.25, batch_per_site=4)
    data = build_run_data(config, sites, tmp_path / "split.json", reuse_split=False)
    transform = data.train.dataset.transform
    assert transform.hospital.p == 0.5 and transform.randconv.p == 0.25
    assert all(loader.dataset.transform.__class__.__name__ == "EvalTransform" for loader in data.eval.values())
    with pytest.raises(ConfigError, match="augment_hospital"):
        data_on_device(TrainConfig(augment_hospital=0.5, data_on_device="on"), torch.device("cpu"))
    labels = sites[0].labels
    for batch in data.train:
        assert batch["image"].shape[1:] == (3, 32, 32)
        assert torch.equal(batch["label"], torch.as_tensor(labels[batch["index"].numpy()]))
