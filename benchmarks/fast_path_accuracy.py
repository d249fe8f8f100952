"""Does the fast inference path change results? ONNX Runtime vs PyTorch on a finished run's own slices.

    python benchmarks/fast_path_accuracy.py RUN_DIR [--json]

For every site of the run, the model is exported with that site's normalisation (`crosssite export`), both
backends score the site's validation and test slices listed in RUN_DIR/predictions.csv, and the AUCs and the
largest probability difference are printed. The PyTorch figures are recomputed here, not read from the file,
so both paths see the same decoded inputs.
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

from crosssite.inference import Predictor, export_onnx
from crosssite.models import load


def compare(run_dir: Path) -> dict:
    _, card = load(run_dir / "model")
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
            for part in ("val", "test"):
                items = rows[(site, part)]
                if not items or any(r["frame"] for r in items):
                    continue
                labels = np.array([int(r["label"]) for r in items])
                files = [Path(r["path"]) for r in items]
                probs = {name: np.array([r.p_covid for r in b.predict(files) if r.kind == "slice"])
                         for name, b in backends.items()}
                result[f"{site}/{part}"] = {
                    "n": len(items),
                    "auc_torch": round(float(roc_auc_score(labels, probs["torch"])), 6),
                    "auc_onnx": round(float(roc_auc_score(labels, probs["onnx"])), 6),
                    "max_abs_p_diff": float(np.max(np.abs(probs["torch"] - probs["onnx"]))),
                }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = compare(args.run_dir)
    if args.json:
        print(json.dumps(result))
        return
    for key, r in result.items():
        print(f"{key:<28} n={r['n']:<5} AUC torch {r['auc_torch']:.6f}  onnx {r['auc_onnx']:.6f}  "
              f"max |dp| {r['max_abs_p_diff']:.2e}")


if __name__ == "__main__":
    main()
