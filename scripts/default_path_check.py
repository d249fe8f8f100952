"""The path a new user takes, on known slices: each model on the command line scores 300 random slices (seed 0) of
each public site with no site given and the default unseen-site strategy (standardise), as `crosssite predict
FOLDER` does, and prints the AUC, the accuracy of the card's labels and the share called COVID.

    python scripts/default_path_check.py MODEL [MODEL ...]

The slices were in every shipped model's training data, so this measures whether the default path keeps what the
model knows (the whole-slice shipped model did not: site B's AUC fell to 0.46), not how well it generalises.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from crosssite.data import load_site
from crosssite.inference import Predictor
from crosssite.models.adaptation import DEFAULT_STRATEGY

DATA = Path(os.environ.get("CROSSSITE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
N = 300


def main(models: list[str]) -> None:
    for model in models:
        predictor = Predictor.from_file(model, site=None, adapt=DEFAULT_STRATEGY)
        for name in ("covid_ct", "sars_cov2_ct"):
            site = load_site(f"{name}={DATA / name}")
            chosen = np.random.default_rng(0).choice(len(site.samples), N, replace=False)
            samples = [site.samples[i] for i in chosen]
            rows = {r.path: r for r in predictor.predict([s.path for s in samples]) if r.kind == "slice"}
            found = [rows[str(s.path)] for s in samples]
            y = np.array([s.label for s in samples])
            called = np.array([r.label == predictor.class_names[1] for r in found])
            print(f"{model} {name}: AUC {roc_auc_score(y, [r.p_covid for r in found]):.3f}, accuracy "
                  f"{np.mean(called == (y == 1)):.3f}, called COVID {called.mean():.2f} (of {N} slices)")


if __name__ == "__main__":
    main(sys.argv[1:])
