"""How many slices should a hospital label? The learning curve of `crosssite add-site` (issue "add your hospital").

    python scripts/add_site_curve.py run --out results/add-site-curve     # resumable: finished fits are skipped
    python scripts/add_site_curve.py table --out results/add-site-curve   # Markdown table (+ --figure F.png)

Site B (COVID-CT, which has patient ids) is the new hospital; the base model is `sepnorm-contrastive` trained on
site A alone (`cpu-small` preset, ``protocol=all``: no test part; its checkpoint is chosen on A's validation part).
For k = 0, 2, 5, 10, 20, 50 labelled patients of B (half of them COVID, rounded up; 3 draws each) the labelled
slices are those patients' and the AUC is measured on every other slice of B:

* ``adabn`` (k = 0): a new slot whose statistics are estimated on B's slices, no labels;
* ``slot``: `add_site` -- the same AdaBN slot, then its parameters fine-tuned on the k patients (cross-entropy +
  the contrastive loss with 400 slices of site A in the batches; 300 steps of 16, lr 1e-2), early stopping on a
  patient-grouped validation part of them when each class has at least 2 patients and the part holds at least
  20 slices (else every labelled slice trains and the last weights are kept);
* ``slot+head``: the same with the shared classifier head fine-tuned too (``--train-head``);
* ``all``: the same, but every weight of the model fine-tuned (lr 1e-4);
* ``scratch``: the same architecture trained from a fresh initialisation on the k patients alone.

The slots' statistics are estimated on all of B's slices (labels unused), as a hospital would on its unlabelled
archive, so every k and method sees the same normalisation input. Each fit appends one line to
``OUT/curve.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("CROSSSITE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
KS = (0, 2, 5, 10, 20, 50)
DRAWS = 3
METHODS = ("slot", "slot+head", "all", "scratch")


def base_model(out: Path, tiny: bool) -> Path:
    """The site-A-only model (trained once, then reused)."""
    from crosssite.experiment import PRESETS
    from crosssite.training import train
    from crosssite.training.config import TrainConfig, apply_overrides

    run = out / "base"
    values = {**PRESETS["cpu-small"], "method": "sepnorm-contrastive", "protocol": "all"}
    if tiny:
        values |= {"image_size": 32, "width": 0.0625, "epochs": 1, "limit_per_site": 160, "bn_recalibrate": False}
    train(apply_overrides(TrainConfig(), values), [f"sars_cov2_ct={DATA / 'sars_cov2_ct'}"], run, resume=True,
          progress=False)
    return run / "model"


def draw_patients(patients: dict[str, int], k: int, draw: int) -> list[str]:
    """k patients, ceil(k/2) of them COVID, drawn by ``(k, draw)``."""
    rng = np.random.default_rng([k, draw])
    covid = sorted(p for p, label in patients.items() if label == 1)
    other = sorted(p for p, label in patients.items() if label == 0)
    n_covid = -(-k // 2)
    return list(rng.choice(covid, n_covid, replace=False)) + list(rng.choice(other, k - n_covid, replace=False))


def _done(path: Path) -> set[tuple]:
    if not path.is_file():
        return set()
    return {(r["k"], r["draw"], r["method"]) for r in map(json.loads, path.read_text().splitlines()) if r}


def run(out: Path, tiny: bool) -> None:
    import torch

    from crosssite import models
    from crosssite.data import card_tta, load_site
    from crosssite.experiment import git_commit
    from crosssite.inference.predictor import Preprocess
    from crosssite.training.add_site import add_site, decode_site, finetune_baseline, site_auc

    out.mkdir(parents=True, exist_ok=True)
    results = out / "curve.jsonl"
    done = _done(results)
    ks, draws, steps = ((0, 2), 1, 4) if tiny else (KS, DRAWS, 300)
    plan = [(0, 0, "adabn")] + [(k, d, m) for k in ks if k for d in range(draws) for m in METHODS]
    todo = [p for p in plan if p not in done]
    print(f"add-site curve {out}: {len(plan) - len(todo)} fit(s) finished, {len(todo)} to run", flush=True)
    if not todo:
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    stem = base_model(out, tiny)
    model, card = models.load(stem)
    preprocess = Preprocess.from_card(card)
    site_b = load_site(f"covid_ct={DATA / 'covid_ct'}")
    b = decode_site(site_b, preprocess)
    site_a = load_site(f"sars_cov2_ct={DATA / 'sars_cov2_ct'}")
    pick = np.sort(np.random.default_rng(0).choice(len(site_a.samples), 64 if tiny else 400, replace=False))
    a = decode_site(dataclasses.replace(site_a, samples=[site_a.samples[i] for i in pick]), preprocess)
    patients = {p: int(label) for p, label in zip(b.patients, b.labels.tolist())}
    for k, draw, method in todo:
        chosen = set(draw_patients(patients, k, draw)) if k else set()
        labelled = b.subset([i for i, p in enumerate(b.patients) if p in chosen])
        rest = b.subset([i for i, p in enumerate(b.patients) if p not in chosen])
        start = time.perf_counter()
        info: dict = {}
        if method in ("adabn", "slot", "slot+head"):
            new, _, report = add_site(model, card, "covid_ct", images=b.images,
                                      labelled=None if method == "adabn" else labelled, train_head=method == "slot+head",
                                      known=[(a, card["site_names"][0])], steps=steps, seed=draw)
            site = report.site_index
            info = {"steps": report.steps, "best_step": report.best_step, "val": report.val}
        else:
            new, site = finetune_baseline(model, card, labelled, method, images=b.images, steps=steps, seed=draw)
        auc = site_auc(new, rest, site, card_tta(card))
        line = {"k": k, "draw": draw, "method": method, "auc": auc, "n_labelled": len(labelled),
                "n_eval": len(rest), "wall_s": round(time.perf_counter() - start, 1), "git_commit": git_commit(),
                **info}
        print(json.dumps(line), flush=True)
        with open(results, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")


def table(out: Path, figure: Path | None) -> str:
    rows = [json.loads(t) for t in (out / "curve.jsonl").read_text().splitlines() if t.strip()]
    methods = [m for m in ("adabn", *METHODS) if any(r["method"] == m for r in rows)]
    ks = sorted({r["k"] for r in rows})
    lines = ["| k | labelled slices | " + " | ".join(methods) + " |", "|---:|---:|" + "---:|" * len(methods)]
    curves: dict[str, list[tuple[int, float]]] = {m: [] for m in methods}
    for k in ks:
        mine = [r for r in rows if r["k"] == k]
        cells = []
        for m in methods:
            aucs = [100 * r["auc"] for r in mine if r["method"] == m and r["auc"] is not None]
            if aucs:
                curves[m].append((k, statistics.mean(aucs)))
            sd = f" ± {statistics.stdev(aucs):.1f}" if len(aucs) > 1 else ""
            cells.append(f"{statistics.mean(aucs):.1f}{sd} ({len(aucs)})" if aucs else "")
        n = statistics.mean(r["n_labelled"] for r in mine)
        lines.append(f"| {k} | {n:.0f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("AUC in % on the rest of the site, mean ± std over the draws (count in brackets); labelled slices: "
                 "the mean over the draws.")
    if figure is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for m, points in curves.items():
            if m == "adabn":
                ax.axhline(points[0][1], ls="--", c="grey", label="AdaBN, no labels")
            elif points:
                ax.plot(*zip(*points), marker="o", label=m)
        ax.set_xscale("symlog", linthresh=2)
        ax.set_xticks([k for k in ks if k])
        ax.set_xticklabels([str(k) for k in ks if k])
        ax.set_xlabel("labelled patients of the new site (k)")
        ax.set_ylabel("AUC on the rest of the site (%)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(figure, dpi=120)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "table"))
    parser.add_argument("--out", type=Path, default=Path("results/add-site-curve"))
    parser.add_argument("--tiny", action="store_true", help="k = 0, 2, one draw, 4 steps, a 32 px base (tests)")
    parser.add_argument("--figure", type=Path, default=None, help="with table: write the curve as a PNG")
    args = parser.parse_args()
    if args.command == "run":
        run(args.out, args.tiny)
    else:
        print(table(args.out, args.figure))


if __name__ == "__main__":
    main()
