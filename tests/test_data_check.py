"""`crosssite data check`: the JSON report's shape and content, duplicates, unreadable files, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from crosssite.cli import app

# Two pixel-identical pairs of site A (see ../shared/data/README.md), and two other slices.
A_FILES = ["COVID/Covid (128).png", "COVID/Covid (129).png", "COVID/Covid (134).png", "COVID/Covid (135).png",
           "non-COVID/Non-Covid (1).png", "non-COVID/Non-Covid (2).png"]


def run(*args: str):
    return CliRunner().invoke(app, ["data", "check", *args])


@pytest.fixture
def sites(tmp_path: Path, site_a_path: Path) -> tuple[Path, Path]:
    """A csv site of real site-A files, and a folder site holding a copy of one of them and a corrupt PNG."""
    manifest = tmp_path / "a.csv"
    rows = [f"{site_a_path / f},{'COVID' if f.startswith('COVID') else 'non-COVID'}" for f in A_FILES]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    folder = tmp_path / "other"
    (folder / "covid").mkdir(parents=True)
    (folder / "normal").mkdir()
    shutil.copy(site_a_path / A_FILES[0], folder / "covid" / "copy (1).png")
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(folder / "normal" / "rgb.png")
    (folder / "normal" / "broken%1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return manifest, folder


def test_json_report(sites: tuple[Path, Path]) -> None:
    manifest, folder = sites
    result = run(f"A={manifest}", f"X={folder}", "S=synthetic:shift=0.5,n=4,size=48", "--json", "--allow-unreadable")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    a, x, s = report["sites"]
    for site in (a, x, s):
        assert {"name", "layout", "classes", "patients", "unreadable", "duplicates"} <= site.keys()
        assert set(site["classes"]) == {"COVID", "non-COVID"}
    assert (a["name"], a["layout"], a["classes"], a["patients"]) == ("A", "csv", {"COVID": 4, "non-COVID": 2}, None)
    assert a["duplicates"] == 2 and a["unreadable"] == []
    assert sorted(Path(p).name for g in a["duplicate_groups"] for p in g) == sorted(Path(f).name for f in A_FILES[:4])
    assert a["formats"] == {"PNG": 6} and a["modes"] == {"L": 6}
    assert x["layout"] == "folder" and x["classes"] == {"COVID": 1, "non-COVID": 2}
    assert [Path(p).name for p in x["unreadable"]] == ["broken%1.png"] and x["errors"][0]["reason"]
    w, h = Image.open(manifest.parent / "other" / "covid" / "copy (1).png").size
    assert x["modes"] == {"L": 1, "RGB": 1} and x["width"] == [40, w] and x["height"] == [30, h]
    assert s["layout"] == "synthetic" and s["classes"] == {"COVID": 4, "non-COVID": 4} and s["patients"] == 2
    (cross,) = report["cross_site_duplicates"]
    assert {o["site"] for o in cross} == {"A", "X"}
    assert {Path(o["path"]).name for o in cross} == {"Covid (128).png", "Covid (129).png", "copy (1).png"}


def test_table_report(sites: tuple[Path, Path]) -> None:
    manifest, _ = sites
    result = run(f"A={manifest}")
    assert result.exit_code == 0, result.output
    assert "identical slices in A" in result.stdout and "Covid (128).png" in result.stdout


@pytest.mark.parametrize(
    "make_arg, message",
    [
        (lambda d: f"A={d / 'missing'}", "does not exist"),
        (lambda d: f"A={d}:zip", "unknown layout 'zip'"),
        (lambda d: f"A={d / 'odd'}", "cannot detect the site layout"),
        (lambda d: f"A={d / 'empty'}", "no images"),
    ],
)
def test_bad_sites_exit_1_with_one_line(tmp_path: Path, make_arg, message: str) -> None:
    (tmp_path / "odd" / "misc").mkdir(parents=True)
    (tmp_path / "empty" / "covid").mkdir(parents=True)
    result = run(make_arg(tmp_path), "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_non_ct_dicom_is_named_and_refused_with_strict(tmp_path: Path, site_a_path: Path) -> None:
    """An MR DICOM among the slices of a site: `data check` and `train` name the file and count it; --strict refuses
    it (train: before any work)."""
    import pydicom

    from test_data_io import write_dicom

    folder = tmp_path / "site"
    for cls, name in (("covid", A_FILES[0]), ("normal", A_FILES[4])):
        (folder / cls).mkdir(parents=True)
        shutil.copy(site_a_path / name, folder / cls / Path(name).name)
    hu = np.full((64, 64), -800, np.int16)
    hu[20:40, 20:40] = 40
    mr = write_dicom(folder / "normal" / "mr.dcm", hu)
    ds = pydicom.dcmread(mr)
    ds.Modality = "MR"
    ds.save_as(mr, enforce_file_format=True)

    report = json.loads(run(f"X={folder}", "--json").stdout)
    assert report["sites"][0]["not_ct"] == [{"path": str(mr), "warning": "Modality MR, not CT: scored as if it were "
                                                                           "a chest CT slice"}]
    table = run(f"X={folder}")
    assert table.exit_code == 0 and "in X, 1 DICOM file(s) may not be chest-CT slices" in table.stderr
    assert f"{mr}: Modality MR, not CT" in table.stderr
    strict = run(f"X={folder}", "--strict")
    assert strict.exit_code == 1 and "--strict: 1 DICOM file(s) may not be chest-CT slices" in strict.stderr
    trained = CliRunner().invoke(app, ["train", "--site", f"X={folder}", "--out", str(tmp_path / "run"), "--strict"])
    assert trained.exit_code == 1 and f"{mr}: Modality MR, not CT" in trained.stderr
    assert "error: --strict: 1 DICOM file(s)" in trained.stderr and not (tmp_path / "run").exists()
