"""Leave one site out: train on every site but one, score the held-out site under each test-time strategy."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from crosssite.data import Site, card_tta
from crosssite.errors import ConfigError
from crosssite.experiment.grid import PRESETS
from crosssite.experiment.ledger import append_line
from crosssite.experiment.provenance import git_commit, machine_info
from crosssite.experiment.runs import numbers
from crosssite.ioutil import ensure_dir, read_jsonl

__all__ = ["LOSO_STRATEGIES", "run_loso"]

LOSO_STRATEGIES = ("standardise", "tent", "ensemble")  # on top of norm_strategies' own (sites, mean, AdaBN)


def run_loso(
    sites: Sequence[Site],
    out_dir: Path,
    *,
    preset: str = "cpu",
    method: str = "sepnorm-contrastive",
    backbone: str = "covidnet_redesign",
    seeds: Sequence[int] = (0,),
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    log=print,
) -> int:
    """Leave one site out: for every site (and seed), train ``method`` on all the other sites (every slice but a
    grouped validation part, ``protocol="all"``) and score every slice of the held-out site under each
    test-time strategy. One line per (held-out site, seed, strategy) goes to ``OUT/loso.jsonl``; finished pairs
    are skipped. Returns the number of models trained by this call."""
    from crosssite.evaluation import card_loader, evaluate_model
    from crosssite.models import load
    from crosssite.training import train
    from crosssite.training.config import preset_config

    if len(sites) < 2:
        raise ConfigError("leave-one-site-out needs at least two sites")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out_dir = ensure_dir(Path(out_dir), "the experiment folder")
    results = out_dir / "loso.jsonl"
    done = {(r["held_out"], r["seed"]) for r in read_jsonl(results)}
    trained = 0
    for seed in seeds:
        for held in sites:
            if (held.name, seed) in done:
                continue
            values = {**(overrides or {}), "method": method, "backbone": backbone, "seed": seed, "protocol": "all"}
            config = preset_config(PRESETS[preset], values)
            run_dir = out_dir / "runs" / f"loso__{method}__{backbone}" / f"{held.name}_seed{seed}"
            log(f"leave out {held.name} (seed {seed}) -> {run_dir}")
            start = time.perf_counter()
            train(config, [s for s in sites if s is not held], run_dir, resume=True, progress=progress)
            trained += 1
            model, card = load(run_dir / "model")
            loader = card_loader(held, card, None, batch_size=64)
            evaluations = evaluate_model(model, list(card["site_names"]), {}, {held.name: loader},
                                         strategies=LOSO_STRATEGIES, n_boot=500, seed=seed,
                                         tta=card_tta(card))
            wall = round(time.perf_counter() - start, 1)
            for e in evaluations:
                append_line(results, {
                    "held_out": held.name, "seed": seed, "method": method, "backbone": backbone, "preset": preset,
                    "strategy": e.strategy, "description": e.description, "n": e.n,
                    "metrics": numbers(e.metrics), "ci": {k: list(v) for k, v in e.ci.items()},
                    "ci_resampled": e.resampled, "trained_on": [s.name for s in sites if s is not held],
                    "config": asdict(config), "git_commit": git_commit(), "machine": machine_info(), "wall_s": wall,
                })
    return trained
