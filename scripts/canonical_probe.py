"""How the canonical view (`crosssite.data.canonical`) does on the real sites: how often a lung field is found, the
lung masks against the hand-drawn outlines of tests/data/lung_outlines.json, and how much closer two simulated
hospitals' renderings of one slice come in the canonical view than as they are.

    python scripts/canonical_probe.py [--data ../shared/data] [--per-site 0] [--slices 12] [--pairs 8]

``--per-site``: slices of each site for the found rate (0: all); ``--slices`` x ``--pairs``: slices per site and
pairs of random hospitals (`draw_hospital`) for the invariance measurement: the mean absolute grey difference of
two renderings framed at 64 px, ``pad`` (as they are) and ``canonical``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from skimage.draw import polygon

from crosssite.data import frame_slice, load_site, read_image
from crosssite.data.canonical import canonical_view
from crosssite.data.simulate import draw_hospital, rendered_grey

ROOT = Path(__file__).resolve().parents[1]


def _evenly(n_total: int, n: int) -> list[int]:
    if n <= 0 or n >= n_total:
        return list(range(n_total))
    return np.linspace(0, n_total - 1, n).round().astype(int).tolist()


def found_rate(site, per_site: int) -> tuple[int, int, float]:
    picks = _evenly(len(site.samples), per_site)
    start, found = time.process_time(), 0
    for i in picks:
        found += canonical_view(read_image(site.samples[i].path, site.samples[i].frame)).found
    return found, len(picks), (time.process_time() - start) / len(picks)


def outline_iou(data: Path) -> list[tuple[str, float]]:
    out = []
    for entry in json.loads((ROOT / "tests" / "data" / "lung_outlines.json").read_text())["slices"]:
        image = read_image(data / entry["path"])
        h, w = image.shape
        hand = np.zeros((h, w), dtype=bool)
        for poly in entry["lungs"]:
            p = np.asarray(poly, dtype=float)
            hand[polygon(p[:, 1] * h / 100, p[:, 0] * w / 100, (h, w))] = True
        lungs = canonical_view(image).lungs
        out.append((entry["path"], float((hand & lungs).sum() / (hand | lungs).sum())))
    return out


def invariance(site, slices: int, pairs: int) -> tuple[float, float, float]:
    raw, canonical = [], []
    for n, i in enumerate(_evenly(len(site.samples), slices)):
        image = read_image(site.samples[i].path, site.samples[i].frame)
        for k in range(pairs):
            first, second = (draw_hospital(np.random.default_rng([side, n, k])) for side in (1, 2))
            one, two = (rendered_grey(image, s, np.random.default_rng([n, k])) for s in (first, second))
            for frame, out in (("pad", raw), ("canonical", canonical)):
                a, b = (frame_slice(x, 64, frame).astype(np.float32) / 255 for x in (one, two))
                out.append(float(np.abs(a - b).mean()))
    raw_a, can_a = np.asarray(raw), np.asarray(canonical)
    return float(raw_a.mean()), float(can_a.mean()), float((can_a < raw_a).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("CROSSSITE_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--per-site", type=int, default=0)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    for path, iou in outline_iou(args.data):
        print(f"outline IoU {iou:.3f}  {path}")
    for name in ("sars_cov2_ct", "covid_ct"):
        site = load_site(f"{name}={args.data / name}")
        found, n, cpu = found_rate(site, args.per_site)
        raw, canonical, closer = invariance(site, args.slices, args.pairs)
        print(f"{name}: lung field found in {found} of {n} slices ({100 * found / n:.1f}%; fallback {n - found}), "
              f"{1000 * cpu:.0f} ms CPU a slice; two hospitals' renderings differ by {raw:.3f} as they are, "
              f"{canonical:.3f} in the canonical view (closer in {100 * closer:.0f}% of "
              f"{args.slices} x {args.pairs} slice-pairs)", flush=True)


if __name__ == "__main__":
    main()
