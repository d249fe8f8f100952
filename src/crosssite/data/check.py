"""Inspect sites before training: classes, patients, formats, sizes, unreadable files, duplicate images.

`check_sites` decodes every slice once (in threads) and returns a JSON-ready report::

    {"sites": [{"name", "layout", "root", "classes": {"COVID": n, "non-COVID": n}, "patients",
                "patients_per_class", "formats", "modes", "formats_per_class", "modes_per_class",
                "shortcuts": [{"attribute", "value", "class", "count", "fraction"}, ...],
                "width": [min, max], "height": [min, max],
                "unreadable": [path, ...], "errors": [{"path", "frame", "reason"}], "too_small": [path, ...],
                "not_ct": [{"path", "warning"}, ...],
                "duplicates": n, "duplicate_groups": [[path, ...], ...]}, ...],
     "cross_site_duplicates": [[{"site", "path"}, ...], ...]}

``duplicates`` counts the slices of a site whose decoded pixels equal an earlier slice of the same site
(a pair counts 1); ``cross_site_duplicates`` lists groups of equal slices found in more than one site.

``near_duplicates`` counts the pairs of a site's slices whose average hashes differ in at most
`crosssite.data.groups.NEAR_DUPLICATE_BITS` bits (with up to 10 ``near_duplicate_examples``), and ``groups`` says
how every split groups the site (``by`` patient or pseudo-patient, ``count``, ``largest``). Given a run's
``split.json`` (``splits``), ``split_near_duplicates`` counts the near-duplicate pairs between each two of its parts:
a split that tests on slices whose twins it trained on shows it here.

``shortcuts`` warns of a file property that tells the classes apart without looking at the lungs: a file format
or colour mode found in one class only, covering at least `SHORTCUT_FRACTION` of the site's readable slices
(site B: every COVID slice is PNG, 202 of 397 non-COVID slices are JPEG, 179 of them RGB). A model can learn such
a cue (compression artefacts, colour) instead of the disease.

``not_ct`` lists the DICOM files that may not be chest-CT slices (`crosssite.data.io.input_warnings`: a Modality
other than CT such as MR or an RT dose map, a localizer, a non-axial slice), read from their headers only
(`dicom_warnings`); training would use them as CT slices, so `data check` and `train` name them and ``--strict``
refuses them.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from crosssite.data.groups import group_sizes, near_duplicate_pairs, site_hashes, straddling_pairs
from crosssite.data.io import MIN_IMAGE_SIDE, ImageInfo, image_kind, input_warnings, inspect_image
from crosssite.data.sites import Sample, Site
from crosssite.data.splits import groups_of
from crosssite.errors import ImageReadError

__all__ = ["SHORTCUT_FRACTION", "check_sites", "dicom_warnings", "sample_name", "class_shortcuts",
           "near_duplicate_report", "split_parts"]

SHORTCUT_FRACTION = 0.05
_CLASS_NAMES = ("non-COVID", "COVID")


def sample_name(sample: Sample) -> str:
    """A slice's path, with ``#frame`` for a slice of a multi-slice file."""
    return str(sample.path) if sample.frame is None else f"{sample.path}#{sample.frame}"


def _inspect(sample: Sample) -> ImageInfo | ImageReadError:
    try:
        return inspect_image(sample.path, sample.frame)
    except ImageReadError as e:
        return e


def _per_class(site: Site, results: Sequence[ImageInfo | ImageReadError], attribute: str) -> dict[str, dict]:
    counts: dict[str, Counter] = {name: Counter() for name in ("COVID", "non-COVID")}
    for sample, r in zip(site.samples, results):
        if isinstance(r, ImageInfo):
            counts[_CLASS_NAMES[sample.label]][getattr(r, attribute)] += 1
    return {name: dict(sorted(c.items())) for name, c in counts.items()}


def class_shortcuts(per_class: dict[str, dict[str, dict[str, int]]], min_fraction: float = SHORTCUT_FRACTION
                    ) -> list[dict]:
    """The values of each attribute (``{"format": {class: {value: n}}, ...}``) found in one class only and on at
    least ``min_fraction`` of all counted slices."""
    out = []
    for attribute, classes in per_class.items():
        total = sum(n for c in classes.values() for n in c.values())
        for cls, values in classes.items():
            others = [c for name, c in classes.items() if name != cls]
            for value, n in values.items():
                if total and n / total >= min_fraction and all(value not in c for c in others):
                    out.append({"attribute": attribute, "value": value, "class": cls, "count": n,
                                "fraction": round(n / total, 4)})
    return out


def dicom_warnings(site: Site, threads: int | None = None) -> list[dict[str, str]]:
    """Each DICOM file of ``site`` that may not be a chest-CT slice, once per file: ``{"path", "warning"}``."""
    paths = list(dict.fromkeys(s.path for s in site.samples if image_kind(s.path) == "dicom"))
    with ThreadPoolExecutor(threads or min(4, os.cpu_count() or 1)) as pool:
        found = list(pool.map(input_warnings, paths))
    return [{"path": str(p), "warning": "; ".join(w)} for p, w in zip(paths, found) if w]


def _site_report(site: Site, results: Sequence[ImageInfo | ImageReadError]) -> dict:
    infos = [r for r in results if isinstance(r, ImageInfo)]
    errors = [(s, r) for s, r in zip(site.samples, results) if isinstance(r, ImageReadError)]
    groups: dict[str, list[str]] = defaultdict(list)
    for sample, r in zip(site.samples, results):
        if isinstance(r, ImageInfo):
            groups[r.digest].append(sample_name(sample))
    duplicate_groups = [g for g in groups.values() if len(g) > 1]
    widths = [i.width for i in infos] or [0]
    heights = [i.height for i in infos] or [0]
    return {
        "name": site.name,
        "layout": site.layout,
        "root": str(site.root),
        "classes": {"COVID": site.class_counts()["COVID"], "non-COVID": site.class_counts()["non-COVID"]},
        "patients": site.num_patients(),
        "patients_per_class": site.patients_per_class(),
        "formats": dict(sorted(Counter(i.format for i in infos).items())),
        "modes": dict(sorted(Counter(i.mode for i in infos).items())),
        "formats_per_class": (formats := _per_class(site, results, "format")),
        "modes_per_class": (modes := _per_class(site, results, "mode")),
        "shortcuts": class_shortcuts({"format": formats, "mode": modes}),
        "width": [min(widths), max(widths)],
        "height": [min(heights), max(heights)],
        "unreadable": [sample_name(s) for s, _ in errors],
        "too_small": [sample_name(s) for s, r in zip(site.samples, results)  # refused by training
                      if isinstance(r, ImageInfo) and min(r.width, r.height) < MIN_IMAGE_SIDE],
        "errors": [{"path": str(s.path), "frame": s.frame, "reason": e.reason} for s, e in errors],
        "duplicates": sum(len(g) - 1 for g in duplicate_groups),
        "duplicate_groups": duplicate_groups,
    }


def split_parts(site: Site, splits: dict) -> dict[str, np.ndarray] | None:
    """The parts (``train`` / ``val`` / ``test`` index arrays into ``site.samples``) that a run's ``split.json``
    (``splits``) gives ``site``, matched by file (and frame); None where it names no site of that name."""
    entry = next((e for e in splits.get("sites", []) if e.get("site") == site.name), None)
    if entry is None:
        return None
    position = {(str(s.path), s.frame): i for i, s in enumerate(site.samples)}
    parts = {}
    for part in ("train", "val", "test"):
        files = entry.get(part) or {"paths": []}
        frames = files.get("frames") or [None] * len(files["paths"])
        parts[part] = np.array([position[k] for k in zip(files["paths"], frames) if k in position], dtype=np.int64)
    return parts


def near_duplicate_report(site: Site, splits: dict | None = None) -> dict:
    """Near-duplicate pairs of ``site``, the groups its splits use, and (given a ``split.json``) the near-duplicate
    pairs between the split's parts."""
    hashes = site_hashes(site)
    pairs = near_duplicate_pairs(hashes)
    sizes = group_sizes(groups_of(site)) if site.samples else np.zeros(1, dtype=np.int64)
    out = {
        "near_duplicates": int(len(pairs)),
        "near_duplicate_examples": [[sample_name(site.samples[i]), sample_name(site.samples[j])]
                                    for i, j in pairs[:10]],
        "groups": {"by": "patient" if site.has_patients else "pseudo-patient", "count": int(len(sizes)),
                   "largest": int(sizes.max())},
    }
    parts = split_parts(site, splits) if splits is not None else None
    if parts is not None:
        out["split_near_duplicates"] = straddling_pairs(hashes, parts)
    return out


def check_sites(sites: Sequence[Site], threads: int | None = None, splits: dict | None = None) -> dict:
    """Decode every slice of ``sites`` and report on them (see the module docstring); ``splits``: a run's
    ``split.json``, whose parts are checked for near-duplicates across them."""
    threads = threads or min(4, os.cpu_count() or 1)
    reports, owners = [], defaultdict(list)
    with ThreadPoolExecutor(threads) as pool:
        for site in sites:
            results = list(pool.map(_inspect, site.samples))
            reports.append({**_site_report(site, results), **near_duplicate_report(site, splits),
                            "not_ct": dicom_warnings(site, threads)})
            for sample, r in zip(site.samples, results):
                if isinstance(r, ImageInfo):
                    owners[r.digest].append({"site": site.name, "path": sample_name(sample)})
    cross = [g for g in owners.values() if len({o["site"] for o in g}) > 1]
    return {"sites": reports, "cross_site_duplicates": cross}
