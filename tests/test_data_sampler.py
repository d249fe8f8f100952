"""Multi-site batch sampler: exactly batch_per_site from every site, the paper's epoch, determinism, shards."""

from __future__ import annotations

import numpy as np
import pytest

from crosssite.data import MultiSiteBatchSampler, oversample_factors


def _sites(*sizes: int) -> np.ndarray:
    """site_of_item for sites of the given sizes, interleaved so that indices do not reveal the site."""
    site_of = np.concatenate([np.full(n, s) for s, n in enumerate(sizes)])
    return site_of[np.random.default_rng(0).permutation(len(site_of))]


def _per_site(batch: list[int], site_of: np.ndarray) -> np.ndarray:
    return np.bincount(site_of[batch], minlength=site_of.max() + 1)


def test_every_batch_is_16_plus_16() -> None:
    site_of = _sites(100, 20)
    sampler = MultiSiteBatchSampler(site_of)
    assert sampler.factors == [1, 4]  # the smaller site (20 < 100 / 2) is repeated 4 times, as the paper
    assert len(sampler) == max(-(-100 // 16), -(-80 // 16)) == 7
    batches = list(sampler)
    assert len(batches) == 7
    for batch in batches:
        assert len(batch) == 32
        assert _per_site(batch, site_of).tolist() == [16, 16]
    seen = np.concatenate(batches)
    assert set(seen[site_of[seen] == 0]) == set(np.flatnonzero(site_of == 0))  # the large site, each item
    counts = np.bincount(seen[site_of[seen] == 1])[np.flatnonzero(site_of == 1)]
    assert counts.min() >= 4  # the small site, each item at least 4 times


def test_paper_mode_on_real_sizes() -> None:
    """Fold sizes of the paper's sites: A about 1488 training slices, B about 447: B is repeated x4."""
    assert oversample_factors([1488, 447], "paper") == [1, 4]
    assert oversample_factors([1000, 600], "paper") == [1, 1]
    assert oversample_factors([10, 10, 2], "paper") == [1, 1, 4]
    assert oversample_factors([10, 5], {1: 2}) == [1, 2]
    assert oversample_factors([10, 5], [1, 3]) == [1, 3]
    assert oversample_factors([10, 5], None) == [1, 1]
    with pytest.raises(ValueError):
        oversample_factors([10, 5], {2: 2})
    with pytest.raises(ValueError):
        oversample_factors([10, 5], [1, 0])
    with pytest.raises(ValueError):
        oversample_factors([10, 5], "double")


def test_deterministic_and_epoch_dependent() -> None:
    site_of = _sites(50, 30)
    a, b = MultiSiteBatchSampler(site_of, seed=3), MultiSiteBatchSampler(site_of, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(MultiSiteBatchSampler(site_of, seed=4)) != first


def test_small_site_and_three_sites() -> None:
    site_of = _sites(40, 3, 17)
    sampler = MultiSiteBatchSampler(site_of, batch_per_site=8, oversample=None)
    assert len(sampler) == 5
    for batch in sampler:
        assert _per_site(batch, site_of).tolist() == [8, 8, 8]
    # The 3-item site is cycled: within each pass of its list every item appears once.
    small = np.flatnonzero(site_of == 1)
    stream = [i for batch in sampler for i in batch if site_of[i] == 1]
    for start in range(0, len(stream) - 2, 3):
        assert sorted(stream[start : start + 3]) == sorted(small)


def test_ranks_share_every_global_batch() -> None:
    site_of = _sites(64, 24)
    full = list(MultiSiteBatchSampler(site_of, seed=1))
    shards = [list(MultiSiteBatchSampler(site_of, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(full)
    for step, batch in enumerate(full):
        r0, r1 = shards[0][step], shards[1][step]
        assert _per_site(r0, site_of).tolist() == [8, 8] and _per_site(r1, site_of).tolist() == [8, 8]
        for site in (0, 1):
            glob = [i for i in batch if site_of[i] == site]
            assert glob == [i for i in r0 if site_of[i] == site] + [i for i in r1 if site_of[i] == site]
    with pytest.raises(ValueError, match="divisible"):
        MultiSiteBatchSampler(site_of, batch_per_site=15, world_size=2)


def test_start_step_resumes_inside_an_epoch() -> None:
    site_of = _sites(64, 24)
    full = MultiSiteBatchSampler(site_of, seed=2)
    full.set_epoch(3)
    epoch3 = list(full)
    resumed = MultiSiteBatchSampler(site_of, seed=2, start_step=4)
    resumed.set_epoch(3)
    assert list(resumed) == epoch3[4:]
    resumed.set_epoch(4)
    full.set_epoch(4)
    assert list(resumed) == list(full)  # the next epoch starts at step 0


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no items"):
        MultiSiteBatchSampler([0, 0, 2])
    with pytest.raises(ValueError, match=r"site\(s\) \[2\] have no items"):
        MultiSiteBatchSampler([0, 1, 1], num_sites=3)  # a last site without items is not dropped
    with pytest.raises(ValueError, match="rank"):
        MultiSiteBatchSampler([0, 1], rank=2, world_size=2)
    with pytest.raises(ValueError, match="non-empty"):
        MultiSiteBatchSampler([])
