"""Which received DICOM instances are scored, and how a series is split into volumes.

A PACS routes whatever it holds for a study: the CT series, but also its localizers, dose reports, presentation
states, key-object selections and secondary captures, and sometimes a "series" that mixes reconstructions. The rules
decide, from the header alone, what a chest-CT classifier should see:

* the Modality is one of ``modalities`` (default CT);
* the instance holds pixel data (an SR, a presentation state or a key-object selection does not);
* it is not a localizer / scout (ImageType's third value LOCALIZER, or a scout in the series description);
* its slice plane is axial: the normal of ImageOrientationPatient within ``axial_tolerance`` (cosine) of the
  patient's feet-head axis (an instance without the attribute passes);
* its SliceThickness lies within ``slice_thickness_mm`` (an instance without it passes unless
  ``require_slice_thickness``).

What passes is grouped into volumes by `volume_key`: instances whose size, orientation, thickness, image type and
pixel spacing agree form one volume, so a series that mixes reconstructions (a lung and a soft-tissue kernel, two
thicknesses, an axial and a coronal stack) is scored as several volumes, never as one. A multi-frame instance is a
volume by itself.

The rules live in a small YAML (or JSON) file; every key is optional and defaults to `SelectionRules`'s value::

    modalities: [CT]
    axial_tolerance: 0.9
    slice_thickness_mm: [0.5, 10.0]
    require_slice_thickness: false
    min_slices: 1
    exclude_image_types: [LOCALIZER]
    exclude_descriptions: [scout, topogram, localizer, surview]
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from crosssite.errors import ConfigError

__all__ = ["SelectionRules", "load_rules", "skip_reason", "volume_key", "NON_IMAGE", "NOT_SELECTED"]

NON_IMAGE = "non-image"
"""Outcome category of an instance without pixel data."""

NOT_SELECTED = "not-selected"
"""Outcome category of an image instance the rules leave out (modality, localizer, plane, thickness)."""


@dataclass(frozen=True)
class SelectionRules:
    """The selection rules; see the module docstring."""

    modalities: tuple[str, ...] = ("CT",)
    axial_tolerance: float = 0.9  # |cos| between the slice normal and the feet-head axis; 0.9 is about 26 degrees
    slice_thickness_mm: tuple[float, float] = (0.5, 10.0)
    require_slice_thickness: bool = False
    min_slices: int = 1  # a volume with fewer selected slices is not scored
    exclude_image_types: tuple[str, ...] = ("LOCALIZER",)
    exclude_descriptions: tuple[str, ...] = ("scout", "topogram", "localizer", "surview")

    def __post_init__(self) -> None:
        low, high = self.slice_thickness_mm
        if not 0 <= low <= high:
            raise ConfigError(f"slice_thickness_mm must be [low, high] with 0 <= low <= high, got {[low, high]}")
        if not 0 <= self.axial_tolerance <= 1:
            raise ConfigError(f"axial_tolerance must lie in [0, 1], got {self.axial_tolerance}")
        if self.min_slices < 1:
            raise ConfigError(f"min_slices must be >= 1, got {self.min_slices}")
        if not self.modalities:
            raise ConfigError("modalities must name at least one modality (e.g. [CT])")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def load_rules(path: str | Path | None) -> SelectionRules:
    """The rules of a YAML / JSON file (None: the defaults); an unknown key or a bad value is a `ConfigError`
    naming the file."""
    if path is None:
        return SelectionRules()
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the selection rules ({' '.join(str(e).split())})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the selection rules must be a mapping of keys to values")
    known = {f.name: f for f in fields(SelectionRules)}
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown selection rule(s) {', '.join(unknown)}; known: {', '.join(known)}")
    values: dict[str, Any] = {}
    try:
        for key, value in doc.items():
            default = getattr(SelectionRules(), key)
            if isinstance(default, tuple):
                items = [value] if isinstance(value, str) else list(value)
                values[key] = tuple(float(v) for v in items) if key == "slice_thickness_mm" else tuple(
                    str(v) for v in items)
            else:
                values[key] = type(default)(value)
        if "slice_thickness_mm" in values and len(values["slice_thickness_mm"]) != 2:
            raise ConfigError("slice_thickness_mm must be [low, high]")
        return SelectionRules(**values)
    except (TypeError, ValueError, ConfigError) as e:
        raise ConfigError(f"{path}: {' '.join(str(e).split())}") from None


def _text(ds: Any, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _normal(ds: Any) -> np.ndarray | None:
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    norm = float(np.linalg.norm(normal))
    return None if norm == 0 else normal / norm


def skip_reason(ds: Any, rules: SelectionRules) -> tuple[str, str] | None:
    """``(category, reason)`` when the rules leave the instance out (category `NON_IMAGE` or `NOT_SELECTED`),
    None when it is to be scored. Reads the header only."""
    modality = _text(ds, "Modality").upper()
    sop_class = ds.get("SOPClassUID")
    sop_name = getattr(sop_class, "name", None) or str(sop_class or "unknown SOP class")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return NON_IMAGE, f"non-image instance ({sop_name}, Modality {modality or 'none'})"
    if modality not in {m.upper() for m in rules.modalities}:
        return NOT_SELECTED, f"Modality {modality or 'none'} ({sop_name}), not {'/'.join(rules.modalities)}"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    excluded = [t for t in rules.exclude_image_types if t.upper() in image_type[2:]]
    if excluded:
        return NOT_SELECTED, f"ImageType {excluded[0]} (a localizer / scout, not an axial slice)"
    description = _text(ds, "SeriesDescription").lower()
    words = [w for w in rules.exclude_descriptions if w.lower() in description]
    if words:
        return NOT_SELECTED, f"series description names a {words[0]} (not an axial slice)"
    normal = _normal(ds)
    if normal is not None and abs(normal[2]) < rules.axial_tolerance:
        return NOT_SELECTED, "slice plane is not axial (normal {:.2f} {:.2f} {:.2f})".format(*normal)
    thickness = ds.get("SliceThickness")
    low, high = rules.slice_thickness_mm
    if thickness in (None, ""):
        if rules.require_slice_thickness:
            return NOT_SELECTED, "no SliceThickness (the rules require one)"
    else:
        try:
            value = float(thickness)
        except (TypeError, ValueError):
            return NOT_SELECTED, f"unreadable SliceThickness {thickness!r}"
        if not low <= value <= high:
            return NOT_SELECTED, f"SliceThickness {value:g} mm outside {low:g}-{high:g} mm"
    return None


def volume_key(ds: Any) -> str:
    """A short key shared by the instances of a series that form one volume (see the module docstring)."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:  # a multi-frame instance holds a volume by itself
        parts: list[Any] = ["multiframe", str(ds.get("SOPInstanceUID", ""))]
    else:
        normal = _normal(ds)
        spacing = ds.get("PixelSpacing") or []
        parts = [
            int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0),
            None if normal is None else tuple(np.round(normal, 2).tolist()),
            _text(ds, "SliceThickness"),
            tuple(str(v).upper() for v in (ds.get("ImageType") or [])),
            tuple(round(float(v), 4) for v in spacing),
            _text(ds, "ConvolutionKernel"),
        ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]
