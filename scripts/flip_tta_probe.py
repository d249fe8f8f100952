"""Would test-time flip averaging help? Validation AUC of trained runs with and without it (validation parts only).

    python scripts/flip_tta_probe.py results/choices/runs/recipe/paper/fold*

For each run folder: its best model on its own validation part (the run's split and preprocessing), scored as
trained ("plain"), averaged with its horizontal mirror ("h"), and over all four h/v flips ("hv"). Inference only:
nothing is trained, and no test fold is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from crosssite import models
from crosssite.training.config import TrainConfig
from crosssite.training.data import build_run_data
from crosssite.rundir import read_sites

VIEWS = {"plain": ((),), "h": ((), (3,)), "hv": ((), (3,), (2,), (2, 3))}  # dims flipped, per averaged view


def probe(run: Path) -> dict[str, list[float]]:
    model, card = models.load(run / "model")
    model.eval()
    config = TrainConfig(**card["train_config"])
    data = build_run_data(config, read_sites(run), run / "split.json", reuse_split=True)
    scores: dict[str, list[torch.Tensor]] = {k: [] for k in VIEWS}
    labels, sites = [], []
    with torch.inference_mode():
        for batch in data.eval["val"]:
            x, site = batch["image"], batch["site"]
            p = {dims: model(x.flip(dims) if dims else x, site).logits.softmax(1)[:, 1] for dims in VIEWS["hv"]}
            for name, views in VIEWS.items():
                scores[name].append(sum(p[d] for d in views) / len(views))
            labels.append(batch["label"])
            sites.append(site)
    y, s = torch.cat(labels).numpy(), torch.cat(sites).numpy()
    return {name: [100 * roc_auc_score(y[s == i], torch.cat(v).numpy()[s == i]) for i in range(len(data.sites))]
            for name, v in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| run | " + " | ".join(f"{k} A | {k} B" for k in VIEWS) + " |")
    print("|---|" + "---:|" * (2 * len(VIEWS)))
    for run in args.runs:
        out = probe(run)
        print(f"| {run.name} | " + " | ".join(f"{a:.2f} | {b:.2f}" for a, b in out.values()) + " |")


if __name__ == "__main__":
    main()
