"""AUC of the shipped model with JPEG draft decoding against full decoding, on the real sites.

    python benchmarks/draft_accuracy.py

Site B (covid_ct): every slice, and its official test split; site A holds PNGs only, so draft decoding cannot
change it (checked: its slices are scored both ways too). Prints, per set, the number of JPEGs, how many of them
are decoded at a reduced scale, the AUC (%) both ways and max / mean |P(COVID) difference|.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from crosssite.data import load_site, official_split
from crosssite.data.io import draft_scale
from crosssite.inference import Predictor
from crosssite.models import load
from crosssite.pretrained import shipped_model

DATA = Path(os.environ.get("CROSSSITE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    model, card = load(shipped_model())
    exact, fast = Predictor(model, card, draft=False), Predictor(model, card)
    framed, frame = exact.preprocess.transform.framed_size, exact.preprocess.frame
    site_b = load_site(f"covid_ct={DATA / 'covid_ct'}")
    site_a = load_site(f"sars_cov2_ct={DATA / 'sars_cov2_ct'}")
    test = official_split(site_b).test
    sets = {"site B, every slice": site_b.samples, "site B, official test split": [site_b.samples[i] for i in test],
            "site A, every slice": site_a.samples}
    for name, samples in sets.items():
        files = [s.path for s in samples]
        y = np.array([s.label for s in samples])
        p = {}
        for key, predictor in (("full", exact), ("draft", fast)):
            p[key] = np.array([r.p_covid for r in predictor.predict(files) if r.kind == "slice"])
        jpegs = [f for f in files if f.suffix.lower() in (".jpg", ".jpeg")]
        reduced = sum(draft_scale(*Image.open(f).size, framed, frame) > 1 for f in jpegs)
        auc = {k: 100 * roc_auc_score(y, v) for k, v in p.items()}
        dp = np.abs(p["full"] - p["draft"])
        print(f"{name}: {len(files)} slices, {len(jpegs)} JPEGs ({reduced} reduced); AUC full {auc['full']:.2f}, "
              f"draft {auc['draft']:.2f} (change {auc['draft'] - auc['full']:+.2f} points); |dP| max {dp.max():.4f}, "
              f"mean {dp.mean():.5f}")


if __name__ == "__main__":
    main()
