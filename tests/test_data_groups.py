"""Pseudo-patients for a site without patient ids: on real site A no near-duplicate pair straddles any split, the
thresholds sit where the module says against pairs of different patients, and `data check` reports the pairs,
the groups and a leaking split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import StratifiedKFold
from typer.testing import CliRunner

from crosssite.cli import app
from crosssite.data import load_site
from crosssite.data.groups import (
    file_number,
    NEAR_DUPLICATE_BITS,
    RUN_BITS,
    hamming,
    near_duplicate_pairs,
    pseudo_patients,
    site_hashes,
    straddling_pairs,
)
from crosssite.data.sites import Site
from crosssite.data.splits import all_data_split, groups_of, make_folds, split_fold


@pytest.fixture(scope="module")
def hashes_a(site_a: Site) -> np.ndarray:
    return site_hashes(site_a)


def test_no_near_duplicate_pair_straddles_a_split_of_site_a(site_a: Site, hashes_a: np.ndarray) -> None:
    assert not site_a.has_patients
    everything = np.arange(len(site_a))
    for fold, test in enumerate(make_folds(site_a, 4)):
        parts = {"train": np.setdiff1d(everything, test), "test": test}
        assert straddling_pairs(hashes_a, parts) == {"train/test": 0}, fold
    parts = split_fold(site_a, 0).parts()  # the validation part carved from the training folds
    assert sum(len(p) for p in parts.values()) == len(site_a)
    assert set(straddling_pairs(hashes_a, parts).values()) == {0}
    assert set(straddling_pairs(hashes_a, all_data_split(site_a).parts()).values()) == {0}
    # the measurement does find the leak of a split that ignores the groups (the old random folds)
    random_test = next(StratifiedKFold(4, shuffle=True, random_state=0).split(site_a.labels, site_a.labels))[1]
    random_train = np.setdiff1d(np.arange(len(site_a)), random_test)
    assert straddling_pairs(hashes_a, {"train": random_train, "test": random_test})["train/test"] > 20


def test_thresholds_sit_below_pairs_of_different_patients(site_a: Site, hashes_a: np.ndarray) -> None:
    """A COVID and a non-COVID slice come from different patients: no such pair is a near-duplicate, and at most 1%
    of them are as close as a run link allows."""
    labels = site_a.labels
    covid, other = hashes_a[labels == 1], hashes_a[labels == 0]
    assert len(near_duplicate_pairs(covid, NEAR_DUPLICATE_BITS, other=other)) == 0
    close = sum(int((hamming(row[None, :], other) <= RUN_BITS).sum()) for row in covid)
    assert close / (len(covid) * len(other)) <= 0.01
    # ...while the slices the groups join are alike: near-duplicates exist within site A, and groups are many
    groups = groups_of(site_a)
    assert len(near_duplicate_pairs(hashes_a)) > 100
    assert 100 <= len(set(groups)) < len(site_a)
    # a group never mixes the classes
    assert all(len(set(labels[groups == g])) == 1 for g in np.unique(groups))


def _write(folder: Path, name: str, pixels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(folder / name)


def test_pseudo_patients_join_near_duplicates_and_like_consecutive_numbers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, (8, 8)).repeat(8, 0).repeat(8, 1) for _ in range(6)]
    covid, normal = tmp_path / "covid", tmp_path / "non-covid"
    _write(covid, "scan (1).png", blobs[0])
    _write(covid, "scan (2).png", np.clip(blobs[0] + rng.normal(0, 3, (64, 64)), 0, 255))  # next number, alike
    _write(covid, "scan (3).png", blobs[1])  # next number, unlike: a new patient
    _write(covid, "scan (9).png", np.clip(blobs[1] + 2, 0, 255))  # far in number, a near-duplicate of 3
    for k, blob in enumerate(blobs[2:], start=1):
        _write(normal, f"scan ({k}).png", blob)
    site = load_site(f"s={tmp_path}")
    by_name = {Path(s.path).relative_to(tmp_path).as_posix(): g for s, g in zip(site.samples, pseudo_patients(site))}
    assert by_name["covid/scan (1).png"] == by_name["covid/scan (2).png"]
    assert by_name["covid/scan (3).png"] == by_name["covid/scan (9).png"] != by_name["covid/scan (1).png"]
    assert len({by_name[f"non-covid/scan ({k}).png"] for k in range(1, 5)}) == 4


def test_data_check_reports_near_duplicates_groups_and_a_leaking_split(site_a_path: Path, tmp_path: Path) -> None:
    """On 400 slices of site A (the 200 lowest numbers of each class, as a CSV site without patients), with a
    random split written as a run's split.json."""
    rows = ["path,label"] + [f"{path},{label}" for folder, label in (("COVID", "covid"), ("non-COVID", "non-covid"))
                             for path in sorted((site_a_path / folder).glob("*.png"), key=file_number)[:200]]
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n")
    site = load_site(f"A={tmp_path / 'a.csv'}")
    hashes = site_hashes(site)
    random_test = next(StratifiedKFold(4, shuffle=True, random_state=0).split(site.labels, site.labels))[1]
    random_train = np.setdiff1d(np.arange(len(site)), random_test)
    leaks = straddling_pairs(hashes, {"train": random_train, "test": random_test})["train/test"]
    assert leaks > 0
    entry = {"site": "A", **{part: {"paths": [str(site.samples[i].path) for i in idx]}
                             for part, idx in (("train", random_train), ("test", random_test))}}
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"sites": [entry]}))
    spec = f"A={tmp_path / 'a.csv'}"
    result = CliRunner().invoke(app, ["data", "check", spec, "--json", "--split", str(split_file)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["sites"][0]
    groups = groups_of(site)
    assert report["near_duplicates"] == len(near_duplicate_pairs(hashes)) > 0
    assert report["groups"] == {"by": "pseudo-patient", "count": len(set(groups)),
                                "largest": int(np.bincount(groups).max())}
    assert report["split_near_duplicates"] == {"train/test": leaks}
    text = CliRunner().invoke(app, ["data", "check", spec, "--split", str(split_file)]).output
    assert "the split leaks" in text and "pseudo-patient" in text
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = CliRunner().invoke(app, ["data", "check", spec, "--split", str(bad)])
    assert result.exit_code == 1 and "not a run's split.json" in result.output
