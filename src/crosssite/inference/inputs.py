"""What `crosssite predict` reads: files and folders turned into 2D slices, grouped into volumes.

An input is an image file, a DICOM file, a NIfTI volume, or a folder, searched recursively. Inside a
folder, the single-frame DICOM files form one series (a volume, in patient-axis order as
`crosssite.data.expand_inputs` sorts it) when there are at least two of them; a multi-frame DICOM file or
a NIfTI file with more than one slice is a volume by itself; every other image is a lone slice.

Nothing is dropped silently: an input that cannot be expanded (missing, unsupported type, unreadable
header) becomes an error entry naming the file, an input folder without any image is listed in ``empty``,
and files inside folders that are not images are listed in ``skipped``. Hidden files and folders (name
starting with ``.``) are ignored, as `expand_inputs` does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from crosssite.data import SliceRef, expand_inputs
from crosssite.data.io import dicom_series_order, image_kind, is_supported_file
from crosssite.errors import ImageReadError

__all__ = ["SliceItem", "InputPlan", "collect_inputs"]


@dataclass(frozen=True)
class SliceItem:
    """One slice to predict: the file (and frame) to read, and the volume it belongs to, if any."""

    ref: SliceRef
    volume: Path | None = None  # DICOM series folder, multi-frame DICOM or NIfTI file
    index: int | None = None  # position of the slice in its volume


@dataclass
class InputPlan:
    """Slices found in the inputs, in input order, and what could not be used."""

    items: list[SliceItem] = field(default_factory=list)
    errors: list[ImageReadError] = field(default_factory=list)  # inputs that cannot be expanded
    skipped: list[Path] = field(default_factory=list)  # non-image files found inside folders
    empty: list[Path] = field(default_factory=list)  # input folders without any image file


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _expand_file(path: Path, plan: InputPlan) -> None:
    """A file given (or found) alone: one slice, or the slices of a volume file."""
    try:
        refs = expand_inputs([path])
    except ImageReadError as e:
        plan.errors.append(e)
        return
    if len(refs) == 1 and refs[0].frame is None:
        plan.items.append(SliceItem(refs[0]))
    else:
        plan.items.extend(SliceItem(r, volume=path, index=r.frame) for r in refs)


def _series_refs(folder: Path, dicoms: list[Path], plan: InputPlan) -> list[SliceRef]:
    """The DICOM slices of ``folder`` in patient-axis order.

    `expand_inputs` orders a folder's DICOM files as a whole and fails as a whole; when it fails, each
    file is expanded alone so that the bad ones are reported by name, and the good ones are ordered again.
    """
    try:
        return [r for r in expand_inputs([folder]) if image_kind(r.path) == "dicom"]
    except ImageReadError:
        good: dict[Path, list[SliceRef]] = {}
        for f in dicoms:
            try:
                good[f] = expand_inputs([f])
            except ImageReadError as e:
                plan.errors.append(e)
        return [r for f in dicom_series_order(list(good)) for r in good[f]]


def _expand_folder_files(folder: Path, names: Iterable[str], plan: InputPlan) -> int:
    """Add the images directly inside ``folder``; return how many files were images."""
    files = sorted(folder / n for n in names if _visible(n) and (folder / n).is_file())
    images = [f for f in files if is_supported_file(f)]
    plan.skipped.extend(f for f in files if not is_supported_file(f))
    dicoms = [f for f in images if image_kind(f) == "dicom"]
    for f in images:
        if f not in dicoms:
            _expand_file(f, plan)
    if dicoms:
        refs = _series_refs(folder, dicoms, plan)
        singles = [r for r in refs if r.frame is None]
        if len(singles) > 1:
            plan.items.extend(SliceItem(r, volume=folder, index=i) for i, r in enumerate(singles))
        else:
            plan.items.extend(SliceItem(r) for r in singles)
        plan.items.extend(SliceItem(r, volume=r.path, index=r.frame) for r in refs if r.frame is not None)
    return len(images)


def _expand_folder(root: Path, plan: InputPlan) -> None:
    found = 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        found += _expand_folder_files(Path(folder), names, plan)
    if not found:
        plan.empty.append(root)


def collect_inputs(paths: Iterable[Path | str]) -> InputPlan:
    """Expand files and folders (recursively) into the slices to predict; see the module docstring."""
    plan = InputPlan()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            _expand_folder(p, plan)
        elif p.is_file():
            _expand_file(p, plan)
        else:
            plan.errors.append(ImageReadError(p, "file does not exist"))
    return plan
