"""Rows that prediction returns, volume-level scores, and writing the rows as CSV or JSON.

Every row is a `Record` of one ``kind``:

* ``"slice"``: one 2D slice and its P(COVID), with a ``warning`` when its file may not be a chest-CT slice
  (a DICOM whose Modality is not CT, a localizer or non-axial slice, a tiny image), and ``ood`` /
  ``ood_score`` when its statistics sit far from every training site (`crosssite.inference.predictor`);
* ``"volume"``: a DICOM series or NIfTI volume, scored by the mean of its ``top_k`` highest slice
  probabilities (all of them when it has fewer), so a scan with a few clearly affected slices scores high
  even when most of its slices show healthy lung;
* ``"error"``: an input that could not be read, with the reason;
* ``"skipped"``: a file found inside an input folder that is not an image.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from crosssite.errors import CrossSiteError
from crosssite.ioutil import atomic_write_text

__all__ = ["Record", "KINDS", "DEFAULT_TOP_K", "volume_score", "failed", "write_records"]

KINDS = ("slice", "volume", "error", "skipped")
DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Record:
    """One output row. Fields that do not apply to a kind are None."""

    kind: str  # one of KINDS
    path: str  # slice file; series folder or volume file; input that failed or was skipped
    frame: int | None = None  # frame inside `path` (multi-frame DICOM, NIfTI); None for a one-slice file
    volume: str | None = None  # slice: the series folder or volume file it belongs to
    slice: int | None = None  # slice: its position in `volume`
    p_covid: float | None = None  # slice: softmax P(COVID); volume: mean of its top-k slice probabilities
    label: str | None = None  # class name at the model's threshold (COVID when p_covid >= threshold)
    norm: str | None = None  # normalisation used: a site name, "mean-of-sites", "adabn:<n images>", "shared"
    n_slices: int | None = None  # volume: slices scored
    top_k: int | None = None  # volume: slices averaged
    cam: str | None = None  # slice: Grad-CAM overlay PNG, when requested
    error: str | None = None  # error / skipped: the reason
    warning: str | None = None  # slice: why the input may not be a chest-CT slice (`crosssite.data.input_warnings`)
    ood: bool | None = None  # slice / volume: ood_score above the model's threshold (far from every training site)
    ood_score: float | None = None  # slice: distance to the closest known site (FirstNormShift); volume: slices' mean


def volume_score(p_covid: Sequence[float] | np.ndarray, top_k: int | None = DEFAULT_TOP_K) -> tuple[float, int]:
    """Mean of the ``top_k`` highest probabilities (all of them when ``top_k`` is None or exceeds their
    number); returns ``(score, k used)``."""
    p = np.sort(np.asarray(p_covid, dtype=np.float64))[::-1]
    if p.size == 0:
        raise ValueError("volume_score needs at least one slice probability")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for every slice), got {top_k}")
    k = p.size if top_k is None else min(top_k, p.size)
    return float(p[:k].mean()), k


def failed(records: Sequence[Record]) -> list[Record]:
    """The error rows."""
    return [r for r in records if r.kind == "error"]


def _header(records: Sequence[Record], meta: dict[str, Any]) -> dict[str, Any]:
    counts = {k: sum(r.kind == k for r in records) for k in KINDS}
    return {**meta, "counts": counts}


def write_records(path: Path | str, records: Sequence[Record], meta: dict[str, Any] | None = None) -> Path:
    """Write the rows as CSV (one line per row, empty cells for None) or JSON (``meta`` plus ``rows``),
    chosen by the suffix of ``path``, atomically (a failed write leaves no partial file)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise CrossSiteError(f"{path}: output must end in .csv or .json")
    if suffix == ".json":
        doc = {**_header(records, meta or {}), "rows": [asdict(r) for r in records]}
        atomic_write_text(path, json.dumps(doc, indent=1) + "\n", "predictions")
        return path
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow([fl.name for fl in fields(Record)])
    for r in records:
        writer.writerow(["" if v is None else v for v in asdict(r).values()])
    atomic_write_text(path, buffer.getvalue(), "predictions")
    return path
