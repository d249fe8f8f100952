"""Uploaded files on their way to `Predictor`: safe names, a private folder per request, safe zip extraction.

Every upload is written to its own numbered folder under a temporary folder that only the server's user can
read (`tempfile.mkdtemp`, mode 0700), removed when the request ends (`request_folder`). A zip archive (a
DICOM series, or any mix of images) is extracted into its folder, which then goes to `Predictor` as a folder
input, so its DICOM files form a series. Extraction refuses, naming the archive: more members than
``max_entries``, a declared decompressed size above ``max_bytes`` (the bytes written are counted against the
same limit, and a member larger than its header says fails its checksum), encrypted members, absolute member
paths and ``..`` components. Symbolic links and nested archives are not followed (a nested archive is reported as a
skipped, non-image file).

Names shown to the client are the upload's own file name (folder parts removed) and, inside an archive, the
member's path: never a path of the server.

Work on a request stops when its ``cancel`` event is set (the request timed out, or the server is stopping):
copying and extraction check it between 1 MiB chunks and raise `RequestCancelled`.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import stat
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from crosssite.errors import CrossSiteError

__all__ = ["RequestCancelled", "UploadError", "ZIP_SUFFIX", "check_cancel", "display_name", "is_zip",
           "request_folder", "save_upload", "extract_zip"]

ZIP_SUFFIX = ".zip"
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class UploadError(CrossSiteError):
    """An uploaded file refused as a whole (a zip bomb, an unreadable archive, an empty file)."""


class RequestCancelled(CrossSiteError):
    """The request's work was stopped: it ran past the request timeout, or the server is shutting down."""


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise `RequestCancelled` once ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise RequestCancelled("request cancelled (timed out, or the server is stopping); its work was stopped")


def display_name(filename: str | None, index: int) -> str:
    """The upload's file name without any folder part or control characters (``file<index>`` if none)."""
    name = _UNSAFE.sub("", (filename or "").replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return name[-200:] if name and name not in (".", "..") else f"file{index}"


def _stored_name(name: str) -> str:
    """The name a file is stored under: its display name without leading dots (hidden files are ignored)."""
    return name.lstrip(".") or "file"


def is_zip(name: str, head: bytes) -> bool:
    """Whether an upload is a zip archive: by its name, or by its first bytes when the name has no suffix."""
    suffix = Path(name).suffix.lower()
    return suffix == ZIP_SUFFIX or (not suffix and head.startswith(_ZIP_MAGIC))


@contextlib.contextmanager
def request_folder(parent: Path | None = None) -> Iterator[Path]:
    """A private temporary folder (mode 0700) for one request, in ``parent`` (the service's own temporary folder;
    None: the system's), removed with everything in it afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="crosssite-serve-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy(src: BinaryIO, dest: Path, limit: int | None, what: str, cancel: threading.Event | None = None) -> int:
    written = 0
    with open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            check_cancel(cancel)
            written += len(chunk)
            if limit is not None and written > limit:
                raise UploadError(f"{what} decompresses to more than {_mb(limit)} (the server's limit); refused")
            out.write(chunk)
    return written


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def save_upload(src: BinaryIO, folder: Path, name: str, cancel: threading.Event | None = None) -> Path:
    """Write an uploaded file into ``folder`` (created) under a safe name; return its path."""
    folder.mkdir(parents=True)
    dest = folder / _stored_name(name)
    if _copy(src, dest, None, name, cancel) == 0:
        raise UploadError("empty file (0 bytes)")
    return dest


def _member_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    path = PurePosixPath(info.filename.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UploadError(f"member {info.filename!r} has an unsafe path (absolute or with '..'); archive refused")
    return tuple(_stored_name(_UNSAFE.sub("", p)) for p in path.parts if p not in ("", "."))


def extract_zip(src: BinaryIO, folder: Path, *, max_bytes: int, max_entries: int,
                cancel: threading.Event | None = None) -> Path:
    """Extract the zip archive ``src`` into ``folder`` (created) within the limits; return ``folder``."""
    folder.mkdir(parents=True)
    try:
        archive = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UploadError(f"not a readable zip archive ({e})") from None
    with archive:
        members = [i for i in archive.infolist() if not i.is_dir()]
        if len(members) > max_entries:
            raise UploadError(f"archive holds {len(members)} files, more than the limit of {max_entries}; refused")
        declared = sum(i.file_size for i in members)
        if declared > max_bytes:
            raise UploadError(f"archive decompresses to {_mb(declared)}, more than the limit of {_mb(max_bytes)}; "
                              "refused")
        left = max_bytes
        for info in members:
            if info.flag_bits & 0x1:
                raise UploadError(f"member {info.filename!r} is encrypted; archive refused")
            if stat.S_ISLNK(info.external_attr >> 16):
                continue
            parts = _member_parts(info)
            if not parts:
                continue
            target = folder.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as member:
                    left -= _copy(member, target, left, "archive", cancel)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
                raise UploadError(f"member {info.filename!r} cannot be extracted ({e}); archive refused") from None
    return folder
