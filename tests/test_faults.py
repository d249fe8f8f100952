"""Fault injection against the command line: unwritable outputs, full disks, bad inputs, federated data errors.

Each case runs the real command (in this process through typer's runner, or as a subprocess where the fault needs
another user, a file-size limit or a mount) and checks what a user sees: exit status 1, one line naming the path
and the problem, no "Traceback", no partial file, and nothing finished lost (a run stopped by a full disk resumes).
Mount cases (a read-only or a tiny tmpfs) are skipped where this machine does not allow mounting; they never leave
a mount behind. docs/RELIABILITY.md lists every case and the test that checks it.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from typer.testing import CliRunner

from crosssite.cli import app
from crosssite.data import CLASS_NAMES, load_site, read_image
from crosssite.data.io import MIN_IMAGE_SIDE, input_warnings
from crosssite.errors import CheckpointError, ImageReadError
from crosssite.models import create_model, load, save

SIZE = 32
TINY = ["--set", f"image_size={SIZE}", "--set", "width=0.0625", "--set", "batch_per_site=4", "--set", "folds=2",
        "--set", "epochs=1", "--set", "ckpt_every=0", "--quiet"]
SITES = ["--site", f"a=synthetic:n=24,size={SIZE},seed=1", "--site", f"b=synthetic:n=24,size={SIZE},seed=2,shift=1"]


# ------------------------------------------------------------------------------------------------ helpers


def cli(*args: object) -> tuple[int, str]:
    """Run ``crosssite ARGS`` in this process; (exit status, stdout + stderr). An escaped exception fails the test."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def crosssite(*args: object, env: dict[str, str] | None = None, preexec: Callable[[], None] | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m crosssite ARGS`` as a separate process (what a user's shell runs)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "crosssite", *map(str, args)], capture_output=True, text=True,
                          env=full_env, preexec_fn=preexec, cwd=cwd, timeout=300)


def assert_named_error(status: int, output: str, *names: object) -> str:
    """Exit status 1, no traceback, and an ``error:`` line naming every one of ``names``; returns that line."""
    assert status == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert lines, output
    line = lines[-1]
    for name in names:
        assert str(name) in line, line
    return line


def no_partial_files(root: Path) -> None:
    """No temporary file of an atomic write is left anywhere below ``root``."""
    leftovers = [p for p in root.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".pack-")]
    assert leftovers == [], leftovers


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` for the block (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


_CAPS_BYPASSING_PERMISSIONS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
_PR_CAPBSET_DROP = 24


def _obey_permissions() -> None:
    """preexec_fn for root: drop the capabilities that bypass file permissions from the bounding set, so the
    command run after exec obeys them like any user (it can still read root's own 0700 folders as their owner)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in _CAPS_BYPASSING_PERMISSIONS:
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def without_permission_override() -> Callable[[], None] | None:
    """The preexec_fn that makes a subprocess obey file permissions (None for a non-root user, who does)."""
    if os.geteuid() != 0:
        return None
    try:
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_obey_permissions, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot drop root's permission override here: {e}")
    return _obey_permissions


def file_size_limit(limit: int) -> Callable[[], None]:
    """preexec_fn: files may grow to ``limit`` bytes; SIGXFSZ ignored, so a write past it fails with EFBIG."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) one-site model file; enough for predict, evaluate and export to write their outputs."""
    path = tmp_path_factory.mktemp("model") / "model"
    torch_model = create_model("covidnet_redesign", num_sites=1, width=0.0625, image_size=SIZE)
    card = {"site_names": ["a"], "class_names": list(CLASS_NAMES),
            "preprocessing": {"image_size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3}}
    save(torch_model, path, card)
    return path


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of four grey PNG slices."""
    folder = tmp_path_factory.mktemp("slices")
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / f"s{k}.png")
    return folder


def copied_site(tmp_path: Path) -> tuple[str, list[Path]]:
    """A copy of a small synthetic site, as a csv site: (site spec, its image files in sample order)."""
    source = load_site(f"t=synthetic:n=24,size={SIZE},seed=3")
    copy = tmp_path / "copied-site"
    shutil.copytree(source.root, copy)
    return f"t={copy / 'manifest.csv'}", [copy / Path(s.path).relative_to(source.root) for s in source.samples]


def site_with_truncated_png(tmp_path: Path) -> tuple[str, Path]:
    """`copied_site` with one PNG cut short: (site spec, that file)."""
    spec, files = copied_site(tmp_path)
    files[5].write_bytes(files[5].read_bytes()[:60])
    return spec, files[5]


# ------------------------------------------------------------------------------------------- train --out


def test_train_out_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    status, output = cli("train", *SITES, *TINY, "--out", tmp_path / "file" / "run")
    line = assert_named_error(status, output, tmp_path / "file" / "run")
    assert "not a folder" in line
    status, output = cli("train", *SITES, *TINY, "--out", tmp_path / "file")
    assert "a file is in the way" in assert_named_error(status, output, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize("root, reasons", [("/proc", ("refuses new files",)),
                                           ("/sys", ("not permitted", "read-only"))])  # read-only in some containers
def test_train_out_under_a_pseudo_file_system(root: str, reasons: tuple[str, ...]) -> None:
    if not Path(root).is_dir():
        pytest.skip(f"no {root} here")
    status, output = cli("train", *SITES, *TINY, "--out", f"{root}/crosssite-run")
    line = assert_named_error(status, output, f"{root}/crosssite-run")
    assert any(reason in line for reason in reasons), line


def test_train_out_on_a_read_only_file_system(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        status, output = cli("train", *SITES, *TINY, "--out", ro / "run")
        assert "read-only file system" in assert_named_error(status, output, ro / "run")


def test_train_out_without_write_permission(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    run = crosssite("train", *SITES, *TINY, "--out", locked / "run", env={"CROSSSITE_CACHE": str(cache)},
                    preexec=without_permission_override())
    line = assert_named_error(run.returncode, run.stdout + run.stderr, locked / "run")
    assert "permission denied" in line and len(run.stderr.splitlines()) == 1, run.stderr
    assert list(locked.iterdir()) == []


def test_train_out_in_an_immutable_directory(tmp_path: Path) -> None:
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode:
        pytest.skip("cannot make a directory immutable here (no chattr, or the file system lacks the attribute)")
    try:
        status, output = cli("train", *SITES, *TINY, "--out", frozen / "run")
        assert "not permitted" in assert_named_error(status, output, frozen / "run")
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=True)
    assert list(frozen.iterdir()) == []


def test_train_on_a_full_disk_names_the_file_and_resumes(tmp_path: Path) -> None:
    """A 1 MB file-size limit: the run stops at the first file larger than that (the 2.7 MB checkpoint), leaves
    no partial file, and ``--resume`` without the limit finishes the run."""
    out = tmp_path / "run"
    run = crosssite("train", *SITES, *TINY, "--out", out, preexec=file_size_limit(1_000_000))
    line = assert_named_error(run.returncode, run.stdout + run.stderr, out / "checkpoints" / "last.pt")
    assert "file too large" in line
    no_partial_files(out)
    assert (out / "config.yaml").is_file() and (out / "model.safetensors").is_file()
    status, output = cli("train", "--resume", out, "--quiet")
    assert status == 0, output
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "last.pt").is_file()


def test_train_on_a_small_tmpfs_says_no_space(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=300k") as small:
        status, output = cli("train", *SITES, *TINY, "--out", small / "run")
        line = assert_named_error(status, output, small / "run" / "model.safetensors")
        assert "no space left on device" in line and "--resume" in line
        no_partial_files(small)


def test_decode_cache_on_a_full_disk(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run = crosssite("train", *SITES, *TINY, "--out", tmp_path / "run", env={"CROSSSITE_CACHE": str(cache)},
                    preexec=file_size_limit(16_000))
    line = assert_named_error(run.returncode, run.stdout + run.stderr, cache / "slices", "CROSSSITE_CACHE")
    assert "file too large" in line
    no_partial_files(cache)
    assert not (tmp_path / "run").exists()  # a run that failed to start leaves nothing


# ------------------------------------------------------------------------------ other commands' outputs


def test_predict_export_and_cam_outputs_under_a_file(tmp_path: Path, model_file: Path, slices: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args, path in (
        (("predict", model_file, slices, "--out", blocker / "p.csv"), blocker),
        (("predict", model_file, slices, "--cam", blocker / "cams"), blocker / "cams"),
        (("export", model_file, "--onnx", blocker / "m.onnx"), "m.onnx"),
    ):
        status, output = cli(*args)
        line = assert_named_error(status, output, path)
        assert "a file is in the way of a folder" in line or "not a folder" in line
    assert blocker.read_text() == "x"


def test_predict_and_evaluate_on_a_read_only_file_system(tmp_path: Path, model_file: Path, slices: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        status, output = cli("predict", model_file, slices, "--out", ro / "p.csv")
        assert "read-only" in assert_named_error(status, output, ro)
        status, output = cli("evaluate", model_file, "--site", f"a=synthetic:n=8,size={SIZE}", "--bootstrap", 10,
                             "--out", ro / "eval")
        assert "read-only" in assert_named_error(status, output, ro / "eval")


def test_evaluate_out_without_write_permission(tmp_path: Path, model_file: Path) -> None:
    model = tmp_path / "model"
    for suffix in (".safetensors", ".json"):
        shutil.copy(model_file.with_suffix(suffix), model.with_suffix(suffix))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    run = crosssite("evaluate", model, "--site", f"a=synthetic:n=8,size={SIZE}", "--bootstrap", 10, "--out",
                    locked / "eval", env={"CROSSSITE_CACHE": str(cache)}, preexec=without_permission_override())
    line = assert_named_error(run.returncode, run.stdout + run.stderr, locked / "eval")
    assert "permission denied" in line


# -------------------------------------------------------------------------------------- failed starts


def test_failed_start_leaves_nothing_and_federated_names_the_file(tmp_path: Path) -> None:
    pytest.importorskip("flwr")
    spec, bad = site_with_truncated_png(tmp_path)
    out = tmp_path / "run"
    central = assert_named_error(*cli("train", *SITES[:2], "--site", spec, *TINY, "--out", out), bad)
    assert not out.exists()
    again = assert_named_error(*cli("train", *SITES[:2], "--site", spec, *TINY, "--out", out), bad)
    assert again == central  # the failed start changed nothing: not "already holds a run"
    status, output = cli("train", "--resume", out, "--quiet")
    assert_named_error(status, output, out / "sites.json")  # nothing to resume, said as such

    fed_out = tmp_path / "fed"
    status, output = cli("federated", *SITES[:2], "--site", spec, "--rounds", 1, "--out", fed_out, *TINY)
    federated = assert_named_error(status, output, bad)
    assert federated == central and "no model was saved" not in output
    assert not fed_out.exists()


def test_resume_without_a_configuration_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sites.json").write_text('{"sites": []}')
    status, output = cli("train", "--resume", tmp_path, "--quiet")
    assert "never started" in assert_named_error(status, output, tmp_path / "config.yaml")


# ------------------------------------------------------------------------------------ silent inputs


def write_dicom(path: Path, stored: np.ndarray, *, modality: str = "CT", rescale: bool = True,
                image_type: list[str] | None = None, orientation: list[float] | None = None) -> Path:
    """A single-frame DICOM file of int16 ``stored`` values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    if image_type is not None:
        ds.ImageType = image_type
    if orientation is not None:
        ds.ImageOrientationPatient = orientation
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_ct_dicom_without_rescale_tags(tmp_path: Path) -> None:
    """The CT Image module requires RescaleSlope/Intercept; without them the identity LUT is used only for values
    that look like HU (air below -500), with a warning; raw detector values (0..2000) are refused by name."""
    rng = np.random.default_rng(0)
    raw = write_dicom(tmp_path / "raw.dcm", rng.integers(0, 2000, (32, 32)), rescale=False)
    with pytest.raises(ImageReadError, match=r"raw\.dcm: CT image without RescaleSlope/RescaleIntercept.*0\.\.19"):
        read_image(raw)
    hu = write_dicom(tmp_path / "hu.dcm", rng.integers(-1000, 400, (32, 32)), rescale=False)
    assert read_image(hu).shape == (32, 32)
    assert any("no RescaleSlope/RescaleIntercept" in w for w in input_warnings(hu))
    assert input_warnings(write_dicom(tmp_path / "ok.dcm", rng.integers(0, 1400, (32, 32)))) == []


def test_tiny_image_refused_in_training_and_warned_in_predict(tmp_path: Path, model_file: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    Image.fromarray(np.full((1, 1), 90, np.uint8)).save(folder / "dot.png")
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(folder / "fine.png")
    status, output = cli("predict", model_file, folder)
    assert status == 0 and "warning:" in output and "dot.png" in output and f"minimum of {MIN_IMAGE_SIDE}" in output
    status, output = cli("predict", model_file, folder, "--strict")
    assert_named_error(status, output, folder / "dot.png", "1 x 1")

    spec, files = copied_site(tmp_path)
    Image.fromarray(np.full((1, 1), 90, np.uint8)).save(files[0])
    status, output = cli("train", *SITES[:2], "--site", spec, *TINY, "--out", tmp_path / "run")
    assert f"minimum of {MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE}" in assert_named_error(status, output, files[0], "1 x 1")
    status, output = cli("data", "check", spec, "--json")
    assert status == 1 and "unreadable or too small" in output
    assert json.loads(output[:output.rindex("}") + 1])["sites"][0]["too_small"] == [str(files[0])]


def test_non_ct_dicom_is_predicted_only_with_a_warning(tmp_path: Path, model_file: Path) -> None:
    rng = np.random.default_rng(1)
    mr = write_dicom(tmp_path / "mr.dcm", rng.integers(0, 900, (32, 32)), modality="MR", rescale=False)
    scout = write_dicom(tmp_path / "scout.dcm", rng.integers(0, 1400, (32, 32)),
                        image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    sagittal = write_dicom(tmp_path / "sag.dcm", rng.integers(0, 1400, (32, 32)), orientation=[0, 1, 0, 0, 0, -1])
    axial = write_dicom(tmp_path / "axial.dcm", rng.integers(0, 1400, (32, 32)), orientation=[1, 0, 0, 0, 1, 0])
    csv = tmp_path / "p.csv"
    status, output = cli("predict", model_file, mr, scout, sagittal, axial, "--out", csv)
    assert status == 0, output
    # per-file warnings (the untrained test model also puts every scan far from its sites: one more, summary line)
    warned = [line for line in output.splitlines() if line.startswith("warning:") and "ood_score" not in line]
    assert len(warned) == 3 and "Modality MR, not CT" in warned[0], output
    assert "localizer" in output and "not axial" in output and str(axial) not in "".join(warned)
    rows = csv.read_text().splitlines()
    assert "warning" in rows[0].split(",") and sum("not CT" in r for r in rows) == 1
    status, output = cli("predict", model_file, mr, axial, "--strict")
    assert_named_error(status, output, mr, "refused (strict)")


def test_data_check_exits_1_on_unreadable_files_and_lists_ignored_ones(tmp_path: Path) -> None:
    spec, bad = site_with_truncated_png(tmp_path)
    site = Path(spec.split("=", 1)[1]).parent
    (site / "COVID" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    folder_spec = f"f={site}:folder"
    status, output = cli("data", "check", folder_spec)
    assert "1 unreadable or too small file(s)" in assert_named_error(status, output)
    assert str(bad) in output and "ignored on purpose in f: 1 hidden or system file(s)" in output
    status, output = cli("data", "check", folder_spec, "--allow-unreadable")
    assert status == 0, output


def test_checkpoint_mismatch_is_summarised(tmp_path: Path, model_file: Path) -> None:
    wide = create_model("covidnet_redesign", num_sites=2, width=0.125, image_size=SIZE)
    weights, _ = save(wide, tmp_path / "wide")
    shutil.copy(model_file.with_suffix(".json"), tmp_path / "mixed.json")
    shutil.copy(weights, tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError) as info:
        load(tmp_path / "mixed")
    message = str(info.value)
    assert "mixed.safetensors" in message and "of another shape" in message and len(message) < 600, message


# ------------------------------------------------------------------------------------ pydicom's files


def pydicom_image_files() -> list[Path]:
    """Every file of pydicom's own test data present on this machine that holds pixel data (none downloaded)."""
    from pydicom.data import get_testdata_files

    found = []
    for name in sorted(get_testdata_files()):
        with contextlib.suppress(Exception):
            if "PixelData" in pydicom.dcmread(name, force=True, specific_tags=["PixelData"]):
                found.append(Path(name))
    return found


STANDARD_COMPRESSIONS = ("JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm", "MR_small_jpeg_ls_lossless.dcm",
                         "SC_rgb_jls_lossy_line.dcm", "SC_rgb_jls_lossy_sample.dcm", "JPGExtended.dcm",
                         "examples_jpeg2k.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jp2klossless.dcm",
                         "SC_rgb_rle.dcm", "examples_ybr_color.dcm")


def test_predict_every_pydicom_test_file(tmp_path: Path, model_file: Path) -> None:
    files = pydicom_image_files()
    assert len(files) >= 60, files
    csv = tmp_path / "all.csv"
    status, output = cli("predict", model_file, *files, "--out", csv)
    assert "Traceback" not in output and status == 1, output  # some of pydicom's files are broken on purpose
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert all(len(line) > len("error: ") + 20 for line in errors)  # each refusal gives its reason
    import csv as csv_module

    rows = list(csv_module.DictReader(csv.open()))
    predicted = {Path(r["path"]).name for r in rows if r["kind"] == "slice"}
    refused = {Path(r["path"]).name: r["error"] for r in rows if r["kind"] == "error"}
    assert set(STANDARD_COMPRESSIONS) <= predicted, sorted(set(STANDARD_COMPRESSIONS) - predicted)
    assert len(predicted) + len(refused) == len({f.name for f in files})
    assert all(reason for reason in refused.values())
    assert len(refused) <= 8, refused
    not_ct = [r for r in rows if r["kind"] == "slice" and Path(r["path"]).name.startswith(("MR_", "rtdose"))]
    assert not_ct and all("not CT" in r["warning"] for r in not_ct)


def test_experiment_results_never_end_in_half_a_line(tmp_path: Path) -> None:
    """A results line that does not fit (file-size limit) is cut off again: results.jsonl keeps its whole lines."""
    results = tmp_path / "results.jsonl"
    results.write_text('{"run": 1}\n' * 90)  # 990 bytes
    code = ("import sys; from pathlib import Path; from crosssite.experiment.ledger import append_line as _append_line; "
            "from crosssite.errors import OutputError\n"
            "try:\n    _append_line(Path(sys.argv[1]), {'run': 2, 'pad': 'x' * 200})\n"
            "except OutputError as e:\n    print(e); sys.exit(3)\n")
    run = subprocess.run([sys.executable, "-c", code, str(results)], capture_output=True, text=True,
                         preexec_fn=file_size_limit(1100), timeout=120)
    assert run.returncode == 3, run.stdout + run.stderr
    assert str(results) in run.stdout and "file too large" in run.stdout
    assert results.read_text() == '{"run": 1}\n' * 90
