"""Into the hospital's PACS: selection rules, the SR, the outbox's retries, the dry run, and two end-to-end paths
against a real Orthanc (C-STORE routed to `crosssite dicom-node`, and `crosssite predict --dicomweb`).

The CT series are written here with pydicom from real slices of site B (`crosssite.pacs.series`), under a marker
patient name that must appear nowhere in crosssite's logs. Every probability in an SR is checked against
`Predictor` on the very files that were sent (the same call `crosssite predict FOLDER` makes).

The Orthanc tests need Debian's ``orthanc`` and ``orthanc-dicomweb`` (`.ci/run` installs them), and the whole file
the ``pacs`` extra (`make install` installs it). Without them the tests are skipped, unless
``CROSSSITE_REQUIRE_ORTHANC=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

if os.environ.get("CROSSSITE_REQUIRE_ORTHANC") != "1":  # in CI a missing PACS extra fails instead
    for _name in ("pynetdicom", "highdicom", "dicomweb_client"):
        pytest.importorskip(_name)

from crosssite.inference import Predictor  # noqa: E402
from crosssite.models.adaptation import DEFAULT_STRATEGY  # noqa: E402
from crosssite.pacs.delivery import CStoreSender, FolderSender, Outbox  # noqa: E402
from crosssite.pacs.orthanc import OrthancProcess, find_orthanc, free_port  # noqa: E402
from crosssite.pacs.pipeline import ACCEPTED, REFUSED, Pipeline  # noqa: E402
from crosssite.pacs.rules import NON_IMAGE, NOT_SELECTED, SelectionRules, load_rules, skip_reason  # noqa: E402
from crosssite.pacs.series import write_ct_series  # noqa: E402
from crosssite.pacs.sr import RESEARCH_STATEMENT, read_sr  # noqa: E402
from crosssite.pretrained import shipped_model  # noqa: E402
from crosssite.errors import ConfigError  # noqa: E402

MARKER = "Zzmarker^Quokka"
PATIENT_ID = "MRN-77-QUOKKA"
TOLERANCE = 1e-4  # the SR stores the probability as a decimal string (DS, 16 characters): ~1e-12 lost; 1e-4 is loose


@pytest.fixture(scope="module")
def slices(site_b_path: Path) -> list[np.ndarray]:
    """Eight real slices of site B, resized to one size as the slices of one CT series are."""
    files = [f for folder in ("CT_COVID", "CT_NonCOVID") for f in sorted((site_b_path / folder).glob("*.png"))[:4]]
    return [np.asarray(Image.open(f).convert("L").resize((160, 160)), np.float32) / 255.0 for f in files]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    """What `crosssite predict FOLDER` builds without options: the shipped model, an unseen site."""
    return Predictor.from_file(shipped_model(), adapt=DEFAULT_STRATEGY)


def expected(predictor: Predictor, folder: Path) -> tuple[dict[str, float], float]:
    """P(COVID) per SOP Instance UID and the volume score, as `crosssite predict FOLDER` gives them."""
    records = predictor.predict([folder], progress=False)
    per_slice = {str(pydicom.dcmread(r.path, stop_before_pixels=True).SOPInstanceUID): r.p_covid
                 for r in records if r.kind == "slice"}
    volume = next(r.p_covid for r in records if r.kind == "volume")
    return per_slice, volume


def check_sr(sr: pydicom.Dataset, source: list[Path], per_slice: dict[str, float], volume: float) -> dict:
    """The SR holds every slice's probability, the series score, cites the source series, and copies its patient
    and study attributes."""
    first = pydicom.dcmread(source[0], stop_before_pixels=True)
    values = read_sr(sr)
    assert sr.Modality == "SR" and sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert sr.StudyInstanceUID == first.StudyInstanceUID and sr.SeriesInstanceUID != first.SeriesInstanceUID
    assert all(pydicom.uid.UID(uid).is_valid for uid in (sr.SeriesInstanceUID, sr.SOPInstanceUID))
    assert str(sr.PatientName) == str(first.PatientName) and sr.PatientID == first.PatientID
    assert values["series_uid"] == first.SeriesInstanceUID
    got = dict(values["slices"])
    assert set(got) == set(per_slice)
    assert max(abs(got[uid] - p) for uid, p in per_slice.items()) < TOLERANCE
    assert abs(values["series_p"] - volume) < TOLERANCE
    assert values["label"] == ("COVID" if volume >= 0.5 else "non-COVID")
    assert values["comment"] == RESEARCH_STATEMENT and "card sha256" in values["algorithm_parameters"]
    assert values["algorithm_name"] == "crosssite-recipe-cpu64" and values["ood"] in ("Yes", "No")
    evidence = {str(item.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence if series.SeriesInstanceUID == first.SeriesInstanceUID
                for item in series.ReferencedSOPSequence}
    assert evidence == set(per_slice)
    # nothing about the patient beyond what the source holds
    patient_keywords = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
                        "PatientSize", "OtherPatientIDs", "EthnicGroup", "PatientComments"}
    assert {k for k in patient_keywords if k in sr} <= {k for k in patient_keywords if k in first}
    return values


def _dataset(**attributes: object) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for k, v in attributes.items():
        setattr(ds, k, v)
    return ds


# ------------------------------------------------------------------------------------------------ rules


def test_rules_skip_what_is_not_an_axial_ct_image(tmp_path: Path) -> None:
    rules = SelectionRules()
    ct = dict(Modality="CT", PixelData=b"\0\0", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
              ImageOrientationPatient=[1, 0, 0, 0, 1, 0], SliceThickness=2.5, SOPClassUID=pydicom.uid.CTImageStorage)
    assert skip_reason(_dataset(**ct), rules) is None
    cases = {
        "MR": (_dataset(**{**ct, "Modality": "MR", "SOPClassUID": pydicom.uid.MRImageStorage}), NOT_SELECTED,
               "Modality MR"),
        "SR": (_dataset(Modality="SR", SOPClassUID=pydicom.uid.ComprehensiveSRStorage), NON_IMAGE, "non-image"),
        "scout": (_dataset(**{**ct, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}), NOT_SELECTED, "LOCALIZER"),
        "coronal": (_dataset(**{**ct, "ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}), NOT_SELECTED, "not axial"),
        "thick": (_dataset(**{**ct, "SliceThickness": 12}), NOT_SELECTED, "12 mm outside 0.5-10 mm"),
        "topogram": (_dataset(**{**ct, "SeriesDescription": "Topogram 0.6 T20s"}), NOT_SELECTED, "topogram"),
    }
    for name, (ds, category, words) in cases.items():
        got = skip_reason(ds, rules)
        assert got is not None and got[0] == category and words in got[1], (name, got)
    # the rules file: defaults for what it leaves out, a named error for what it gets wrong
    path = tmp_path / "rules.yaml"
    path.write_text("slice_thickness_mm: [1, 3]\nmodalities: [CT, PT]\n")
    loaded = load_rules(path)
    assert loaded.slice_thickness_mm == (1.0, 3.0) and loaded.modalities == ("CT", "PT")
    assert loaded.axial_tolerance == rules.axial_tolerance
    assert "outside 1-3 mm" in skip_reason(_dataset(**{**ct, "SliceThickness": 5}), loaded)[1]
    path.write_text("slice_thickness: [1, 3]\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown selection rule"):
        load_rules(path)


def _store(pipeline: Pipeline, files: list[Path]) -> list:
    return [pipeline.accept(pydicom.dcmread(f)) for f in files]


def test_mixed_series_is_scored_as_separate_volumes_and_a_bad_instance_fails_alone(
        tmp_path: Path, slices: list[np.ndarray], predictor: Predictor, caplog: pytest.LogCaptureFixture) -> None:
    """One series UID holding two reconstructions (2 mm and 5 mm), an MR image, a non-image object and a slice
    whose pixel data is cut short: two SRs (one per reconstruction), the MR and the SR skipped with a reason, the
    broken slice named and the rest of its volume scored -- in a dry run, written to a folder."""
    caplog.set_level(logging.INFO)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    thin = write_ct_series(slices[:4], tmp_path / "thin", patient_name=MARKER, study_uid=study, series_uid=series,
                           thickness_mm=2.0)
    thick = write_ct_series(slices[4:], tmp_path / "thick", patient_name=MARKER, study_uid=study, series_uid=series,
                            thickness_mm=5.0)
    mr = write_ct_series(slices[:1], tmp_path / "mr", patient_name=MARKER, study_uid=study, series_uid=series,
                         modality="MR")
    broken = pydicom.dcmread(thick[-1])
    broken.PixelData = broken.PixelData[:100]
    broken.save_as(thick[-1], enforce_file_format=True)
    other = pydicom.dcmread(thin[0], stop_before_pixels=True)
    other.SOPInstanceUID, other.Modality = pydicom.uid.generate_uid(), "PR"
    dry = tmp_path / "dry"
    pipeline = Pipeline(predictor, SelectionRules(), tmp_path / "spool", Outbox(tmp_path / "outbox", FolderSender(dry)))
    outcomes = _store(pipeline, thin + thick + mr) + [pipeline.accept(other)]
    assert [o.category for o in outcomes] == [ACCEPTED] * 8 + [NOT_SELECTED, NON_IMAGE]
    report = pipeline.complete(series)

    assert len(report.volumes) == 2 and report.delivery == ["sent", "sent"]
    written = sorted(dry.rglob("*.dcm"))
    assert len(written) == 2 and not list((tmp_path / "outbox").iterdir())
    bad_uid = str(broken.SOPInstanceUID)
    assert len(report.refused) == 1 and report.refused[0].startswith(bad_uid)
    (tmp_path / "thick" / thick[-1].name).unlink()  # predict on the same good files
    by_size = {len(read_sr(pydicom.dcmread(p))["slices"]): pydicom.dcmread(p) for p in written}
    assert sorted(by_size) == [3, 4]
    for folder, files, n in ((tmp_path / "thin", thin, 4), (tmp_path / "thick", thick[:-1], 3)):
        per_slice, volume = expected(predictor, folder)
        values = check_sr(by_size[n], files, per_slice, volume)
        assert "of 2 of the source series" in values["algorithm_parameters"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"series {series}"))
    assert "received 10" in line and "skipped 2" in line and "refused 1" in line and "2 volume(s)" in line
    assert f"instance {bad_uid} failed" in caplog.text
    assert MARKER not in caplog.text and PATIENT_ID not in caplog.text
    assert not (tmp_path / "spool" / series).exists()


def test_grad_cam_captures_of_the_top_slices_go_beside_the_sr(
        tmp_path: Path, slices: list[np.ndarray], predictor: Predictor) -> None:
    files = write_ct_series(slices[:4], tmp_path / "series", patient_name=MARKER, patient_id=PATIENT_ID)
    dry = tmp_path / "dry"
    pipeline = Pipeline(predictor, SelectionRules(), tmp_path / "spool", Outbox(tmp_path / "outbox", FolderSender(dry)),
                        cam_top=2)
    _store(pipeline, files)
    report = pipeline.complete(pipeline.open_series()[0])
    assert report.delivery == ["sent"] * 3
    written = [pydicom.dcmread(p) for p in sorted(dry.rglob("*.dcm"))]
    captures = [ds for ds in written if ds.Modality != "SR"]
    per_slice, _ = expected(predictor, tmp_path / "series")
    top = sorted(per_slice, key=per_slice.get, reverse=True)[:2]
    assert [str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in
            sorted(captures, key=lambda ds: ds.InstanceNumber)] == top
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for ds in captures:
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert str(ds.PatientName) == MARKER and ds.PatientID == PATIENT_ID
        assert ds.SeriesInstanceUID not in (source.SeriesInstanceUID, report.reports[0].SeriesInstanceUID)
        assert ds.pixel_array.shape == (256, 256, 3) and ds.pixel_array.std() > 10  # an image, not a blank
        assert "research result" in ds.ImageComments
    assert len({ds.SeriesInstanceUID for ds in captures}) == 1


def test_malformed_instance_is_refused_by_name(tmp_path: Path, predictor: Predictor,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pipeline = Pipeline(predictor, SelectionRules(), tmp_path / "spool",
                        Outbox(tmp_path / "outbox", FolderSender(tmp_path / "dry")))
    outcome = pipeline.accept(_dataset(Modality="CT", SOPInstanceUID="1.2.3", SeriesInstanceUID="not a uid"),
                              "instance from TESTSCU")
    assert outcome.category == REFUSED and "SeriesInstanceUID" in outcome.reason
    assert "instance from TESTSCU refused: missing or invalid SeriesInstanceUID" in caplog.text


def test_node_receives_compressed_series_by_c_store(
        tmp_path: Path, slices: list[np.ndarray], predictor: Predictor) -> None:
    """The node in this process, a pynetdicom SCU sending one series in each lossless compression a PACS may hold
    (RLE, JPEG-LS, JPEG 2000) and an MR image: each series gets its SR with the uncompressed files' probabilities."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

    from crosssite.pacs.node import DicomNode

    syntaxes = (pydicom.uid.RLELossless, pydicom.uid.JPEGLSLossless, pydicom.uid.JPEG2000Lossless)
    plain = write_ct_series(slices[:3], tmp_path / "plain", patient_name=MARKER)
    per_slice, volume = expected(predictor, tmp_path / "plain")
    dry = tmp_path / "dry"
    pipeline = Pipeline(predictor, SelectionRules(), tmp_path / "spool", Outbox(tmp_path / "outbox", FolderSender(dry)))
    node = DicomNode(pipeline, port=0, complete_after_s=0.3).start()
    try:
        ae = AE(ae_title="MODALITY")
        for syntax in syntaxes:
            ae.add_requested_context(CTImageStorage, syntax)
        ae.add_requested_context(MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CROSSSITE")
        assert assoc.is_established
        statuses = []
        for syntax in syntaxes:
            series = pydicom.uid.generate_uid()
            for f in plain:
                ds = pydicom.dcmread(f)
                ds.SeriesInstanceUID = series  # the same slices and SOP Instance UIDs, one series per syntax
                ds.compress(syntax, generate_instance_uid=False)
                statuses.append(assoc.send_c_store(ds).Status)
        mr = pydicom.dcmread(plain[0])
        mr.Modality, mr.SOPClassUID, mr.SeriesInstanceUID = "MR", MRImageStorage, pydicom.uid.generate_uid()
        mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
        statuses.append(assoc.send_c_store(mr).Status)
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        reports = [node.completed.get(timeout=60) for _ in range(len(syntaxes) + 1)]
    finally:
        node.stop()
    assert statuses == [0] * (3 * len(syntaxes) + 1)  # the MR too: accepted, so the PACS's job does not fail
    assert sorted(len(r.volumes) for r in reports) == [0, 1, 1, 1]
    skipped = next(r for r in reports if not r.volumes)
    assert list(skipped.skipped) == ["Modality MR (MR Image Storage), not CT"]
    written = sorted(dry.rglob("*.dcm"))
    assert len(written) == len(syntaxes)
    for path in written:
        got = dict(read_sr(pydicom.dcmread(path))["slices"])
        assert got.keys() == per_slice.keys()
        assert max(abs(got[uid] - p) for uid, p in per_slice.items()) < TOLERANCE


# ----------------------------------------------------------------------------------------------- outbox


def test_failed_send_is_kept_on_disk_and_retried_until_it_succeeds(
        tmp_path: Path, slices: list[np.ndarray], predictor: Predictor) -> None:
    """The peer is down: the SR stays in the outbox; a storage SCP comes up on that port: the outbox's retry
    delivers it and removes the file. An outbox left on disk is picked up by the next one."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage

    port = free_port()
    files = write_ct_series(slices[:3], tmp_path / "series", patient_name=MARKER)
    outbox = Outbox(tmp_path / "outbox", CStoreSender("127.0.0.1", port, "PEER", timeout_s=5))
    pipeline = Pipeline(predictor, SelectionRules(), tmp_path / "spool", outbox)
    _store(pipeline, files)
    report = pipeline.complete(pipeline.open_series()[0])
    assert report.delivery[0].startswith("queued (C-STORE PEER@127.0.0.1")
    kept = outbox.pending()
    assert len(kept) == 1 and kept[0].is_file()
    sr_uid = report.reports[0].SOPInstanceUID

    # a second outbox on the same folder (the node restarted) finds the result left there
    assert Outbox(tmp_path / "outbox", outbox.sender).pending() == kept
    # so does a second pipeline on the same spool, for a series received but not scored before a stop
    _store(pipeline, files[:2])
    restarted = Pipeline(predictor, SelectionRules(), tmp_path / "spool",
                         Outbox(tmp_path / "outbox2", FolderSender(tmp_path / "dry")))
    assert restarted.open_series() == [str(pydicom.dcmread(files[0]).SeriesInstanceUID)]
    again = restarted.complete(restarted.open_series()[0])
    assert again.received == 2 and len(again.volumes[0].slices) == 2 and again.delivery == ["sent"]

    received: list[str] = []

    def on_store(event: object) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="PEER")
    ae.add_supported_context(ComprehensiveSRStorage)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        outbox.start()
        deadline = time.monotonic() + 20
        while outbox.pending() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        outbox.stop()
        server.shutdown()
    assert received == [sr_uid] and not outbox.pending() and not kept[0].exists()


# ---------------------------------------------------------------------------------------------- Orthanc


@pytest.fixture(scope="module")
def orthanc_installed() -> None:
    if find_orthanc() is None:
        message = "needs Orthanc and its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)"
        if os.environ.get("CROSSSITE_REQUIRE_ORTHANC") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _wait_for_sr(orthanc: OrthancProcess, study_uid: str, n: int = 1, timeout_s: float = 60.0) -> list[str]:
    """Orthanc ids of the SR instances of the study, once there are ``n`` of them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = orthanc.find("Instance", {"StudyInstanceUID": study_uid, "Modality": "SR"})
        if len(found) >= n:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no SR in Orthanc's study {study_uid} after {timeout_s:g} s; see {orthanc.log}")


def test_orthanc_routes_a_ct_series_to_the_node_and_stores_its_sr(
        tmp_path: Path, orthanc_installed: None, slices: list[np.ndarray], predictor: Predictor) -> None:
    """`crosssite dicom-node` (the command, in its own process) is a modality of a real Orthanc that routes every
    stable CT series to it; the SR comes back into the same study of Orthanc."""
    node_port = free_port()
    files = write_ct_series(slices, tmp_path / "series", patient_name=MARKER, patient_id=PATIENT_ID)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    orthanc = OrthancProcess(tmp_path / "orthanc", node=("CROSSSITE", "127.0.0.1", node_port), stable_age_s=1)
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:  # the node loads its model while Orthanc starts
        node = subprocess.Popen(
            [sys.executable, "-m", "crosssite", "dicom-node", "--port", str(node_port),
             "--send-to", f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}", "--complete-after", "0.5",
             "--spool", str(tmp_path / "spool")], stdout=log, stderr=subprocess.STDOUT)
    with orthanc:
        try:
            deadline = time.monotonic() + 60
            while "listening on" not in log_path.read_text() and time.monotonic() < deadline:
                assert node.poll() is None, log_path.read_text()
                time.sleep(0.1)
            for f in files:
                orthanc.upload(f)
            sr_ids = _wait_for_sr(orthanc, study_uid)
            sr = pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{sr_ids[0]}/file")))
        finally:
            node.terminate()
            node.wait(timeout=30)
    per_slice, volume = expected(predictor, tmp_path / "series")
    check_sr(sr, files, per_slice, volume)
    assert len(sr_ids) == 1  # the SR itself is not routed back, nor scored
    log_text = log_path.read_text()
    assert "received 8, skipped 0, refused 0, scored 8 slice(s) in 1 volume(s), reports 1 sent" in log_text
    assert MARKER not in log_text and "Quokka" not in log_text and PATIENT_ID not in log_text


def test_predict_dicomweb_pulls_a_study_and_stores_its_sr_back(
        tmp_path: Path, orthanc_installed: None, slices: list[np.ndarray], predictor: Predictor,
        caplog: pytest.LogCaptureFixture) -> None:
    """`crosssite predict --dicomweb URL --study UID` against Orthanc's DICOMweb plugin: QIDO-RS and WADO-RS pull
    the study (its CT series scored, its MR series not), STOW-RS stores the SR, QIDO-RS finds it there."""
    from typer.testing import CliRunner

    from crosssite.cli import app
    from crosssite.pacs.dicomweb import dicomweb_client

    caplog.set_level(logging.INFO)
    study = pydicom.uid.generate_uid()
    files = write_ct_series(slices[:6], tmp_path / "series", patient_name=MARKER, patient_id=PATIENT_ID,
                            study_uid=study)
    mr = write_ct_series(slices[:2], tmp_path / "mr", patient_name=MARKER, patient_id=PATIENT_ID, study_uid=study,
                         modality="MR", series_number=2)
    with OrthancProcess(tmp_path / "orthanc") as orthanc:
        for f in files + mr:
            orthanc.upload(f)
        result = CliRunner().invoke(app, ["predict", "--dicomweb", orthanc.dicomweb, "--study", study],
                                    catch_exceptions=False, env={"CROSSSITE_CACHE": str(tmp_path / "cache")})
        assert result.exit_code == 0, result.output
        client = dicomweb_client(orthanc.dicomweb)
        found = client.search_for_series(study_instance_uid=study, search_filters={"Modality": "SR"})
        assert len(found) == 1
        sr_series = found[0]["0020000E"]["Value"][0]
        (sr,) = client.retrieve_series(study, sr_series)
        # --dry-run: the same SR in a folder, nothing stored
        dry = CliRunner().invoke(app, ["predict", "--dicomweb", orthanc.dicomweb, "--study", study, "--dry-run",
                                       str(tmp_path / "dry")], env={"CROSSSITE_CACHE": str(tmp_path / "cache")})
        assert dry.exit_code == 0, dry.output
        assert len(client.search_for_series(study_instance_uid=study, search_filters={"Modality": "SR"})) == 1
    (written,) = (tmp_path / "dry" / study).glob("*.dcm")
    dry_slices, stored = dict(read_sr(pydicom.dcmread(written))["slices"]), dict(read_sr(sr)["slices"])
    assert dry_slices.keys() == stored.keys() and max(abs(dry_slices[u] - stored[u]) for u in stored) < TOLERANCE
    per_slice, volume = expected(predictor, tmp_path / "series")
    check_sr(sr, files, per_slice, volume)
    assert f"P(COVID) {volume:.4f}" in result.output and "SR sent" in result.output
    assert "skipped: Modality MR" in caplog.text
    for text in (caplog.text, result.output):
        assert MARKER not in text and "Quokka" not in text and PATIENT_ID not in text
