"""pydicom's test corpus sent through crosssite's DICOM node by C-STORE: what was scored, skipped (and why),
refused with a named reason, or crashed; and whether the node still answers afterwards.

    python scripts/pacs_corpus.py [--out results/pacs_corpus.json]

Every file of `pydicom.data.get_testdata_files()` present on this machine (none downloaded) is sent alone, in its
own association, by a pynetdicom SCU to a node running in this process (shipped model, default selection rules,
reports written to a folder: ``--dry-run``). A file the SCU cannot send at all (not a DICOM data set, no SOP class
or transfer syntax) is counted apart: it never reaches the node. Prints a Markdown table (docs/RELIABILITY.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_files
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from crosssite.inference import Predictor
from crosssite.models.adaptation import DEFAULT_STRATEGY
from crosssite.pacs.delivery import FolderSender, Outbox
from crosssite.pacs.node import DicomNode
from crosssite.pacs.orthanc import free_port
from crosssite.pacs.pipeline import ACCEPTED, REFUSED, Pipeline
from crosssite.pacs.rules import NON_IMAGE, NOT_SELECTED, SelectionRules
from crosssite.pacs.sr import read_sr
from crosssite.pretrained import shipped_model


class Crashes(logging.Handler):
    """Counts the log records that carry a traceback (the node's handlers log every unexpected exception so)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record.getMessage())


def send(path: str, port: int) -> tuple[str, str]:
    """(what happened on the wire, detail) for one file sent alone."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:  # not a data set at all
        return "not sent", f"pydicom cannot read it ({type(e).__name__})"
    sop_class = ds.get("SOPClassUID")
    if not sop_class:
        return "not sent", "no SOPClassUID (C-STORE needs one)"
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:  # no file meta: send it in the encoding it was read in
        implicit, little = ds.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ae = AE(ae_title="CORPUS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="CROSSSITE")
    if not assoc.is_established:
        return "rejected", "association refused"
    try:
        context = next((c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class), None)
        if context is None:
            name = getattr(sop_class, "name", str(sop_class))
            return "rejected", f"presentation context refused ({name}, {getattr(syntax, 'name', syntax)})"
        try:
            status = assoc.send_c_store(ds)
        except Exception as e:  # pydicom cannot encode the data set for the wire
            return "not sent", f"the SCU cannot encode it ({type(e).__name__})"
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    return ("stored", "") if code == 0 else ("failed", f"status {'none' if code is None else hex(code)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write every file's outcome as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    crashes = Crashes()
    logging.getLogger("crosssite.pacs").addHandler(crashes)

    work = Path(tempfile.mkdtemp(prefix="pacs-corpus-"))
    predictor = Predictor.from_file(shipped_model(), adapt=DEFAULT_STRATEGY)
    pipeline = Pipeline(predictor, SelectionRules(), work / "spool", Outbox(work / "outbox", FolderSender(work / "sr")))
    outcomes: dict[str, tuple[str, str]] = {}
    accept = pipeline.accept

    def recording_accept(ds: pydicom.Dataset, name: str = "instance") -> object:
        outcome = accept(ds, name)
        outcomes[str(ds.get("SOPInstanceUID", name))] = (outcome.category, outcome.reason)
        return outcome

    pipeline.accept = recording_accept  # type: ignore[method-assign]
    node = DicomNode(pipeline, port=free_port(), complete_after_s=0.5).start()
    files = sorted(f for f in get_testdata_files() if Path(f).is_file())
    rows = []
    try:
        for path in files:
            wire, detail = send(path, node.port)
            try:
                uid = str(pydicom.dcmread(path, force=True, stop_before_pixels=True).get("SOPInstanceUID", ""))
            except Exception:
                uid = ""
            rows.append({"file": Path(path).name, "uid": uid, "wire": wire, "detail": detail})
        while pipeline.open_series() or not node._todo.empty() or node._pending:
            time.sleep(0.2)
        echo = AE(ae_title="CORPUS")
        echo.add_requested_context(Verification)
        assoc = echo.associate("127.0.0.1", node.port, ae_title="CROSSSITE")
        alive = assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        node.stop()
    scored = {uid for sr in (work / "sr").rglob("*.dcm") for uid, _ in read_sr(pydicom.dcmread(sr))["slices"]}
    failed_scoring: dict[str, str] = {}
    while not node.completed.empty():
        for entry in node.completed.get().refused:
            uid, _, reason = entry.partition(": ")
            failed_scoring[uid] = reason
    for row in rows:
        category, reason = outcomes.get(row["uid"], ("", ""))
        if row["wire"] == "not sent":
            row["result"], row["reason"] = "not sendable", row["detail"]
        elif row["wire"] == "rejected":
            row["result"], row["reason"] = "refused", row["detail"]
        elif row["uid"] in scored:
            row["result"], row["reason"] = "scored", ""
        elif category in (NON_IMAGE, NOT_SELECTED):
            row["result"] = "skipped: non-image" if category == NON_IMAGE else "skipped: rules"
            row["reason"] = reason
        elif category == REFUSED or row["uid"] in failed_scoring:
            row["result"], row["reason"] = "refused", reason or failed_scoring.get(row["uid"], "")
        elif category == ACCEPTED:
            row["result"], row["reason"] = "refused", "accepted, not scored (volume below min_slices)"
        else:
            row["result"], row["reason"] = "crashed", row["detail"] or "no outcome recorded"
    counts = Counter(r["result"] for r in rows)
    unnamed = [r for r in rows if r["result"] == "refused" and not r["reason"]]
    print(f"{len(rows)} files of pydicom.data; node alive afterwards: {alive}; tracebacks logged: {len(crashes.records)}")
    print("\n| outcome | files |\n|---|---:|")
    for key in ("scored", "skipped: rules", "skipped: non-image", "refused", "not sendable", "crashed"):
        print(f"| {key} | {counts.get(key, 0)} |")
    print(f"\nrefused without a named reason: {len(unnamed)}")
    reasons = Counter((r["result"], r["reason"].split(" (")[0] if r["result"].startswith("skipped") else r["reason"])
                      for r in rows if r["result"] not in ("scored",))
    print("\n| outcome | reason | files |\n|---|---|---:|")
    for (result, reason), n in sorted(reasons.items(), key=lambda t: (t[0][0], -t[1])):
        print(f"| {result} | {reason} | {n} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"alive": alive, "tracebacks": crashes.records, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
