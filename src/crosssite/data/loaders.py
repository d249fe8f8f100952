"""Datasets and data loaders over several sites, yielding the batches the training loop consumes.

A batch is a dict: ``image`` float (B, 3, H, W), ``label`` long (B,), ``site`` long (B,) (the site's
position in the list of sites given), ``index`` long (B,) (the sample's index in ``site.samples``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from crosssite.data.cache import SliceCache
from crosssite.data.sampler import MultiSiteBatchSampler
from crosssite.data.sites import Sample, Site
from crosssite.data.transforms import DEFAULT_FRAME, eval_transform, short_side_for, train_transform
from crosssite.errors import SiteError

__all__ = ["SliceDataset", "build_cache", "train_loader", "eval_loader", "collate_site_runs", "site_runs"]


def _as_indices(sites: Sequence[Site], indices: Sequence[Sequence[int] | None] | None) -> list[np.ndarray]:
    if indices is None:
        return [np.arange(len(s.samples)) for s in sites]
    if len(indices) != len(sites):
        raise ValueError(f"got {len(indices)} index arrays for {len(sites)} sites")
    out = [np.arange(len(site.samples)) if ix is None else np.asarray(ix, dtype=np.int64).reshape(-1)
           for site, ix in zip(sites, indices)]
    for site, ix in zip(sites, out):
        if len(ix) and (ix.min() < 0 or ix.max() >= len(site.samples)):
            raise ValueError(f"site {site.name!r}: index out of range [0, {len(site.samples)})")
    return out


def build_cache(
    sites: Sequence[Site],
    indices: Sequence[Sequence[int] | None] | None = None,
    image_size: int = 224,
    **kwargs,
) -> SliceCache:
    """A `SliceCache` (framed at ``short_side_for(image_size)``, ``frame`` default "resize": the whole slice)
    of the chosen samples of ``sites``."""
    ix = _as_indices(sites, indices)
    samples = [site.samples[i] for site, idx in zip(sites, ix) for i in idx]
    kwargs.setdefault("short_side", short_side_for(image_size))
    kwargs.setdefault("frame", DEFAULT_FRAME)
    return SliceCache(samples, **kwargs)


class SliceDataset(Dataset):
    """The chosen samples of several sites, read from a `SliceCache` and transformed.

    Samples the cache skipped as unreadable (``skip_bad=True``) are left out; ``skipped`` lists them.
    """

    def __init__(
        self,
        sites: Sequence[Site],
        indices: Sequence[Sequence[int] | None] | None,
        cache: SliceCache,
        transform: Callable[[np.ndarray], torch.Tensor],
    ) -> None:
        self.sites = list(sites)
        self.cache = cache
        self.transform = transform
        site_of, index_of, slot_of, self.skipped = [], [], [], []
        for s, (site, idx) in enumerate(zip(self.sites, _as_indices(self.sites, indices))):
            for i in idx:
                sample: Sample = site.samples[i]
                try:
                    slot = cache.slot_of(sample)
                except KeyError:
                    raise ValueError(f"site {site.name!r}: {sample.path} is not in the cache") from None
                if not cache.valid[slot]:
                    self.skipped.append(sample)
                    continue
                site_of.append(s)
                index_of.append(int(i))
                slot_of.append(slot)
        self.site_of_item = np.asarray(site_of, dtype=np.int64)
        self.index_of_item = np.asarray(index_of, dtype=np.int64)
        self.slot_of_item = np.asarray(slot_of, dtype=np.int64)
        self.label_of_item = np.asarray(
            [self.sites[s].samples[i].label for s, i in zip(site_of, index_of)], dtype=np.int64
        )

    def __len__(self) -> int:
        return len(self.site_of_item)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor | int]:
        return {
            "image": self.transform(self.cache[int(self.slot_of_item[item])]),
            "label": int(self.label_of_item[item]),
            "site": int(self.site_of_item[item]),
            "index": int(self.index_of_item[item]),
        }


def collate_site_runs(items: list[dict[str, torch.Tensor | int]]) -> dict:
    """`default_collate`, plus ``site_runs``: the batch's sites as ``((site, count), ...)`` Python ints, in order
    (the multi-site sampler yields each site's items as one contiguous run), read from the items, not from a
    tensor. The training step passes it to the model as a `crosssite.models.SiteLayout`."""
    batch = default_collate(items)
    batch["site_runs"] = site_runs(int(item["site"]) for item in items)
    return batch


def site_runs(sites: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """``((site, count), ...)`` of the consecutive equal entries of ``sites``, as Python ints."""
    runs: list[list[int]] = []
    for site in sites:
        if runs and runs[-1][0] == site:
            runs[-1][1] += 1
        else:
            runs.append([site, 1])
    return tuple((s, n) for s, n in runs)


def _loader_kwargs(workers: int, seed: int, pin_memory: bool) -> dict:
    kwargs: dict = {"num_workers": workers, "pin_memory": pin_memory,
                    "generator": torch.Generator().manual_seed(seed)}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return kwargs


def train_loader(
    sites: Sequence[Site],
    indices: Sequence[Sequence[int] | None] | None,
    cache: SliceCache,
    image_size: int = 224,
    *,
    batch_per_site: int = 16,
    oversample: str | int | Mapping[int, int] | Sequence[int] | None = "paper",
    seed: int = 0,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    steps_per_epoch: int | None = None,
    transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Training batches: ``batch_per_site`` augmented slices of every site per step (`MultiSiteBatchSampler`;
    ``steps_per_epoch`` fixes the epoch's length instead of the sampler's rule).

    Call ``loader.batch_sampler.set_epoch(e)`` before each epoch.
    """
    transform = transform or train_transform(image_size, short_side=cache.short_side, frame=cache.frame)
    dataset = SliceDataset(sites, indices, cache, transform)
    empty = [site.name for s, site in enumerate(dataset.sites) if not (dataset.site_of_item == s).any()]
    if empty:
        raise SiteError(f"no training slices left for site(s) {', '.join(empty)}")
    sampler = MultiSiteBatchSampler(dataset.site_of_item, batch_per_site, oversample, seed, rank, world_size,
                                    start_step, num_sites=len(dataset.sites), steps_per_epoch=steps_per_epoch)
    # Worker seeds differ per rank, so ranks do not draw the same crops and flips.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_site_runs,
                      **_loader_kwargs(workers, seed + 7919 * rank, pin_memory))


def eval_loader(
    sites: Sequence[Site],
    indices: Sequence[Sequence[int] | None] | None,
    cache: SliceCache,
    image_size: int = 224,
    *,
    batch_size: int = 64,
    workers: int = 0,
    transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Evaluation batches in order (site by site, in index order), with `eval_transform` in the cache's frame."""
    transform = transform or eval_transform(image_size, frame=cache.frame)
    dataset = SliceDataset(sites, indices, cache, transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **_loader_kwargs(workers, 0, pin_memory))
