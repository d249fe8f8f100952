"""Pseudo-patients for a site without patient ids: slices grouped by their file numbering and their near-duplicate
images, so that no split puts one patient's near-identical slices on both of its sides.

A site such as SARS-CoV-2 CT (site A) ships numbered slices (``Covid (12).png``) and no patient ids, but its
numbering follows patients, and one patient's slices are near-duplicates of each other; a random split then tests
on slices whose twins were trained on. Two links join slices into one group (union-find):

* **near-duplicates**: the 16 x 16 average hashes (`average_hash`) of two slices of the site differ in at most
  `NEAR_DUPLICATE_BITS` of 256 bits, whatever their class or number;
* **runs**: two slices of one class folder with consecutive file numbers whose hashes differ in at most
  `RUN_BITS` bits (a new patient starts where the numbering jumps to an unlike slice).

Both thresholds are set from pairs that cannot be one patient's: a COVID and a non-COVID slice. On site A no such
pair is within 8 bits (the closest is 9) and 99% of them are more than 26 bits apart (docs/METHODS.md, "Pseudo-
patients"), so a link is a pair more alike than any (near-duplicates) or than 99% (runs) of different patients.

Hashes are cached under the decode cache (``CROSSSITE_CACHE``), keyed by each file's path, size and mtime.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from crosssite.data.io import read_image
from crosssite.data.sites import Site
from crosssite.errors import CrossSiteError, ImageReadError
from crosssite.ioutil import atomic_write_bytes, cache_root

__all__ = ["NEAR_DUPLICATE_BITS", "RUN_BITS", "HASH_SIZE", "average_hash", "site_hashes", "hamming",
           "near_duplicate_pairs", "file_number", "pseudo_patients", "straddling_pairs", "group_sizes"]

HASH_SIZE = 16
NEAR_DUPLICATE_BITS = 8
RUN_BITS = 26
# Groups per (files, thresholds): a run computes its folds, validation part and report from the same site.
_GROUPS: dict[tuple[str, int, int], np.ndarray] = {}
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def average_hash(grey: np.ndarray, size: int = HASH_SIZE) -> np.ndarray:
    """The slice's average hash: the slice shrunk to ``size`` x ``size`` (Pillow's antialiased bilinear filter), one
    bit per cell (above the cells' mean), packed
    into ``size * size / 8`` bytes. ``grey``: float (H, W) in [0, 1]."""
    small = np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    return np.packbits(small > small.mean())


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distances between packed hashes ``a`` (..., B) and ``b`` (..., B), broadcast."""
    return _POPCOUNT[np.bitwise_xor(a, b)].sum(-1, dtype=np.int64)


def _hash_key(site: Site) -> str:
    digest = hashlib.sha1(f"ahash{HASH_SIZE}-bilinear".encode())
    for s in site.samples:
        st = Path(s.path).stat()
        digest.update(f"{s.path}\0{s.frame}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _hash_one(sample) -> np.ndarray:
    try:
        return average_hash(read_image(sample.path, sample.frame))
    except ImageReadError:  # an unreadable slice links to nothing; training reports it where it reads it
        return np.zeros(HASH_SIZE * HASH_SIZE // 8, dtype=np.uint8)


def site_hashes(site: Site, threads: int = 2) -> np.ndarray:
    """Average hashes of every slice of ``site`` (N, 32) uint8, from the cache when the files are unchanged."""
    path = cache_root() / "hashes" / f"{_hash_key(site)}.npy"
    if path.is_file():
        hashes = np.load(path)
        if hashes.shape[0] == len(site.samples):
            return hashes
    with ThreadPoolExecutor(threads) as pool:
        hashes = np.stack(list(pool.map(_hash_one, site.samples))) if site.samples else np.zeros((0, 32), np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, hashes)
    try:
        atomic_write_bytes(path, buffer.getvalue(), what="hash cache")
    except CrossSiteError:  # a read-only cache costs the hashing next time, nothing else
        pass
    return hashes


def near_duplicate_pairs(hashes: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS,
                         other: np.ndarray | None = None) -> np.ndarray:
    """Index pairs (i, j) whose hashes differ in at most ``max_bits`` bits: within ``hashes`` (i < j), or between
    ``hashes`` (i) and ``other`` (j). Rows are compared in blocks, so memory stays bounded on large sites."""
    pairs = []
    block = 256
    for start in range(0, len(hashes), block):
        rows = hashes[start:start + block]
        d = hamming(rows[:, None, :], (hashes if other is None else other)[None, :, :])  # (b, N)
        i, j = np.nonzero(d <= max_bits)
        i = i + start
        keep = i < j if other is None else np.ones(len(i), dtype=bool)
        pairs.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


def file_number(path: Path | str) -> int | None:
    """The last number in a file's name (``Covid (12).png`` -> 12), or None."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else None


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def pseudo_patients(site: Site, hashes: np.ndarray | None = None, *, near_bits: int = NEAR_DUPLICATE_BITS,
                    run_bits: int = RUN_BITS) -> np.ndarray:
    """A group id per slice of ``site`` (int64, numbered in order of first appearance): near-duplicates and runs
    of consecutive file numbers joined (see the module docstring)."""
    key = None
    if hashes is None:
        key = (_hash_key(site), near_bits, run_bits)
        if key in _GROUPS:
            return _GROUPS[key]
        hashes = site_hashes(site)
    parent = np.arange(len(site.samples))

    def join(i: int, j: int) -> None:
        a, b = _find(parent, i), _find(parent, j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    for i, j in near_duplicate_pairs(hashes, near_bits):
        join(int(i), int(j))
    by_folder: dict[tuple, dict[int, int]] = {}
    for k, s in enumerate(site.samples):
        number = file_number(s.path)
        if number is not None and s.frame is None:
            by_folder.setdefault((Path(s.path).parent, s.label), {})[number] = k
    for numbered in by_folder.values():
        for number, k in numbered.items():
            nxt = numbered.get(number + 1)
            if nxt is not None and int(hamming(hashes[k], hashes[nxt])) <= run_bits:
                join(k, nxt)
    roots = [_find(parent, k) for k in range(len(parent))]
    ids: dict[int, int] = {}
    groups = np.array([ids.setdefault(r, len(ids)) for r in roots], dtype=np.int64)
    if key is not None:
        _GROUPS[key] = groups
    return groups


def straddling_pairs(hashes: np.ndarray, parts: dict[str, np.ndarray], max_bits: int = NEAR_DUPLICATE_BITS
                     ) -> dict[str, int]:
    """Near-duplicate pairs (at most ``max_bits`` apart) between each two parts of a split (``{"train": idx,
    "test": idx, ...}``), as ``{"train/test": n, ...}``: the leak a grouped split must bring to 0."""
    names = [n for n, idx in parts.items() if len(idx)]
    out = {}
    for a, name_a in enumerate(names):
        for name_b in names[a + 1:]:
            pairs = near_duplicate_pairs(hashes[parts[name_a]], max_bits, other=hashes[parts[name_b]])
            out[f"{name_a}/{name_b}"] = int(len(pairs))
    return out


def group_sizes(groups: Sequence[int]) -> np.ndarray:
    """Number of slices in each group."""
    return np.bincount(np.asarray(groups, dtype=np.int64))
