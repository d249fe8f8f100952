"""Everything a run needs from `crosssite.data`: per-site splits, the decode cache, train and eval loaders.

Normalisation: the per-channel mean and standard deviation every transform of the run uses are computed on the
run's own training part (its decoded, framed slices), never on validation or test slices, and go into the model
card, so prediction and export apply the same values.

The split of every site is fixed by ``(protocol, fold, folds, split_seed, val_fraction, limit_per_site)`` only,
never by the training seed, so the runs of one fold with different seeds see the same test part. It is saved
beside the run as ``split.json`` and reloaded (and checked against the site's files) on resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from crosssite.data import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    MultiSiteBatchSampler,
    Site,
    SliceCache,
    Split,
    build_cache,
    all_data_split,
    eval_loader,
    eval_transform,
    official_split,
    split_fold,
    train_loader,
    train_transform,
)
from crosssite.data.resident import ResidentLoader, resident_reason
from crosssite.errors import ConfigError
from crosssite.training.config import TrainConfig
from crosssite.rundir import load_splits

__all__ = ["RunData", "limit_site", "make_splits", "pixel_stats", "multi_site_steps", "data_on_device",
           "build_run_data"]

PARTS = ("train", "val", "test")
EVAL_BATCH = 128  # slices per validation / test forward (inference mode: large batches cost no extra passes)


@dataclass
class RunData:
    """Sites (after ``limit_per_site``), their splits, and the loaders of one run."""

    sites: list[Site]
    splits: list[Split]
    cache: SliceCache
    # `DataLoader`s, or their `ResidentLoader` twins when the slices stay on the device (`data_on_device`)
    train: DataLoader | ResidentLoader  # batches of `batch_per_site` per site; `.batch_sampler`: MultiSiteBatchSampler
    eval: dict[str, DataLoader | ResidentLoader]  # "val" / "test": every site's part, in order
    recalibration: DataLoader | ResidentLoader | None  # with bn_recalibrate: the training part, drawn as `train` is
    mean: tuple[float, float, float]  # normalisation, from the training part
    std: tuple[float, float, float]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train.batch_sampler)


def limit_site(site: Site, limit: int, seed: int) -> Site:
    """A class-stratified random subset of ``limit`` samples of ``site`` (the site itself if ``limit`` is 0 or
    not smaller than the site), in the site's original order."""
    n = len(site.samples)
    if limit <= 0 or limit >= n:
        return site
    labels = site.labels
    rng = np.random.default_rng([seed, n])
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = max(1, int(round(limit * len(members) / n)))
        keep.append(rng.choice(members, size=min(take, len(members)), replace=False))
    chosen = np.sort(np.concatenate(keep))
    return dataclasses.replace(site, samples=[site.samples[i] for i in chosen])


def make_splits(sites: list[Site], config: TrainConfig) -> list[Split]:
    """Train / val / test indices of every site under the configured protocol."""
    if config.protocol == "official":
        return [official_split(site) for site in sites]
    if config.protocol == "all":
        return [all_data_split(site, config.split_seed, config.val_fraction) for site in sites]
    return [split_fold(s, config.fold, config.folds, config.split_seed, config.val_fraction) for s in sites]


def pixel_stats(cache: SliceCache, slots: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (in [0, 1]) of every pixel of the cached slices ``slots``.

    The slices are grey, so the three channels share one value.
    """
    total = total_sq = count = 0.0
    for slot in slots:
        pixels = cache[int(slot)].astype(np.float64) / 255.0
        total += float(pixels.sum())
        total_sq += float(np.square(pixels).sum())
        count += pixels.size
    if count == 0:
        raise ConfigError("no readable training slice to compute the normalisation from")
    mean = total / count
    std = max(np.sqrt(max(total_sq / count - mean * mean, 0.0)), 1e-3)
    return (mean,) * 3, (float(std),) * 3


def multi_site_steps(sites: list[Site], config: TrainConfig) -> int:
    """Optimiser steps per epoch of a multi-site run on ``sites`` (what `single` matches on each site)."""
    splits = make_splits([limit_site(site, config.limit_per_site, config.split_seed) for site in sites], config)
    site_of_item = np.concatenate([np.full(len(split.train), s) for s, split in enumerate(splits)])
    return len(MultiSiteBatchSampler(site_of_item, config.batch_per_site, config.oversample, num_sites=len(sites)))


def _check_parts(sites: list[Site], splits: list[Split], protocol: str) -> None:
    for site, split in zip(sites, splits):
        for part in PARTS[:2] if protocol == "all" else PARTS:
            if len(split.parts()[part]) == 0:
                raise ConfigError(f"site {site.name!r}: the {part} part of the split is empty")


def _normalisation(config: TrainConfig, sites: list[Site], splits: list[Split], cache: SliceCache
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The run's input mean / std: the training part's pixels (``input_norm="train"``) or the fixed constants."""
    if config.input_norm != "train":
        return DEFAULT_MEAN, DEFAULT_STD
    slots = np.array([cache.slot_of(site.samples[i]) for site, split in zip(sites, splits) for i in split.train])
    return pixel_stats(cache, slots[cache.valid[slots]])


def _recalibration_sampling(config: TrainConfig, sampling: dict) -> dict:
    """The recalibration loader's sampling: ``bn_recalibrate_images`` per site in batches of 4 x
    ``batch_per_site`` per site (``0``: one training epoch's draws, in training's batches)."""
    if config.bn_recalibrate_images == 0:
        return sampling
    per_site = 4 * config.batch_per_site
    return sampling | {"batch_per_site": per_site, "steps_per_epoch": -(-config.bn_recalibrate_images // per_site)}


def data_on_device(config: TrainConfig, device: torch.device | None) -> bool:
    """Whether the run keeps its slices on ``device`` (`crosssite.data.resident`): ``data_on_device="on"`` (an error
    naming the reason when the frame or augmentation forbid it), ``"off"``, or ``"auto"``: on CUDA when allowed."""
    numpy_augment = config.augment_scanner > 0 or config.augment_hospital > 0 or config.augment_randconv > 0
    reason = resident_reason(config.frame, config.augment and numpy_augment)
    if config.data_on_device == "on":
        if reason:
            raise ConfigError(f"data_on_device: 'on' is not possible: {reason}")
        return device is not None
    return config.data_on_device == "auto" and reason is None and device is not None and device.type == "cuda"


def build_run_data(
    config: TrainConfig,
    sites: list[Site],
    split_file: Path,
    *,
    reuse_split: bool,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    pin_memory: bool = False,
    device: torch.device | None = None,
) -> RunData:
    """Limit the sites, make (or reload) their splits, decode the cache once, and build the loaders (kept on
    ``device`` when `data_on_device` says so)."""
    sites = [limit_site(site, config.limit_per_site, config.split_seed) for site in sites]
    splits = load_splits(split_file, sites) if reuse_split else make_splits(sites, config)
    _check_parts(sites, splits, config.protocol)
    cache = build_cache(sites, None, config.image_size, frame=config.frame, skip_bad=config.skip_bad,
                        progress=progress)
    mean, std = _normalisation(config, sites, splits, cache)
    view = eval_transform(config.image_size, frame=config.frame, mean=mean, std=std)
    augment = (train_transform(config.image_size, short_side=cache.short_side, frame=config.frame, mean=mean, std=std,
                               scanner=config.augment_scanner, hospital=config.augment_hospital,
                               randconv=config.augment_randconv)
               if config.augment else view)
    train_indices = [s.train for s in splits]
    sampling = dict(batch_per_site=config.batch_per_site, oversample=config.oversample, seed=config.seed,
                    workers=config.workers, rank=rank, world_size=world_size,
                    steps_per_epoch=config.steps_per_epoch or None, pin_memory=pin_memory)
    train = train_loader(sites, train_indices, cache, config.image_size, transform=augment, **sampling)
    evaluation = {
        part: eval_loader(sites, [s.parts()[part] for s in splits], cache, config.image_size,
                          batch_size=EVAL_BATCH, workers=config.workers, transform=view,
                          pin_memory=pin_memory)
        for part in ("val", "test")
    }
    # BN recalibration sees the training part through the evaluation view, but in the training sampler's
    # proportions (per-site batches, oversampling), so shared BN statistics mix the sites as training does.
    recalibration = (train_loader(sites, train_indices, cache, config.image_size, transform=view,
                                  **_recalibration_sampling(config, sampling))
                     if config.bn_recalibrate else None)
    if data_on_device(config, device):
        train = ResidentLoader.from_loader(train, device, seed=config.seed + 7919 * rank)
        evaluation = {part: ResidentLoader.from_loader(loader, device) for part, loader in evaluation.items()}
        if recalibration is not None:
            recalibration = ResidentLoader.from_loader(recalibration, device, seed=config.seed)
    return RunData(sites=sites, splits=splits, cache=cache, train=train, eval=evaluation,
                   recalibration=recalibration, mean=mean, std=std)
