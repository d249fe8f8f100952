"""Folds and validation parts: partitions, stratified, grouped by patient, deterministic, saved as JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crosssite.data import Sample, Site, Split, make_folds, split_fold
from crosssite.errors import SiteError




def _patients(site: Site, idx: np.ndarray) -> set[str]:
    return {site.samples[i].patient for i in idx}


def test_site_b_folds_never_split_a_patient(site_b: Site) -> None:
    folds = make_folds(site_b, k=4, seed=0)
    assert len(folds) == 4
    everything = np.concatenate(folds)
    assert sorted(everything) == list(range(len(site_b)))  # a partition
    owner: dict[str, int] = {}
    for f, idx in enumerate(folds):
        for p in _patients(site_b, idx):
            assert owner.setdefault(p, f) == f, f"patient {p} in folds {owner[p]} and {f}"
    # Stratified: each fold's COVID share stays near the site's.
    share = site_b.labels.mean()
    for idx in folds:
        assert abs(site_b.labels[idx].mean() - share) < 0.1


def test_site_b_validation_is_grouped(site_b: Site) -> None:
    folds = make_folds(site_b, 4, 1)
    for fold in (0, 3):
        split = split_fold(site_b, fold, k=4, seed=1)
        parts = [split.train, split.val, split.test]
        assert sum(len(p) for p in parts) == len(site_b)
        assert len(np.intersect1d(split.train, split.val)) == 0
        groups = [_patients(site_b, p) for p in parts]
        assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]
        assert 0.12 < len(split.val) / (len(split.train) + len(split.val)) < 0.28
        np.testing.assert_array_equal(split.test, folds[fold])


def test_site_a_folds_stratified_and_grouped_by_pseudo_patients(site_a: Site) -> None:
    folds = make_folds(site_a, k=4, seed=0)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for idx in folds:
        counts = np.bincount(site_a.labels[idx], minlength=2)
        assert abs(counts[1] - 1252 / 4) <= 1 and abs(counts[0] - 1229 / 4) <= 1


def test_folds_deterministic_under_seed(site_b: Site) -> None:
    a, b, c = make_folds(site_b, seed=5), make_folds(site_b, seed=5), make_folds(site_b, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    s1, s2 = split_fold(site_b, 2, seed=5), split_fold(site_b, 2, seed=5)
    for p in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(s1, p), getattr(s2, p))


def test_split_json_round_trip(tmp_path: Path, site_b: Site) -> None:
    split = split_fold(site_b, 1)
    split.save(tmp_path / "split.json", site_b)
    again = Split.load(tmp_path / "split.json", site_b)
    for p in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(again, p), getattr(split, p))
    moved = Site("B", site_b.layout, site_b.root, site_b.samples[1:] + site_b.samples[:1], True)
    with pytest.raises(SiteError, match="no longer holds"):
        Split.load(tmp_path / "split.json", moved)


def test_too_few_patients_for_k() -> None:
    samples = [Sample(Path(f"/x/{i}.png"), i % 2, f"p{i % 4}") for i in range(12)]
    site = Site("T", "csv", Path("/x"), samples, True)
    with pytest.raises(SiteError, match="at least 4 patients per class"):
        make_folds(site, k=4)
    assert len(make_folds(site, k=2)) == 2


def test_zero_val_fraction(site_b: Site) -> None:
    split = split_fold(site_b, 0, val_fraction=0.0)
    assert len(split.val) == 0 and len(split.train) + len(split.test) == len(site_b)
