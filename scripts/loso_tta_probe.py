"""Does test-time flip averaging help on a hospital the model never saw? The leave-one-site-out models of
``results/loso-v1`` scored on their held-out site, under each normalisation strategy, without and with ``tta=flip``.

    python scripts/loso_tta_probe.py [--data ../shared/data]

Inference only: nothing is trained. Prints one line per held-out site: AUC in % (none, flip) per strategy.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from crosssite.data import load_site
from crosssite.evaluation import card_loader, evaluate_model
from crosssite.models import load

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "results" / "loso-v1" / "runs" / "loso__sepnorm-contrastive__covidnet_redesign"
SYNTHETIC = "synthetic=synthetic:shift=1.0,n=300,seed=5,size=256"  # the third site of results/loso-v1
STRATEGIES = ("standardise", "mean", "adabn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CROSSSITE_DATA", ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    torch.set_num_threads(1)
    specs = {"sars_cov2_ct": f"sars_cov2_ct={args.data / 'sars_cov2_ct'}",
             "covid_ct": f"covid_ct={args.data / 'covid_ct'}", "synthetic": SYNTHETIC}
    for held, spec in specs.items():
        model, card = load(RUNS / f"{held}_seed0" / "model")
        loader = card_loader(load_site(spec), card, None, batch_size=64)
        auc = {}
        for tta in ("none", "flip"):
            for e in evaluate_model(model, list(card["site_names"]), {}, {held: loader}, strategies=("standardise",),
                                    n_boot=10, tta=tta):
                auc.setdefault(e.strategy, []).append(round(100 * e.metrics["auc"], 2))
        print(held, {k: tuple(auc[k]) for k in STRATEGIES}, flush=True)


if __name__ == "__main__":
    main()
