"""A run that fails before it has started leaves nothing behind.

`undo_failed_start` wraps a run (central or federated): when the block raises before the run has started, every
file and folder the block created in the output folder is removed again, so the next command sees the folder as
it was -- not "already holds a run", and no ``--resume`` of a run whose ``config.yaml`` was never written. A
central run has started once one of its folders holds ``split.json`` and ``config.yaml`` (written together after
the data loaded, right before the first step: `run_started`); from then on its files are kept, since ``--resume``
continues from them (with the last checkpoint, or from the first step when none was written yet, e.g. on a full
disk). A federated run cannot be resumed, so its files are kept only once a client saved its state
(`federated_started`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["run_started", "federated_started", "undo_failed_start"]


def _entries(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.is_dir() else set()


def run_started(out_dir: Path) -> bool:
    """Whether ``out_dir`` (or a per-site folder in it) holds a run whose training loop began."""
    folders = [out_dir, *(p for p in out_dir.iterdir() if p.is_dir())] if out_dir.is_dir() else []
    return any((f / "split.json").is_file() and (f / "config.yaml").is_file() for f in folders)


def federated_started(out_dir: Path) -> bool:
    """Whether a client of the federated run in ``out_dir`` saved its state after a round."""
    return out_dir.is_dir() and any(p.is_file() for p in out_dir.glob("*/state.pt"))


@contextlib.contextmanager
def undo_failed_start(out_dir: os.PathLike | str, started: Callable[[Path], bool] = run_started) -> Iterator[None]:
    """Remove what the block created in ``out_dir`` if it raises while ``started(out_dir)`` is false.

    Only the main process (``RANK`` 0 or unset) removes anything; files that existed before are never touched.
    """
    out_dir = Path(out_dir)
    existed = out_dir.exists()
    before = _entries(out_dir)
    try:
        yield
    except BaseException:
        if int(os.environ.get("RANK", 0)) == 0 and not started(out_dir):
            if not existed:
                shutil.rmtree(out_dir, ignore_errors=True)
            else:
                for path in sorted(_entries(out_dir) - before, key=lambda p: len(p.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        raise
