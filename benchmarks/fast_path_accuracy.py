"""Does the fast inference path change results? ONNX Runtime vs PyTorch on a finished run's own slices.

    python benchmarks/fast_path_accuracy.py RUN_DIR [--int8] [--json]

For every site of the run, the model is exported with that site's normalisation (`crosssite export`), the
backends score the site's validation and test slices listed in RUN_DIR/predictions.csv, and the AUCs and the
largest probability difference to PyTorch are printed. The PyTorch figures are recomputed here, not read from
the file, so every path sees the same decoded inputs. ``--int8`` adds the int8 export (`crosssite export
--int8`), calibrated on up to 256 slices of the site's training part (RUN_DIR/split.json), never on the
slices it is scored on.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from crosssite.inference import Predictor, export_int8, export_onnx
from crosssite.models import load


def compare(run_dir: Path, int8: bool = False) -> dict:
    _, card = load(run_dir / "model")
    splits = {s["site"]: s for s in json.loads((run_dir / "split.json").read_text())["sites"]}
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    with (run_dir / "predictions.csv").open() as f:
        for row in csv.DictReader(f):
            rows[(row["site"], row["part"])].append(row)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for site in card["site_names"]:
            onnx_path = export_onnx(run_dir / "model", Path(tmp) / f"{site}.onnx", site=site)
            backends = {"torch": Predictor.from_file(run_dir / "model", site=site),
                        "onnx": Predictor.from_file(onnx_path)}
            if int8:
                done = export_int8(run_dir / "model", Path(tmp) / f"{site}.int8.onnx", splits[site]["train"]["paths"],
                                   site=site)
                backends["int8"] = Predictor.from_file(done.path)
            for part in ("val", "test"):
                items = rows[(site, part)]
                if not items or any(r["frame"] for r in items):
                    continue
                labels = np.array([int(r["label"]) for r in items])
                files = [Path(r["path"]) for r in items]
                probs = {name: np.array([r.p_covid for r in b.predict(files) if r.kind == "slice"])
                         for name, b in backends.items()}
                result[f"{site}/{part}"] = {"n": len(items)} | {
                    f"auc_{name}": round(float(roc_auc_score(labels, p)), 6) for name, p in probs.items()
                } | {f"max_abs_p_diff_{name}": float(np.max(np.abs(p - probs["torch"])))
                     for name, p in probs.items() if name != "torch"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--int8", action="store_true", help="also score the int8 export")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = compare(args.run_dir, args.int8)
    if args.json:
        print(json.dumps(result))
        return
    for key, r in result.items():
        names = [k.removeprefix("auc_") for k in r if k.startswith("auc_")]
        aucs = "  ".join(f"{name} {r['auc_' + name]:.6f}" for name in names)
        diffs = "  ".join(f"{name} {r['max_abs_p_diff_' + name]:.2e}" for name in names if name != "torch")
        print(f"{key:<28} n={r['n']:<5} AUC {aucs}   max |dp| {diffs}")


if __name__ == "__main__":
    main()
