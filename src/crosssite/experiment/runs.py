"""Training the runs of a grid in this process: one run per key, claimed while it trains, and its results line."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crosssite.data import Site
from crosssite.experiment.grid import PRESETS, RunKey
from crosssite.experiment.ledger import append_line, claim_run, finished_keys
from crosssite.experiment.provenance import git_commit, machine_info
from crosssite.rundir import read_predictions

__all__ = ["Job", "numbers", "results_line", "run_keys"]

def test_predictions(run_dir: Path) -> dict[str, dict[str, list]]:
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


def numbers(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The numeric metrics of a site; an undefined one (None, NaN in metrics.json) is kept as None (JSON null),
    so that every line of results.jsonl names every metric."""
    return {k: v for k, v in metrics.items()
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}


def results_line(key: RunKey, preset: str, out_dir: Path, run_dir: Path, sites: Sequence[Site],
                  metrics: dict[str, Any], config: Any) -> dict[str, Any]:
    """The results.jsonl line of a finished run (without its wall time): test metrics and predictions per site,
    validation metrics, the collapse flag, configuration, commit and machine."""
    preds = test_predictions(run_dir)
    return {
        **asdict(key),
        "preset": preset,
        "run_dir": str(run_dir.relative_to(out_dir)),
        "sites": {name: {**numbers(m["test"]), **preds.get(name, {})} for name, m in metrics["sites"].items()},
        "site_order": [s.name for s in sites],
        "site_info": {s.name: {"layout": s.layout, "has_patients": s.has_patients,
                               "grouping": "patient" if s.has_patients else "pseudo-patient"} for s in sites},
        "val": {name: numbers(m["val"]) for name, m in metrics["sites"].items()},
        "collapsed": bool(metrics.get("collapsed", False)),
        "config": asdict(config),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class Job:
    """What every run of one `run_experiment` call shares (sent to worker processes)."""

    sites: tuple[Site, ...]
    out_dir: Path
    preset: str
    folds: int
    overrides: dict[str, Any]


def run_keys(job: Job, todo: Sequence[RunKey], progress: bool, log: Callable[[str], None],
              quiet_skips: bool = False, stop: Callable[[], bool] | None = None) -> list[RunKey]:
    """Train the runs of ``todo`` that are neither finished nor held by another runner; one results line each.
    ``stop`` is asked before each run (a runner process stops when its parent is gone)."""
    from crosssite.training import train
    from crosssite.training.config import preset_config

    results = job.out_dir / "results.jsonl"
    ran: list[RunKey] = []
    left: list[RunKey] = []
    for i, key in enumerate(todo, 1):
        if stop is not None and stop():
            log("stopping: the command that started this runner has ended")
            break
        run_dir = job.out_dir / "runs" / key.dirname
        with claim_run(run_dir) as mine:
            if not mine:
                left.append(key)
                continue
            if key in finished_keys(results):  # finished by another runner since this call began
                continue
            values = {**job.overrides, "method": key.method, "backbone": key.backbone, "fold": key.fold,
                      "folds": job.folds, "seed": key.seed, "split_seed": key.split_seed}
            config = preset_config(PRESETS[job.preset], values)  # the method's recipe goes over the preset
            log(f"[{i}/{len(todo)}] {key.method} / {key.backbone} fold {key.fold} split {key.split_seed} "
                f"seed {key.seed} -> {run_dir}")
            resumed = run_dir.exists()
            start = time.perf_counter()
            metrics = train(config, list(job.sites), run_dir, resume=True, progress=progress)
            wall = time.perf_counter() - start
            line = results_line(key, job.preset, job.out_dir, run_dir, job.sites, metrics, config)
            append_line(results, line | {"resumed": resumed, "wall_s": round(wall, 1)})
            ran.append(key)
    if left and not quiet_skips:
        log(f"{len(left)} run(s) left to the runner(s) that hold them: "
            + ", ".join(f"{k.method} fold {k.fold} seed {k.seed}" for k in left))
    return ran
