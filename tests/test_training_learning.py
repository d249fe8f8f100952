"""Learning, not just running: on two synthetic sites with a strong scanner shift, the site-specific-BN model and the
shared-BN joint model both reach a high validation AUC within a few hundred steps at a tiny width.

Settings: site a is a clean scanner (shift 0), site b a strongly shifted one (shift 1.5: lower resolution, blur,
gamma, contrast, brightness and noise); 48 images per class per site, 48 px crops, width 1/16, 8 + 8 images per
step, 175 steps, Adam 2e-3 with cosine decay, and batch-norm statistics recomputed on the training part before
each validation (the running averages of such a short, fast run trail the weights).

Mean validation AUC over the sites (and per-site accuracy), seeds 0 / 1 / 2 with oneDNN, 0 / 1 without it (2-vCPU
AMD EPYC): SepNorm 0.974 / 0.943 / 0.927, 0.995 / 0.948; Joint 0.932 / 0.917 / 0.984, 0.912 / 0.995. Accuracy at the
0.5 threshold ranged 0.70-1.00 per site, and SepNorm's lead over Joint went from +0.08 to -0.06: at this scale
neither is a property of the method, only of the seed and the CPU's rounding, so the test holds both models to an
AUC of 0.9 and a mean accuracy of 0.75 (the lowest measured: 0.775), which every seed and kernel reached.
"""

from __future__ import annotations

import pytest

from crosssite.data import load_sites
from crosssite.training import TrainConfig, train

SPECS = ["a=synthetic:shift=0.0,n=48,size=64", "b=synthetic:shift=1.5,n=48,size=64"]
CONFIG = dict(image_size=48, width=0.0625, batch_per_site=8, lr=2e-3, lr_min=2e-5, epochs=25, val_fraction=0.25,
              eval_every=5, bn_recalibrate=True, ckpt_every=0, seed=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    sites = load_sites(SPECS)
    out = tmp_path_factory.mktemp("learning")
    return {m: train(TrainConfig(method=m, **CONFIG), sites, out / m, progress=False) for m in ("sepnorm", "joint")}


def test_sepnorm_reaches_high_validation_accuracy(runs: dict[str, dict]) -> None:
    metrics = runs["sepnorm"]
    assert metrics["steps"] == 175
    assert metrics["val_mean_auc"] >= 0.9, metrics["val_mean_auc"]
    accuracy = [site["val"]["accuracy"] for site in metrics["sites"].values()]
    assert sum(accuracy) / len(accuracy) >= 0.75, accuracy


def test_joint_learns_under_strong_shift_too(runs: dict[str, dict]) -> None:
    metrics = runs["joint"]
    assert metrics["val_mean_auc"] >= 0.9, metrics["val_mean_auc"]
    accuracy = [site["val"]["accuracy"] for site in metrics["sites"].values()]
    assert sum(accuracy) / len(accuracy) >= 0.75, accuracy
