"""Image readers: every supported file becomes float32 grey slices (H, W) in [0, 1].

* PNG / JPEG / BMP / TIFF (Pillow), any mode: ``L``, ``LA``, ``RGB``, ``RGBA``, ``P``, ``1``, ``CMYK``, 16-bit
  (``I;16``) and 32-bit (``I``, ``F``). Colour is turned to grey with ITU-R 601 luma weights; alpha is dropped.
* DICOM (pydicom, with the pylibjpeg / pyjpegls / GDCM decoder plugins for every standard compression):
  stored values go through the modality LUT (rescale slope / intercept) to Hounsfield units and a window
  (default lung window, level -600, width 1500) maps them to [0, 1]; ``MONOCHROME1`` is inverted; a multi-frame
  file holds one slice per frame; colour (RGB, YBR as decoded to RGB, palette) becomes luma. A CT image without
  RescaleSlope / RescaleIntercept (Type 1 in the CT Image module, so non-conformant) is read with the identity
  LUT (slope 1, intercept 0) only when its values look like HU (some below `MIN_AIR_HU`), and is refused
  otherwise; `input_warnings` says so, and names a Modality other than CT or a non-axial slice. Images without a
  modality LUT that are not CT (e.g. secondary captures) are stretched over their own range.
* NIfTI (``.nii``, ``.nii.gz``, nibabel): reoriented to the closest canonical (RAS+) orientation; slice
  ``k`` is the ``k``-th axial slice from inferior to superior, shown in radiological convention (rows run
  anterior to posterior, columns from the patient's right to left); values are taken as Hounsfield units
  and windowed like DICOM.

Every failure raises `ImageReadError(path, reason)`.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from crosssite.errors import ImageReadError

__all__ = [
    "LUNG_WINDOW",
    "READER_VERSION",
    "SliceRef",
    "is_supported_file",
    "image_kind",
    "num_frames",
    "read_image",
    "DRAFT_MARGIN",
    "draft_scale",
    "read_volume",
    "expand_inputs",
    "apply_window",
    "ImageInfo",
    "inspect_image",
    "MIN_IMAGE_SIDE",
    "MAX_IMAGE_PIXELS",
    "MAX_DICOM_PIXEL_BYTES",
    "MAX_VOLUME_VOXELS",
    "check_image_size",
    "too_small",
    "input_warnings",
]

READER_VERSION = 2
"""Bumped whenever decoding changes, so decode caches built by an older reader are not reused."""

LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)
"""Default (level, width) window in Hounsfield units."""

MIN_AIR_HU = -500.0
"""A chest CT slice in Hounsfield units holds air (about -1000 outside the body, -850 in the lungs) below this."""

MAX_IMAGE_PIXELS = 8192 * 8192
"""Most pixels of one 2D image (or one frame) read: far above any CT slice (512 x 512 to 2048 x 2048), below what
lets a small compressed file (a "decompression bomb") take gigabytes of memory and minutes to decode. Checked
from the header, before any pixel is decoded."""

MAX_DICOM_PIXEL_BYTES = 2**30
"""Most bytes of decoded pixel data (rows x columns x frames x samples x bits) one DICOM file may declare: a
2000-frame 512 x 512 16-bit file. Checked from the header, before the pixel data is decoded."""

MAX_VOLUME_VOXELS = 2**28
"""Most voxels of one NIfTI volume read (1 GiB as float32; a 600-slice 512 x 512 series is 157 M), checked from its
header before the data is decompressed."""

MIN_IMAGE_SIDE = 8
"""Fewest pixels along either side of an image that is trained on, evaluated, or predicted without a warning:
a smaller one is a thumbnail or a broken export, not a CT slice (the network sees it upscaled to a blur)."""

PIL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class SliceRef(NamedTuple):
    """One 2D slice of an input file: ``frame`` is None for single-slice files."""

    path: Path
    frame: int | None


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def image_kind(path: Path | str) -> str | None:
    """``"pil"``, ``"dicom"``, ``"nifti"`` or None for a file no reader handles (by suffix, or DICOM magic)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in PIL_SUFFIXES:
        return "pil"
    if suffix in DICOM_SUFFIXES or _has_dicom_magic(path):
        return "dicom"
    return None


def is_supported_file(path: Path | str) -> bool:
    """Whether `read_image` can read ``path`` (judged by name and, for DICOM, by its magic bytes)."""
    return image_kind(path) is not None


# ------------------------------------------------------------------------------------------ windowing


def apply_window(hu: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Map values to [0, 1] through a (level, width) window; None stretches the slice's own min..max."""
    hu = hu.astype(np.float32, copy=False)
    if window is None:
        lo, hi = float(hu.min()), float(hu.max())
        width = hi - lo if hi > lo else 1.0
    else:
        level, width = window
        if width <= 0:
            raise ValueError(f"window width must be positive, got {width}")
        lo = level - width / 2.0
    return np.clip((hu - lo) / width, 0.0, 1.0).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------ PIL


def _pil_to_grey(img) -> np.ndarray:
    """Any Pillow image -> float32 grey in [0, 1]."""
    mode = img.mode
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
        mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    if mode in ("L", "LA"):
        arr = np.asarray(img)
        return (arr[..., 0] if arr.ndim == 3 else arr).astype(np.float32) / 255.0
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        arr = np.asarray(img)[..., :3].astype(np.float32)
        return (arr @ _LUMA) / 255.0
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.float32) / 65535.0
    if mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float32)
        if mode == "I" and arr.min() >= 0 and arr.max() <= 65535:
            return arr / 65535.0
        return apply_window(arr, None)
    raise ValueError(f"unsupported image mode {mode}")


DRAFT_MARGIN = 2
"""A JPEG read with ``draft`` is decoded at a reduced DCT scale only while at least this many decoded pixels remain
per pixel of the framed slice, on each axis that matters, so the resize that follows still averages over several
decoded pixels instead of aliasing."""


def draft_scale(width: int, height: int, size: int, frame: str) -> int:
    """The coarsest JPEG DCT scale (1, 2, 4 or 8) for a slice of ``width`` x ``height`` that is then framed at
    ``size`` (`crosssite.data.transforms.frame_slice`) that keeps `DRAFT_MARGIN` decoded pixels per framed pixel:
    ``"pad"`` resizes the long side to ``size``, ``"resize"`` and ``"crop"`` bring the short side to it."""
    side = max(width, height) if frame == "pad" else min(width, height)
    for scale in (8, 4, 2):
        if side / scale >= DRAFT_MARGIN * size:
            return scale
    return 1


def _open_pil(path: Path):
    """``Image.open`` with our own size limit, checked from the header: a named error instead of Pillow's
    DecompressionBombWarning (a library path on stderr), whose threshold lies above `MAX_IMAGE_PIXELS`."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise ValueError(f"image of {width} x {height} pixels is larger than the limit of "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels for a CT slice; refused before decoding")
    return img


def _read_pil(path: Path, frame: int | None, draft: tuple[int, str] | None = None) -> np.ndarray:
    with _open_pil(path) as img:
        if frame:
            img.seek(frame)
        if draft is not None and img.format == "JPEG":
            scale = draft_scale(*img.size, *draft)
            if scale > 1:  # Pillow picks the coarsest scale whose result is at least the size asked for
                img.draft(img.mode, (img.size[0] // scale, img.size[1] // scale))
        img.load()
        return _pil_to_grey(img)


# ---------------------------------------------------------------------------------------------- DICOM


def _dicom_to_grey(ds, pixels: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("YBR"):
        # pydicom's pixel_array returns YBR_FULL / YBR_FULL_422 converted to RGB, and the JPEG 2000 decoders undo
        # YBR_RCT / YBR_ICT themselves: the pixels are RGB already (converting again would shift every colour).
        photometric = "RGB"
    if photometric in ("RGB", "PALETTE COLOR"):
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            pixels = apply_color_lut(pixels, ds)
        scale = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        return np.clip((pixels[..., :3].astype(np.float32) @ _LUMA) / scale, 0.0, 1.0)
    has_lut = "RescaleSlope" in ds or "RescaleIntercept" in ds
    is_ct = str(ds.get("Modality", "")).upper() == "CT" or has_lut
    if is_ct:
        if not has_lut:
            _check_hounsfield(pixels)
        grey = apply_window(apply_modality_lut(pixels, ds), window)
    else:
        grey = apply_window(pixels.astype(np.float32), None)
    return 1.0 - grey if photometric == "MONOCHROME1" else grey


def _check_hounsfield(stored: np.ndarray) -> None:
    """A CT image without RescaleSlope / RescaleIntercept: its stored values are read as HU (slope 1, intercept 0,
    the identity modality LUT the standard gives when the module is absent) only when they look like HU."""
    low, high = float(stored.min()), float(stored.max())
    if low >= MIN_AIR_HU:
        raise ValueError(
            f"CT image without RescaleSlope/RescaleIntercept (Type 1 in the DICOM CT Image module) whose stored "
            f"values {low:g}..{high:g} hold no air (nothing below {MIN_AIR_HU:g} HU), so they are not Hounsfield "
            "units (likely raw detector values needing an intercept such as -1024); add the scanner's rescale tags"
        )


def _dicom_num_frames(ds) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


_DICOM_GROUPS = (0x0002, 0x0008)  # the first group of a DICOM data set written without the 128-byte preamble


def _dicom_header(path: Path):
    """The data set up to its pixel data; "not a DICOM file" for a file with neither the DICM marker nor a DICOM
    group first (an empty, zero-filled or random file: pydicom's forced reading would parse zeros as millions of
    empty elements), and a pixel data size past `MAX_DICOM_PIXEL_BYTES` refused before anything is decoded."""
    import pydicom

    with open(path, "rb") as f:
        head = f.read(132)
    raw_group = int.from_bytes(head[:2], "little") if len(head) >= 2 else -1
    if head[128:132] != b"DICM" and raw_group not in _DICOM_GROUPS and raw_group not in (0x0200, 0x0800):
        raise ValueError("not a DICOM file (no DICM marker and no DICOM header)"
                         if head else "not a DICOM file (empty, 0 bytes)")
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * columns > MAX_IMAGE_PIXELS:
        raise ValueError(f"DICOM image of {columns} x {rows} pixels is larger than the limit of "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; refused before decoding")
    declared = (rows * columns * _dicom_num_frames(ds) * int(ds.get("SamplesPerPixel", 1) or 1)
                * int(ds.get("BitsAllocated", 16) or 16) // 8)
    if declared > MAX_DICOM_PIXEL_BYTES:
        raise ValueError(f"DICOM pixel data of {declared / 2**20:.0f} MiB declared ({columns} x {rows} x "
                         f"{_dicom_num_frames(ds)} frames), more than the limit of {MAX_DICOM_PIXEL_BYTES / 2**20:.0f}"
                         " MiB; refused before decoding")
    return ds


def _read_dicom(path: Path, frame: int | None, window: tuple[float, float] | None) -> np.ndarray:
    import pydicom

    ds = _dicom_header(path)
    n = _dicom_num_frames(ds)
    if n > 1:
        if frame is None:
            raise ValueError(f"multi-frame DICOM of {n} frames; choose a frame (or use read_volume)")
        if not 0 <= frame < n:
            raise ValueError(f"frame {frame} out of range (file has {n} frames)")
        ds, frames = _volume(path, "dicom")
        return _dicom_to_grey(ds, frames[frame], window)
    if frame not in (None, 0):
        raise ValueError(f"frame {frame} out of range (file has 1 frame)")
    ds = pydicom.dcmread(path, force=True)
    if "PixelData" not in ds:
        raise ValueError("DICOM file holds no pixel data")
    return _dicom_to_grey(ds, ds.pixel_array, window)


# ---------------------------------------------------------------------------------------------- NIfTI


def _nifti_volume(path: Path):
    """The canonical (RAS+) image, and its shape as 3D (a 2D image gets a slice axis of 1)."""
    import nibabel as nib

    loaded = nib.load(str(path))  # the header only: the data stays on disk until asked for
    if int(np.prod(loaded.shape[:3], dtype=np.int64)) > MAX_VOLUME_VOXELS:
        raise ValueError(f"NIfTI volume of shape {tuple(loaded.shape[:3])} is larger than the limit of "
                         f"{MAX_VOLUME_VOXELS / 2**20:.0f} M voxels; refused before decoding")
    img = nib.as_closest_canonical(loaded)
    shape = img.shape
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) > 3 and any(d != 1 for d in shape[3:]):
        raise ValueError(f"NIfTI of shape {img.shape}: only 3D volumes (one time point) are supported")
    return img, shape[:3]


def _read_nifti(path: Path, frame: int | None, window: tuple[float, float] | None) -> np.ndarray:
    _, shape = _nifti_volume(path)
    n = shape[2]
    if frame is None:
        if n > 1:
            raise ValueError(f"NIfTI volume of {n} axial slices; choose a frame (or use read_volume)")
        frame = 0
    if not 0 <= frame < n:
        raise ValueError(f"slice {frame} out of range (volume has {n} axial slices)")
    data = _volume(path, "nifti")[..., frame]  # (x, y), canonical
    # RAS+: x grows toward the patient's right, y toward anterior. Rows must run anterior -> posterior and
    # columns from the patient's right to left, so both axes are reversed and then transposed.
    return apply_window(np.ascontiguousarray(data[::-1, ::-1].T), window)


# ------------------------------------------------------------------------------------ volume memory


_VOLUME_LOCK = threading.Lock()


@functools.lru_cache(maxsize=2)
def _load_volume(path: str, kind: str, size: int, mtime_ns: int):
    """A decoded volume: NIfTI -> float32 (x, y, z) canonical; DICOM -> (dataset, frames (N, H, W)).

    Kept for the next slices: reading slice by slice would otherwise decode (and, for ``.nii.gz``,
    decompress) the whole file once per slice.
    """
    if kind == "nifti":
        img, shape = _nifti_volume(Path(path))
        return np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    import pydicom

    _dicom_header(path)
    ds = pydicom.dcmread(path, force=True)
    if "PixelData" not in ds:
        raise ValueError("DICOM file holds no pixel data")
    return ds, ds.pixel_array


def _volume(path: Path, kind: str):
    st = path.stat()
    with _VOLUME_LOCK:  # one thread decodes a volume; the others then find it decoded
        return _load_volume(str(path.resolve()), kind, st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------------------------- public


class ImageInfo(NamedTuple):
    """What `inspect_image` learns from decoding one slice."""

    format: str  # PNG, JPEG, ..., DICOM, NIfTI
    mode: str  # Pillow mode, DICOM photometric interpretation, or NIfTI data type
    width: int
    height: int
    digest: str  # SHA-1 of the decoded pixels (with their mode and shape): equal pixels, equal digest


def _fail(path: Path, e: BaseException) -> ImageReadError:
    reason = str(e) or type(e).__name__
    return ImageReadError(path, reason)


def read_image(
    path: Path | str, frame: int | None = None, window: tuple[float, float] | None = LUNG_WINDOW, *,
    draft: tuple[int, str] | None = None,
) -> np.ndarray:
    """Read one 2D slice as float32 (H, W) in [0, 1]; ``frame`` picks a slice of a multi-slice file.

    ``window`` is the (level, width) in Hounsfield units for DICOM CT and NIfTI (None: the slice's own
    range); it does not affect PNG/JPEG. ``draft=(size, frame)``: the slice is for a model that frames it at
    ``size``, so a JPEG may be decoded at a reduced DCT scale (`draft_scale`); every other format, and a JPEG too
    small to reduce, decodes in full.
    """
    path = Path(path)
    kind = image_kind(path)
    if kind is None:
        raise ImageReadError(path, "unsupported file type (expected PNG, JPEG, BMP, TIFF, DICOM or NIfTI)")
    try:
        if kind == "pil":
            image = _read_pil(path, frame, draft)
        elif kind == "dicom":
            image = _read_dicom(path, frame, window)
        else:
            image = _read_nifti(path, frame, window)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist") from None
    except Exception as e:  # decoders raise many types (OSError, ValueError, SyntaxError, struct.error...)
        raise _fail(path, e) from e
    if image.ndim != 2 or min(image.shape) < 1:
        raise ImageReadError(path, f"decoded to shape {image.shape}, expected a 2D image")
    if not np.isfinite(image).all():
        raise ImageReadError(path, "decoded pixels are not finite")
    return np.ascontiguousarray(image, dtype=np.float32)


def check_image_size(path: Path | str, image: np.ndarray) -> np.ndarray:
    """``image`` itself, or `ImageReadError` naming ``path`` when a side is below `MIN_IMAGE_SIDE` pixels."""
    if min(image.shape) < MIN_IMAGE_SIDE:
        height, width = image.shape
        raise ImageReadError(path, too_small(width, height))
    return image


def too_small(width: int, height: int) -> str:
    """The reason given for an image below `MIN_IMAGE_SIDE`."""
    minimum = f"{MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE}"
    return f"image of {width} x {height} pixels is below the minimum of {minimum} for a CT slice"


def _dicom_header_warnings(ds) -> list[str]:
    modality = str(ds.get("Modality", "") or "").upper()
    if modality != "CT":
        kind = f"Modality {modality}" if modality else "no Modality"
        return [f"{kind}, not CT: scored as if it were a chest CT slice"]
    found = []
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if len(image_type) >= 3 and image_type[2] == "LOCALIZER":
        found.append("a localizer (scout) image, not an axial slice")
    orientation = ds.get("ImageOrientationPatient")
    if orientation is not None and len(orientation) == 6:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        if np.linalg.norm(normal) > 0 and abs(normal[2]) / np.linalg.norm(normal) < 0.9:
            found.append("slice orientation is not axial (plane normal {:.2f} {:.2f} {:.2f})".format(*normal))
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        found.append("no RescaleSlope/RescaleIntercept: stored values taken as Hounsfield units (slope 1, "
                     "intercept 0)")
    return found


def _image_size(path: Path, kind: str) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding the pixels."""
    if kind == "pil":
        from PIL import Image

        with _open_pil(path) as img:
            return img.size
    if kind == "dicom":
        ds = _dicom_header(path)
        return int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
    shape = _nifti_volume(path)[1]
    return shape[0], shape[1]


def input_warnings(path: Path | str) -> list[str]:
    """Why a readable file may not be what a chest-CT classifier expects (empty when nothing is odd): a DICOM
    whose Modality is not CT, a localizer or non-axial slice, a CT without rescale tags, a side below
    `MIN_IMAGE_SIDE`. Read from the header only; a file that cannot be read gives no warning (its read fails)."""
    path = Path(path)
    kind = image_kind(path)
    found = []
    try:
        if kind == "dicom":
            found += _dicom_header_warnings(_dicom_header(path))
        size = _image_size(path, kind) if kind is not None else None
    except Exception:  # the read itself reports it
        return found
    if size is not None and 0 < min(size) < MIN_IMAGE_SIDE:
        found.append(too_small(*size))
    return found


def num_frames(path: Path | str) -> int | None:
    """Number of slices of a multi-slice file (multi-frame DICOM, NIfTI volume); None for a 2D image."""
    path = Path(path)
    kind = image_kind(path)
    if kind == "pil" or kind is None:
        return None
    try:
        if kind == "dicom":
            n = _dicom_num_frames(_dicom_header(path))
        else:
            n = _nifti_volume(path)[1][2]
    except Exception as e:
        raise _fail(path, e) from e
    return n if n > 1 else None


def read_volume(
    path: Path | str,
    frames: Sequence[int] | None = None,
    window: tuple[float, float] | None = LUNG_WINDOW,
) -> list[np.ndarray]:
    """All slices (or the chosen ``frames``) of a file or of a DICOM series folder, in order."""
    refs = expand_inputs([path])
    if frames is not None:
        n = len(refs)
        bad = [f for f in frames if not 0 <= f < n]
        if bad:
            raise ImageReadError(Path(path), f"slice(s) {bad} out of range (input has {n} slices)")
        refs = [refs[f] for f in frames]
    return [read_image(r.path, r.frame, window) for r in refs]


def dicom_series_order(files: list[Path]) -> list[Path]:
    """Sort the files of a DICOM series along the patient axis (position, else instance number, else name)."""
    keys = []
    for f in files:
        try:
            ds = _dicom_header(f)
        except Exception as e:
            raise _fail(f, e) from e
        position = ds.get("ImagePositionPatient")
        z = float(position[2]) if position is not None and len(position) == 3 else None
        instance = ds.get("InstanceNumber")
        keys.append((z is None, z or 0.0, instance is None, int(instance or 0), f.name))
    return [f for _, f in sorted(zip(keys, files), key=lambda t: t[0])]


def expand_inputs(paths: Iterable[Path | str]) -> list[SliceRef]:
    """Turn files and folders into 2D slices: a volume gives one `SliceRef` per slice; a folder gives the
    supported files directly inside it (other images by name, then a DICOM series in patient-axis order:
    ImagePositionPatient, else InstanceNumber, else file name)."""
    refs: list[SliceRef] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and is_supported_file(f))
            if not files:
                raise ImageReadError(p, "folder holds no supported image files")
            dicoms = [f for f in files if image_kind(f) == "dicom"]
            others = [f for f in files if image_kind(f) != "dicom"]
            refs.extend(expand_inputs(others))
            for f in dicom_series_order(dicoms):
                refs.extend(expand_inputs([f]))
        elif p.is_file():
            if not is_supported_file(p):
                raise ImageReadError(p, "unsupported file type (expected PNG, JPEG, BMP, TIFF, DICOM or NIfTI)")
            n = num_frames(p)
            refs.extend([SliceRef(p, None)] if n is None else [SliceRef(p, k) for k in range(n)])
        else:
            raise ImageReadError(p, "file does not exist")
    return refs


def _pixel_digest(mode: str, pixels: np.ndarray) -> str:
    digest = hashlib.sha1(f"{mode}|{pixels.dtype}|{pixels.shape}|".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def _inspect(path: Path, frame: int | None, window: tuple[float, float] | None) -> ImageInfo:
    kind = image_kind(path)
    if kind == "pil":
        from PIL import Image

        with _open_pil(path) as img:
            if frame:
                img.seek(frame)
            img.load()
            _pil_to_grey(img)  # the conversion must succeed too
            pixels = np.asarray(img.convert("RGBA") if img.mode in ("P", "PA") else img)  # colours, not indices
            return ImageInfo(img.format or path.suffix.lstrip(".").upper(), img.mode, img.width, img.height,
                             _pixel_digest(img.mode, pixels))
    grey = read_image(path, frame, window)
    if kind == "dicom":
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        fmt, mode = "DICOM", str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    else:
        import nibabel as nib

        fmt, mode = "NIfTI", str(nib.load(str(path)).get_data_dtype())
    return ImageInfo(fmt, mode, grey.shape[1], grey.shape[0], _pixel_digest(mode, grey))


def inspect_image(
    path: Path | str, frame: int | None = None, window: tuple[float, float] | None = LUNG_WINDOW
) -> ImageInfo:
    """Decode one slice fully and describe it (format, mode, size, pixel digest); `ImageReadError` if it
    cannot be read."""
    path = Path(path)
    if image_kind(path) is None:
        raise ImageReadError(path, "unsupported file type (expected PNG, JPEG, BMP, TIFF, DICOM or NIfTI)")
    try:
        return _inspect(path, frame, window)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist") from None
    except Exception as e:
        raise _fail(path, e) from e
