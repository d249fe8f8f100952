"""The paper's protocol as a resumable grid: method x backbone x fold x seed (`run_experiment`), and leave one site
out (`run_loso`).

Every finished run appends one JSON line to ``DIR/results.jsonl`` holding each site's test metrics and
test-part predictions, the resolved configuration, the git commit, the machine and the wall time. A run
whose key (method, backbone, fold, seed) already has a line is skipped, so a grid grows across many
invocations; a run interrupted half-way resumes from its own last checkpoint. Each run is claimed (an exclusive
lock on a file beside its folder, held while it trains) so several runners may share one grid: a run another
runner holds is left to it. ``runners=N`` starts N such runners at once, each with a share of the torch threads
(single-thread runners side by side use small models' cores better than one runner with every thread: the
measurement is in docs/RESULTS.md).

Modules: `grid` (presets, rows, keys), `ledger` (results.jsonl and claim files under locks), `runs` (training
the runs in this process), `runners` (runner processes), `provenance` (commit, machine), `loso`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crosssite.data import Site
from crosssite.errors import ConfigError
from crosssite.experiment.grid import PAPER_ROWS, PRESETS, RunKey, grid
from crosssite.experiment.ledger import claim_run, finished_keys
from crosssite.experiment.loso import run_loso
from crosssite.experiment.provenance import git_commit, machine_info
from crosssite.experiment.runners import run_runners
from crosssite.experiment.runs import Job, run_keys

__all__ = ["PRESETS", "PAPER_ROWS", "RunKey", "claim_run", "grid", "finished_keys", "git_commit", "machine_info",
           "run_experiment", "run_loso"]

def run_experiment(
    sites: Sequence[Site],
    out_dir: Path,
    *,
    preset: str = "cpu",
    rows: Sequence[tuple[str, str]] | None = None,
    folds: int = 4,
    seeds: Sequence[int] = (0,),
    repeats: int = 0,
    only_folds: Sequence[int] | None = None,
    overrides: dict[str, Any] | None = None,
    max_runs: int | None = None,
    runners: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[RunKey]:
    """Run every unfinished (method, backbone, fold, seed, split seed) of the grid, in `grid` order, skipping runs
    another runner holds; ``runners`` > 1 shares them among that many runner processes. ``repeats`` = R > 0 runs R
    partitions with one model seed each instead of ``seeds`` on one partition (`grid`). Returns the keys run."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if runners < 1:
        raise ConfigError(f"runners: must be at least 1, got {runners}")
    rows = list(rows) if rows is not None else [(m, b) for m, b, _ in PAPER_ROWS]
    out_dir = Path(out_dir)
    results = out_dir / "results.jsonl"
    done = finished_keys(results)
    todo = [k for k in grid(rows, folds, seeds, repeats)
            if k not in done and (only_folds is None or k.fold in only_folds)]
    if max_runs is not None:
        todo = todo[:max_runs]
    runners = min(runners, len(todo)) if todo else 1
    log(f"experiment {out_dir}: {len(done)} run(s) finished, {len(todo)} to run now"
        + (f" by {runners} runners" if runners > 1 else ""))
    job = Job(tuple(sites), out_dir, preset, folds, overrides or {})
    if runners == 1:
        return run_keys(job, todo, progress, log)
    ran = set(run_runners(job, todo, runners, log))
    return [k for k in todo if k in ran]
