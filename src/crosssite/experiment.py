"""The paper's protocol as a resumable grid: method x backbone x fold x seed.

Every finished run appends one JSON line to ``DIR/results.jsonl`` holding each site's test metrics and
test-part predictions, the resolved configuration, the git commit, the machine and the wall time. A run
whose key (method, backbone, fold, seed) already has a line is skipped, so a grid grows across many
invocations; a run interrupted half-way resumes from its own last checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crosssite.data import Site, card_tta
from crosssite.errors import ConfigError
from crosssite.ioutil import ensure_dir, guard_output, read_jsonl
from crosssite.training.methods import PAPER_TABLE_I, method_recipe
from crosssite.training.rundir import read_predictions

__all__ = [
    "PRESETS",
    "PAPER_ROWS",
    "RunKey",
    "grid",
    "finished_keys",
    "machine_info",
    "run_experiment",
    "run_loso",
]

# Table I of the paper: (method, backbone, label) in the paper's order.
PAPER_ROWS: tuple[tuple[str, str, str], ...] = tuple((m, b, r.label) for (m, b), r in PAPER_TABLE_I.items())

# Configuration overrides of each preset. `paper` is the published protocol (a GPU job). `cpu` is the reduced scale
# of Table I v2 (docs/RESULTS.md): chosen on the validation parts of folds 0-1 over 2 seeds among image sizes
# 64-160, widths 0.25-0.5 and epoch counts under a budget of 5 minutes per run on 2 cores
# (`python scripts/choose_defaults.py table`: 64 px, width 0.25, 16 epochs, 90.66 mean validation AUC, about
# 2.2-2.6 minutes per run). `cpu-small` is the cpu preset up to crosssite 0.3 (6 epochs; the grid of
# results/cpu-real). The learning rate 5e-4 makes up for runs far shorter than the paper's 100 epochs; short
# high-lr runs leave BN running statistics behind the weights, so both recompute them on the training part before
# each validation (`bn_recalibrate`).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"image_size": 224, "width": 1.0, "epochs": 100, "batch_per_site": 16, "lr": 1e-4},
    "cpu": {"image_size": 64, "width": 0.25, "epochs": 16, "batch_per_site": 16, "lr": 5e-4, "bn_recalibrate": True},
    "cpu-small": {"image_size": 64, "width": 0.25, "epochs": 6, "batch_per_site": 16, "lr": 5e-4,
                  "bn_recalibrate": True},
}


@dataclass(frozen=True, order=True)
class RunKey:
    """Identifies one run of the grid."""

    method: str
    backbone: str
    fold: int
    seed: int

    @property
    def dirname(self) -> str:
        return f"{self.method}__{self.backbone}/fold{self.fold}_seed{self.seed}"


def grid(rows: Sequence[tuple[str, str]], folds: int, seeds: Sequence[int]) -> Iterator[RunKey]:
    """Runs in the order that fills Table I evenly: every row of fold 0 seed 0 first, and so on."""
    for seed in seeds:
        for fold in range(folds):
            for method, backbone in rows:
                yield RunKey(method, backbone, fold, seed)


def finished_keys(results: Path) -> set[RunKey]:
    """Keys of the runs that already have a line in ``results``."""
    return {RunKey(row["method"], row["backbone"], int(row["fold"]), int(row["seed"])) for row in read_jsonl(results)}


def _append_line(results: Path, row: dict[str, Any]) -> None:
    """Append one JSON line under an exclusive lock, flushed to disk, so parallel runners never interleave; a
    failed write (full disk) is cut off again, so the file never ends in half a line, and is an `OutputError`."""
    with guard_output(results, "the experiment's results"):
        ensure_dir(results.parent)
        line = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
        with open(results, "ab", buffering=0) as fh:  # unbuffered: every byte written is known
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                end = os.lseek(fh.fileno(), 0, os.SEEK_END)
                try:
                    view = memoryview(line)
                    while view:
                        view = view[os.write(fh.fileno(), view):]
                    os.fsync(fh.fileno())
                except OSError:
                    os.ftruncate(fh.fileno(), end)
                    raise
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def git_commit() -> str:
    """The commit of the crosssite checkout this code runs from, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """What the run ran on: enough to compare wall times honestly."""
    import torch

    from crosssite.training.precision import cpu_model

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _test_predictions(run_dir: Path) -> dict[str, dict[str, list]]:
    """Per site, the labels and P(COVID) of the test part (and the patient ids, where the site has them for
    every slice), from the run's predictions.csv files."""
    out: dict[str, dict[str, list]] = {}
    for p in read_predictions(run_dir, "test"):
        site = out.setdefault(p.site, {"y_true": [], "p_covid": [], "patients": []})
        site["y_true"].append(p.label)
        site["p_covid"].append(p.p_covid)
        site["patients"].append(p.patient)
    for site in out.values():
        if any(pid is None for pid in site["patients"]):
            del site["patients"]
    return out


def _numbers(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The numeric metrics of a site; an undefined one (None, NaN in metrics.json) is kept as None (JSON null),
    so that every line of results.jsonl names every metric."""
    return {k: v for k, v in metrics.items()
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}


def _results_line(key: RunKey, preset: str, out_dir: Path, run_dir: Path, sites: Sequence[Site],
                  metrics: dict[str, Any], config: Any) -> dict[str, Any]:
    """The results.jsonl line of a finished run (without its wall time): test metrics and predictions per site,
    validation metrics, the collapse flag, configuration, commit and machine."""
    preds = _test_predictions(run_dir)
    return {
        **asdict(key),
        "preset": preset,
        "run_dir": str(run_dir.relative_to(out_dir)),
        "sites": {name: {**_numbers(m["test"]), **preds.get(name, {})} for name, m in metrics["sites"].items()},
        "site_order": [s.name for s in sites],
        "site_info": {s.name: {"layout": s.layout, "has_patients": s.has_patients} for s in sites},
        "val": {name: _numbers(m["val"]) for name, m in metrics["sites"].items()},
        "collapsed": bool(metrics.get("collapsed", False)),
        "config": asdict(config),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_experiment(
    sites: Sequence[Site],
    out_dir: Path,
    *,
    preset: str = "cpu",
    rows: Sequence[tuple[str, str]] | None = None,
    folds: int = 4,
    seeds: Sequence[int] = (0,),
    only_folds: Sequence[int] | None = None,
    overrides: dict[str, Any] | None = None,
    max_runs: int | None = None,
    progress: bool = True,
    log=print,
) -> list[RunKey]:
    """Run every unfinished (method, backbone, fold, seed) of the grid; returns the keys run this call."""
    from crosssite.training import TrainConfig, train
    from crosssite.training.config import apply_overrides

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    rows = list(rows) if rows is not None else [(m, b) for m, b, _ in PAPER_ROWS]
    out_dir = Path(out_dir)
    results = out_dir / "results.jsonl"
    done = finished_keys(results)
    todo = [
        k for k in grid(rows, folds, seeds) if k not in done and (only_folds is None or k.fold in only_folds)
    ]
    if max_runs is not None:
        todo = todo[:max_runs]
    log(f"experiment {out_dir}: {len(done)} run(s) finished, {len(todo)} to run now")
    ran: list[RunKey] = []
    for i, key in enumerate(todo, 1):
        values = {**PRESETS[preset], **method_recipe(key.method), **(overrides or {})}
        values.update(method=key.method, backbone=key.backbone, fold=key.fold, folds=folds, seed=key.seed)
        config = apply_overrides(TrainConfig(), values)
        run_dir = out_dir / "runs" / key.dirname
        log(f"[{i}/{len(todo)}] {key.method} / {key.backbone} fold {key.fold} seed {key.seed} -> {run_dir}")
        resumed = run_dir.exists()
        start = time.perf_counter()
        metrics = train(config, list(sites), run_dir, resume=True, progress=progress)
        wall = time.perf_counter() - start
        line = _results_line(key, preset, out_dir, run_dir, sites, metrics, config)
        _append_line(results, line | {"resumed": resumed, "wall_s": round(wall, 1)})
        ran.append(key)
    return ran


# ----------------------------------------------------------------------------------- leave one site out

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
    from crosssite.training import TrainConfig, train
    from crosssite.training.config import apply_overrides

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
            values = {**PRESETS[preset], **(overrides or {}), "method": method, "backbone": backbone,
                      "seed": seed, "protocol": "all"}
            config = apply_overrides(TrainConfig(), values)
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
                _append_line(results, {
                    "held_out": held.name, "seed": seed, "method": method, "backbone": backbone, "preset": preset,
                    "strategy": e.strategy, "description": e.description, "n": e.n,
                    "metrics": _numbers(e.metrics), "ci": {k: list(v) for k, v in e.ci.items()},
                    "ci_resampled": e.resampled, "trained_on": [s.name for s in sites if s is not held],
                    "config": asdict(config), "git_commit": git_commit(), "machine": machine_info(), "wall_s": wall,
                })
    return trained
