"""The files runners share, under file locks: results.jsonl (read whole, appended one whole line at a time) and
each run's claim file (held while the run trains, removed when it ends, however it ends).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crosssite.experiment.grid import RunKey
from crosssite.ioutil import ensure_dir, guard_output

__all__ = ["finished_keys", "append_line", "claim_run"]

def finished_keys(results: Path) -> set[RunKey]:
    """Keys of the runs that already have a line in ``results`` (read under a shared lock: a line another runner
    is appending is never read half-way)."""
    if not Path(results).is_file():
        return set()
    with open(results, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            text = fh.read().decode("utf-8")
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {RunKey(row["method"], row["backbone"], int(row["fold"]), int(row["seed"]), int(row.get("split_seed", 0)))
            for row in rows}


def append_line(results: Path, row: dict[str, Any]) -> None:
    """Append one JSON line under an exclusive lock, flushed to disk, so parallel runners never interleave; a
    failed write (full disk) is cut off again, so the file never ends in half a line, and is an `OutputError`."""
    with guard_output(results, "the experiment's results"):
        ensure_dir(results.parent)
        line = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
        with open(results, "ab", buffering=0) as fh:  # unbuffered: every byte written is known
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                end = os.lseek(fh.fileno(), 0, os.SEEK_END)
                try:
                    view = memoryview(line)
                    while view:
                        view = view[os.write(fh.fileno(), view):]
                    os.fsync(fh.fileno())
                except OSError:
                    os.ftruncate(fh.fileno(), end)
                    raise
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def claim_run(run_dir: Path) -> Iterator[bool]:
    """Hold the run at ``run_dir`` for this process: yields True while an exclusive lock on its claim file
    (``.NAME.claim`` beside the folder) is held, False when another runner holds it. The holder removes the file
    when its run finished or failed; an interrupted or killed runner leaves it, marking a run left half-way (it
    resumes from its checkpoint), and since the operating system drops the lock with its process, the next runner
    claims it again."""
    path = ensure_dir(run_dir.parent, "the experiment's runs folder") / f".{run_dir.name}.claim"
    while True:
        with guard_output(path, "the run's claim file"):
            fh = open(path, "a")
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            if not _same_file(fh, path):  # its holder removed it between our open and our lock: claim anew
                continue
            try:
                yield True
            except Exception:
                path.unlink(missing_ok=True)  # while locked: a runner that opened it meanwhile sees it gone
                raise
            else:
                path.unlink(missing_ok=True)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
            return


def _same_file(fh: Any, path: Path) -> bool:
    """Whether the open file ``fh`` is still the file at ``path``."""
    try:
        return os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
    except FileNotFoundError:
        return False
