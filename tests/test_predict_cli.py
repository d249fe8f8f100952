"""`crosssite predict` and `crosssite export`: output files, exit status, messages, ONNX, Grad-CAM, AdaBN."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from crosssite.cli import app
from test_inference import IMAGE_SIZE, real_files, save_tiny_model, site_images


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(site_a_path: Path, site_b_path: Path) -> list[Path]:
    return real_files(site_a_path, site_b_path)[2]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory, files: list[Path]) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cli-model") / "model", site_images(files))


@pytest.fixture
def folder(tmp_path: Path, files: list[Path]) -> Path:
    """Eight real slices, in two subfolders."""
    for k, f in enumerate(files):
        dest = tmp_path / "in" / ("a" if k < 4 else "b") / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    return tmp_path / "in"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_corrupt_file_gives_rows_and_exit_1(model_path: Path, folder: Path, tmp_path: Path) -> None:
    (folder / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "pred.csv"
    result = run("predict", model_path, folder, "--out", out)
    assert result.exit_code == 1
    assert "broken.jpg" in result.stderr and "Traceback" not in result.output
    rows = read_csv(out)
    assert sorted(r["kind"] for r in rows) == ["error"] + ["slice"] * 8
    (error,) = [r for r in rows if r["kind"] == "error"]
    assert Path(error["path"]).name == "broken.jpg" and error["error"]
    for r in rows:
        if r["kind"] == "slice":
            p = float(r["p_covid"])
            # no --site: an unseen site, the default strategy (each slice standardised, then the sites' mean)
            assert r["label"] == ("COVID" if p >= 0.5 else "non-COVID") and r["norm"] == "mean-of-sites+standardise"


def test_json_and_table_output(model_path: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.json"
    result = run("predict", model_path, folder, "--site", "A", "--out", out, "--batch-size", "3")
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["norm"] == "A" and doc["threshold"] == 0.5 and doc["counts"]["slice"] == 8
    assert {r["norm"] for r in doc["rows"]} == {"A"}

    table = run("predict", model_path, folder / "a", "--site", "A")
    assert table.exit_code == 0, table.output
    assert "normalisation A" in table.stdout and "P(COVID)" in table.stdout
    first = next(r for r in doc["rows"] if Path(r["path"]).parent.name == "a")
    assert f"{first['p_covid']:.4f}" in table.stdout


def test_onnx_export_then_predict(model_path: Path, folder: Path, tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    result = run("export", model_path, "--onnx", onnx)
    assert result.exit_code == 0, result.output
    assert onnx.is_file() and "max |P difference|" in result.stdout
    torch_rows = tmp_path / "torch.csv"
    onnx_rows = tmp_path / "onnx.csv"
    assert run("predict", model_path, folder, "--out", torch_rows).exit_code == 0
    result = run("predict", onnx, folder, "--out", onnx_rows)
    assert result.exit_code == 0, result.output
    p_torch = np.array([float(r["p_covid"]) for r in read_csv(torch_rows)])
    p_onnx = np.array([float(r["p_covid"]) for r in read_csv(onnx_rows)])
    np.testing.assert_allclose(p_onnx, p_torch, rtol=0, atol=1e-4)
    assert {r["norm"] for r in read_csv(onnx_rows)} == {"mean-of-sites+standardise"}

    refused = run("predict", onnx, folder, "--site", "A")
    assert refused.exit_code == 1 and "fixed at export" in refused.stderr
    refused = run("predict", onnx, folder, "--cam", tmp_path / "cams")
    assert refused.exit_code == 1 and "Grad-CAM needs a crosssite model file" in refused.stderr


def test_grad_cam_overlays(model_path: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    result = run("predict", model_path, folder / "a", "--cam", tmp_path / "cams", "--out", out)
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    pngs = sorted((tmp_path / "cams").glob("*.png"))
    assert len(pngs) == 4 and sorted(Path(r["cam"]) for r in rows) == pngs
    assert Image.open(pngs[0]).size == (IMAGE_SIZE, IMAGE_SIZE) and Image.open(pngs[0]).mode == "RGB"


def test_adapt_and_save_adapted(model_path: Path, folder: Path, tmp_path: Path) -> None:
    new = tmp_path / "adapted"
    out = tmp_path / "adapted.csv"
    result = run("predict", model_path, folder, "--adapt", "--save-adapted", new, "--adapt-name", "site-c",
                 "--out", out)
    assert result.exit_code == 0, result.output
    assert "re-estimated on 8 images" in result.stderr
    assert {r["norm"] for r in read_csv(out)} == {"adabn:8"}
    card = json.loads(new.with_suffix(".json").read_text())
    assert card["site_names"] == ["A", "B", "site-c"] and card["num_sites"] == 3
    again = tmp_path / "again.csv"
    assert run("predict", new, folder, "--site", "site-c", "--out", again).exit_code == 0
    np.testing.assert_allclose([float(r["p_covid"]) for r in read_csv(again)],
                               [float(r["p_covid"]) for r in read_csv(out)], atol=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapt-strategy", "adabn"], "at least 8 images"),
        (["--save-adapted", "x"], "at least 8 images"),  # saving needs a new slot: AdaBN
        (["--site", "Z"], "unknown site 'Z'; the model knows: A, B"),
        (["--site", "A", "--adapt"], "exclude each other"),
        (["--save-adapted", "x", "--adapt-strategy", "standardise"], "needs AdaBN or TENT"),
        (["--save-adapted", "x", "--adapt-strategy", "none"], "needs --adapt"),
        (["--out", "x.txt"], "must end in .csv or .json"),
    ],
)
def test_bad_requests(model_path: Path, files: list[Path], args: list[str], message: str) -> None:
    result = run("predict", model_path, *files[:3], *args)
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_empty_folder_and_corrupt_model(model_path: Path, files: list[Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run("predict", model_path, tmp_path / "empty")
    assert result.exit_code == 1 and "no image files found" in result.stderr

    shutil.copy(model_path.with_suffix(".json"), tmp_path / "bad.json")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    bad = tmp_path / "bad"
    for command in (["predict", bad, files[0]], ["export", bad, "--onnx", tmp_path / "x.onnx"]):
        result = run(*command)
        assert result.exit_code == 1 and "bad.safetensors" in result.stderr
        assert result.stderr.startswith("error: ") and "Traceback" not in result.output


def test_int8_export_and_predict(model_path: Path, folder: Path, site_a_path: Path, tmp_path: Path) -> None:
    onnx = tmp_path / "int8.onnx"
    result = run("export", model_path, "--onnx", onnx, "--int8")
    assert result.exit_code == 1 and "--calibrate" in result.stderr and not onnx.exists()
    result = run("export", model_path, "--onnx", onnx, "--calibrate", folder)
    assert result.exit_code == 1 and "--int8" in result.stderr and not onnx.exists()

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    result = run("export", model_path, "--onnx", onnx, "--site", "A", "--int8", "--calibrate", site_a_path / "COVID",
                 "--calibrate", broken, "--calibration-slices", 17)  # the last of 17 evenly spread picks: broken.png
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable input(s)" in result.stderr and "broken.png" in result.stderr
    assert "int8, calibrated on 16 slices" in result.stdout

    out = tmp_path / "pred.json"
    result = run("predict", onnx, folder, "--out", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["counts"]["slice"] == 8 and {r["norm"] for r in doc["rows"]} == {"A+standardise"}


def test_a_canonical_model_notes_the_slices_it_showed_whole(model_path: Path, folder: Path, tmp_path: Path) -> None:
    """A slice without a lung field (a grey ramp) is shown whole by a canonical frame: its row says so, one line
    sums it up, and --strict does not refuse it (it is not a problem of the file)."""
    canonical = tmp_path / "canonical"
    shutil.copy(model_path.with_suffix(".safetensors"), canonical.with_suffix(".safetensors"))
    card = json.loads(model_path.with_suffix(".json").read_text())
    card["preprocessing"]["frame"] = "canonical-aerated"
    canonical.with_suffix(".json").write_text(json.dumps(card))
    Image.fromarray(np.tile(np.linspace(0, 255, 160).astype(np.uint8), (120, 1))).save(folder / "ramp.png")
    out = tmp_path / "pred.csv"
    result = run("predict", canonical, folder, "--out", out, "--strict")
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in read_csv(out) if r["kind"] == "slice"}
    assert len(rows) == 9
    assert "no lung field found" in rows["ramp.png"]["warning"]
    assert all("no lung field" not in r["warning"] for name, r in rows.items() if name != "ramp.png")
    assert "no lung field found in 1 of 9 slice(s)" in result.stderr and "ramp.png" in result.stderr
    assert "predicted with a warning" not in result.stderr
