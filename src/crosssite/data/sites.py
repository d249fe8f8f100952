"""Sites: named collections of labelled 2D CT slices, and the layouts they are read from.

A site is written on the command line as ``NAME=PATH[:LAYOUT]``. The layout of PATH is detected unless
forced:

* ``sars_cov2_ct``: ``COVID/`` and ``non-COVID/`` (SARS-CoV-2 CT-scan, Soares et al. 2020). No patient ids.
* ``covid_ct``: ``CT_COVID/``, ``CT_NonCOVID/``, ``Meta/*.csv`` (patient ids) and ``Data-split/`` (the
  official train/val/test split, stored in ``Sample.split``) (COVID-CT, Zhao et al. 2020).
* ``folder``: one sub-folder per class, names matched to the two classes through `CLASS_ALIASES`.
* ``csv``: a manifest with columns ``path,label[,patient][,site][,frame]``; relative paths are resolved
  against the manifest's folder. With a ``site`` column only the rows whose site equals NAME are kept.
* ``synthetic``: ``NAME=synthetic[:shift=0.5,n=200,seed=0,size=256]``, see `crosssite.data.synthetic`.
* ``simulated``: ``NAME=simulated:SOURCE,hospital=K,seed=S[,limit=N]``, the slices of the site at SOURCE
  re-rendered as a simulated hospital's export (labels and patient ids kept), see `crosssite.data.simulate`.

DICOM files with several frames and NIfTI volumes found in a ``folder`` or ``csv`` site expand into one
sample per slice (``Sample.frame``); the volume's path is the patient id when the layout gives none.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from crosssite.data.simulate import SourceItem, parse_simulated_spec
from crosssite.data.simulate import materialise as materialise_simulated
from crosssite.data.synthetic import SyntheticParams, materialise, parse_synthetic_spec
from crosssite.errors import ImageReadError, SiteError

__all__ = [
    "synthetic_site",
    "load_synthetic_site",
    "load_simulated_site",
    "CLASS_NAMES",
    "CLASS_ALIASES",
    "LAYOUTS",
    "Sample",
    "Site",
    "class_of_name",
    "parse_site_spec",
    "load_site",
    "load_sites",
    "detect_layout",
    "load_manifest",
]

CLASS_NAMES: tuple[str, str] = ("non-COVID", "COVID")
"""Class names by label: ``non-COVID`` = 0, ``COVID`` = 1 (the positive class)."""

# Folder or label names per class, compared after lower-casing and removing spaces, '_' and '-'.
CLASS_ALIASES: dict[int, frozenset[str]] = {
    1: frozenset({
        "covid", "covid19", "ctcovid", "covidct", "covidpositive", "sarscov2", "positive", "pos", "1",
    }),
    0: frozenset({
        "noncovid", "noncovid19", "ctnoncovid", "noncovidct", "covidnegative", "normal", "negative", "neg",
        "0", "healthy", "control",
    }),
}

LAYOUTS: tuple[str, ...] = ("sars_cov2_ct", "covid_ct", "folder", "csv", "synthetic", "simulated")

# Files that may sit in a class folder without being images.
_IGNORED_FILES = frozenset({"thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class Sample:
    """One labelled 2D slice: a file, or one frame / axial slice (``frame``) of a multi-slice file."""

    path: Path
    label: int
    patient: str | None = None
    frame: int | None = None
    split: str | None = None


@dataclass
class Site:
    """A named list of samples read with one layout from one root (folder, manifest or synthetic folder).

    ``has_patients``: every sample has a patient id (folds are then grouped by patient). ``params``: the
    generator parameters of a synthetic site (``shift``, ``n``, ``seed``, ``size``) or the spec, source and draw of a
    simulated one, empty otherwise.
    """

    name: str
    layout: str
    root: Path
    samples: list[Sample]
    has_patients: bool
    params: dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        """Labels of all samples, int64 (N,)."""
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))

    def class_counts(self) -> dict[str, int]:
        """Number of samples per class name."""
        counts = np.bincount(self.labels, minlength=len(CLASS_NAMES))
        return {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)}

    def num_patients(self) -> int | None:
        """Number of distinct patient ids, or None where the layout gives none."""
        if not self.has_patients:
            return None
        return len({s.patient for s in self.samples})

    def patients_per_class(self) -> dict[str, int] | None:
        """Number of distinct patients per class name, or None without patient ids."""
        if not self.has_patients:
            return None
        return {
            name: len({s.patient for s in self.samples if s.label == label})
            for label, name in enumerate(CLASS_NAMES)
        }


def _alias_key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.strip().lower())


def class_of_name(name: str) -> int | None:
    """Label of a class folder or label name (case-insensitive, aliases allowed), or None if unknown."""
    key = _alias_key(name)
    for label, aliases in CLASS_ALIASES.items():
        if key in aliases:
            return label
    return None


def parse_site_spec(spec: str) -> tuple[str, Path, str | None]:
    """Split ``NAME=PATH[:LAYOUT]`` into ``(name, path, layout or None)``.

    The text after the last ``:`` is a layout only when it names one of `LAYOUTS`; otherwise it is part
    of the path. ``NAME=synthetic[:key=value,...]`` keeps the whole ``synthetic:...`` text as its path.
    """
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name or not rest:
        raise SiteError(f"site spec {spec!r}: expected NAME=PATH[:LAYOUT]")
    head, colon, tail = rest.rpartition(":")
    if colon and tail in LAYOUTS and head:
        return name, Path(head), tail
    return name, Path(rest), None


def _is_synthetic_spec(path: Path | str) -> bool:
    text = str(path)
    return text == "synthetic" or text.startswith("synthetic:")


def load_site(spec: str | tuple[str, Path | str, str | None] | Site) -> Site:
    """Load a site from ``"NAME=PATH[:LAYOUT]"`` or a ``(name, path, layout)`` tuple (layout may be None)."""
    if isinstance(spec, Site):
        return spec
    if isinstance(spec, str):
        name, path, layout = parse_site_spec(spec)
    else:
        name, path, layout = spec
    if layout is not None and layout not in LAYOUTS:
        raise SiteError(f"site {name!r}: unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "synthetic" or (layout is None and _is_synthetic_spec(path)):
        return load_synthetic_site(name, str(path))
    if layout == "simulated" or (layout is None and str(path).startswith("simulated:")):
        return load_simulated_site(name, str(path))
    path = Path(path).expanduser()
    if not path.exists():
        head, colon, tail = str(path).rpartition(":")
        if colon and layout is None and Path(head).exists():
            raise SiteError(f"site {name!r}: unknown layout {tail!r}; expected one of {', '.join(LAYOUTS)}")
        raise SiteError(f"site {name!r}: path {path} does not exist")
    layout = layout or detect_layout(path)
    loader = {
        "sars_cov2_ct": _load_sars_cov2_ct,
        "covid_ct": _load_covid_ct,
        "folder": _load_folder,
        "csv": load_manifest,
    }[layout]
    site = loader(name, path)
    if not site.samples:
        raise SiteError(f"site {name!r}: no images found under {path} (layout {layout})")
    return site


def load_sites(specs: Iterable[str | tuple[str, Path | str, str | None] | Site]) -> list[Site]:
    """Load several sites; their names must be distinct (a site's index in the list is its integer id)."""
    sites = [load_site(s) for s in specs]
    names = [s.name for s in sites]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SiteError(f"site names must be distinct; repeated: {', '.join(duplicates)}")
    return sites


def detect_layout(path: Path) -> str:
    """Guess the layout of an existing path; raise `SiteError` when nothing fits."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise SiteError(f"{path}: a site must be a folder or a .csv manifest")
    children = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if {"CT_COVID", "CT_NonCOVID"} <= children:
        return "covid_ct"
    if {"COVID", "non-COVID"} == children:
        return "sars_cov2_ct"
    if children and all(class_of_name(c) is not None for c in children):
        return "folder"
    manifests = sorted(path.glob("*.csv"))
    if not children and len(manifests) == 1:
        raise SiteError(f"{path}: holds one manifest; give the manifest itself: {manifests[0]}")
    unknown = sorted(c for c in children if class_of_name(c) is None)
    detail = f"unrecognised class folders: {', '.join(unknown)}" if unknown else "no class folders"
    raise SiteError(f"{path}: cannot detect the site layout ({detail}); force one with NAME=PATH:LAYOUT")


# --------------------------------------------------------------------------------------------- layouts


def _ignored(name: str) -> bool:
    """Hidden and system entries (``.DS_Store``, ``._x.png``, ``.git/``, ``Thumbs.db``) are skipped on purpose."""
    return name.startswith(".") or name.lower() in _IGNORED_FILES


def ignored_files(folder: Path | str) -> list[Path]:
    """The hidden and system files and folders below ``folder`` that site loading skips on purpose."""
    found = []
    for root, dirs, names in os.walk(folder):
        found += [Path(root) / n for n in sorted([*dirs, *names]) if _ignored(n)]
        dirs[:] = [d for d in dirs if not _ignored(d)]
    return found


def _image_files(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively, sorted); an unsupported file is an error naming it."""
    from crosssite.data.io import is_supported_file

    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if _ignored(name):
                continue
            path = Path(root) / name
            if not is_supported_file(path):
                raise SiteError(f"{path}: not a supported image file (PNG, JPEG, BMP, TIFF, DICOM, NIfTI)")
            files.append(path)
    return files


def _expand(path: Path, label: int, patient: str | None, split: str | None = None) -> list[Sample]:
    """One sample per slice of ``path``; a volume's path is its patient id when none is given.

    A file whose header cannot be read stays one sample, so that reading it later fails with a named
    error (or is recorded by ``skip_bad``) instead of stopping the site from loading.
    """
    from crosssite.data.io import num_frames

    try:
        n = num_frames(path)
    except ImageReadError:
        n = None
    if n is None:
        return [Sample(path, label, patient, None, split)]
    patient = patient if patient is not None else str(path)
    return [Sample(path, label, patient, k, split) for k in range(n)]


def _class_folder_samples(folders: dict[int, Path]) -> list[Sample]:
    samples = []
    for label, folder in sorted(folders.items()):
        for path in _image_files(folder):
            samples.extend(_expand(path, label, None))
    return samples


def _site(name: str, layout: str, root: Path, samples: list[Sample]) -> Site:
    has_patients = bool(samples) and all(s.patient is not None for s in samples)
    return Site(name=name, layout=layout, root=root, samples=samples, has_patients=has_patients)


def _require_dirs(name: str, root: Path, folders: Sequence[str], layout: str) -> None:
    missing = [f for f in folders if not (root / f).is_dir()]
    if missing:
        raise SiteError(f"site {name!r}: {root} is not a {layout} site: missing folder(s) {', '.join(missing)}")


def _load_sars_cov2_ct(name: str, root: Path) -> Site:
    _require_dirs(name, root, ["COVID", "non-COVID"], "sars_cov2_ct")
    samples = _class_folder_samples({1: root / "COVID", 0: root / "non-COVID"})
    return _site(name, "sars_cov2_ct", root, samples)


def _load_folder(name: str, root: Path) -> Site:
    folders: dict[int, Path] = {}
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = class_of_name(child.name)
        if label is None:
            raise SiteError(
                f"site {name!r}: class folder {child} matches neither COVID nor non-COVID "
                f"(known names: {', '.join(sorted(CLASS_ALIASES[1] | CLASS_ALIASES[0]))})"
            )
        if label in folders:
            raise SiteError(f"site {name!r}: folders {folders[label].name} and {child.name} name the same class")
        folders[label] = child
    return _site(name, "folder", root, _class_folder_samples(folders))


# covid_ct: class folder, metadata csv, split folder, split file suffix per label.
_COVID_CT_PARTS = {
    1: ("CT_COVID", "COVID-CT-MetaInfo.csv", "COVID", "CT_COVID"),
    0: ("CT_NonCOVID", "NonCOVID-CT-MetaInfo.csv", "NonCOVID", "CT_NonCOVID"),
}
SPLIT_PARTS: tuple[str, ...] = ("train", "val", "test")


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SiteError(f"{path}: cannot read csv: {e}") from e


def _covid_ct_patients(meta: Path) -> dict[str, str]:
    rows = _read_csv_rows(meta)
    if rows and not {"image name", "patient id"} <= rows[0].keys():
        raise SiteError(f"{meta}: expected columns 'image name' and 'patient id', found {list(rows[0])}")
    return {r["image name"].strip(): r["patient id"].strip() for r in rows if r["patient id"].strip()}


def _covid_ct_split(root: Path, split_dir: str, suffix: str, files: dict[str, Path]) -> dict[str, str]:
    """Map file name -> official split part; a listed file that does not exist is a `SiteError`."""
    split_of: dict[str, str] = {}
    for part in SPLIT_PARTS:
        list_file = root / "Data-split" / split_dir / f"{part}{suffix}.txt"
        if not list_file.is_file():
            continue
        for line in list_file.read_text(encoding="utf-8").splitlines():
            fname = line.strip()
            if not fname:
                continue
            if fname not in files:
                raise SiteError(f"{list_file}: lists {fname!r}, which does not exist in {root / split_dir}")
            if fname in split_of and split_of[fname] != part:
                raise SiteError(f"{list_file}: {fname!r} is listed in both {split_of[fname]} and {part}")
            split_of[fname] = part
    return split_of


def _load_covid_ct(name: str, root: Path) -> Site:
    _require_dirs(name, root, ["CT_COVID", "CT_NonCOVID"], "covid_ct")
    samples: list[Sample] = []
    for label, (folder, meta_name, split_dir, suffix) in sorted(_COVID_CT_PARTS.items()):
        files = {p.name: p for p in _image_files(root / folder)}
        meta = root / "Meta" / meta_name
        patients = _covid_ct_patients(meta) if meta.is_file() else {}
        split_of = _covid_ct_split(root, split_dir, suffix, files) if (root / "Data-split").is_dir() else {}
        for fname, path in files.items():
            samples.extend(_expand(path, label, patients.get(fname), split_of.get(fname)))
    return _site(name, "covid_ct", root, samples)


def _parse_label(value: str, where: str) -> int:
    label = class_of_name(value)
    if label is None:
        raise SiteError(f"{where}: label {value!r} is neither COVID (1) nor non-COVID (0)")
    return label


def load_manifest(name: str, manifest: Path) -> Site:
    """A ``csv``-layout site: the rows of ``manifest`` (only those of site ``name`` if it has a site column)."""
    rows = _read_csv_rows(manifest)
    columns = set(rows[0].keys()) if rows else set()
    if rows and not {"path", "label"} <= columns:
        raise SiteError(f"{manifest}: needs columns 'path' and 'label', found {sorted(columns)}")
    numbered = list(enumerate(rows, start=2))  # line numbers in the file (line 1 is the header)
    if "site" in columns:
        names = sorted({(r["site"] or "").strip() for r in rows})
        numbered = [(line, r) for line, r in numbered if (r["site"] or "").strip() == name]
        if not numbered:
            raise SiteError(f"{manifest}: no row has site {name!r}; sites in the manifest: {', '.join(names)}")
    samples = []
    for line, row in numbered:
        where = f"{manifest}, line {line}"
        text = (row["path"] or "").strip()
        if not text:
            raise SiteError(f"{where}: empty path")
        path = Path(text).expanduser()
        path = path if path.is_absolute() else manifest.parent / path
        if not path.is_file():
            raise SiteError(f"{where}: image {path} does not exist")
        label = _parse_label(row["label"] or "", where)
        patient = (row.get("patient") or "").strip() or None
        frame = (row.get("frame") or "").strip()
        if frame:
            if not frame.isdigit():
                raise SiteError(f"{where}: frame {frame!r} is not a non-negative integer")
            samples.append(Sample(path, label, patient, int(frame)))
        else:
            samples.extend(_expand(path, label, patient))
    return _site(name, "csv", manifest, samples)


def synthetic_site(name: str, params: SyntheticParams | None = None, root: Path | None = None):
    """A `Site` of synthetic slices (layout ``synthetic``), materialised under the cache directory."""
    params = params or SyntheticParams()
    folder = materialise(params, root)
    loaded = load_manifest(name, folder / "manifest.csv")
    return Site(name=name, layout="synthetic", root=folder, samples=loaded.samples, has_patients=True,
                params=asdict(params))


def load_synthetic_site(name: str, spec: str):
    """Load the synthetic site ``NAME=synthetic[:key=value,...]``."""
    return synthetic_site(name, parse_synthetic_spec(spec))


def load_simulated_site(name: str, spec: str) -> Site:
    """Load ``NAME=simulated:SOURCE,hospital=K,seed=S[,limit=N]``: the source site's slices re-rendered by one
    simulated hospital (`crosssite.data.simulate`), with the source's labels and patient ids."""
    parsed = parse_simulated_spec(spec)
    source = load_site(f"{name}={parsed.source}")
    items = [SourceItem(s.path, s.frame, s.label, s.patient) for s in source.samples]
    folder = materialise_simulated(parsed, items)
    loaded = load_manifest(name, folder / "manifest.csv")
    params = {"spec": spec, "source": str(source.root), "source_layout": source.layout,
              "hospital": parsed.hospital, "seed": parsed.seed, "limit": parsed.limit}
    return Site(name=name, layout="simulated", root=folder, samples=loaded.samples,
                has_patients=source.has_patients, params=params)
