"""The validation-only runs behind the defaults docs/METHODS.md records (issue "Faithful Table I").

    python scripts/choose_defaults.py run --out results/choices       # resumable: finished runs are skipped
    python scripts/choose_defaults.py table --out results/choices     # Markdown tables of the validation AUCs

Every run is a `crosssite train` on both real sites at the `cpu-small` preset (64 px, width 0.25, 6 epochs; the
``recipe`` question: the `cpu` preset, 16 epochs) with one setting changed; only the validation parts of folds 0 and 1 are read (``metrics.json`` -> ``sites.*.val``), never a
test fold. Finished runs append one line (validation AUCs, wall time, commit) to ``OUT/choices.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from crosssite.bench_preset import PLAIN
from crosssite.data import load_sites
from crosssite.experiment import PRESETS, git_commit, machine_info
from crosssite.training import train
from crosssite.training.config import TrainConfig, apply_overrides

DATA = Path(os.environ.get("CROSSSITE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SITES = [f"A={DATA / 'sars_cov2_ct'}", f"B={DATA / 'covid_ct'}"]
# every speed lever of the engine off (issue "Experiments 4x cheaper"): contiguous tensors, the site tensor, Adam's
# loop, fp32, BN recalibration over a whole epoch's draws in training-sized batches
PLAIN_PATH = {**PLAIN, "bn_recalibrate_images": 0}

# (question, label, method, backbone, overrides): the settings compared. Every run starts from the `cpu-small`
# preset (64 px, width 0.25, 6 epochs: the cpu preset up to crosssite 0.3) with the overrides applied.
CHOICES: list[tuple[str, str, str, str, dict]] = [
    ("covidnet-lr", "lr 5e-4", "single", "covidnet", {"lr": 5e-4}),
    ("covidnet-lr", "lr 1e-4", "single", "covidnet", {"lr": 1e-4}),
    ("covidnet-lr", "lr 2e-3", "single", "covidnet", {"lr": 2e-3}),
    ("frame+block_act", "resize, none", "sepnorm-contrastive", "covidnet_redesign", {"frame": "resize"}),
    ("frame+block_act", "pad, none", "sepnorm-contrastive", "covidnet_redesign", {"frame": "pad"}),
    ("frame+block_act", "resize, relu", "sepnorm-contrastive", "covidnet_redesign",
     {"frame": "resize", "block_act": "relu"}),
    ("frame+block_act", "pad, relu", "sepnorm-contrastive", "covidnet_redesign", {"frame": "pad", "block_act": "relu"}),
    # issue "Experiments 4x cheaper": the training fast path against the plain path (3 seeds, fold 0) ...
    ("fast-path", "plain", "sepnorm-contrastive", "covidnet_redesign", PLAIN_PATH),
    ("fast-path", "fast", "sepnorm-contrastive", "covidnet_redesign", {}),
    # ... and the cpu preset: image size x width x epochs under a budget of 5 minutes per run
    *[("preset", f"{size}px w{width} {epochs}ep", "sepnorm-contrastive", "covidnet_redesign",
       {"image_size": size, "width": width, "epochs": epochs})
      for size, width, epochs in ((64, 0.25, 6), (64, 0.25, 16), (96, 0.25, 10), (128, 0.25, 8), (160, 0.25, 5),
                                  (64, 0.5, 8))],
    # issue "Table I v2": crosssite's own recipe, each lever alone on the paper's method at the `cpu` preset (the
    # same budget: image size, width, epochs and batch unchanged), then the levers that helped, together
    *[("recipe", label, "sepnorm-contrastive", "covidnet_redesign", overrides) for label, overrides in (
        ("paper", {}),
        ("label smoothing 0.1", {"label_smoothing": 0.1}),
        ("ema 0.998", {"ema_decay": 0.998}),
        ("scanner aug 0.1", {"augment_scanner": 0.1}),
        ("tau 0.1", {"tau": 0.1}),
        ("alpha 0.3", {"alpha": 0.3}),
        ("mixstyle 0.5", {"mixstyle": 0.5}),
        # round 2, after round 1 left the paper's setting ahead of every single lever on the fold mean
        ("lr 1e-3", {"lr": 1e-3}),
        ("weight decay 5e-4", {"weight_decay": 5e-4}),
        ("ema 0.99", {"ema_decay": 0.99}),
        ("tau 0.1 + label smoothing 0.1", {"tau": 0.1, "label_smoothing": 0.1}),
        # round 3: the two best levers together; the three leaders (paper, tau 0.1, lr 1e-3) get seed 1
        ("tau 0.1 + lr 1e-3", {"tau": 0.1, "lr": 1e-3}),
        # round 4: every image standardised on its own inside the network (what the default unseen-site strategy
        # does at test time, here in training too)
        ("standardise input", {"standardise_input": True}),
        # round 5: the batch-norm recalibration before each validation, the suspect of the fast path's site-B
        # drop ("Accuracy of the training fast path"): one epoch's draws in training batches (crosssite <= 0.3),
        # and none at all (the paper)
        ("recalibrate over one epoch", {"bn_recalibrate_images": 0}),
        ("no recalibration", {"bn_recalibrate": False}),
    )],
]
SEEDS = {"covidnet-lr": (0,), "frame+block_act": (0, 1), "fast-path": (0, 1, 2), "preset": (0, 1), "recipe": (0, 1)}
BASE = {"recipe": "cpu"}  # the preset each question starts from (every other question: cpu-small)
FOLDS = {"fast-path": (0,)}  # every other question: folds 0 and 1
BUDGET_MINUTES = 5.0  # a preset setting slower than this per run is not chosen


def _key(question: str, label: str, fold: int, seed: int) -> str:
    return f"{question}|{label}|{fold}|{seed}"


def _done(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {_key(r["question"], r["label"], r["fold"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def run(out: Path, only: list[str] | None = None, questions: list[str] | None = None) -> None:
    sites = load_sites(SITES)
    results = out / "choices.jsonl"
    done = _done(results)
    plan = [(q, label, m, b, o, fold, seed) for seed in (0, 1, 2) for fold in (0, 1)
            for q, label, m, b, o in CHOICES if seed in SEEDS[q] and fold in FOLDS.get(q, (0, 1))]
    # seed-0 runs of every setting first, so that a partial sweep already answers each question on 2 folds
    for q, label, method, backbone, overrides, fold, seed in plan:
        if _key(q, label, fold, seed) in done or (only and label not in only) or (questions and q not in questions):
            continue
        values = {**PRESETS[BASE.get(q, "cpu-small")], **overrides, "method": method, "backbone": backbone, "fold": fold, "seed": seed}
        config = apply_overrides(TrainConfig(), values)
        run_dir = out / "runs" / q / label.replace(", ", "_").replace(" ", "") / f"fold{fold}_seed{seed}"
        print(f"{q}: {label} fold {fold} seed {seed} -> {run_dir}", flush=True)
        resumed = run_dir.exists()  # an interrupted run continues: its wall time covers only the rest
        start = time.perf_counter()
        metrics = train(config, sites, run_dir, resume=True, progress=False)
        line = {
            "question": q, "label": label, "method": method, "backbone": backbone, "overrides": overrides,
            "fold": fold, "seed": seed, "wall_s": round(time.perf_counter() - start, 1), "resumed": resumed,
            "val_auc": {name: s["val"]["auc"] for name, s in metrics["sites"].items()},
            "val_p_std": {name: s.get("val_p_std") for name, s in metrics["sites"].items()},
            "collapsed": metrics.get("collapsed", False), "git_commit": git_commit(),
            "cpu": machine_info()["cpu"],
        }
        with open(results, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")


def table(out: Path) -> str:
    rows = [json.loads(t) for t in (out / "choices.jsonl").read_text().splitlines() if t.strip()]
    lines = []
    for question in dict.fromkeys(r["question"] for r in rows):
        mine = [r for r in rows if r["question"] == question]
        lines += [f"**{question}**", "", "| setting | runs | val AUC A | val AUC B | mean | min std P(COVID) | min/run (fastest) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for label in dict.fromkeys(r["label"] for r in mine):
            runs = [r for r in mine if r["label"] == label]
            a = [100 * r["val_auc"]["A"] for r in runs]
            b = [100 * r["val_auc"]["B"] for r in runs]
            spread = min(min(v for v in r["val_p_std"].values() if v is not None) for r in runs)
            lines.append(f"| {label} | {len(runs)} | {statistics.mean(a):.2f} | {statistics.mean(b):.2f} | "
                         f"{statistics.mean(a + b):.2f} | {spread:.3g} | {_minutes(runs):.1f} |")
        if question == "preset":
            lines.append(f"chosen: **{chosen_preset(mine)}** (best mean validation AUC over both sites among the "
                         f"settings whose fastest run took at most {BUDGET_MINUTES:g} minutes)")
        lines.append("")
    return "\n".join(lines)


def _minutes(runs: list[dict]) -> float:
    """Minutes of a setting's fastest run: the sweep shared the 2-core machine with other work part of the time,
    so the fastest of its runs is the closest to an idle run (a resumed run's time is not counted)."""
    fresh = [r["wall_s"] for r in runs if not r.get("resumed")] or [r["wall_s"] for r in runs]
    return min(fresh) / 60


def chosen_preset(rows: list[dict]) -> str:
    """The preset setting with the best mean validation AUC over both sites, among those within the budget."""
    scores = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        runs = [r for r in rows if r["label"] == label]
        if _minutes(runs) <= BUDGET_MINUTES:
            scores[label] = statistics.mean(v for r in runs for v in r["val_auc"].values())
    return max(scores, key=scores.get) if scores else "none within the budget"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "table"))
    parser.add_argument("--out", type=Path, default=Path("results/choices"))
    parser.add_argument("--only", action="append", metavar="LABEL",
                        help="run only the settings with this label (repeatable), e.g. to give the leaders a seed")
    parser.add_argument("--question", action="append", metavar="QUESTION",
                        help="run only this question's settings (repeatable), e.g. recipe")
    args = parser.parse_args()
    if args.command == "run":
        run(args.out, args.only, args.question)
    else:
        print(table(args.out))


if __name__ == "__main__":
    main()
