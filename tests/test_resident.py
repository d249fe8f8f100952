"""Device-resident batches (`crosssite.data.resident`), run on the CPU device: the same slices, labels and site
layout as the CPU loaders, crops that are true sub-squares of the framed slice, the evaluation view bit-identical
to the CPU path, and whole runs that are deterministic and refuse what cannot stack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crosssite.data import build_cache, eval_loader, load_sites, train_loader, train_transform
from crosssite.data.resident import ResidentLoader
from crosssite.errors import ConfigError
from crosssite.training import TrainConfig, train
from crosssite.training.data import data_on_device

CPU = torch.device("cpu")
SIZE = 24


@pytest.fixture(scope="module")
def real(site_a, site_b):
    sites = [site_a, site_b]
    indices = [np.arange(0, 40), np.arange(0, 30)]
    cache = build_cache(sites, indices, SIZE)
    return sites, indices, cache


def test_training_batches_hold_the_cpu_loaders_slices_cut_from_the_framed_slice(real) -> None:
    sites, indices, cache = real
    loader = train_loader(sites, indices, cache, SIZE, batch_per_site=4, seed=3)
    resident = ResidentLoader.from_loader(loader, CPU, seed=3)
    assert len(resident) == len(loader)
    view = loader.dataset.transform
    checked = 0
    for cpu_batch, batch in zip(loader, resident):
        for key in ("label", "site", "index"):
            assert torch.equal(cpu_batch[key], batch[key])
        assert batch["site_runs"] == cpu_batch["site_runs"]
        assert batch["image"].shape == cpu_batch["image"].shape and batch["image"].dtype == torch.float32
        # undo the normalisation: each image is a crop of its framed slice, possibly flipped
        grey = torch.round((batch["image"][:, 0] - float(view.normalise.bias[0])) / float(view.normalise.scale[0]))
        for g, site, index in zip(grey.numpy().astype(np.uint8), batch["site"], batch["index"]):
            framed = cache[cache.slot_of(sites[int(site)].samples[int(index)])]
            side = framed.shape[0]
            windows = np.lib.stride_tricks.sliding_window_view(framed, (SIZE, SIZE)).reshape(-1, SIZE, SIZE)
            assert side > SIZE and any(np.array_equal(w[::v, ::h], g) for w in windows for v in (1, -1) for h in (1, -1))
            checked += 1
    assert checked == len(loader) * 8


def test_crops_and_flips_vary_and_depend_only_on_seed_epoch_and_step(real) -> None:
    sites, indices, cache = real

    def first_images(seed: int, epoch: int) -> torch.Tensor:
        loader = ResidentLoader.from_loader(train_loader(sites, indices, cache, SIZE, batch_per_site=4, seed=0),
                                            CPU, seed=seed)
        loader.batch_sampler.set_epoch(epoch)
        return next(iter(loader))["image"]

    assert torch.equal(first_images(0, 0), first_images(0, 0))
    assert not torch.equal(first_images(0, 0), first_images(1, 0))
    assert not torch.equal(first_images(0, 0), first_images(0, 1))
    # resumed at step 2, the loader draws what an uninterrupted epoch draws at step 2
    loader = ResidentLoader.from_loader(train_loader(sites, indices, cache, SIZE, batch_per_site=4), CPU)
    whole = [b["image"] for b in loader]
    loader.batch_sampler.start_step = 2
    assert torch.equal(next(iter(loader))["image"], whole[2])


def test_evaluation_batches_equal_the_cpu_loaders(real) -> None:
    sites, indices, cache = real
    loader = eval_loader(sites, indices, cache, SIZE, batch_size=16)
    resident = ResidentLoader.from_loader(loader, CPU)
    pairs = list(zip(loader, resident))
    assert len(pairs) == len(resident) == -(-70 // 16)
    for cpu_batch, batch in pairs:
        assert torch.allclose(cpu_batch["image"], batch["image"], atol=1e-6)
        assert torch.equal(cpu_batch["index"], batch["index"]) and torch.equal(cpu_batch["site"], batch["site"])


def test_what_cannot_stack_is_refused_with_the_reason(real) -> None:
    sites, indices, cache = real
    scanner = train_transform(SIZE, short_side=cache.short_side, scanner=0.5)
    with pytest.raises(ValueError, match="scanner-style"):
        ResidentLoader.from_loader(train_loader(sites, indices, cache, SIZE, transform=scanner), CPU)
    with pytest.raises(ConfigError, match="data_on_device.*crop"):
        data_on_device(TrainConfig(frame="crop", data_on_device="on"), CPU)
    assert not data_on_device(TrainConfig(), CPU)  # auto: only on CUDA
    assert data_on_device(TrainConfig(data_on_device="on"), CPU)


def test_a_run_with_slices_on_the_device_trains_and_repeats(tmp_path: Path) -> None:
    sites = load_sites([f"s{i}=synthetic:shift={i * 0.8},n=16,size=48,seed={i}" for i in range(2)])
    config = TrainConfig(image_size=32, width=0.0625, batch_per_site=4, folds=2, epochs=2, lr=1e-3, ckpt_every=0,
                         data_on_device="on", bn_recalibrate=True)
    first = train(config, sites, tmp_path / "a", progress=False)
    again = train(config, sites, tmp_path / "b", progress=False)
    assert first["sites"] == again["sites"]
    cpu = train(config.replace(data_on_device="off"), sites, tmp_path / "c", progress=False)
    assert cpu["steps"] == first["steps"]
