"""Run crosssite's fault matrix: bad inputs, bad options and abuse of the service, one row per case.

    python scripts/fault_matrix.py [--data ../shared/data] [--out FILE.md]

Each case runs the real command (in-process through typer's runner; `serve` start-up as a subprocess; the HTTP
API through FastAPI's test client on a started service) in a fresh temporary folder with the shipped model and
real slices of site A, and is classed as

* ``named error``: exit status 1 (HTTP 4xx/5xx, or the file's own error row) with one ``error: ...`` line, or
  a refusal the answer names;
* ``warning``: the command went on and said what was odd (a ``warning:`` line, or the answer's ``warnings``);
* ``ok``: a good input that gave its answer;
* ``traceback``: a Python traceback reached the person;
* ``silent``: a bad input that gave no word at all;
* ``unformatted``: a library's own warning or path reached the output.

The table (markdown) goes to stdout or ``--out``; docs/RELIABILITY.md holds the latest one with the command and
the machine that produced it, so a review reruns the matrix instead of rebuilding it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# a slice of site A the shipped model places near its training sites; some others of site A lie past the
# out-of-distribution threshold (Covid (1004).png: ood_score 1.43), which is a warning, not a fault
GOOD_SLICE = "Covid_(1).png"
LIBRARY_NOISE = re.compile(r"\w+Warning: |site-packages/|dist-packages/")


@dataclass
class Outcome:
    """What one case gave: its exit status (or HTTP status), its output, and whether a traceback escaped."""

    status: int
    output: str
    traceback: bool = False
    warned: bool = False  # a warning reached the person (a line, or the API answer's warnings)


@dataclass
class Case:
    area: str
    name: str
    command: str
    run: Callable[[], Outcome]
    expect: str  # "error", "warning" or "ok"


def classify(case: Case, outcome: Outcome) -> str:
    if outcome.traceback or "Traceback (most recent call last)" in outcome.output:
        return "traceback"
    if LIBRARY_NOISE.search(outcome.output):
        return "unformatted"
    if outcome.status != 0:
        lines = [line for line in outcome.output.splitlines() if line.startswith("error: ")]
        return "named error" if lines or case.area == "serve (HTTP)" else "unformatted"
    if outcome.warned or "warning: " in outcome.output:
        return "warning"
    return "ok" if case.expect == "ok" else "silent"


# ---------------------------------------------------------------------------------------------- fixtures


def make_fixtures(work: Path, data: Path) -> dict[str, Path]:
    """The shipped model, a labelled folder site of real slices of site A, and a folder of bad files."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    site = work / "site"
    for cls, source in (("covid", "COVID"), ("normal", "non-COVID")):
        (site / cls).mkdir(parents=True)
        for f in sorted((data / "sars_cov2_ct" / source).glob("*.png"))[:8]:
            shutil.copy(f, site / cls / f.name.replace(" ", "_"))
    bad = work / "bad"
    bad.mkdir()
    (bad / "empty.dcm").write_bytes(b"")
    with open(bad / "zeros.dcm", "wb") as f:
        f.truncate(20 * 2**20)
    (bad / "random.dcm").write_bytes(np.random.default_rng(0).integers(0, 256, 65536, np.uint8).tobytes())
    good = (site / "covid").iterdir().__next__().read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 3])
    (bad / "text.png").write_text("not an image\n")
    Image.new("1", (10000, 10000)).save(bad / "huge.png")
    Image.fromarray(np.full((4, 4), 90, np.uint8)).save(bad / "tiny.png")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.full((64, 64), -800, np.int16).tobytes()
    ds.save_as(bad / "mr.dcm", enforce_file_format=True)
    del ds.PixelData
    ds.save_as(bad / "nopixels.dcm", enforce_file_format=True)
    (bad / "empty_folder").mkdir()
    mixed = work / "mixed"
    shutil.copytree(site, mixed)
    shutil.copy(bad / "mr.dcm", mixed / "normal" / "mr.dcm")
    broken = work / "broken_site"
    shutil.copytree(site, broken)
    shutil.copy(bad / "truncated.png", broken / "covid" / "truncated.png")
    (work / "file").write_text("a file, not a folder\n")
    from safetensors.torch import load_file, save_file

    from crosssite.pretrained import shipped_model

    shipped = shipped_model()
    state = load_file(f"{shipped}.safetensors")
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first].clone().fill_(float("nan"))  # as a diverged run of an older version wrote it
    save_file(state, work / "nan.safetensors")
    shutil.copy(f"{shipped}.json", work / "nan.json")
    return {"model": shipped, "site": site, "bad": bad, "mixed": mixed, "broken": broken, "work": work}


# ------------------------------------------------------------------------------------------------ runners


def cli(args: list[str]) -> Callable[[], Outcome]:
    def run() -> Outcome:
        from typer.testing import CliRunner

        from crosssite.cli import app

        result = CliRunner().invoke(app, args)
        escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
        return Outcome(result.exit_code, result.output, traceback=escaped)

    return run


def process(args: list[str], timeout: float = 120) -> Callable[[], Outcome]:
    def run() -> Outcome:
        try:
            done = subprocess.run([sys.executable, "-m", "crosssite", *args], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return Outcome(0, f"still running after {timeout:g} s: {(e.stderr or b'')[-200:]!r}")
        return Outcome(done.returncode, done.stdout + done.stderr)

    return run


def http_cases(fx: dict[str, Path]) -> list[Case]:
    """Requests to the API of a started service (the TestClient runs its lifespan)."""
    from fastapi.testclient import TestClient

    from crosssite.serve import Limits, Service
    from crosssite.serve.app import create_app

    state: dict[str, TestClient] = {}

    def client() -> TestClient:
        if "c" not in state:
            service = Service.from_file(fx["model"], limits=Limits(max_unzipped_bytes=64 * 2**20, timeout_s=20))
            state["c"] = TestClient(create_app(service, token="t0ken")).__enter__()
        return state["c"]

    auth = {"Authorization": "Bearer t0ken"}

    def post(files: list, query: str = "", headers: dict | None = None) -> Callable[[], Outcome]:
        def run() -> Outcome:
            r = client().post(f"/v1/predict{query}", files=files, headers=auth if headers is None else headers)
            if r.status_code != 200:
                return Outcome(r.status_code, f"HTTP {r.status_code}: {r.json().get('detail')}")
            answer = r.json()
            errors = [e["error"] for f in answer["files"] for e in f["errors"]]
            warnings = [w for f in answer["files"] for w in f["warnings"]]
            text = "; ".join(errors or warnings) or json.dumps(answer["counts"])
            return Outcome(1 if errors else 0, f"HTTP 200: {text}", warned=bool(warnings))

        return run

    def get(path: str, headers: dict | None = None) -> Callable[[], Outcome]:
        def run() -> Outcome:
            r = client().get(path, headers=headers or {})
            return Outcome(0 if r.status_code == 200 else r.status_code, f"HTTP {r.status_code}: "
                           + (r.json().get("detail", "") if r.status_code != 200 else "model card"))

        return run

    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.dcm", bytes(200 * 2**20))
    traversal = io.BytesIO()
    with zipfile.ZipFile(traversal, "w") as z:
        z.writestr("../../etc/x.png", (fx["bad"] / "tiny.png").read_bytes())
    slice_png = fx["site"] / "covid" / GOOD_SLICE
    bad = fx["bad"]
    area = "serve (HTTP)"
    return [
        Case(area, "good slice", "POST /v1/predict slice.png", post([("files", ("s.png", slice_png.read_bytes()))]), "ok"),
        Case(area, "no token", "POST /v1/predict without Authorization", post([("files", ("s.png", b"x"))], headers={}), "error"),
        Case(area, "token in the URL", "GET /v1/model?token=...", get("/v1/model?token=t0ken"), "error"),
        Case(area, "zip bomb (200 MiB of zeros in 200 KB)", "POST bomb.zip", post([("files", ("bomb.zip", bomb.getvalue()))]), "error"),
        Case(area, "zip with ../ member", "POST trav.zip", post([("files", ("trav.zip", traversal.getvalue()))]), "error"),
        Case(area, "20 MB zero-filled .dcm", "POST zeros.dcm", post([("files", ("zeros.dcm", (bad / "zeros.dcm").read_bytes()))]), "error"),
        Case(area, "random-byte .dcm", "POST random.dcm", post([("files", ("random.dcm", (bad / "random.dcm").read_bytes()))]), "error"),
        Case(area, "10000 x 10000 PNG", "POST huge.png", post([("files", ("huge.png", (bad / "huge.png").read_bytes()))]), "error"),
        Case(area, "MR DICOM", "POST mr.dcm", post([("files", ("mr.dcm", (bad / "mr.dcm").read_bytes()))]), "warning"),
        Case(area, "4 x 4 image", "POST tiny.png", post([("files", ("tiny.png", (bad / "tiny.png").read_bytes()))]), "warning"),
        Case(area, "empty upload", "POST empty.png (0 bytes)", post([("files", ("empty.png", b""))]), "error"),
        Case(area, "Grad-CAM overlay", "POST ?cam=true", post([("files", ("s.png", slice_png.read_bytes()))], "?cam=true"), "ok"),
    ]


def cases(fx: dict[str, Path]) -> list[Case]:
    m, site, bad, work = str(fx["model"]), fx["site"], fx["bad"], fx["work"]
    out = str(work / "out")
    port = _busy_port()
    w = lambda p: str(p)  # noqa: E731
    rows = [
        # predict
        ("predict", "good slice", ["predict", m, w(site / "covid" / GOOD_SLICE)], "ok"),
        ("predict", "input that does not exist", ["predict", m, w(work / "missing.png")], "error"),
        ("predict", "empty folder", ["predict", m, w(bad / "empty_folder")], "error"),
        ("predict", "zero-byte .dcm", ["predict", m, w(bad / "empty.dcm")], "error"),
        ("predict", "20 MB zero-filled .dcm", ["predict", m, w(bad / "zeros.dcm")], "error"),
        ("predict", "random-byte .dcm", ["predict", m, w(bad / "random.dcm")], "error"),
        ("predict", "DICOM without pixel data", ["predict", m, w(bad / "nopixels.dcm")], "error"),
        ("predict", "truncated PNG", ["predict", m, w(bad / "truncated.png")], "error"),
        ("predict", "text file named .png", ["predict", m, w(bad / "text.png")], "error"),
        ("predict", "10000 x 10000 PNG", ["predict", m, w(bad / "huge.png")], "error"),
        ("predict", "4 x 4 image", ["predict", m, w(bad / "tiny.png")], "warning"),
        ("predict", "MR DICOM", ["predict", m, w(bad / "mr.dcm")], "warning"),
        ("predict", "MR DICOM, --strict", ["predict", m, w(bad / "mr.dcm"), "--strict"], "error"),
        ("predict", "--out with a bad suffix", ["predict", m, w(site), "--out", out + ".txt"], "error"),
        ("predict", "--out under a file", ["predict", m, w(site), "--out", w(work / "file" / "p.csv")], "error"),
        ("predict", "unknown --site", ["predict", m, w(site), "--site", "Z"], "error"),
        ("predict", "unknown --adapt-strategy", ["predict", m, w(site), "--adapt-strategy", "magic"], "error"),
        ("predict", "model whose weights hold NaN", ["predict", w(work / "nan"), w(site / "covid" / GOOD_SLICE)], "error"),
        ("predict", "model that does not exist", ["predict", w(work / "nomodel.safetensors"), w(site)], "error"),
        # train
        ("train", "site that does not exist", ["train", "--site", f"A={work / 'missing'}", "--out", out + "-t1"], "error"),
        ("train", "no --out", ["train", "--site", f"A={site}"], "error"),
        ("train", "unknown --set key", ["train", "--site", f"A={site}", "--out", out + "-t2", "--set", "colour=red"], "error"),
        ("train", "--set lr=nan", ["train", "--site", f"A={site}", "--out", out + "-t3", "--set", "lr=nan", "--set", "epochs=1"], "error"),
        ("train", "--set epochs=-1", ["train", "--site", f"A={site}", "--out", out + "-t4", "--set", "epochs=-1"], "error"),
        ("train", "truncated PNG in a site", ["train", "--site", f"A={fx['broken']}", "--out", out + "-t5"], "error"),
        ("train", "MR DICOM in a site, --strict", ["train", "--site", f"A={fx['mixed']}", "--out", out + "-t6", "--strict"], "error"),
        # evaluate
        ("evaluate", "run folder that does not exist", ["evaluate", w(work / "norun"), "--site", f"A={site}"], "error"),
        ("evaluate", "--external path that does not exist", ["evaluate", m, "--site", f"A={site}", "--external", f"C={work / 'missing'}"], "error"),
        ("evaluate", "unknown --adapt-strategy", ["evaluate", m, "--site", f"A={site}", "--external", f"C={site}", "--adapt-strategy", "magic"], "error"),
        # export
        ("export", "model that does not exist", ["export", w(work / "nomodel"), "--onnx", out + ".onnx"], "error"),
        ("export", "--int8 without --calibrate", ["export", m, "--onnx", out + ".onnx", "--int8"], "error"),
        ("export", "--onnx under a file", ["export", m, "--onnx", w(work / "file" / "m.onnx")], "error"),
        # add-site
        ("add-site", "--site folder that does not exist", ["add-site", m, "--site", f"new={work / 'missing'}", "--out", out + "-a1"], "error"),
        ("add-site", "--lr nan", ["add-site", m, "--site", f"h={site}", "--labels", "folders", "--out", out + "-a2", "--lr", "nan"], "error"),
        ("add-site", "--lr 1e9 (diverges)", ["add-site", m, "--site", f"h={site}", "--labels", "folders", "--out", out + "-a3", "--lr", "1e9", "--steps", "10"], "error"),
        ("add-site", "a site the model knows", ["add-site", m, "--site", f"sars_cov2_ct={site}", "--out", out + "-a4"], "error"),
        ("add-site", "--labels CSV that does not exist", ["add-site", m, "--site", f"h={site}", "--labels", w(work / "no.csv"), "--out", out + "-a5"], "error"),
        # data check
        ("data check", "good site", ["data", "check", f"A={site}"], "ok"),
        ("data check", "site that does not exist", ["data", "check", f"A={work / 'missing'}"], "error"),
        ("data check", "truncated PNG in a site", ["data", "check", f"A={fx['broken']}"], "error"),
        ("data check", "MR DICOM in a site", ["data", "check", f"A={fx['mixed']}"], "warning"),
        ("data check", "MR DICOM in a site, --strict", ["data", "check", f"A={fx['mixed']}", "--strict"], "error"),
    ]
    found = [Case(area, name, "crosssite " + " ".join(_short(a, work) for a in args), cli(args), expect)
             for area, name, args, expect in rows]
    serve = [
        ("model that does not exist", ["serve", w(work / "nomodel"), "--port", "0"]),
        ("port in use", ["serve", m, "--port", str(port)]),
        ("--host that does not resolve", ["serve", m, "--host", "no-such-host.invalid"]),
        ("unknown --site", ["serve", m, "--site", "Z", "--port", "0"]),
        ("--timeout 0", ["serve", m, "--timeout", "0", "--port", "0"]),
    ]
    found += [Case("serve", name, "crosssite " + " ".join(_short(a, work) for a in args), process(args, 60), "error")
              for name, args in serve]
    return found + http_cases(fx)


_HOLD: list[socket.socket] = []


def _busy_port() -> int:
    """A port this process listens on, for the "port in use" case."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _HOLD.append(sock)
    return sock.getsockname()[1]


def _short(arg: str, work: Path) -> str:
    return arg.replace(str(work), "W").replace(str(REPO) + "/", "")


def table(results: list[tuple[Case, str, str, float]]) -> str:
    counts: dict[str, int] = {}
    for _, result, _, _ in results:
        counts[result] = counts.get(result, 0) + 1
    lines = ["| # | area | case | command | expected | result | what the person sees | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, (case, result, shown, seconds) in enumerate(results, 1):
        cells = [str(i), case.area, case.name, f"`{case.command}`", case.expect, f"**{result}**",
                 shown.replace("|", "\\|"), f"{seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return f"{len(results)} cases: {summary}\n\n" + "\n".join(lines) + "\n"


def _seen(outcome: Outcome, work: Path) -> str:
    """The line the person reads first: the error, else the first warning, else the first line."""
    lines = [line.strip() for line in outcome.output.splitlines() if line.strip()]
    pick = next((x for x in lines if x.startswith(("error:", "Traceback"))), None)
    pick = pick or next((x for x in lines if "warning" in x.lower()), None) or (lines[0] if lines else "")
    return _short(pick, work)[:140]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, help="write the markdown table here (default: stdout)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crosssite-faults-") as tmp:
        work = Path(tmp)
        os.environ["CROSSSITE_CACHE"] = str(work / "cache")
        fx = make_fixtures(work, args.data)
        results = []
        for case in cases(fx):
            started = time.perf_counter()
            outcome = case.run()
            seconds = time.perf_counter() - started
            result = classify(case, outcome)
            results.append((case, result, _seen(outcome, work), seconds))
            print(f"{case.area:>13} | {case.name:<40} | {result}", file=sys.stderr)
    text = table(results)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
