"""The DICOMweb path: a study pulled from a DICOMweb server by its UID, scored, and its reports stored back.

    reports = score_study(pipeline, client, study_uid)

QIDO-RS lists the study's series; WADO-RS retrieves each series' instances, which go through the same pipeline as
instances received by C-STORE (selection rules, spool, `Predictor`, one SR per volume); the pipeline's outbox
delivers the reports (STOW-RS back to the same server with `crosssite.pacs.delivery.StowSender`, or a folder with
``--dry-run``). A series crosssite wrote itself (its SR) is skipped by the rules like any non-image series.
"""

from __future__ import annotations

import logging
from typing import Any

from crosssite.errors import CrossSiteError
from crosssite.pacs.pipeline import Pipeline, SeriesReport

__all__ = ["dicomweb_client", "score_study"]

log = logging.getLogger("crosssite.pacs")


def dicomweb_client(url: str) -> Any:
    """A `dicomweb_client.DICOMwebClient` for ``url`` (the server's DICOMweb root, e.g. ``.../dicom-web``)."""
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=url.rstrip("/"))


def _tag(attributes: dict[str, Any], tag: str) -> str | None:
    values = (attributes.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def score_study(pipeline: Pipeline, client: Any, study_uid: str) -> list[SeriesReport]:
    """Score every series of the study ``study_uid`` on the server behind ``client``; return one report per
    series that held anything (its health line is logged). A study the server does not know is a
    `CrossSiteError`."""
    try:
        found = client.search_for_series(study_instance_uid=study_uid)
    except Exception as e:  # requests' connection and HTTP errors
        raise CrossSiteError(f"QIDO-RS {client.base_url}: cannot list the series of study {study_uid} "
                             f"({' '.join(str(e).split())[:200]})") from None
    if not found:
        raise CrossSiteError(f"QIDO-RS {client.base_url}: no series in study {study_uid} (unknown study?)")
    reports = []
    for attributes in found:
        series_uid = _tag(attributes, "0020000E")
        modality = _tag(attributes, "00080060") or "none"
        if series_uid is None:
            continue
        if modality.upper() not in {m.upper() for m in pipeline.rules.modalities}:
            log.info("series %s skipped: Modality %s, not %s (not retrieved)", series_uid, modality,
                     "/".join(pipeline.rules.modalities))
            continue
        try:
            instances = client.retrieve_series(study_uid, series_uid)
        except Exception as e:
            log.warning("series %s not retrieved by WADO-RS: %s", series_uid, " ".join(str(e).split())[:200])
            continue
        for ds in instances:
            pipeline.accept(ds)
        if series_uid in pipeline.open_series():
            reports.append(pipeline.complete(series_uid))
    return reports
