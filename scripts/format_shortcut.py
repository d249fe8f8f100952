"""How much do trained models rely on site B's file-format cue (every COVID slice PNG, 202 of 397 non-COVID JPEG)?

    python scripts/format_shortcut.py results/choices/runs --site B     # every predictions.csv below the folder
    python scripts/format_shortcut.py results/cpu-v2/runs --site covid_ct --by-row   # one line per grid row

For each run's test part of the site: the AUC on every slice, the AUC on the PNG slices alone (the cue removed:
both classes PNG), and the mean P(COVID) of the non-COVID slices by format. A model that reads the format gives
non-COVID JPEGs a lower P(COVID) than non-COVID PNGs and loses AUC on the PNG-only subset. This reads test
predictions only to measure; nothing is chosen from it.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from sklearn.metrics import roc_auc_score


def _runs(root: Path, site: str) -> list[tuple[Path, list[dict[str, str]]]]:
    out = []
    for path in sorted(root.rglob("predictions.csv")):
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if r["site"] == site and r["part"] == "test"]
        if rows:
            out.append((path.parent, rows))
    return out


def analyse(rows: list[dict[str, str]]) -> dict[str, float]:
    y = [int(r["label"]) for r in rows]
    p = [float(r["p_covid"]) for r in rows]
    png = [i for i, r in enumerate(rows) if r["path"].lower().endswith(".png")]
    neg = {fmt: [p[i] for i, r in enumerate(rows) if y[i] == 0 and Path(r["path"]).suffix.lower() in exts]
           for fmt, exts in (("png", {".png"}), ("jpeg", {".jpg", ".jpeg"}))}
    return {
        "auc_all": roc_auc_score(y, p),
        "auc_png": roc_auc_score([y[i] for i in png], [p[i] for i in png]),
        "n_png_noncovid": len(neg["png"]),
        "p_noncovid_png": statistics.mean(neg["png"]),
        "p_noncovid_jpeg": statistics.mean(neg["jpeg"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--site", default="B")
    parser.add_argument("--by-row", action="store_true",
                        help="one line per first folder under ROOT (a grid's row), the mean over its runs")
    args = parser.parse_args()
    first = "row (runs)" if args.by_row else "run"
    print(f"| {first} | AUC all | AUC PNG only | non-COVID PNG in test | mean P non-COVID PNG | mean P non-COVID JPEG |")
    print("|---|---:|---:|---:|---:|---:|")
    groups: dict[str, list[dict[str, float]]] = {}
    for run, rows in _runs(args.root, args.site):
        where = run.relative_to(args.root)
        name = (where.parts[0] if where.parts else args.root.name) if args.by_row else str(where)
        groups.setdefault(name, []).append(analyse(rows))
    if args.by_row:
        groups = {f"{name} ({len(found)})": found for name, found in groups.items()}
    found = [r for rs in groups.values() for r in rs]
    for name, rs in [*groups.items(), *([(f"mean of {len(found)}", found)] if found else [])]:
        mean = {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
        print(f"| {name} | {100 * mean['auc_all']:.2f} | {100 * mean['auc_png']:.2f} | "
              f"{mean['n_png_noncovid']:.0f} | {mean['p_noncovid_png']:.3f} | {mean['p_noncovid_jpeg']:.3f} |")


if __name__ == "__main__":
    main()
