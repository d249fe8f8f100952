"""The result of one scored volume as a DICOM Comprehensive SR (highdicom) in the source study.

The report is a simple SR that cites its source series (no TID 1500 measurement groups: a classifier's output is
a probability per image, not a measurement of a region). Its content tree::

    CONTAINER  crosssite COVID-19 CT classification
      TEXT      Comment: research-use statement (not a medical device, not for diagnosis)
      TEXT      Algorithm Name / Algorithm Version / Algorithm Parameters (card hash, normalisation, tta, top-k)
      UIDREF    Series Instance UID of the source series
      NUM       P(COVID) of the series (mean of its top-k slice probabilities)
      NUM       decision threshold
      CODE      label at the threshold (COVID / non-COVID)
      CODE      out of distribution (Yes / No), NUM its score
      CONTAINER per-slice P(COVID)
        NUM     P(COVID)   INFERRED FROM  IMAGE (the source instance)      one per scored slice, in slice order

The codes crosssite defines itself carry the private coding scheme `SCHEME` (PS3.16 allows a "99" prefix for
local schemes); DCM and SNOMED CT codes are used where the standard has one. The patient and study attributes are
those highdicom copies from the source instances (the Patient, General Study and Patient Study modules); the SR
adds nothing else about the patient. Every UID (series, instance) is new, from highdicom's UID generator.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SCHEME", "RESEARCH_STATEMENT", "SliceScore", "VolumeResult", "ModelInfo", "build_sr", "read_sr",
           "card_hash"]

SCHEME = "99CROSSSITE"
RESEARCH_STATEMENT = (
    "Research result of crosssite, a COVID-19 CT classifier trained on public research data sets. Not a medical "
    "device; not for diagnosis or patient management."
)
SERIES_DESCRIPTION = "crosssite P(COVID) - research use only"
CLASS_CODES = {"COVID": ("COVID", "COVID"), "non-COVID": ("NONCOVID", "non-COVID")}


@dataclass(frozen=True)
class SliceScore:
    """One scored slice: the source instance and its P(COVID) (and the frame, for a multi-frame instance)."""

    sop_class_uid: str
    sop_instance_uid: str
    p_covid: float
    frame: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the SR says about the model: name, version, card hash, normalisation, test-time augmentation."""

    name: str
    version: str
    card_sha256: str
    norm: str
    tta: str
    top_k: int | None
    threshold: float
    ood_threshold: float

    @classmethod
    def of(cls, predictor: Any) -> ModelInfo:
        card = predictor.card
        return cls(
            name=str(card.get("name") or card.get("architecture") or predictor.source),
            version=str(card.get("package_version") or card.get("version") or "unknown"),
            card_sha256=card_hash(card), norm=predictor.norm, tta=predictor.tta, top_k=predictor.top_k,
            threshold=predictor.threshold, ood_threshold=predictor.ood_threshold,
        )


@dataclass(frozen=True)
class VolumeResult:
    """The scores of one volume of a source series."""

    series_instance_uid: str
    slices: Sequence[SliceScore]
    p_covid: float
    label: str
    ood: bool | None
    ood_score: float | None
    part: str = ""  # "volume 2 of 3" when the series was split into several volumes
    extra: dict[str, Any] = field(default_factory=dict)


def card_hash(card: dict[str, Any]) -> str:
    """sha256 of the model card as canonical JSON (sorted keys): which exact model produced a result."""
    return hashlib.sha256(json.dumps(card, sort_keys=True, default=str).encode()).hexdigest()


def _code(value: str, meaning: str, scheme: str = SCHEME) -> Any:
    from pydicom.sr.coding import Code

    return Code(value, scheme, meaning)


def _names() -> dict[str, Any]:
    from pydicom.sr.codedict import codes

    return {
        "report": _code("REPORT", "crosssite COVID-19 CT classification"),
        "comment": codes.DCM.Comment,
        "algorithm_name": codes.DCM.AlgorithmName,
        "algorithm_version": codes.DCM.AlgorithmVersion,
        "algorithm_parameters": codes.DCM.AlgorithmParameters,
        "series_uid": codes.DCM.SeriesInstanceUID,
        "series_p": _code("PCOVIDSERIES", "P(COVID) of the series"),
        "slice_p": _code("PCOVID", "P(COVID)"),
        "threshold": _code("THRESHOLD", "Decision threshold"),
        "label": _code("LABEL", "Label at the decision threshold"),
        "ood": _code("OOD", "Out of distribution"),
        "ood_score": _code("OODSCORE", "Distance to the closest training site"),
        "slices": _code("SLICES", "P(COVID) per slice"),
    }


def build_sr(result: VolumeResult, evidence: Sequence[Any], model: ModelInfo, *, series_number: int = 9901,
             now: dt.datetime | None = None) -> Any:
    """The Comprehensive SR (a `highdicom.sr.ComprehensiveSR`) of ``result``; ``evidence`` are the source
    instances' datasets (headers suffice), from which the patient and study attributes are copied."""
    import highdicom as hd
    from highdicom.sr import (
        CodeContentItem,
        ContainerContentItem,
        ImageContentItem,
        NumContentItem,
        RelationshipTypeValues,
        TextContentItem,
        UIDRefContentItem,
    )
    from pydicom.sr.codedict import codes

    contains, inferred = RelationshipTypeValues.CONTAINS, RelationshipTypeValues.INFERRED_FROM
    name = _names()
    unit = codes.UCUM.NoUnits
    parameters = (f"model card sha256 {model.card_sha256}; normalisation {model.norm}; test-time augmentation "
                  f"{model.tta}; series score = mean of the top {model.top_k or 'all'} slice probabilities; "
                  f"ood threshold {model.ood_threshold:g}")
    if result.part:
        parameters += f"; {result.part} of the source series"
    label_value, label_meaning = CLASS_CODES.get(result.label, (result.label.upper()[:16], result.label))
    items: list[Any] = [
        TextContentItem(name["comment"], RESEARCH_STATEMENT, relationship_type=contains),
        TextContentItem(name["algorithm_name"], model.name, relationship_type=contains),
        TextContentItem(name["algorithm_version"], model.version, relationship_type=contains),
        TextContentItem(name["algorithm_parameters"], parameters, relationship_type=contains),
        UIDRefContentItem(name["series_uid"], result.series_instance_uid, relationship_type=contains),
        NumContentItem(name["series_p"], float(result.p_covid), unit, relationship_type=contains),
        NumContentItem(name["threshold"], float(model.threshold), unit, relationship_type=contains),
        CodeContentItem(name["label"], _code(label_value, label_meaning), relationship_type=contains),
    ]
    if result.ood is not None:
        items.append(CodeContentItem(name["ood"], codes.SCT.Yes if result.ood else codes.SCT.No,
                                     relationship_type=contains))
    if result.ood_score is not None:
        items.append(NumContentItem(name["ood_score"], float(result.ood_score), unit, relationship_type=contains))
    per_slice = ContainerContentItem(name["slices"], relationship_type=contains)
    rows = []
    for s in result.slices:
        row = NumContentItem(name["slice_p"], float(s.p_covid), unit, relationship_type=contains)
        row.ContentSequence = [ImageContentItem(
            codes.DCM.SourceImage, s.sop_class_uid, s.sop_instance_uid,
            referenced_frame_numbers=None if s.frame is None else s.frame + 1, relationship_type=inferred)]
        rows.append(row)
    per_slice.ContentSequence = rows
    items.append(per_slice)
    root = ContainerContentItem(name["report"])
    root.ContentSequence = items
    now = now or dt.datetime.now()
    return hd.sr.ComprehensiveSR(
        evidence=list(evidence), content=root, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="crosssite", is_complete=True,
        series_description=SERIES_DESCRIPTION, content_date=now.date(), content_time=now.time(),
    )


def _walk(items: Any) -> list[Any]:
    out = []
    for item in items or []:
        out.append(item)
        out.extend(_walk(item.get("ContentSequence")))
    return out


def read_sr(ds: Any) -> dict[str, Any]:
    """The values of a crosssite SR (as written by `build_sr`) as a plain dict: ``series_p``, ``threshold``,
    ``label``, ``ood``, ``ood_score``, ``series_uid``, ``algorithm_*``, ``comment`` and ``slices``
    (``[(sop_instance_uid, p_covid), ...]`` in slice order). For tests and tools that read the result back."""
    keys = {(c.value, c.scheme_designator): k for k, c in _names().items()}
    out: dict[str, Any] = {"slices": []}
    for item in _walk(ds.ContentSequence):
        concept = item.ConceptNameCodeSequence[0]
        key = keys.get((concept.CodeValue, concept.CodingSchemeDesignator))
        kind = item.ValueType
        if key == "slice_p":
            ref = item.ContentSequence[0].ReferencedSOPSequence[0]
            out["slices"].append((str(ref.ReferencedSOPInstanceUID), float(item.MeasuredValueSequence[0].NumericValue)))
        elif kind == "NUM" and key:
            out[key] = float(item.MeasuredValueSequence[0].NumericValue)
        elif kind == "TEXT" and key:
            out[key] = str(item.TextValue)
        elif kind == "UIDREF" and key:
            out[key] = str(item.UID)
        elif kind == "CODE" and key:
            out[key] = str(item.ConceptCodeSequence[0].CodeMeaning)
    return out
