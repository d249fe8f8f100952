"""Cross-validation folds, validation parts and the official COVID-CT split, as index arrays.

* `make_folds`: ``k`` test folds, stratified by class and grouped (scikit-learn's ``StratifiedGroupKFold``) so
  that no group is in two folds: by patient wherever the site has patient ids (a sample without one is its own
  group), else by pseudo-patient (`crosssite.data.groups.pseudo_patients`: runs of file numbers and
  near-duplicate images), so that no slice is tested while its near-identical twin is trained on.
* `split_fold`: fold ``fold`` is the test part; the validation part is carved from the remaining folds,
  stratified and grouped the same way: about ``val_fraction`` of the training samples (``round(1 /
  val_fraction)`` grouped folds of the training part, the first is validation). Default 0.2.
* `official_split`: the split shipped with COVID-CT (``Sample.split``).

All are deterministic functions of the site's sample order and ``seed``. `Split.to_json` / `Split.from_json`
store a split beside a run, with sample paths so a changed site is detected on reload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crosssite.data.groups import pseudo_patients
from crosssite.data.sites import SPLIT_PARTS, Site
from crosssite.errors import SiteError

__all__ = ["all_data_split", "Split", "make_folds", "split_fold", "official_split", "groups_of"]

DEFAULT_VAL_FRACTION = 0.2


@dataclass
class Split:
    """Index arrays (into ``site.samples``) of the train, validation and test parts."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def parts(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def to_json(self, site: Site) -> dict:
        """JSON-ready description: per part the indices and the samples' paths (and frames)."""
        out: dict = {"site": site.name, "num_samples": len(site.samples)}
        for part, idx in self.parts().items():
            out[part] = {
                "indices": [int(i) for i in idx],
                "paths": [str(site.samples[i].path) for i in idx],
                "frames": [site.samples[i].frame for i in idx],
            }
        return out

    def save(self, path: Path | str, site: Site) -> None:
        Path(path).write_text(json.dumps(self.to_json(site), indent=1))

    @classmethod
    def from_json(cls, data: dict, site: Site | None = None) -> Split:
        """Rebuild a split; with ``site``, check that every index still points at the same file."""
        parts = {p: np.asarray(data[p]["indices"], dtype=np.int64) for p in ("train", "val", "test")}
        if site is not None:
            for part, idx in parts.items():
                frames = data[part].get("frames") or [None] * len(idx)
                for i, path, frame in zip(idx, data[part]["paths"], frames):
                    if i >= len(site.samples) or (str(site.samples[i].path), site.samples[i].frame) != (path, frame):
                        where = path if frame is None else f"{path}#{frame}"
                        raise SiteError(f"saved split of site {site.name!r} names {where} at index {i}, "
                                        f"which the site no longer holds there")
        return cls(**parts)

    @classmethod
    def load(cls, path: Path | str, site: Site | None = None) -> Split:
        return cls.from_json(json.loads(Path(path).read_text()), site)


def groups_of(site: Site) -> np.ndarray:
    """Integer group per sample: its patient (a sample without one is its own group), or, where no sample has a
    patient id, its pseudo-patient."""
    if not any(s.patient is not None for s in site.samples):
        return pseudo_patients(site)
    ids: dict[object, int] = {}
    return np.array([ids.setdefault(s.patient if s.patient is not None else ("sample", i), len(ids))
                     for i, s in enumerate(site.samples)], dtype=np.int64)


def _kfold(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Test indices of ``k`` stratified, grouped folds of ``labels``."""
    from sklearn.model_selection import StratifiedGroupKFold  # here: predicting needs no sklearn

    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = [test for _, test in splitter.split(np.zeros(len(labels)), labels, groups)]
    return [np.sort(f).astype(np.int64) for f in folds]


def _units(labels: np.ndarray, groups: np.ndarray) -> list[int]:
    """Number of groups per class (non-COVID, COVID)."""
    return [len(set(groups[labels == c])) for c in (0, 1)]


def _check_k(site: Site, k: int, groups: np.ndarray) -> None:
    if k < 2:
        raise SiteError(f"site {site.name!r}: need k >= 2 folds, got {k}")
    units = _units(site.labels, groups)
    if min(units) < k:
        what = "patients" if site.has_patients else "pseudo-patients (groups of near-identical slices)"
        raise SiteError(f"site {site.name!r}: {k} folds need at least {k} {what} per class, "
                        f"found {units[0]} non-COVID and {units[1]} COVID")


def make_folds(site: Site, k: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Test indices of each of ``k`` folds (sorted), stratified by class and grouped by patient."""
    groups = groups_of(site)
    _check_k(site, k, groups)
    return _kfold(site.labels, groups, k, seed)


def split_fold(
    site: Site, fold: int, k: int = 4, seed: int = 0, val_fraction: float = DEFAULT_VAL_FRACTION
) -> Split:
    """Fold ``fold`` of `make_folds` as test part; a grouped, stratified validation part of about
    ``val_fraction`` of the rest (0 gives an empty validation part)."""
    folds = make_folds(site, k, seed)
    if not 0 <= fold < k:
        raise SiteError(f"site {site.name!r}: fold {fold} out of range for k={k}")
    test = folds[fold]
    train = np.sort(np.concatenate([f for i, f in enumerate(folds) if i != fold]))
    if val_fraction <= 0:
        return Split(train=train, val=np.zeros(0, dtype=np.int64), test=test)
    if not val_fraction < 1:
        raise SiteError(f"val_fraction must be in [0, 1), got {val_fraction}")
    parts = max(2, int(round(1.0 / val_fraction)))
    labels, sub_groups = site.labels[train], groups_of(site)[train]
    parts = min(parts, *_units(labels, sub_groups))
    if parts < 2:
        raise SiteError(f"site {site.name!r}: too few samples in the training folds to carve a validation part")
    val_local = _kfold(labels, sub_groups, parts, seed + 1000 * (fold + 1))[0]
    keep = np.ones(len(train), dtype=bool)
    keep[val_local] = False
    return Split(train=train[keep], val=train[val_local], test=test)


def all_data_split(site: Site, seed: int = 0, val_fraction: float = DEFAULT_VAL_FRACTION) -> Split:
    """Every sample for training but a grouped, stratified validation part of about ``val_fraction`` (for
    choosing the checkpoint), and no test part: the split of a model trained to be shipped, whose estimate of
    performance comes from cross-validation of the same recipe."""
    if not 0 < val_fraction < 1:
        raise SiteError(f"val_fraction must be in (0, 1), got {val_fraction}")
    parts = min(max(2, int(round(1.0 / val_fraction))), *_units(site.labels, groups_of(site)))  # fewer, larger parts on a small site
    if parts < 2:
        raise SiteError(f"site {site.name!r}: too few samples to carve a validation part")
    val = make_folds(site, parts, seed + 7)[0]
    train = np.setdiff1d(np.arange(len(site.samples)), val)
    return Split(train=train, val=np.sort(val), test=np.zeros(0, dtype=np.int64))


def official_split(site: Site) -> Split:
    """The split shipped with the site (COVID-CT's ``Data-split``): indices of samples per part."""
    parts = np.array([s.split for s in site.samples], dtype=object)
    if all(p is None for p in parts):
        raise SiteError(f"site {site.name!r} (layout {site.layout}) has no official split")
    unlisted = [str(s.path) for s in site.samples if s.split is None]
    if unlisted:
        raise SiteError(f"site {site.name!r}: {len(unlisted)} images are in no part of the official split, "
                        f"e.g. {unlisted[0]}")
    return Split(**{p: np.flatnonzero(parts == p).astype(np.int64) for p in SPLIT_PARTS})
