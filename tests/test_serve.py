"""`crosssite serve`: the HTTP API on real slices of both sites and on DICOM / NIfTI made here -- results equal
to `Predictor`'s, per-file errors, upload limits, zip bombs, the token, privacy of DICOM attributes, the
queue, micro-batching, Grad-CAM, the ONNX int8 backend and the command line."""

from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from crosssite.models.adaptation import DEFAULT_STRATEGY
from crosssite.cli import app as cli
from crosssite.data import read_image
from crosssite.inference import Predictor
from crosssite.serve import Limits, MicroBatcher, Service, Upload
from crosssite.serve.app import create_app
from test_inference import IMAGE_SIZE, real_files, save_tiny_model, site_images, write_dicom_series

TOKEN = "s3cret-token"
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-4711", "PatientBirthDate": "19700101",
           "OtherPatientIDs": "OTHER-0815"}


@pytest.fixture(scope="module")
def files(site_a_path: Path, site_b_path: Path) -> list[Path]:
    """Four real slices of each site (two per class)."""
    return real_files(site_a_path, site_b_path)[2]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory, files: list[Path]) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("serve-model") / "model", site_images(files))


def client_for(model: Path, limits: Limits = Limits(), token: str | None = None, **kwargs: object) -> TestClient:
    service = Service.from_file(model, limits=limits, top_k=3, **kwargs)
    return TestClient(create_app(service, token=token))


@pytest.fixture(scope="module")
def client(model_path: Path):
    with client_for(model_path) as c:
        yield c


def upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (p.name, p.read_bytes())) for p in paths]


def post(client: TestClient, files: list, query: str = "", **kwargs: object):
    return client.post(f"/v1/predict{query}", files=files, **kwargs)


def slice_rows(answer: dict) -> list[dict]:
    return [s for f in answer["files"] for s in f["slices"]]


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def with_patient(paths: list[Path]) -> list[Path]:
    """Give DICOM files the patient attributes that must never leave the server."""
    import pydicom

    for p in paths:
        ds = pydicom.dcmread(p)
        for key, value in PATIENT.items():
            setattr(ds, key, value)
        ds.save_as(p, enforce_file_format=True)
    return paths


def dicom_series(folder: Path, files: list[Path], n: int = 5) -> list[Path]:
    return with_patient(write_dicom_series(folder, [read_image(f)[:120, :160] for f in files[:n]]))


# --------------------------------------------------------------------------------------------- results


def test_real_slices_of_both_sites_equal_predictor(client: TestClient, model_path: Path, files: list[Path]) -> None:
    response = post(client, upload(files))
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = Predictor.from_file(model_path, adapt=DEFAULT_STRATEGY).predict(files)
    rows = slice_rows(answer)
    assert [r["name"] for r in rows] == [f.name for f in files]
    np.testing.assert_allclose([r["p_covid"] for r in rows], [r.p_covid for r in expected], rtol=0, atol=1e-5)
    assert [r["label"] for r in rows] == [r.label for r in expected]
    assert np.std([r["p_covid"] for r in rows]) > 0.05  # the test model tells the slices apart
    assert answer["normalisation"] == "mean-of-sites+standardise" and answer["counts"] == {
        "files": 8, "slices": 8, "volumes": 0, "errors": 0, "warnings": 0}
    assert answer["model"]["id"] == "model" and answer["model"]["version"].startswith("sha256:")
    assert answer["model"]["backend"] == "pytorch" and "not a medical device" in answer["notice"]
    assert "cam_png" not in rows[0] and "image_png" not in rows[0]  # pixels only when asked for
    assert response.headers["cache-control"] == "no-store"


def test_site_normalisation(model_path: Path, files: list[Path]) -> None:
    with client_for(model_path, site="B") as c:
        answer = post(c, upload(files[:3])).json()
    expected = Predictor.from_file(model_path, site="B").predict(files[:3])
    assert answer["normalisation"] == "B"
    np.testing.assert_allclose([r["p_covid"] for r in slice_rows(answer)], [r.p_covid for r in expected], atol=1e-5)


def test_corrupt_file_fails_alone(client: TestClient, files: list[Path]) -> None:
    parts = upload(files[:2]) + [("files", ("broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"))]
    parts += upload(files[6:7])
    response = post(client, parts)
    assert response.status_code == 200
    answer = response.json()
    assert [f["file"] for f in answer["files"]] == [files[0].name, files[1].name, "broken.jpg", files[6].name]
    broken = answer["files"][2]
    assert broken["slices"] == [] and len(broken["errors"]) == 1 and broken["errors"][0]["name"] == "broken.jpg"
    assert broken["errors"][0]["error"] and "crosssite-serve-" not in response.text  # no server path leaks
    assert answer["counts"]["slices"] == 3 and answer["counts"]["errors"] == 1


def test_empty_uploads(client: TestClient, files: list[Path]) -> None:
    response = client.post("/v1/predict", data={"note": "no file"})
    assert response.status_code == 400 and "no files uploaded" in response.json()["detail"]
    answer = post(client, [("files", ("empty.png", b""))] + upload(files[:1])).json()
    assert answer["files"][0]["errors"] == [{"name": "empty.png", "error": "empty file (0 bytes)"}]
    assert len(answer["files"][1]["slices"]) == 1


def test_too_many_files(model_path: Path, files: list[Path]) -> None:
    with client_for(model_path, Limits(max_files=2)) as c:
        response = post(c, upload(files[:3]))
    assert response.status_code == 400 and "Too many files" in response.json()["detail"]


def test_oversize_upload_refused(model_path: Path, files: list[Path]) -> None:
    limit = 64 * 1024
    big = np.random.default_rng(0).integers(0, 255, (400, 400), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="PNG")  # ~160 KB of noise
    with client_for(model_path, Limits(max_upload_bytes=limit)) as c:
        response = post(c, [("files", ("big.png", buffer.getvalue()))])
        assert response.status_code == 413 and "limit of 0.0625 MiB" in response.json()["detail"]

        def chunks():  # no Content-Length: the limit counts the bytes as they arrive
            for _ in range(40):
                yield b"x" * 4096

        streamed = c.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert streamed.status_code == 413
        assert post(c, upload(files[:1])).status_code == 200  # a small one still passes


def test_zip_bomb_and_unsafe_archives_refused(model_path: Path, files: list[Path]) -> None:
    bomb = zip_bytes({"zeros.dcm": bytes(64 * 2**20)})  # 64 MiB of zeros in ~64 KB
    assert len(bomb) < 2**20
    traversal = zip_bytes({"../../evil.png": files[0].read_bytes()})
    many = zip_bytes({f"s{i}.png": b"x" for i in range(20)})
    with client_for(model_path, Limits(max_unzipped_bytes=8 * 2**20, max_zip_entries=10)) as c:
        parts = [("files", ("bomb.zip", bomb)), ("files", ("trav.zip", traversal)), ("files", ("many.zip", many))]
        answer = post(c, parts + upload(files[:1])).json()
    errors = {f["file"]: f["errors"] for f in answer["files"]}
    assert "decompresses to 64 MiB, more than the limit of 8 MiB" in errors["bomb.zip"][0]["error"]
    assert "unsafe path" in errors["trav.zip"][0]["error"]
    assert "holds 20 files, more than the limit of 10" in errors["many.zip"][0]["error"]
    assert answer["files"][3]["slices"][0]["name"] == files[0].name  # the good file is still scored


def test_zip_whose_headers_understate_the_size_is_refused(tmp_path: Path) -> None:
    """A member bigger than its headers say (4 MiB declared as 100 bytes) never gets past the limit: extraction
    stops at the declared size and the archive is refused (its checksum fails)."""
    from crosssite.serve.uploads import UploadError, extract_zip

    data = bytearray(zip_bytes({"a.dcm": bytes(4 * 2**20)}))
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    data[local + 22 : local + 26] = (100).to_bytes(4, "little")  # the local and central headers claim 100 bytes
    data[central + 24 : central + 28] = (100).to_bytes(4, "little")
    with pytest.raises(UploadError, match="member 'a.dcm' cannot be extracted .*archive refused"):
        extract_zip(io.BytesIO(bytes(data)), tmp_path / "x", max_bytes=2**20, max_entries=10)


def test_dicom_series_zip_and_nifti_volume(client: TestClient, model_path: Path, files: list[Path],
                                           tmp_path: Path) -> None:
    series = dicom_series(tmp_path / "series", files)
    archive = zip_bytes({f"study/series/{p.name}": p.read_bytes() for p in series})
    greys = [read_image(f)[:120, :160] for f in files[:4]]
    volume = np.stack([np.round(g.T[::-1, ::-1] * 1500.0 - 1350.0) for g in greys], axis=-1)
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), np.eye(4)), nifti)
    answer = post(client, [("files", ("ct.zip", archive))] + upload([nifti])).json()

    expected = Predictor.from_file(model_path, adapt=DEFAULT_STRATEGY, top_k=3).predict([tmp_path / "series", nifti])
    zipped, nii = answer["files"]
    assert [s["name"] for s in zipped["slices"]] == [f"ct.zip/study/series/{Path(r.path).name}"
                                                     for r in expected[:5]]  # patient-axis order
    assert {s["volume"] for s in zipped["slices"]} == {"ct.zip/study/series"}
    assert [s["slice"] for s in zipped["slices"]] == list(range(5))
    (vol,) = zipped["volumes"]
    assert (vol["name"], vol["n_slices"], vol["top_k"]) == ("ct.zip/study/series", 5, 3)
    assert vol["p_covid"] == pytest.approx(expected[5].p_covid, abs=1e-5)
    assert vol["p_covid"] == pytest.approx(np.sort([s["p_covid"] for s in zipped["slices"]])[-3:].mean(), abs=1e-9)
    assert [(s["name"], s["frame"]) for s in nii["slices"]] == [("scan.nii.gz", k) for k in range(4)]
    np.testing.assert_allclose([s["p_covid"] for s in nii["slices"]], [r.p_covid for r in expected[6:10]],
                               atol=1e-5)
    assert nii["volumes"][0]["p_covid"] == pytest.approx(expected[10].p_covid, abs=1e-5)


def test_patient_attributes_never_in_response_or_log(client: TestClient, files: list[Path], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    series = dicom_series(tmp_path / "series", files, n=3)
    truncated = series[0].read_bytes()[:-300]  # pixel data cut short: an error row for a file with a patient
    archive = zip_bytes({p.name: p.read_bytes() for p in series})
    parts = [("files", ("series.zip", archive)), ("files", ("one.dcm", series[1].read_bytes())),
             ("files", ("cut.dcm", truncated))]
    with caplog.at_level(logging.DEBUG):
        response = post(client, parts, "?cam=true&images=true")
    assert response.status_code == 200
    answer = response.json()
    assert {k: v for k, v in answer["counts"].items() if k != "warnings"} == {"files": 3, "slices": 4, "volumes": 1,
                                                                             "errors": 1}
    assert answer["files"][2]["errors"][0]["name"] == "cut.dcm"
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "scored 3 file(s)" in caplog.text
    # base64 PNGs (overlays, slice images) are left out of the text searched: a short name like "Doe" occurs in
    # random base64 by chance; the pixels carry no DICOM attribute
    text = json.dumps(_without_pngs(answer))
    assert '"cam_png"' in response.text  # the images were there, and are only skipped in the search
    for value in [*PATIENT.values(), "Doe", "Jane"]:
        assert value not in text and value not in logged, value


def _without_pngs(value):
    if isinstance(value, dict):
        return {k: _without_pngs(v) for k, v in value.items() if not k.endswith("_png")}
    if isinstance(value, list):
        return [_without_pngs(v) for v in value]
    return value


def test_grad_cam_overlay(client: TestClient, model_path: Path, files: list[Path], tmp_path: Path) -> None:
    answer = post(client, upload(files[:2]), "?cam=true").json()
    Predictor.from_file(model_path, adapt=DEFAULT_STRATEGY).predict(files[:2], cam_dir=tmp_path / "cam")
    expected = sorted((tmp_path / "cam").glob("*.png"))
    for row, png in zip(slice_rows(answer), expected):
        cam = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["cam_png"]))))
        assert cam.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        np.testing.assert_array_equal(cam, np.asarray(Image.open(png)))  # the overlay `predict --cam` writes
        grey = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["image_png"]))))
        assert grey.shape == (IMAGE_SIZE, IMAGE_SIZE) and grey.std() > 10


# ----------------------------------------------------------------------------------------- access, API


def test_token(model_path: Path, files: list[Path]) -> None:
    with client_for(model_path, token=TOKEN) as c:
        missing = post(c, upload(files[:1]))
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["detail"] == "missing bearer token"
        wrong = post(c, upload(files[:1]), headers={"Authorization": "Bearer s3cret-tokeN"})
        assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong bearer token"
        assert c.get("/v1/model", headers={"Authorization": "Basic s3cret-token"}).status_code == 401
        assert c.get("/v1/model").status_code == 401
        good = post(c, upload(files[:1]), headers={"Authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200 and good.json()["counts"]["slices"] == 1
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # probes, viewer: open


def test_model_card_probes_viewer_and_openapi(client: TestClient, model_path: Path) -> None:
    card = client.get("/v1/model").json()
    assert card["architecture"] == "covidnet_redesign" and card["site_names"] == ["A", "B"]
    assert card["preprocessing"]["image_size"] == IMAGE_SIZE and card["grad_cam"] is True
    assert card["normalisation"] == "mean-of-sites+standardise" and card["top_k"] == 3 and "metrics" in card
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["forward_passes"] >= 1 and ready.json()["capacity"] == Limits().max_pending
    page = client.get("/")
    assert "not a medical device" in page.text and "/static/viewer.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/viewer.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200
    assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "http://x"}).headers


def test_not_ready_outside_lifespan(model_path: Path) -> None:
    service = Service.from_file(model_path)
    response = TestClient(create_app(service)).get("/readyz")  # no lifespan: the worker never started
    assert response.status_code == 503 and response.json()["status"] == "not ready"


def server_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("crosssite-serve-*"))


def test_timeout_answers_504_and_cleans_up(model_path: Path, files: list[Path]) -> None:
    before = server_folders()
    service = Service.from_file(model_path, limits=Limits(timeout_s=0.001), max_wait_s=0.05)
    with TestClient(create_app(service)) as c:
        response = post(c, upload(files[:2]))
        assert response.status_code == 504 and "timeout of 0.001 s" in response.json()["detail"]
        deadline = time.monotonic() + 20
        while service.pending and time.monotonic() < deadline:  # the abandoned work finishes, then frees its slot
            time.sleep(0.02)
        assert service.pending == 0
    assert server_folders() <= before  # its private folder is gone too


def test_full_queue_answers_503(model_path: Path, files: list[Path]) -> None:
    service = Service.from_file(model_path, limits=Limits(max_pending=2, retry_after_s=7))
    with TestClient(create_app(service)) as c:
        assert service.try_admit() and service.try_admit()  # two requests in flight
        busy = post(c, upload(files[:1]))
        assert busy.status_code == 503 and busy.headers["retry-after"] == "7"
        service.release()
        assert post(c, upload(files[:1])).status_code == 200
        assert service.pending == 1  # the request gave its slot back


# ------------------------------------------------------------------------------------- micro-batching


def test_micro_batcher_merges_and_splits() -> None:
    calls: list[int] = []

    def run(x: torch.Tensor) -> np.ndarray:
        calls.append(len(x))
        return x[:, 0, 0, 0].double().numpy()

    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.5)
    batcher.start()
    inputs = [torch.full((n, 3, 2, 2), float(k)) for k, n in enumerate([1, 2, 3])]
    out: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, batcher.submit(inputs[k]))) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [6]  # one forward for the three jobs
    for k, n in enumerate([1, 2, 3]):
        np.testing.assert_array_equal(out[k], np.full(n, float(k)))
    assert batcher.submit(torch.zeros(9, 3, 2, 2)).shape == (9,)  # a job larger than a batch runs alone
    batcher.stop()
    assert calls[-1] == 9 and batcher.stats.merged == 1 and batcher.stats.largest == 9


def test_micro_batcher_carries_over_and_reports_failures() -> None:
    calls: list[int] = []

    def run(x: torch.Tensor) -> np.ndarray:
        calls.append(len(x))
        if (x < 0).any():
            raise RuntimeError("forward failed")
        return np.zeros(len(x))

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.3)
    batcher.start()
    errors: list[str] = []

    def submit(x: torch.Tensor) -> None:
        try:
            batcher.submit(x)
        except RuntimeError as e:
            errors.append(str(e))

    jobs = [torch.zeros(3, 1), torch.zeros(3, 1), -torch.ones(1, 1)]
    threads = [threading.Thread(target=submit, args=(x,)) for x in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.stop()
    assert sorted(calls) == [3, 4]  # 3 + 3 exceeds 4: the second job waits for the next batch
    assert errors == ["forward failed"] * 2  # the failing forward's two jobs both hear of it


def test_concurrent_requests_share_forward_passes(model_path: Path, files: list[Path]) -> None:
    service = Service.from_file(model_path, max_wait_s=0.3)
    expected = {r.path: r.p_covid for r in Predictor.from_file(model_path, adapt=DEFAULT_STRATEGY).predict(files[:4])}
    answers: dict[int, dict] = {}
    with TestClient(create_app(service)) as c:
        before = service.batcher.stats.batches
        threads = [threading.Thread(target=lambda k=k: answers.__setitem__(k, post(c, upload([files[k]])).json()))
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert service.batcher.stats.batches - before < 4 and service.batcher.stats.merged >= 1
    for k in range(4):
        assert slice_rows(answers[k])[0]["p_covid"] == pytest.approx(expected[str(files[k])], abs=1e-5)


# ---------------------------------------------------------------------------------------- ONNX, CLI


def test_onnx_int8_backend(model_path: Path, site_a_path: Path, files: list[Path], tmp_path: Path) -> None:
    from crosssite.inference import export_int8

    done = export_int8(model_path, tmp_path / "m.int8.onnx", [site_a_path / "COVID"], site="A", max_slices=16)
    with client_for(done.path) as c:
        card = c.get("/v1/model").json()
        assert card["backend"] == "onnxruntime" and card["grad_cam"] is False and card["normalisation"] == "A+standardise"
        assert card["quantization"]["calibration_slices"] == 16 and card["id"] == "m.int8"
        answer = post(c, upload(files[:3]), "?images=true").json()
        refused = post(c, upload(files[:1]), "?cam=true")
    expected = Predictor.from_file(done.path, adapt=DEFAULT_STRATEGY).predict(files[:3])
    np.testing.assert_allclose([r["p_covid"] for r in slice_rows(answer)], [r.p_covid for r in expected], atol=1e-6)
    assert all(r["image_png"] for r in slice_rows(answer)) and answer["model"]["backend"] == "onnxruntime"
    assert refused.status_code == 400 and "ONNX export" in refused.json()["detail"]


def test_adabn_at_start_up(model_path: Path, files: list[Path], site_b_path: Path) -> None:
    service = Service.from_file(model_path, adapt=[site_b_path / "CT_COVID"])
    assert service.direct.norm.startswith("adabn:")
    out = service.direct.predict(files[:2])
    with TestClient(create_app(service)) as c:
        answer = post(c, upload(files[:2])).json()
    assert answer["normalisation"] == service.direct.norm
    np.testing.assert_allclose([r["p_covid"] for r in slice_rows(answer)], [r.p_covid for r in out], atol=1e-5)


def test_direct_service_call(model_path: Path, files: list[Path]) -> None:
    service = Service.from_file(model_path)
    service.start()
    try:
        with open(files[0], "rb") as f:
            answer = service.predict([Upload("../../etc/x.png", f)])
    finally:
        service.stop()
    assert answer["files"][0]["file"] == "x.png" and json.dumps(answer)


def test_cli_errors_are_one_line(model_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli, ["serve", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and missing.output.startswith("error: ") and "Traceback" not in missing.output
    both = runner.invoke(cli, ["serve", str(model_path), "--site", "A", "--adapt", str(tmp_path)])
    assert both.exit_code == 1 and "not both" in both.output
    unknown = runner.invoke(cli, ["serve", str(model_path), "--site", "Z"])
    assert unknown.exit_code == 1 and "unknown site 'Z'" in unknown.output


def test_cors_only_for_the_origins_given(model_path: Path) -> None:
    service = Service.from_file(model_path)
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with TestClient(create_app(service, cors_origins=["https://pacs.example"])) as c:
        allowed = c.options("/v1/predict", headers={"Origin": "https://pacs.example", **preflight})
        other = c.options("/v1/predict", headers={"Origin": "https://evil.example", **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://pacs.example"
    assert "access-control-allow-origin" not in other.headers


# --------------------------------------------------------------------------------- warnings, like the CLI


def test_answer_carries_every_warning_the_cli_prints(client: TestClient, files: list[Path], tmp_path: Path) -> None:
    """An MR DICOM and a 4 x 4 slice are scored with the CLI's warnings, per slice and per file; every slice
    and volume row has ``ood`` / ``ood_score``, equal to `Predictor`'s."""
    import pydicom

    (mr,) = write_dicom_series(tmp_path / "mr", [read_image(files[0])[:120, :160]])
    ds = pydicom.dcmread(mr)
    ds.Modality = "MR"
    ds.save_as(mr, enforce_file_format=True)
    tiny = io.BytesIO()
    Image.fromarray(np.full((4, 4), 90, np.uint8)).save(tiny, format="PNG")
    series = zip_bytes({p.name: p.read_bytes() for p in dicom_series(tmp_path / "series", files, n=3)})
    answer = post(client, [("files", ("mr.dcm", mr.read_bytes())), ("files", ("tiny.png", tiny.getvalue())),
                           ("files", ("ct.zip", series))] + upload(files[:1])).json()
    mr_file, tiny_file, ct_file, real = answer["files"]
    assert mr_file["slices"][0]["warnings"][0].startswith("Modality MR, not CT")
    assert mr_file["warnings"][0].startswith("mr.dcm: Modality MR, not CT")
    assert "below the minimum" in tiny_file["slices"][0]["warnings"][0]
    assert tiny_file["warnings"] and tiny_file["warnings"][0].startswith("tiny.png: image of 4 x 4 pixels")
    rows = [*slice_rows(answer), *ct_file["volumes"]]
    assert all(isinstance(r["ood"], bool) and r["ood_score"] > 0 for r in rows)
    for r in rows:  # the flag and its warning go together
        assert r["ood"] == any(w.startswith("far from every training site") for w in r["warnings"])
    assert not [w for w in real["slices"][0]["warnings"] if not w.startswith("far from")]
    assert answer["counts"]["warnings"] == sum(len(f["warnings"]) for f in answer["files"]) >= 2
    assert answer["ood_threshold"] > 0
