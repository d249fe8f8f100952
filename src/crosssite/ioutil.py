"""Writing outputs: one place that turns an operating-system failure on an output into a named `OutputError`.

Every command writes through `guard_output` (directly, or through the atomic writers below), and the command
line's group (`crosssite.cli.app`) maps any such error left unguarded with `output_error`, so a full disk, a
read-only file system, a missing permission or a file where a folder should be gives one line -- the path, what
failed, what to do -- and exit status 1, never a traceback. The atomic writers write to a temporary file and
rename it into place, so a failed write leaves no partial file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from crosssite.errors import OutputError

__all__ = ["OUTPUT_ERRNOS", "output_error", "guard_output", "ensure_dir", "atomic_write", "atomic_write_bytes",
           "atomic_write_text", "atomic_folder", "cache_root", "read_jsonl"]

OUTPUT_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose a path whose parents are folders"),
    errno.EISDIR: ("it is a folder", "give a file name"),
    errno.EEXIST: ("a file is in the way of a folder", "remove it or choose another path"),
    errno.EACCES: ("permission denied", "choose a folder you may write to, or change its permissions"),
    errno.EPERM: ("operation not permitted (immutable or protected)", "choose another folder"),
    errno.EROFS: ("read-only file system", "choose a folder on a writable file system"),
    errno.ENOSPC: ("no space left on device", "free space or choose a folder on another disk, then run again "
                   "(a training run continues with --resume)"),
    errno.EDQUOT: ("disk quota exceeded", "free space within the quota or choose another disk"),
    errno.EFBIG: ("file too large for the file system or the process limit", "raise the limit (ulimit -f) or "
                  "choose another disk"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
}
"""errno -> (what went wrong, what to do) for the failures `guard_output` (and the command line) names."""

_GUARDED_ONLY: dict[int, tuple[str, str]] = {
    errno.ENOENT: ("the file system refuses new files there (e.g. /proc)", "choose a folder on a disk"),
}
"""Failures that are about the output only inside `guard_output` (elsewhere ENOENT is usually a missing input)."""


def output_error(error: OSError, path: object | None = None, what: str = "output") -> OutputError | None:
    """The `OutputError` for ``error`` (None when its errno is not an output failure of `OUTPUT_ERRNOS`).

    ``path`` is the output being written; without it the error's own file name is used.
    """
    known = OUTPUT_ERRNOS.get(error.errno) or (_GUARDED_ONLY.get(error.errno) if path is not None else None)
    if known is None:
        return None
    reason, hint = known
    where = error.filename if path is None else path
    if path is not None and error.filename is not None and not _is_or_temp_of(Path(error.filename), Path(path)):
        reason = f"{reason} ({error.filename})"
    return OutputError(where, what, reason, hint)


def _is_or_temp_of(name: Path, path: Path) -> bool:
    """Whether ``name`` is ``path`` or the temporary file `atomic_write` writes beside it."""
    return name == path or (name.parent == path.parent and name.name.startswith(f".{path.name}."))


@contextlib.contextmanager
def guard_output(path: os.PathLike | str, what: str) -> Iterator[None]:
    """Turn an `OSError` of `OUTPUT_ERRNOS` raised inside the block into an `OutputError` naming ``path``."""
    try:
        yield
    except OSError as e:
        mapped = output_error(e, path, what)
        if mapped is None:
            raise
        raise mapped from e


def ensure_dir(path: os.PathLike | str, what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents); a file in the way or an unwritable parent is an `OutputError`."""
    path = Path(path)
    with guard_output(path, what):
        if path.exists() and not path.is_dir():
            raise FileExistsError(errno.EEXIST, "is a file", str(path))
        path.mkdir(parents=True, exist_ok=True)
    return path


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: os.PathLike | str, write: Callable[[str], None], what: str = "file") -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk and move it onto ``path``.

    A run killed at any instant, or a write that fails (full disk, size limit...), leaves either the old file or
    none, never a partial one; the temporary file is removed. OS failures of `OUTPUT_ERRNOS` raise `OutputError`.
    """
    path = Path(path)
    with guard_output(path, what):
        ensure_dir(path.parent, f"the folder of the {what} {path.name}")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would
            os.close(fd)
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def atomic_write_bytes(path: os.PathLike | str, data: bytes, what: str = "file") -> Path:
    """Write ``data`` to ``path`` atomically (see `atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write, what)


def atomic_write_text(path: os.PathLike | str, text: str, what: str = "file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), what)


def atomic_folder(folder: Path, generate: Callable[[Path], None], done: str = "manifest.csv") -> Path:
    """``folder``, made once by ``generate(tmp)`` in a temporary sibling renamed into place, so no user ever sees
    half a folder; where another process finished it first (its ``done`` file exists), that folder is kept."""
    if (folder / done).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        generate(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same folder first
            if not (folder / done).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def cache_root() -> Path:
    """``$CROSSSITE_CACHE``, or ``~/.cache/crosssite``."""
    return Path(os.environ.get("CROSSSITE_CACHE", "~/.cache/crosssite")).expanduser()


def read_jsonl(path: os.PathLike | str) -> list[Any]:
    """The objects of a JSON-lines file (blank lines skipped); an empty list when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
