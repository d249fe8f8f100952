"""A batch sampler that takes the same number of items from every site at every step.

An epoch, following the paper: each site's items are repeated ``factor`` times (its oversampling factor)
and shuffled with a generator seeded by ``(seed, epoch, site)``. The epoch has as many steps as the longest
of these lists needs (``ceil(len / batch_per_site)``); a shorter list, or a site with fewer items than
``batch_per_site``, continues with fresh shuffles of itself (sampling with replacement across passes), so no
site is ever dropped from a step.

Oversampling factors:

* ``"paper"``: the release repeats the smaller site's list four times. In general, every site with fewer
  than half the items of the largest site is repeated 4 times, every other site once.
* an integer ``k``: the same rule with ``k`` instead of 4 (``1``: no site is repeated).
* a mapping ``{site: factor}`` or a sequence of one factor per site (positive integers); missing sites get 1.
* ``None``: every factor 1.

With ``world_size > 1`` every rank draws the same global batches and keeps its own
``batch_per_site // world_size`` items of each site, so each rank sees every site at every step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["MultiSiteBatchSampler", "oversample_factors"]

PAPER_FACTOR = 4


Oversample = str | int | Mapping[int, int] | Sequence[int] | None


def oversample_factors(sizes: Sequence[int], oversample: Oversample) -> list[int]:
    """Repetition factor of each site's list (see the module docstring)."""
    n = len(sizes)
    if oversample is None:
        return [1] * n
    if isinstance(oversample, str) and oversample != "paper":
        raise ValueError(f"oversample must be 'paper', a factor, a mapping, a sequence or None, got {oversample!r}")
    if isinstance(oversample, (str, int)):
        factor = PAPER_FACTOR if oversample == "paper" else int(oversample)
        if factor < 1:
            raise ValueError(f"oversample factor must be >= 1, got {factor}")
        largest = max(sizes)
        return [factor if 2 * s < largest else 1 for s in sizes]
    if isinstance(oversample, Mapping):
        unknown = sorted(set(oversample) - set(range(n)))
        if unknown:
            raise ValueError(f"oversample names site(s) {unknown}, but there are {n} sites")
        factors = [oversample.get(i, 1) for i in range(n)]
    else:
        factors = list(oversample)
        if len(factors) != n:
            raise ValueError(f"oversample gives {len(factors)} factors for {n} sites")
    if any(int(f) != f or f < 1 for f in factors):
        raise ValueError(f"oversample factors must be positive integers, got {factors}")
    return [int(f) for f in factors]


class MultiSiteBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices: ``batch_per_site`` items of every site (``// world_size`` per rank).

    Args:
        site_of_item: integer site of each dataset item (sites are ``0 .. S-1``, each with >= 1 item).
        batch_per_site: items per site in one global step (16 in the paper).
        oversample: ``"paper"``, a factor for its rule, per-site factors, or None (see the module docstring).
        seed: base seed; the order of epoch ``e`` depends only on ``(seed, e)``.
        rank, world_size: this process's share of every global batch.
        start_step: steps of the first epoch iterated to skip (resume inside an epoch); later epochs
            start at step 0.
        num_sites: the number of sites (default: the largest site index + 1); a site without items is an
            error, never silently left out.
        steps_per_epoch: a fixed epoch length (default: the rule of the module docstring); each site's stream
            continues with fresh shuffles as long as needed.
    """

    def __init__(
        self,
        site_of_item: Sequence[int] | np.ndarray | torch.Tensor,
        batch_per_site: int = 16,
        oversample: Oversample = "paper",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        num_sites: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        sites = np.asarray(site_of_item, dtype=np.int64)
        if sites.ndim != 1 or len(sites) == 0:
            raise ValueError("site_of_item must be a non-empty 1D sequence of site indices")
        num_sites = int(sites.max()) + 1 if num_sites is None else num_sites
        if sites.min() < 0 or sites.max() >= num_sites:
            raise ValueError(f"site indices must lie in [0, {num_sites})")
        self.items = [np.flatnonzero(sites == s) for s in range(num_sites)]
        empty = [s for s, it in enumerate(self.items) if len(it) == 0]
        if empty:
            raise ValueError(f"site(s) {empty} have no items")
        if batch_per_site < 1:
            raise ValueError(f"batch_per_site must be >= 1, got {batch_per_site}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_per_site % world_size:
            raise ValueError(f"batch_per_site {batch_per_site} is not divisible by world_size {world_size}")
        self.batch_per_site = batch_per_site
        self.factors = oversample_factors([len(it) for it in self.items], oversample)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.fixed_steps = steps_per_epoch
        self.epoch = 0

    @property
    def num_sites(self) -> int:
        return len(self.items)

    @property
    def steps_per_epoch(self) -> int:
        if self.fixed_steps is not None:
            return self.fixed_steps
        return max(-(-len(it) * f // self.batch_per_site) for it, f in zip(self.items, self.factors))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _site_stream(self, site: int, length: int) -> np.ndarray:
        """``length`` items of ``site`` for this epoch: shuffled repeated list, then further shuffles."""
        rng = np.random.default_rng([self.seed, self.epoch, site])
        base = np.tile(self.items[site], self.factors[site])
        chunks, total = [], 0
        while total < length:
            chunks.append(base[rng.permutation(len(base))])
            total += len(base)
        return np.concatenate(chunks)[:length]

    def __iter__(self) -> Iterator[list[int]]:
        steps, b = self.steps_per_epoch, self.batch_per_site
        streams = [self._site_stream(s, steps * b).reshape(steps, b) for s in range(self.num_sites)]
        share = b // self.world_size
        lo, hi = self.rank * share, (self.rank + 1) * share
        start, self.start_step = self.start_step, 0
        for step in range(start, steps):
            yield [int(i) for stream in streams for i in stream[step, lo:hi]]
