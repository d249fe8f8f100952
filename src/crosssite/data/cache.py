"""Decode cache: every slice decoded and resized once, then read from memory-mapped uint8 files.

Layout of a cache folder (default ``$CROSSSITE_CACHE/slices``, ``$CROSSSITE_CACHE`` defaulting to
``~/.cache/crosssite``):

* ``pack-<id>.u8``: the pixels of many slices, uint8, one after the other (shapes vary);
* ``pack-<id>.json``: ``{key: [offset, height, width]}`` for the slices of that pack, written last, so a pack
  without its index was never finished and is ignored;
* ``files.json``: ``{path: [size, mtime_ns, sha1]}``, so unchanged files are not hashed again.

A slice's key is the SHA-1 of (the file's SHA-1, frame, short side, reader version, window): a file that
changes gets a new key and is decoded again, identical files share one entry, and packs are never
modified after they are written (so several processes can use one folder; at worst they decode the same
slice twice). Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from crosssite.data.io import LUNG_WINDOW, READER_VERSION, check_image_size, read_image
from crosssite.data.sites import Sample
from crosssite.data.transforms import CANONICAL_FRAMES, frame_tag, framed_view
from crosssite.errors import ImageReadError
from crosssite.ioutil import cache_root, guard_output

__all__ = ["cache_root", "file_sha1", "SliceCache"]

_CHUNK = 64  # slices decoded per batch of thread-pool work
CACHE_WHAT = "the decode cache (or set CROSSSITE_CACHE to a folder with space)"


def file_sha1(path: Path) -> str:
    """SHA-1 of a file's bytes; a missing or unreadable file is an `ImageReadError`."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise ImageReadError(path, e.strerror or str(e)) from e
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _FileHashes:
    """``files.json``: file SHA-1 reused while a file's size and modification time are unchanged."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "files.json"
        self.entries: dict[str, list] = self._read()
        self.changed = False

    def _read(self) -> dict[str, list]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def sha1(self, path: Path) -> str:
        try:
            st = path.stat()
        except OSError as e:
            raise ImageReadError(path, e.strerror or str(e)) from e
        key = str(path.resolve())
        entry = self.entries.get(key)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        digest = file_sha1(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            merged = {**self._read(), **self.entries}
            _atomic_write_text(self.path, json.dumps(merged))


class SliceCache:
    """uint8 slices of ``samples`` framed at ``short_side`` (`crosssite.data.transforms.frame_slice`: ``"crop"``
    keeps the aspect ratio with that short side, ``"resize"`` / ``"pad"`` store the whole slice as a square of
    that side), decoded once and memory-mapped.

    ``cache[i]`` is sample ``i``'s slice, uint8 (h, w); `slot_of` finds a sample by value. With
    ``skip_bad=True`` an unreadable sample is recorded in ``skipped`` (sample, reason) and marked False in
    ``valid``; otherwise its `ImageReadError` stops the build. ``whole`` marks the slices a canonical frame shows
    whole for want of a lung field (`crosssite.data.transforms.framed_view`), stored with each packed slice.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        short_side: int = 256,
        cache_dir: Path | str | None = None,
        *,
        frame: str = "crop",
        window: tuple[float, float] | None = LUNG_WINDOW,
        skip_bad: bool = False,
        progress: bool = True,
        threads: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.short_side = short_side
        self.frame = frame
        self.window = window
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "slices"
        self.threads = threads or min(4, os.cpu_count() or 1)
        self.skipped: list[tuple[Sample, str]] = []
        self._maps: dict[str, np.memmap] = {}
        self._index = {s: i for i, s in enumerate(self.samples)}
        # Inputs that fail are ImageReadErrors; an OSError here is the cache's own folder (full, read-only...).
        with guard_output(self.cache_dir, CACHE_WHAT):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._build(skip_bad, progress)

    # ------------------------------------------------------------------------------------------ build

    def _key(self, file_digest: str, sample: Sample) -> str:
        framing = self.short_side if self.frame == "crop" else f"{self.short_side}|{frame_tag(self.frame)}"
        text = f"{file_digest}|{sample.frame}|{framing}|{READER_VERSION}|{self.window}"
        return hashlib.sha1(text.encode()).hexdigest()

    def _read_packs(self) -> dict[str, tuple[str, int, int, int, bool | None]]:
        """key -> (pack, offset, h, w, whole); ``whole`` None in packs written before it was stored."""
        entries: dict[str, tuple[str, int, int, int, bool | None]] = {}
        for index_file in sorted(self.cache_dir.glob("pack-*.json")):
            pack = index_file.stem
            try:
                table = json.loads(index_file.read_text())
            except (OSError, ValueError):
                continue
            if not (self.cache_dir / f"{pack}.u8").is_file():
                continue
            for key, (offset, h, w, *whole) in table.items():
                entries[key] = (pack, offset, h, w, bool(whole[0]) if whole else None)
        return entries

    def _build(self, skip_bad: bool, progress: bool) -> None:
        hashes = _FileHashes(self.cache_dir)
        keys: list[str | None] = []
        for sample in self.samples:
            try:
                keys.append(self._key(hashes.sha1(sample.path), sample))
            except ImageReadError as e:
                if not skip_bad:
                    raise
                self.skipped.append((sample, e.reason))
                keys.append(None)
        hashes.save()
        entries = self._read_packs()
        if self.frame in CANONICAL_FRAMES:  # an older pack does not say which slices were shown whole
            entries = {k: e for k, e in entries.items() if e[4] is not None}
        missing: dict[str, Sample] = {}
        for sample, key in zip(self.samples, keys):
            if key is not None and key not in entries:
                missing.setdefault(key, sample)
        if missing:
            written, failures = self._write_pack(missing, skip_bad, progress)
            entries.update(written)
            self.skipped.extend((s, failures[k]) for s, k in zip(self.samples, keys) if k in failures)
        self.valid = np.array([k is not None and k in entries for k in keys], dtype=bool)
        loc = [entries[k] if ok else ("", 0, 0, 0, False) for k, ok in zip(keys, self.valid)]
        self._packs = [p for p, *_ in loc]
        self._offsets = np.array([o for _, o, _, _, _ in loc], dtype=np.int64)
        self._shapes = np.array([(h, w) for _, _, h, w, _ in loc], dtype=np.int64).reshape(-1, 2)
        self.whole = np.array([bool(e[4]) for e in loc], dtype=bool)

    def _decode(self, sample: Sample) -> tuple[np.ndarray, bool]:
        image = check_image_size(sample.path, read_image(sample.path, sample.frame, self.window))
        return framed_view(image, self.short_side, self.frame)

    def _write_pack(
        self, missing: dict[str, Sample], skip_bad: bool, progress: bool
    ) -> tuple[dict[str, tuple[str, int, int, int, bool]], dict[str, str]]:
        """Decode the missing slices into a new pack; return its entries and the failed keys' reasons."""
        pack = f"pack-{uuid.uuid4().hex[:16]}"
        data_path = self.cache_dir / f"{pack}.u8"
        fd, tmp = tempfile.mkstemp(prefix=f".{pack}-", dir=self.cache_dir)
        table: dict[str, list[int]] = {}
        failures: dict[str, str] = {}
        offset = 0
        items = list(missing.items())
        try:
            with os.fdopen(fd, "wb") as out, ThreadPoolExecutor(self.threads) as pool, _progress(
                progress, len(missing), f"decoding {len(missing)} slices"
            ) as advance:
                # In chunks, so that a bad file stops the build early and few decoded slices wait in memory.
                for start in range(0, len(items), _CHUNK):
                    chunk = items[start : start + _CHUNK]
                    for (key, _), result in zip(chunk, pool.map(self._try_decode, (s for _, s in chunk))):
                        advance()
                        if isinstance(result, ImageReadError):
                            if not skip_bad:
                                raise result
                            failures[key] = result.reason
                            continue
                        pixels, whole = result
                        out.write(pixels.tobytes())
                        table[key] = [offset, *pixels.shape, int(whole)]
                        offset += pixels.size
            if table:
                os.replace(tmp, data_path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        if not table:
            return {}, failures
        _atomic_write_text(self.cache_dir / f"{pack}.json", json.dumps(table))
        return {k: (pack, o, h, w, bool(whole)) for k, (o, h, w, whole) in table.items()}, failures

    def _try_decode(self, sample: Sample) -> tuple[np.ndarray, bool] | ImageReadError:
        try:
            return self._decode(sample)
        except ImageReadError as e:
            return e

    # ----------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.samples)

    def _map(self, pack: str) -> np.memmap:
        mm = self._maps.get(pack)
        if mm is None:
            mm = np.memmap(self.cache_dir / f"{pack}.u8", dtype=np.uint8, mode="r")
            self._maps[pack] = mm
        return mm

    def __getitem__(self, i: int) -> np.ndarray:
        if not self.valid[i]:
            sample = self.samples[i]
            raise ImageReadError(sample.path, "was skipped as unreadable when the cache was built")
        h, w = self._shapes[i]
        offset = self._offsets[i]
        return self._map(self._packs[i])[offset : offset + h * w].reshape(h, w)

    def slot_of(self, sample: Sample) -> int:
        """Position of ``sample`` in this cache; KeyError if it was not given when the cache was built."""
        return self._index[sample]

    def shape(self, i: int) -> tuple[int, int]:
        return tuple(int(v) for v in self._shapes[i])

    def whole_samples(self) -> list[Sample]:
        """The samples a canonical frame shows whole for want of a lung field (none for the other frames)."""
        return [s for s, w in zip(self.samples, self.whole) if w]

    def write_skipped(self, path: Path | str) -> int:
        """Write the skipped samples (path, frame, reason) as JSON; return how many there are."""
        rows = [{"path": str(s.path), "frame": s.frame, "reason": r} for s, r in self.skipped]
        _atomic_write_text(Path(path), json.dumps(rows, indent=1))
        return len(rows)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}  # each process maps the packs itself instead of pickling their pixels
        return state


class _progress:
    """A rich progress bar when ``enabled``; yields a callable that advances it by one."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.enabled = enabled
        self.total = total
        self.description = description
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
