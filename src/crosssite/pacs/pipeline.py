"""From received DICOM instances to delivered reports: the part shared by the DICOM node and the DICOMweb path.

    pipeline = Pipeline(predictor, rules, spool_dir, outbox)
    pipeline.accept(ds)              # per received instance: checked, spooled to disk, or skipped with a reason
    report = pipeline.complete(uid)  # when the series is complete: scored, one SR per volume, delivered

A received instance is checked against the selection rules (`crosssite.pacs.rules`) from its header and written
to ``spool/<SeriesInstanceUID>/<volume key>/<SOPInstanceUID>.dcm``; each volume folder is then exactly what
``crosssite predict FOLDER`` reads, and it is scored by the same `crosssite.inference.Predictor` (the same
decoding, framing, normalisation, test-time augmentation and top-k volume score), so a series gets the
probabilities ``predict`` gives for the same files. A slice whose pixels do not decode fails alone, named by its
SOP Instance UID; the rest of its volume is scored.

Each completed series gives one health line on the ``crosssite.pacs`` logger: instances received, skipped (by
reason), refused, scored, what became of the reports, and the seconds from its last instance to its reports
delivered. It holds UIDs and counts only: no patient attribute and no pixel value is ever logged.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosssite.pacs.capture import build_captures
from crosssite.pacs.delivery import Outbox, save_dataset
from crosssite.pacs.rules import SelectionRules, skip_reason, volume_key
from crosssite.pacs.sr import ModelInfo, SliceScore, VolumeResult, build_sr

__all__ = ["ACCEPTED", "REFUSED", "Outcome", "SeriesReport", "Pipeline", "UID_PATTERN"]

log = logging.getLogger("crosssite.pacs")

ACCEPTED = "accepted"
REFUSED = "refused"
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class Outcome:
    """What became of one received instance: `ACCEPTED`, `REFUSED`, or a skip category of `crosssite.pacs.rules`
    (``NON_IMAGE``, ``NOT_SELECTED``), and why."""

    category: str
    reason: str = ""
    series_uid: str | None = None


@dataclass
class _Series:
    received: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> instances
    refused: list[str] = field(default_factory=list)
    last_at: float = 0.0


@dataclass
class SeriesReport:
    """The result of one completed series (what its health line says)."""

    series_uid: str
    received: int
    skipped: dict[str, int]
    refused: list[str]
    volumes: list[VolumeResult]
    reports: list[Any]  # the SR datasets, one per scored volume
    delivery: list[str]  # per report: "sent", "queued (reason)"
    seconds: float  # from the last instance received to the last report handed over

    def health_line(self) -> str:
        skipped = sum(self.skipped.values())
        why = "; ".join(f"{n} {r}" for r, n in Counter(self.skipped).most_common(3))
        scored = sum(len(v.slices) for v in self.volumes)
        sent = Counter(d.split(" ", 1)[0] for d in self.delivery)
        delivered = ", ".join(f"{n} {k}" for k, n in sent.items()) or "none"
        return (f"series {self.series_uid}: received {self.received}, skipped {skipped}"
                f"{f' ({why})' if skipped else ''}, refused {len(self.refused)}, scored {scored} slice(s) in "
                f"{len(self.volumes)} volume(s), reports {delivered}, {self.seconds:.2f} s after the last instance")


def _uid(ds: Any, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not UID_PATTERN.match(value) or len(value) > 64:
        raise ValueError(f"missing or invalid {keyword} {value[:70]!r}")
    return value


class Pipeline:
    """Receives instances, scores completed series, and hands their reports to an outbox.

    Args:
        predictor: a `crosssite.inference.Predictor` (its normalisation, threshold, tta and top-k are used).
        rules: the selection rules.
        spool: folder for received instances (a sub-folder per series, removed once the series is scored).
        outbox: where reports go (`crosssite.pacs.delivery.Outbox`).
        cam_top: beside each SR, a Secondary Capture series with the Grad-CAM overlays of the volume's
            ``cam_top`` slices of highest P(COVID) (`crosssite.pacs.capture`); 0: none. Needs a crosssite model file.
    """

    def __init__(self, predictor: Any, rules: SelectionRules, spool: Path, outbox: Outbox, cam_top: int = 0) -> None:
        self.predictor = predictor
        self.cam_top = cam_top
        self.rules = rules
        self.spool = Path(spool)
        self.outbox = outbox
        self.model = ModelInfo.of(predictor)
        self._series: dict[str, _Series] = {}
        self._lock = threading.Lock()
        self._score_lock = threading.Lock()  # one series scored at a time: the predictor is not thread-safe
        self._recover()

    def _recover(self) -> None:
        """Series a stopped (or crashed) node received but did not finish scoring are taken up again: each is
        complete once the series-complete wait has passed from now."""
        import pydicom

        if not self.spool.is_dir():
            return
        for folder in sorted(p for p in self.spool.iterdir() if p.is_dir()):
            files = sorted(folder.glob("*/*.dcm"))
            if folder.name.startswith(".scoring-") and files:  # was being scored: back under its series' folder
                uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
                for f in files:
                    (self.spool / uid / f.parent.name).mkdir(parents=True, exist_ok=True)
                    os.replace(f, self.spool / uid / f.parent.name / f.name)
            if folder.name.startswith(".scoring-") or not files:
                shutil.rmtree(folder, ignore_errors=True)
        for folder in sorted(p for p in self.spool.iterdir() if p.is_dir()):
            received = len(list(folder.glob("*/*.dcm")))
            self._series[folder.name] = _Series(received=received, last_at=time.monotonic())
        if self._series:
            log.info("spool: %d series received before the last stop, scored again", len(self._series))

    # ------------------------------------------------------------------------------------------ receiving

    def accept(self, ds: Any, name: str = "instance") -> Outcome:
        """Check one received instance and spool it (see the module docstring); never raises for a bad one."""
        try:
            sop_uid = _uid(ds, "SOPInstanceUID")
            series_uid = _uid(ds, "SeriesInstanceUID")
            _uid(ds, "StudyInstanceUID")  # the SR goes into this study: it must be there
        except ValueError as e:
            log.warning("%s refused: %s", name, e)
            return Outcome(REFUSED, str(e))
        except Exception as e:  # an undecodable element; its message may quote a value (a name): never logged
            log.warning("%s refused: unreadable header (%s)", name, type(e).__name__)
            return Outcome(REFUSED, f"unreadable header ({type(e).__name__})")
        name = f"instance {sop_uid}"
        try:
            skip = skip_reason(ds, self.rules)
        except Exception as e:  # as above: the type only
            skip = (REFUSED, f"unreadable header ({type(e).__name__})")
        # the file and its series' record change together: `complete` takes a series' folder under the same lock,
        # so an instance arriving while its series is being scored starts the series anew, with its file
        with self._lock:
            series = self._series.setdefault(series_uid, _Series())
            series.received += 1
            series.last_at = time.monotonic()
            if skip is None:
                try:
                    save_dataset(self.spool / series_uid / volume_key(ds) / f"{sop_uid}.dcm", ds,
                                 "a received instance")
                except Exception as e:  # a dataset pydicom cannot write back (a value it cannot encode)
                    skip = (REFUSED, f"cannot be stored ({type(e).__name__})")
            if skip is not None and skip[0] == REFUSED:
                series.refused.append(f"{sop_uid}: {skip[1]}")
            elif skip is not None:
                series.skipped[skip[1]] += 1
        if skip is not None:
            category, reason = skip
            log.info("%s %s: %s", name, "refused" if category == REFUSED else "skipped", reason)
            return Outcome(category, reason, series_uid)
        return Outcome(ACCEPTED, "", series_uid)

    def idle_series(self, quiet_s: float) -> list[str]:
        """The series that received nothing for ``quiet_s`` seconds (complete, by the node's rule)."""
        now = time.monotonic()
        with self._lock:
            return [uid for uid, s in self._series.items() if now - s.last_at >= quiet_s]

    def open_series(self) -> list[str]:
        with self._lock:
            return list(self._series)

    # ------------------------------------------------------------------------------------------- scoring

    def complete(self, series_uid: str) -> SeriesReport:
        """Score every volume of a received series, build and deliver one SR per volume, log its health line."""
        with self._lock:
            series = self._series.pop(series_uid)
            folder = self.spool / f".scoring-{uuid.uuid4().hex}"
            received = self.spool / series_uid
            if received.is_dir():
                received.rename(folder)
        try:
            with self._score_lock:
                volumes, evidence, errors = self._score(series_uid, series, folder)
            series.refused.extend(errors)
            reports, delivery = [], []
            for volume in volumes:
                try:
                    sr = build_sr(volume, evidence[volume.extra["key"]], self.model)
                except Exception as e:  # source headers highdicom cannot copy from: this volume fails, named
                    reason = f"no SR for {volume.part or 'the volume'} ({type(e).__name__})"
                    series.refused.append(f"{series_uid}: {reason}")
                    log.warning("series %s: %s", series_uid, reason)
                    continue
                reports.append(sr)
                delivery.append(self.outbox.submit(sr))
                for capture in self._captures(volume, evidence[volume.extra["key"]]):
                    reports.append(capture)
                    delivery.append(self.outbox.submit(capture))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        report = SeriesReport(series_uid, series.received, series.skipped, series.refused, volumes, reports,
                              delivery, time.monotonic() - series.last_at)
        log.info("%s", report.health_line())
        return report

    def _score(self, series_uid: str, series: _Series,
               folder: Path) -> tuple[list[VolumeResult], dict[str, list[Any]], list[str]]:
        import pydicom

        groups = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        sized = [(g, sorted(g.glob("*.dcm"))) for g in groups]
        too_few = [(g, files) for g, files in sized if len(files) < self.rules.min_slices]
        for g, files in too_few:
            series.skipped[f"volume of {len(files)} slice(s), below min_slices {self.rules.min_slices}"] += len(files)
        sized = [(g, files) for g, files in sized if len(files) >= self.rules.min_slices]
        volumes: list[VolumeResult] = []
        evidence: dict[str, list[Any]] = {}
        errors: list[str] = []
        for i, (group, files) in enumerate(sized):
            headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
            cam_dir = folder / ".cams" / group.name if self.cam_top else None
            records = self.predictor.predict([group], cam_dir=cam_dir, progress=False)
            slices, volume_row, cams = [], None, {}
            for r in records:
                if r.kind == "error":
                    errors.append(f"{Path(r.path).stem}: {' '.join(str(r.error).split())}")
                    log.warning("instance %s failed: %s", Path(r.path).stem, " ".join(str(r.error).split()))
                elif r.kind == "slice":
                    ds = headers[Path(r.path)]
                    slices.append(SliceScore(str(ds.SOPClassUID), str(ds.SOPInstanceUID), float(r.p_covid), r.frame))
                    cams[(str(ds.SOPInstanceUID), r.frame)] = r.cam
                elif r.kind == "volume":
                    volume_row = r
            if not slices:
                continue
            if volume_row is None:  # a volume of one slice: its score is the slice's
                volume_row = next(r for r in records if r.kind == "slice")
            scored = {s.sop_instance_uid for s in slices}
            evidence[group.name] = [ds for ds in headers.values() if str(ds.SOPInstanceUID) in scored]
            part = f"volume {i + 1} of {len(sized)}" if len(sized) > 1 else ""
            volumes.append(VolumeResult(series_uid, slices, float(volume_row.p_covid), str(volume_row.label),
                                        volume_row.ood, volume_row.ood_score, part,
                                        {"key": group.name, "cams": cams}))
        return volumes, evidence, errors

    def _captures(self, volume: VolumeResult, evidence: list[Any]) -> list[Any]:
        """The Grad-CAM Secondary Captures of the volume's top slices (none without ``cam_top``)."""
        if not self.cam_top:
            return []
        headers = {str(ds.SOPInstanceUID): ds for ds in evidence}
        top = sorted(volume.slices, key=lambda s: -s.p_covid)[: self.cam_top]
        cams = volume.extra["cams"]
        return build_captures([(headers[s.sop_instance_uid], s.p_covid, Path(cams[(s.sop_instance_uid, s.frame)]))
                               for s in top])
