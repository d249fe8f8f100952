"""Pack a trained run's best model as the model shipped in the package (`crosssite.pretrained`).

    python scripts/ship_model.py /tmp/shipped/run --command "crosssite train ..." --commit b04f6d6 \
        [--cv results/cpu-v2/results.jsonl]

Writes ``src/crosssite/pretrained/<SHIPPED_NAME>.safetensors`` (float16 weights) and ``.json`` (the run's card plus
the training command, commit, licences and the validation AUC of the float16 weights against float32 on the run's
own validation parts, and, with ``--cv``, the cross-validated test AUC of the same method, backbone and frame in a grid's
``results.jsonl``: mean and std over its finished runs, with their count), and refuses the float16 file when it moves any site's validation AUC by 0.5 points or more.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from crosssite import models
from crosssite.pretrained import HERE, SHIPPED_NAME
from crosssite.training.config import TrainConfig
from crosssite.training.data import build_run_data
from crosssite.rundir import read_sites
from crosssite.training.validation import score_part

LICENCES = {
    "weights": "non-commercial research only (site A's data is CC BY-NC-SA 4.0); not a medical device",
    "sars_cov2_ct": "SARS-CoV-2 CT-scan dataset (Soares et al. 2020): CC BY-NC-SA 4.0",
    "covid_ct": "COVID-CT (Zhao et al. 2020, UCSD-AI4H): no licence stated; copyright stays with the source papers",
}


def cross_validated(results: Path, card: dict) -> dict:
    """Test AUC (%) per site of the grid's finished, not collapsed runs of the card's method, backbone and frame (a
    grid of another frame estimates another model)."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    frame = card["train_config"].get("frame", "pad")
    mine = [r for r in rows if r["method"] == card["method"] and r["backbone"] == card["architecture"]
            and r.get("config", {}).get("frame", "pad") == frame and not r.get("collapsed")]
    if not mine:
        return {"grid": str(results), "runs": 0,
                "note": f"no finished run of this recipe (method, backbone and frame {frame!r}) in the grid yet"}
    aucs = {site: [100 * r["sites"][site]["auc"] for r in mine] for site in mine[0]["sites"]}
    return {"grid": str(results), "runs": len(mine), "folds_seeds": sorted([r["fold"], r["seed"]] for r in mine),
            "test_auc_mean": {s: round(statistics.mean(v), 2) for s, v in aucs.items()},
            "test_auc_std": {s: round(statistics.stdev(v), 2) if len(v) > 1 else None for s, v in aucs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--command", required=True, help="The training command, recorded in the card.")
    parser.add_argument("--commit", required=True)
    parser.add_argument("--cv", type=Path, help="A grid's results.jsonl holding runs of the same recipe.")
    args = parser.parse_args()
    model, card = models.load(args.run / "model")
    config = TrainConfig(**card["train_config"])
    data = build_run_data(config, read_sites(args.run), args.run / "split.json", reuse_split=True)
    device = torch.device("cpu")
    full, _ = score_part(model, data, "val", device, config)
    half = models.load(args.run / "model")[0].half().float()  # the weights as the float16 file restores them
    rounded, _ = score_part(half, data, "val", device, config)
    diff = {s: 100 * (rounded[s]["auc"] - full[s]["auc"]) for s in full}
    if max(abs(d) for d in diff.values()) >= 0.5:
        raise SystemExit(f"float16 moves the validation AUC by {diff} points: not shipped")
    card |= {
        "name": SHIPPED_NAME,
        "training_command": args.command,
        "git_commit": args.commit,
        "weights_dtype": "float16",
        "validation_auc_float32": {s: m["auc"] for s, m in full.items()},
        "validation_auc_float16": {s: m["auc"] for s, m in rounded.items()},
        "cross_validated_estimate": cross_validated(args.cv, card) if args.cv else "pending: no grid given",
        "licence": LICENCES,
        "intended_use": "research on multi-site COVID-19 CT classification; not for diagnosis",
    }
    stem = HERE / SHIPPED_NAME
    models.save(model.half(), stem, card)
    print(f"wrote {stem}.safetensors ({stem.with_suffix('.safetensors').stat().st_size / 2**20:.2f} MB); "
          f"validation AUC float32 {card['validation_auc_float32']}, float16 {card['validation_auc_float16']}")


if __name__ == "__main__":
    main()
