"""The paper's protocol as a resumable grid: method x backbone x fold x seed.

Every finished run appends one JSON line to ``DIR/results.jsonl`` holding each site's test metrics and
test-part predictions, the resolved configuration, the git commit, the machine and the wall time. A run
whose key (method, backbone, fold, seed) already has a line is skipped, so a grid grows across many
invocations; a run interrupted half-way resumes from its own last checkpoint. Each run is claimed (an exclusive
lock beside its folder, released when its process ends, however it ends) while it trains, so several runners may
share one grid: a run another runner holds is left to it. ``runners=N`` starts N such runners at once, each with
a share of the torch threads (on 2 cores, two single-thread runners train about 1.4x the images per second of one
two-thread runner: docs/RESULTS.md).
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crosssite.data import Site, card_tta
from crosssite.errors import ConfigError, CrossSiteError
from crosssite.ioutil import ensure_dir, guard_output, read_jsonl
from crosssite.training.methods import PAPER_TABLE_I
from crosssite.training.rundir import read_predictions

__all__ = [
    "PRESETS",
    "PAPER_ROWS",
    "RunKey",
    "claim_run",
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
    """Keys of the runs that already have a line in ``results`` (read under a shared lock: a line another runner
    is appending is never read half-way)."""
    if not Path(results).is_file():
        return set()
    with open(results, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            text = fh.read().decode("utf-8")
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {RunKey(row["method"], row["backbone"], int(row["fold"]), int(row["seed"])) for row in rows}


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


@dataclass(frozen=True)
class _Job:
    """What every run of one `run_experiment` call shares (sent to worker processes)."""

    sites: tuple[Site, ...]
    out_dir: Path
    preset: str
    folds: int
    overrides: dict[str, Any]


@contextmanager
def claim_run(run_dir: Path) -> Iterator[bool]:
    """Hold the run at ``run_dir`` for this process: yields True while an exclusive lock on its claim file
    (``.NAME.claim`` beside the folder) is held, False when another runner holds it. The operating system drops
    the lock when its process ends, so a killed runner never leaves a stale claim."""
    path = ensure_dir(run_dir.parent, "the experiment's runs folder") / f".{run_dir.name}.claim"
    with guard_output(path, "the run's claim file"):
        fh = open(path, "a")
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    runners: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[RunKey]:
    """Run every unfinished (method, backbone, fold, seed) of the grid, in `grid` order, skipping runs another
    runner holds; ``runners`` > 1 shares them among that many runner processes. Returns the keys run this call."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if runners < 1:
        raise ConfigError(f"runners: must be at least 1, got {runners}")
    rows = list(rows) if rows is not None else [(m, b) for m, b, _ in PAPER_ROWS]
    out_dir = Path(out_dir)
    results = out_dir / "results.jsonl"
    done = finished_keys(results)
    todo = [
        k for k in grid(rows, folds, seeds) if k not in done and (only_folds is None or k.fold in only_folds)
    ]
    if max_runs is not None:
        todo = todo[:max_runs]
    runners = min(runners, len(todo)) if todo else 1
    log(f"experiment {out_dir}: {len(done)} run(s) finished, {len(todo)} to run now"
        + (f" by {runners} runners" if runners > 1 else ""))
    job = _Job(tuple(sites), out_dir, preset, folds, overrides or {})
    if runners == 1:
        return _run_keys(job, todo, progress, log)
    ran = set(_run_runners(job, todo, runners, log))
    return [k for k in todo if k in ran]


def _run_keys(job: _Job, todo: Sequence[RunKey], progress: bool, log: Callable[[str], None],
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
                      "folds": job.folds, "seed": key.seed}
            config = preset_config(PRESETS[job.preset], values)  # the method's recipe goes over the preset
            log(f"[{i}/{len(todo)}] {key.method} / {key.backbone} fold {key.fold} seed {key.seed} -> {run_dir}")
            resumed = run_dir.exists()
            start = time.perf_counter()
            metrics = train(config, list(job.sites), run_dir, resume=True, progress=progress)
            wall = time.perf_counter() - start
            line = _results_line(key, job.preset, job.out_dir, run_dir, job.sites, metrics, config)
            _append_line(results, line | {"resumed": resumed, "wall_s": round(wall, 1)})
            ran.append(key)
    if left and not quiet_skips:
        log(f"{len(left)} run(s) left to the runner(s) that hold them: "
            + ", ".join(f"{k.method} fold {k.fold} seed {k.seed}" for k in left))
    return ran


def _worker(index: int, threads: int, job: _Job, todo: list[RunKey], done: Any) -> None:
    """One runner process of `run_experiment(runners=N)`: ``threads`` torch threads, its lines prefixed, the keys
    it ran put on ``done``; it stops between runs once its parent is gone, and quietly on an interrupt."""
    import torch

    def say(text: str) -> None:
        print(f"[runner {index}] {text}", flush=True)

    torch.set_num_threads(threads)
    # the parent's stop request is an interrupt, even where the runner was started with SIGINT ignored (a
    # background job of a shell script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parent = multiprocessing.parent_process()
    try:
        ran = _run_keys(job, todo, False, say, quiet_skips=True,
                        stop=lambda: parent is not None and not parent.is_alive())
    except KeyboardInterrupt:
        say("interrupted: its run resumes from its last checkpoint next time")
        sys.exit(130)
    except CrossSiteError as e:
        print(f"[runner {index}] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    done.put(ran)


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run_runners(job: _Job, todo: list[RunKey], runners: int, log: Callable[[str], None]) -> list[RunKey]:
    """Start ``runners`` runner processes on ``todo`` (each takes the next run nobody holds), wait for all and
    return the keys they ran. An interrupt or a SIGTERM / SIGHUP of this process is passed on to the runners as
    an interrupt (each finishes its write and stops; its run resumes from its checkpoint next time)."""
    import torch

    threads = max(1, torch.get_num_threads() // runners)
    log(f"{runners} runner processes, {threads} torch thread(s) each")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    done = context.SimpleQueue()
    procs = [context.Process(target=_worker, args=(i, threads, job, todo, done), name=f"runner-{i}")
             for i in range(1, runners + 1)]
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)} if in_main else {}
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    except BaseException:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ran: list[RunKey] = []
    while not done.empty():
        ran += done.get()
    failed = [f"runner {i} (" + (f"killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exit status {p.exitcode}")
              + ")" for i, p in enumerate(procs, 1) if p.exitcode != 0]
    if failed:
        raise CrossSiteError(f"{', '.join(failed)} stopped early (its messages are above); the grid resumes from "
                             "the finished runs and checkpoints when the command is run again")
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
                _append_line(results, {
                    "held_out": held.name, "seed": seed, "method": method, "backbone": backbone, "preset": preset,
                    "strategy": e.strategy, "description": e.description, "n": e.n,
                    "metrics": _numbers(e.metrics), "ci": {k: list(v) for k, v in e.ci.items()},
                    "ci_resampled": e.resampled, "trained_on": [s.name for s in sites if s is not held],
                    "config": asdict(config), "git_commit": git_commit(), "machine": machine_info(), "wall_s": wall,
                })
    return trained
