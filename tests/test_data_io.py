"""Readers: PNG/JPEG in every mode, DICOM (modality LUT, window, MONOCHROME1, multi-frame, series), NIfTI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from crosssite.data import expand_inputs, num_frames, read_image, read_volume
from crosssite.data.io import apply_window, inspect_image
from crosssite.errors import ImageReadError

RGB = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
LUMA = (RGB.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) / 255.0


def lung(hu: float) -> float:
    """Expected value of ``hu`` under the default lung window (level -600, width 1500)."""
    return float(np.clip((hu + 1350.0) / 1500.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------------ PNG/JPEG


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_colour_modes_become_luma(tmp_path: Path, mode: str) -> None:
    img = Image.fromarray(RGB)
    if mode == "RGBA":
        img = Image.fromarray(np.dstack([RGB, np.full(RGB.shape[:2], 7, np.uint8)]))
    elif mode == "P":
        img = img.quantize(colors=4)
    assert img.mode == mode
    img.save(tmp_path / "x.png")
    np.testing.assert_allclose(read_image(tmp_path / "x.png"), LUMA, atol=1e-6)


def test_grey_modes(tmp_path: Path) -> None:
    grey = np.array([[0, 51], [204, 255]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.png")
    Image.fromarray(np.dstack([grey, np.zeros_like(grey)])).save(tmp_path / "la.png")
    sixteen = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    np.testing.assert_allclose(read_image(tmp_path / "l.png"), grey / 255.0, atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "la.png"), grey / 255.0, atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "i16.png"), sixteen / 65535.0, atol=1e-6)


def test_jpeg_grey_and_rgb(tmp_path: Path) -> None:
    flat = np.full((16, 16), 128, dtype=np.uint8)
    Image.fromarray(flat).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(np.dstack([flat] * 3)).save(tmp_path / "c.jpeg", quality=95)
    for name in ("g.jpg", "c.jpeg"):
        image = read_image(tmp_path / name)
        assert image.shape == (16, 16) and image.dtype == np.float32
        np.testing.assert_allclose(image, 128 / 255.0, atol=2 / 255.0)


def test_corrupt_png_is_a_named_error(tmp_path: Path, site_a_path: Path) -> None:
    real = (site_a_path / "COVID" / "Covid (1).png").read_bytes()
    truncated = tmp_path / "cut (1).png"
    truncated.write_bytes(real[: len(real) // 2])
    garbage = tmp_path / "noise%2.png"
    garbage.write_bytes(b"\x89PNG not really" * 10)
    for path in (truncated, garbage):
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        assert info.value.path == path and str(path) in str(info.value)
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "missing.png")


# --------------------------------------------------------------------------------------------- DICOM


def write_dicom(
    path: Path,
    stored: np.ndarray,
    slope: float = 1.0,
    intercept: float = 0.0,
    photometric: str = "MONOCHROME2",
    z: float | None = None,
) -> Path:
    """A CT DICOM file with ``stored`` int16 values, (H, W) or (frames, H, W)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if z is not None:
        ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_rescale_to_hu_and_window(tmp_path: Path) -> None:
    hu = np.array([[-1024, -1000], [-600, 150]], dtype=np.float64)
    stored = ((hu + 1024) / 2).astype(np.int16)  # slope 2, intercept -1024
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=2.0, intercept=-1024.0)
    expected = np.vectorize(lung)(hu)
    np.testing.assert_allclose(read_image(path), expected, atol=1e-6)
    np.testing.assert_allclose(read_image(path, window=(0.0, 2000.0)), np.clip((hu + 1000) / 2000, 0, 1), atol=1e-6)
    assert num_frames(path) is None
    assert inspect_image(path).format == "DICOM"


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = np.array([[-1000, -600], [0, 200]], dtype=np.int16)
    normal = read_image(write_dicom(tmp_path / "m2.dcm", stored, intercept=0.0))
    inverted = read_image(write_dicom(tmp_path / "m1.dcm", stored, intercept=0.0, photometric="MONOCHROME1"))
    np.testing.assert_allclose(normal, np.vectorize(lung)(stored.astype(float)), atol=1e-6)
    np.testing.assert_allclose(inverted, 1.0 - normal, atol=1e-6)


def test_dicom_multi_frame(tmp_path: Path) -> None:
    frames_hu = [-1000.0, -700.0, -100.0]
    stored = np.stack([np.full((3, 4), h + 1024, dtype=np.int16) for h in frames_hu])
    path = write_dicom(tmp_path / "multi frame (1).dcm", stored, intercept=-1024.0)
    assert num_frames(path) == 3
    for k, h in enumerate(frames_hu):
        np.testing.assert_allclose(read_image(path, frame=k), lung(h), atol=1e-6)
    assert expand_inputs([path]) == [(path, 0), (path, 1), (path, 2)]
    volume = read_volume(path)
    assert len(volume) == 3 and volume[2].shape == (3, 4)
    with pytest.raises(ImageReadError, match="choose a frame"):
        read_image(path)
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(path, frame=3)


def test_dicom_series_folder_in_patient_order(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    # File names sort the other way round from the slice positions.
    for name, z, h in (("a.dcm", 30.0, -100.0), ("b.dcm", 10.0, -900.0), ("c.dcm", 20.0, -500.0)):
        write_dicom(series / name, np.full((2, 2), h, dtype=np.int16), z=z)
    refs = expand_inputs([series])
    assert [r.path.name for r in refs] == ["b.dcm", "c.dcm", "a.dcm"]
    values = [float(v.mean()) for v in read_volume(series)]
    np.testing.assert_allclose(values, [lung(-900), lung(-500), lung(-100)], atol=1e-6)


def test_dicom_without_pixels_is_a_named_error(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "ok.dcm", np.zeros((2, 2), np.int16))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(tmp_path / "empty.dcm")
    with pytest.raises(ImageReadError, match="empty.dcm.*no pixel data"):
        read_image(tmp_path / "empty.dcm")


# --------------------------------------------------------------------------------------------- NIfTI


def test_nifti_slices_in_canonical_order(tmp_path: Path) -> None:
    """A volume stored flipped in x and z reads slice by slice from inferior to superior, in radiological
    orientation (anterior at the top, the patient's right on the left)."""
    nx, ny, nz = 6, 5, 4
    data = np.zeros((nx, ny, nz), dtype=np.int16)
    for i in range(nz):
        data[..., i] = -1000 + 200 * i  # voxel slice i lies at world z = -i
    data[0, ny - 1, :] = 300  # voxel x=0 is the patient's right-most column, y=ny-1 the most anterior row
    affine = np.diag([-1.0, 1.0, -1.0, 1.0])
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    assert num_frames(path) == nz
    assert len(expand_inputs([path])) == nz
    for k in range(nz):
        image = read_image(path, frame=k)
        assert image.shape == (ny, nx)
        assert image[0, 0] == pytest.approx(lung(300))  # marker: top-left
        voxel_slice = nz - 1 - k  # canonical slice 0 is the most inferior = voxel slice nz-1
        np.testing.assert_allclose(image[1:, 1:], lung(-1000 + 200 * voxel_slice), atol=1e-6)
    chosen = read_volume(path, frames=[1, 3])
    np.testing.assert_allclose(chosen[0], read_image(path, frame=1))
    np.testing.assert_allclose(chosen[1], read_image(path, frame=3))
    with pytest.raises(ImageReadError, match="out of range"):
        read_volume(path, frames=[nz])


def test_nifti_single_slice_and_uncompressed(tmp_path: Path) -> None:
    path = tmp_path / "one.nii"
    nib.save(nib.Nifti1Image(np.full((3, 2, 1), -600, dtype=np.int16), np.eye(4)), str(path))
    assert num_frames(path) is None
    np.testing.assert_allclose(read_image(path), 0.5, atol=1e-6)


def test_apply_window_none_stretches() -> None:
    np.testing.assert_allclose(apply_window(np.array([2.0, 4.0, 6.0]), None), [0.0, 0.5, 1.0])


# ----------------------------------------------------------------------------- volumes inside a site


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_volumes_in_a_folder_site_expand_per_slice(tmp_path: Path) -> None:
    from crosssite.data import check_sites, load_site, make_folds

    (tmp_path / "covid").mkdir()
    (tmp_path / "normal").mkdir()
    for k in range(2):
        volume = np.stack([np.full((4, 5), -900 + 100 * z, np.int16) for z in range(3)], axis=-1)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "covid" / f"case {k}.nii.gz"))
        stored = np.stack([np.full((4, 4), h, np.int16) for h in (-800, -400)])
        write_dicom(tmp_path / "normal" / f"scan{k}.dcm", stored)
    site = load_site(f"V={tmp_path}")
    assert site.layout == "folder" and site.has_patients
    assert site.class_counts() == {"non-COVID": 4, "COVID": 6}
    scan0, scan1 = str(tmp_path / "normal" / "scan0.dcm"), str(tmp_path / "normal" / "scan1.dcm")
    assert [(s.path.name, s.frame, s.patient) for s in site.samples[:3]] == [
        ("scan0.dcm", 0, scan0), ("scan0.dcm", 1, scan0), ("scan1.dcm", 0, scan1)]
    assert read_image(site.samples[1].path, site.samples[1].frame) == pytest.approx(lung(-400))
    folds = make_folds(site, k=2)
    for fold in folds:  # a volume's slices stay together
        volumes = {site.samples[i].path for i in fold}
        assert sum(1 for s in site.samples if s.path in volumes) == len(fold)
    (report,) = check_sites([site])["sites"]
    assert report["formats"] == {"DICOM": 4, "NIfTI": 6} and report["patients"] == 4
    assert report["duplicates"] == 2 + 3  # both DICOM files hold the same 2 frames, both volumes the same 3 slices

    # A DICOM file whose header is broken stays in the site as one sample and is reported unreadable.
    (tmp_path / "normal" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 20)
    site = load_site(f"V={tmp_path}")
    (report,) = check_sites([site])["sites"]
    assert [Path(p).name for p in report["unreadable"]] == ["broken.dcm"]


# ------------------------------------------------------------------------------- what is refused, and how


def test_files_that_are_not_dicom_say_so_at_once(tmp_path: Path) -> None:
    """An empty, a zero-filled (20 MB) and a random-byte ``.dcm`` are "not a DICOM file" (read from the first 132
    bytes, not parsed as millions of empty elements); a real DICOM without pixels "holds no pixel data"."""
    (tmp_path / "empty.dcm").write_bytes(b"")
    with open(tmp_path / "zeros.dcm", "wb") as f:
        f.truncate(20 * 2**20)
    (tmp_path / "random.dcm").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    for name in ("empty.dcm", "zeros.dcm", "random.dcm"):
        with pytest.raises(ImageReadError, match=rf"{name}: not a DICOM file"):
            read_image(tmp_path / name)
        with pytest.raises(ImageReadError, match="not a DICOM file"):
            num_frames(tmp_path / name)
    ds = pydicom.dcmread(write_dicom(tmp_path / "ct.dcm", np.zeros((4, 4), np.int16)))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match="holds no pixel data"):
        read_image(tmp_path / "nopixels.dcm")


def test_sizes_declared_past_the_limits_are_refused_before_decoding(tmp_path: Path) -> None:
    """A 10000 x 10000 PNG gets our named error, not Pillow's DecompressionBombWarning; a DICOM declaring 4 GiB of
    pixels (a few bytes stored) is refused from its header."""
    import warnings

    Image.new("1", (10000, 10000)).save(tmp_path / "huge.png")  # 100 megapixels in a few kB
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any library warning fails the test
        with pytest.raises(ImageReadError, match=r"huge.png: image of 10000 x 10000 pixels is larger than the limit"):
            read_image(tmp_path / "huge.png")
        with pytest.raises(ImageReadError, match="larger than the limit"):
            inspect_image(tmp_path / "huge.png")
    path = write_dicom(tmp_path / "bomb.dcm", np.zeros((2, 2), np.int16))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 8192, 8192, 32
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"bomb.dcm: DICOM pixel data of 4096 MiB declared .* refused before"):
        read_image(path, frame=0)


def test_nifti_declaring_too_many_voxels_is_refused_from_its_header(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 128))  # 512 M voxels declared; a few bytes of data on disk
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    with pytest.raises(ImageReadError, match=r"huge.nii: NIfTI volume of shape \(2048, 2048, 128\) is larger"):
        num_frames(path)
