"""Sites: the two real datasets load with the published counts; every layout; bad sites are named errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crosssite.data import (
    CLASS_NAMES,
    Site,
    class_of_name,
    load_site,
    load_sites,
    official_split,
    parse_site_spec,
    read_image,
)
from crosssite.data.sites import synthetic_site
from crosssite.data.synthetic import SLICES_PER_PATIENT, SyntheticParams
from crosssite.errors import SiteError




def _png(path: Path, value: int = 100, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------- real


def test_site_a_counts(site_a: Site) -> None:
    assert site_a.layout == "sars_cov2_ct"
    assert site_a.class_counts() == {"non-COVID": 1229, "COVID": 1252}
    assert not site_a.has_patients and site_a.num_patients() is None
    assert all(s.patient is None and s.frame is None for s in site_a.samples)


def test_site_b_counts_and_patients(site_b: Site) -> None:
    assert site_b.layout == "covid_ct"
    assert site_b.class_counts() == {"non-COVID": 397, "COVID": 349}
    assert site_b.has_patients
    assert site_b.patients_per_class() == {"non-COVID": 171, "COVID": 213}
    assert site_b.num_patients() == 213 + 171


def test_site_b_official_split_counts(site_b: Site) -> None:
    split = official_split(site_b)
    labels = site_b.labels
    covid = {part: int((labels[idx] == 1).sum()) for part, idx in split.parts().items()}
    non_covid = {part: int((labels[idx] == 0).sum()) for part, idx in split.parts().items()}
    assert covid == {"train": 191, "val": 60, "test": 98}
    assert non_covid == {"train": 234, "val": 58, "test": 105}
    # The official split keeps every patient of the metadata in one part.
    part_of = {}
    for part, idx in split.parts().items():
        for i in idx:
            assert part_of.setdefault(site_b.samples[i].patient, part) == part


def test_awkward_file_names_are_read(site_a: Site, site_b: Site) -> None:
    """Spaces, parentheses and '%' in names reach the reader unharmed."""
    with_space = next(s for s in site_a.samples if " (" in s.path.name)
    with_percent = next(s for s in site_b.samples if "%" in s.path.name)
    for sample in (with_space, with_percent):
        image = read_image(sample.path)
        assert image.dtype == np.float32 and image.ndim == 2
        assert 0.0 <= image.min() and image.max() <= 1.0


def test_official_split_requires_one(site_a: Site) -> None:
    with pytest.raises(SiteError, match="no official split"):
        official_split(site_a)


# ------------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("A=/data/x", ("A", Path("/data/x"), None)),
        ("A=/data/x:folder", ("A", Path("/data/x"), "folder")),
        ("A=/data/x:y", ("A", Path("/data/x:y"), None)),
        ("S=synthetic:shift=0.5,n=20", ("S", Path("synthetic:shift=0.5,n=20"), None)),
    ],
)
def test_parse_site_spec(spec: str, expected: tuple) -> None:
    assert parse_site_spec(spec) == expected


@pytest.mark.parametrize("spec", ["A", "=x", "A="])
def test_parse_site_spec_rejects(spec: str) -> None:
    with pytest.raises(SiteError, match="NAME=PATH"):
        parse_site_spec(spec)


def test_class_aliases() -> None:
    assert CLASS_NAMES == ("non-COVID", "COVID")
    for name in ("COVID", "covid", "CT_COVID", "Positive", "pos", "1", "COVID-19"):
        assert class_of_name(name) == 1, name
    for name in ("non-COVID", "NonCOVID", "CT_NonCOVID", "normal", "Negative", "neg", "0", "healthy"):
        assert class_of_name(name) == 0, name
    assert class_of_name("pneumonia") is None


# ----------------------------------------------------------------------------------------- layouts


def test_folder_layout_with_aliases(tmp_path: Path) -> None:
    _png(tmp_path / "Positive" / "a.png")
    _png(tmp_path / "Positive" / "sub" / "b.jpg")
    _png(tmp_path / "normal" / "c.png")
    site = load_site(f"F={tmp_path}")
    assert site.layout == "folder"
    assert site.class_counts() == {"non-COVID": 1, "COVID": 2}
    assert {s.path.name: s.label for s in site.samples} == {"a.png": 1, "b.jpg": 1, "c.png": 0}


def test_folder_layout_unknown_class_names_folder(tmp_path: Path) -> None:
    _png(tmp_path / "covid" / "a.png")
    _png(tmp_path / "pneumonia" / "b.png")
    with pytest.raises(SiteError, match="pneumonia"):
        load_site(f"F={tmp_path}:folder")
    with pytest.raises(SiteError, match="pneumonia"):
        load_site(f"F={tmp_path}")


def test_folder_layout_unsupported_file_is_named(tmp_path: Path) -> None:
    _png(tmp_path / "covid" / "a.png")
    (tmp_path / "covid" / "notes.txt").write_text("x")
    with pytest.raises(SiteError, match="notes.txt"):
        load_site(f"F={tmp_path}")


def test_csv_layout(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "x 1 (a).png")
    _png(tmp_path / "imgs" / "y%2.png")
    _png(tmp_path / "other.png")
    (tmp_path / "m.csv").write_text(
        "path,label,patient,site\n"
        "imgs/x 1 (a).png,COVID,p1,H1\n"
        "imgs/y%2.png,0,p2,H1\n"
        f"{tmp_path / 'other.png'},1,,H2\n"
    )
    h1 = load_site(f"H1={tmp_path / 'm.csv'}")
    assert h1.layout == "csv" and h1.has_patients
    assert [(s.path.name, s.label, s.patient) for s in h1.samples] == [("x 1 (a).png", 1, "p1"), ("y%2.png", 0, "p2")]
    h2 = load_site(f"H2={tmp_path / 'm.csv'}")
    assert len(h2) == 1 and not h2.has_patients
    with pytest.raises(SiteError, match="H1, H2"):
        load_site(f"H3={tmp_path / 'm.csv'}")


def test_csv_layout_errors_name_the_line(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "bad_label.csv").write_text("path,label\na.png,maybe\n")
    with pytest.raises(SiteError, match=r"line 2.*'maybe'"):
        load_site(f"X={tmp_path / 'bad_label.csv'}")
    (tmp_path / "missing.csv").write_text("path,label\na.png,1\nnope.png,0\n")
    with pytest.raises(SiteError, match=r"line 3.*nope.png"):
        load_site(f"X={tmp_path / 'missing.csv'}")
    (tmp_path / "sites.csv").write_text("path,label,site\na.png,1,H1\na.png,1,H2\nnope.png,1,H2\n")
    with pytest.raises(SiteError, match=r"line 4.*nope.png"):
        load_site(f"H2={tmp_path / 'sites.csv'}")
    (tmp_path / "short.csv").write_text("path,label\na.png\n")
    with pytest.raises(SiteError, match=r"line 2.*label ''"):
        load_site(f"X={tmp_path / 'short.csv'}")
    (tmp_path / "cols.csv").write_text("file,class\na.png,1\n")
    with pytest.raises(SiteError, match="'path' and 'label'"):
        load_site(f"X={tmp_path / 'cols.csv'}")


def _mini_covid_ct(root: Path) -> Path:
    for folder, names in (("CT_COVID", ["c 1.png", "c%2.png"]), ("CT_NonCOVID", ["n1.jpg", "n2.png"])):
        for n in names:
            _png(root / folder / n)
    (root / "Meta").mkdir()
    (root / "Meta" / "COVID-CT-MetaInfo.csv").write_text("image name,patient id\nc 1.png,P1\nc%2.png,P1\n")
    (root / "Meta" / "NonCOVID-CT-MetaInfo.csv").write_text(",image name,patient id\n0,n1.jpg,q1\n1,n2.png,q2\n")
    for split_dir, suffix, parts in (("COVID", "CT_COVID", {"train": ["c 1.png", "c%2.png"]}),
                                     ("NonCOVID", "CT_NonCOVID", {"train": ["n1.jpg"], "test": ["n2.png"]})):
        (root / "Data-split" / split_dir).mkdir(parents=True)
        for part, names in parts.items():
            (root / "Data-split" / split_dir / f"{part}{suffix}.txt").write_text("\n".join(names) + "\n")
    return root


def test_covid_ct_layout_small(tmp_path: Path) -> None:
    site = load_site(f"B={_mini_covid_ct(tmp_path)}")
    assert site.layout == "covid_ct" and site.has_patients
    assert {s.path.name: (s.label, s.patient, s.split) for s in site.samples} == {
        "c 1.png": (1, "P1", "train"), "c%2.png": (1, "P1", "train"),
        "n1.jpg": (0, "q1", "train"), "n2.png": (0, "q2", "test"),
    }


def test_split_file_naming_a_missing_image_is_an_error(tmp_path: Path) -> None:
    root = _mini_covid_ct(tmp_path)
    with open(root / "Data-split" / "COVID" / "trainCT_COVID.txt", "a") as f:
        f.write("ghost (3).png\n")
    with pytest.raises(SiteError, match=r"ghost \(3\)\.png"):
        load_site(f"B={root}")


def test_bad_sites(tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="does not exist"):
        load_site(f"A={tmp_path / 'nowhere'}")
    (tmp_path / "empty" / "covid").mkdir(parents=True)
    (tmp_path / "empty" / "normal").mkdir()
    with pytest.raises(SiteError, match="no images"):
        load_site(f"E={tmp_path / 'empty'}")
    (tmp_path / "odd" / "stuff").mkdir(parents=True)
    with pytest.raises(SiteError, match="cannot detect"):
        load_site(f"O={tmp_path / 'odd'}")
    with pytest.raises(SiteError, match="unknown layout"):
        load_site(("O", tmp_path, "zip"))
    _png(tmp_path / "two" / "covid" / "a.png")
    _png(tmp_path / "two" / "normal" / "a.png")
    with pytest.raises(SiteError, match="distinct"):
        load_sites([f"X={tmp_path / 'two'}", f"X={tmp_path / 'two'}"])


# --------------------------------------------------------------------------------------- synthetic


def test_synthetic_site_is_reproducible(tmp_path: Path) -> None:
    params = SyntheticParams(shift=0.5, n=6, seed=3, size=64)
    first = synthetic_site("S", params, root=tmp_path / "one")
    again = synthetic_site("S", params, root=tmp_path / "one")  # reuses the materialised files
    fresh = synthetic_site("S", params, root=tmp_path / "two")  # regenerates them
    assert first.layout == "synthetic" and first.has_patients
    assert first.class_counts() == {"non-COVID": 6, "COVID": 6}
    assert first.num_patients() == 2 * -(-6 // SLICES_PER_PATIENT)
    assert [s.path for s in again.samples] == [s.path for s in first.samples]
    for a, b in zip(first.samples, fresh.samples):
        assert (a.label, a.patient) == (b.label, b.patient)
        np.testing.assert_array_equal(read_image(a.path), read_image(b.path))
    other = synthetic_site("S", SyntheticParams(shift=0.5, n=6, seed=4, size=64), root=tmp_path / "one")
    assert not np.array_equal(read_image(other.samples[0].path), read_image(first.samples[0].path))
    assert not list((tmp_path / "one" / "synthetic").glob(".*"))  # no temporary folder left behind


def test_synthetic_spec_and_shift() -> None:
    clean = load_site("S0=synthetic:shift=0,n=4,size=64")
    shifted = load_site("S1=synthetic:shift=2,n=4,size=64")
    assert clean.params["shift"] == 0.0 and shifted.params["shift"] == 2.0
    a = np.stack([read_image(s.path) for s in clean.samples])
    b = np.stack([read_image(s.path) for s in shifted.samples])
    # A shifted scanner is brighter in the background, lower in contrast and noisier.
    assert b[:, :4, :4].mean() > a[:, :4, :4].mean() + 0.05
    assert b[:, :4, :4].std() > a[:, :4, :4].std()
    with pytest.raises(SiteError, match="unknown synthetic option"):
        load_site("S=synthetic:colour=3")
    with pytest.raises(SiteError, match="not a valid int"):
        load_site("S=synthetic:n=many")


def test_synthetic_lesions_only_in_covid() -> None:
    """Without the scanner model, COVID slices carry extra density inside the lungs."""
    from crosssite.data.synthetic import _anatomy, render_slice

    def lung_mean(covid: bool) -> float:
        values = []
        for p in range(6):
            rng = np.random.default_rng([0, p])
            anatomy = _anatomy(rng)
            values.append(render_slice(np.random.default_rng([1, p]), anatomy, covid, 96, 0.0).mean())
        return float(np.mean(values))

    assert lung_mean(True) > lung_mean(False)

