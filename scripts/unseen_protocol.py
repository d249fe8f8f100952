"""The unseen-hospital protocol: leave one real site out, train on the others, and score the held-out site and
K simulated hospitals made from it, under every test-time strategy.

    python scripts/unseen_protocol.py --out results/unseen-v1 --variant baseline [--set frame=canonical ...]
        [--hospitals 8] [--seeds 0,1,2] [--hospital-seed 0] [--limit 0] [--method crosssite]
    python scripts/unseen_protocol.py --out results/unseen-v1 --choose     # the table and the rule's choice

A *variant* is one configuration under test (a preprocessing, a training lever: ``--set`` keys of TrainConfig);
each run of the script adds one variant. For every real site H and every seed S the model is trained on the
other real sites (protocol ``all``: every slice but a patient-grouped validation part; the training sites'
validation picks the best epoch) and scored on H itself and on the simulated hospitals
``simulated:H,hospital=k,seed=<hospital-seed>`` for k < K (`crosssite.data.simulate`: H's slices, labels and
patients, re-rendered by one draw of export settings each). One line per (variant, H, S) is appended to
``OUT/results.jsonl`` when all its scores exist, so a stopped run resumes where it stopped; models live in
``OUT/runs/<variant>/<H>_seed<S>/``. With ``frame=canonical`` each score also carries its target's count of
slices without a found lung field (shown whole), and the run prints it.

The rule that chooses the defaults, fixed before any run (`RULE`, `choose`): every (variant, strategy) pair scored
on all of its variant's simulated held-out hospitals (every real H, seed and k alike; ``site:<name>`` strategies
exist only in the folds that train on that site and so take no part) is scored by its mean AUC over them; the
default is the pair with the highest mean, where pairs within `TIE` of the best mean are told apart by the higher
worst case (the lowest AUC over the same hospitals), then by the higher mean. The real held-out sites' AUCs are
reported beside each pair and never read by the rule: with two real sites they are the test, not the choice.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosssite.data import load_site
from crosssite.data.sites import Site
from crosssite.data.transforms import CANONICAL_FRAMES
from crosssite.evaluation import card_loader, evaluate_model
from crosssite.experiment import git_commit, machine_info
from crosssite.ioutil import atomic_write_text
from crosssite.models import SiteBatchNorm, load
from crosssite.training import TrainConfig, train
from crosssite.training.config import apply_overrides, parse_overrides
from crosssite.training.data import limit_site
from crosssite.training.methods import method_recipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "results.jsonl"
TIE = 0.005  # AUC: pairs whose mean over simulated hospitals lies this close to the best are a tie
RULE = ("among the (variant, strategy) pairs scored on every simulated held-out hospital of their variant (every real "
        "held-out site, seed and hospital; a strategy naming one training site exists in some folds only), the "
        f"highest mean AUC over those hospitals; pairs within {TIE} of the best mean: the higher worst case (lowest "
        "AUC over the same hospitals), then the higher mean; the real held-out sites' AUCs are reported, never read")
N_BOOT = 200  # bootstrap resamples for each AUC's interval: the intervals are reported, the rule reads means


def run_key(variant: str, held_out: str, seed: int) -> str:
    return f"{variant}|{held_out}|{seed}"


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every finished run's line of ``results.jsonl`` (none when the file does not exist yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, record: dict[str, Any]) -> None:
    """``record`` as one more line of ``path``, the file replaced atomically (never half a line); a lock beside it
    keeps two variants run at once from each writing back the file without the other's line."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_text() if path.is_file() else ""
        atomic_write_text(path, old + json.dumps(record) + "\n")


def _extra_strategies(model: torch.nn.Module) -> tuple[str, ...]:
    site_bn = any(isinstance(m, SiteBatchNorm) for m in model.modules())
    return ("standardise", "tent", "ensemble") if site_bn else ("standardise",)


def score_targets(run_dir: Path, targets: dict[str, Site], seed: int) -> list[dict[str, Any]]:
    """AUC (with its bootstrap interval) of the run's model on each target site under every strategy; with the
    canonical frame, each target's count of slices shown whole for want of a lung field."""
    model, card = load(run_dir / "model")
    tta = str(card.get("tta", "none"))
    canonical = (card.get("preprocessing") or {}).get("frame") in CANONICAL_FRAMES
    rows = []
    for name, site in targets.items():
        loader = card_loader(site, card, batch_size=64)
        # the decode cache framed every slice with the card's own frame and kept which ones it showed whole
        fallback = {"canonical_fallback": int(loader.dataset.cache.whole.sum())} if canonical else {}
        if fallback.get("canonical_fallback"):
            print(f"{name}: no lung field found in {fallback['canonical_fallback']} of {len(site)} slices "
                  "(shown whole)", flush=True)
        for e in evaluate_model(model, list(card["site_names"]), {}, {name: loader}, n_boot=N_BOOT, seed=seed,
                                strategies=_extra_strategies(model), tta=tta):
            rows.append({"target": name, "kind": site.layout, "hospital": site.params.get("hospital"),
                         "strategy": e.strategy, "n": e.n, "auc": e.metrics["auc"], "auc_ci": list(e.ci["auc"]),
                         **fallback})
    return rows


def run_protocol(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    done = {run_key(r["variant"], r["held_out"], r["seed"]) for r in read_results(results)}
    overrides = parse_overrides(args.set)
    real = dict(spec.split("=", 1) for spec in args.site)
    for held_out, held_path in real.items():
        train_sites = [load_site(f"{name}={path}") for name, path in real.items() if name != held_out]
        held = limit_site(load_site(f"{held_out}={held_path}"), args.limit * 2, 0)
        targets: dict[str, Site] = {held_out: held}
        for k in range(args.hospitals):
            spec = f"simulated:{held_path},hospital={k},seed={args.hospital_seed},limit={args.limit}"
            targets[f"{held_out}~h{k}"] = load_site(f"{held_out}~h{k}={spec}")
        for seed in args.seeds:
            key = run_key(args.variant, held_out, seed)
            if key in done:
                print(f"{key}: done", flush=True)
                continue
            start = time.time()
            config = apply_overrides(TrainConfig(**method_recipe(args.method), method=args.method, protocol="all",
                                                 seed=seed), overrides)
            run_dir = out / "runs" / args.variant / f"{held_out}_seed{seed}"
            train(config, train_sites, run_dir, resume=True, progress=False)
            scores = score_targets(run_dir, targets, seed)
            append_result(results, {
                "variant": args.variant, "set": overrides, "method": args.method, "held_out": held_out,
                "train_sites": [s.name for s in train_sites], "seed": seed, "hospitals": args.hospitals,
                "hospital_seed": args.hospital_seed, "limit": args.limit, "scores": scores,
                "git_commit": git_commit(), "machine": machine_info(), "wall_s": round(time.time() - start, 1),
            })
            best = max((r for r in scores if r["kind"] == "simulated"), key=lambda r: r["auc"], default=None)
            print(f"{key}: {len(scores)} scores in {time.time() - start:.0f} s"
                  + (f" (best simulated: {best['target']} {best['strategy']} {best['auc']:.3f})" if best else ""),
                  flush=True)


def choose(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The (variant, strategy) pair `RULE` picks, with the table it picks from (one row per pair: mean and worst
    AUC over simulated held-out hospitals, their count, and the real held-out sites' mean AUC per site)."""
    simulated: dict[tuple[str, str], list[float]] = defaultdict(list)
    real: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    hospitals: dict[str, set[tuple[str, int, str]]] = defaultdict(set)  # variant -> simulated hospitals scored
    for record in records:
        for row in record["scores"]:
            pair = (record["variant"], row["strategy"])
            if row["kind"] == "simulated":
                hospitals[record["variant"]].add((record["held_out"], record["seed"], row["target"]))
            if row["auc"] is None or not np.isfinite(row["auc"]):
                continue  # one class only: no AUC, and the pair no longer covers every hospital
            if row["kind"] == "simulated":
                simulated[pair].append(float(row["auc"]))
            else:
                real[pair][row["target"]].append(float(row["auc"]))
    table = [{"variant": v, "strategy": s, "mean_simulated": float(np.mean(a)), "worst_simulated": float(np.min(a)),
              "n_simulated": len(a), "eligible": len(a) == len(hospitals[v]),
              "real": {t: float(np.mean(x)) for t, x in sorted(real[(v, s)].items())}}
             for (v, s), a in simulated.items()]
    eligible = [r for r in table if r["eligible"]]
    if not eligible:
        return {"rule": RULE, "table": table, "chosen": None}
    best_mean = max(r["mean_simulated"] for r in eligible)
    tied = [r for r in eligible if r["mean_simulated"] >= best_mean - TIE]
    chosen = max(tied, key=lambda r: (r["worst_simulated"], r["mean_simulated"]))
    table.sort(key=lambda r: -r["mean_simulated"])
    return {"rule": RULE, "table": table, "chosen": {"variant": chosen["variant"], "strategy": chosen["strategy"]}}


def print_choice(result: dict[str, Any]) -> None:
    print(f"rule: {result['rule']}")
    print(f"{'variant':<24} {'strategy':<22} {'mean sim':>8} {'worst':>6} {'n':>4}  real held-out (report only)")
    for r in result["table"]:
        real = ", ".join(f"{t} {a:.3f}" for t, a in r["real"].items())
        print(f"{r['variant']:<24} {r['strategy']:<22} {r['mean_simulated']:8.3f} {r['worst_simulated']:6.3f} "
              f"{r['n_simulated']:4d}{'' if r['eligible'] else '*'} {real}")
    print("* not scored on every simulated hospital of its variant: not eligible")
    print(f"chosen: {result['chosen']}")


def markdown(result: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The rule's table as Markdown, eligible pairs only, with each real held-out site's AUC over the seeds
    (mean, and the lowest and highest seed) and the chosen pair in bold."""
    seeds: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for record in records:
        for row in record["scores"]:
            if row["kind"] != "simulated" and row["auc"] is not None:
                seeds[(record["variant"], row["strategy"], row["target"])].append(100 * float(row["auc"]))
    sites = sorted({t for (_, _, t) in seeds})
    lines = ["| variant | strategy | mean over simulated hospitals | worst | n | "
             + " | ".join(f"real held-out {t} (mean; seeds min-max)" for t in sites) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(sites)]
    chosen = result["chosen"] or {}
    for r in result["table"]:
        if not r["eligible"]:
            continue
        mark = "**" if chosen == {"variant": r["variant"], "strategy": r["strategy"]} else ""
        real = []
        for t in sites:
            x = seeds.get((r["variant"], r["strategy"], t), [])
            real.append(f"{np.mean(x):.1f} ({min(x):.1f}-{max(x):.1f})" if x else "")
        lines.append(f"| {mark}{r['variant']}{mark} | {mark}{r['strategy']}{mark} | {100 * r['mean_simulated']:.1f} | "
                     f"{100 * r['worst_simulated']:.1f} | {r['n_simulated']} | " + " | ".join(real) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    data = Path(os.environ.get("CROSSSITE_DATA", ROOT.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--choose", action="store_true", help="print the table and the rule's choice, train nothing")
    parser.add_argument("--markdown", action="store_true", help="with --choose: the table as Markdown")
    parser.add_argument("--variant", default="baseline", help="name of the configuration under test")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override")
    parser.add_argument("--site", action="append", metavar="NAME=PATH",
                        help=f"a real site (default: both public sites under {data})")
    parser.add_argument("--method", default="crosssite")
    parser.add_argument("--hospitals", type=int, default=8, help="simulated hospitals per held-out site (K)")
    parser.add_argument("--hospital-seed", type=int, default=0, help="seed of the hospitals' draws")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--limit", type=int, default=0,
                        help="slices per class of each held-out site and simulated hospital (0: all)")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.site = args.site or [f"sars_cov2_ct={data / 'sars_cov2_ct'}", f"covid_ct={data / 'covid_ct'}"]
    if "|" in args.variant:
        parser.error("--variant: '|' is reserved")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.choose:
        records = read_results(args.out / RESULTS)
        result = choose(records)
        if args.markdown:
            print(markdown(result, records))
        else:
            print_choice(result)
        return
    torch.set_num_threads(int(os.environ.get("CROSSSITE_THREADS", "1")))
    run_protocol(args)


if __name__ == "__main__":
    main(sys.argv[1:])
