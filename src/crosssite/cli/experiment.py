"""``crosssite experiment`` (the paper's protocol as a resumable grid) and ``crosssite demo`` (the main job).

    crosssite experiment --site A=PATH --site B=PATH --preset cpu --methods all --folds 4 --seeds 1 --out DIR
    crosssite demo [--out DIR] [--data DIR]
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from crosssite.cli.app import app, fail
from crosssite.errors import ConfigError, CrossSiteError

# The built-in default of `demo`: two synthetic hospitals whose scanners differ strongly.
DEMO_SITES = (
    "hospital-1=synthetic:shift=0.0,n=160,seed=11,size=128",
    "hospital-2=synthetic:shift=1.5,n=120,seed=22,size=96",
)
# Sized to finish within a few minutes on 2 CPU cores (measured in README.md).
DEMO_CONFIG = {
    "image_size": 64, "width": 0.125, "epochs": 30, "batch_per_site": 16, "lr": 1e-3, "lr_min": 1e-5,
    "bn_recalibrate": True,
}



def _parse_rows(methods: str, backbones: str) -> list[tuple[str, str]]:
    """Grid rows selected by ``--methods`` and ``--backbones``: ``all`` keeps every row of the paper's Table I; a
    registered method outside the paper runs on each selected backbone (``all``: the redesign)."""
    from crosssite.experiment import PAPER_ROWS
    from crosssite.models import list_models
    from crosssite.training import METHODS

    wanted_m = None if methods == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    wanted_b = None if backbones == "all" else [b.strip() for b in backbones.split(",") if b.strip()]
    for m in wanted_m or []:
        if m not in METHODS:
            raise ConfigError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    for b in wanted_b or []:
        if b not in list_models():
            raise ConfigError(f"--backbones: unknown backbone {b!r}; choose from {', '.join(list_models())}")
    rows = [
        (m, b)
        for m, b, _ in PAPER_ROWS
        if (wanted_m is None or m in wanted_m) and (wanted_b is None or b in wanted_b)
    ]
    in_paper = {m for m, _, _ in PAPER_ROWS}
    for m in wanted_m or []:
        if m not in in_paper:
            rows += [(m, b) for b in wanted_b or ["covidnet_redesign"]]
    if not rows:
        raise ConfigError(f"no row of Table I has method in {methods!r} and backbone in {backbones!r}")
    return rows


@app.command()
def experiment(
    site: list[str] = typer.Option(..., "--site", help="NAME=PATH[:LAYOUT]; repeat for every site."),
    out: Path = typer.Option(..., "--out", help="Experiment folder (results.jsonl, runs/, report)."),
    preset: str = typer.Option("cpu", help="paper (224 px, width 1, 100 epochs: a GPU job), cpu (64 px, width "
                               "0.25, 16 epochs) or cpu-small (6 epochs: the grid of results/cpu-real)."),
    protocol: str = typer.Option("kfold", help="kfold (Table I: folds x seeds per site) or loso (leave one site "
                                 "out: train on the others, score every slice of it under each test-time strategy)."),
    methods: str = typer.Option("all", help="Comma-separated methods, or all (the nine rows of Table I)."),
    backbones: str = typer.Option("all", help="Comma-separated backbones (covidnet, covidnet_redesign), or all."),
    folds: int = typer.Option(4, min=2, help="Number of cross-validation folds."),
    seeds: int = typer.Option(1, min=1, help="Independent runs per fold (seeds 0..N-1) on one partition."),
    repeats: int = typer.Option(0, min=0, help="Repeated cross-validation: R partitions (split seeds 0..R-1), one "
                                "model seed each, so every run tests a different test set (instead of --seeds)."),
    fold: list[int] = typer.Option(None, "--fold", help="Run only these folds (repeatable)."),
    max_runs: int = typer.Option(None, help="Stop after this many runs (the grid resumes next time)."),
    runners: int = typer.Option(1, min=1, help="Runner processes sharing the grid, each with an equal share of the "
                                "torch threads (on 2 cores, 2 single-thread runners train about 1.4x the images "
                                "per second of one). Progress bars are off with more than one."),
    set_: list[str] = typer.Option(None, "--set", help="key=value overriding the preset, e.g. epochs=5."),
    report: bool = typer.Option(True, help="Write report.md / report.html when the call ends."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Run every (method, backbone, fold, seed, partition) of the paper's protocol; finished runs are skipped."""
    from crosssite.data import load_sites
    from crosssite.experiment import run_experiment, run_loso
    from crosssite.training.config import parse_overrides

    try:
        if protocol not in ("kfold", "loso"):
            raise CrossSiteError(f"--protocol: {protocol!r} is not one of kfold, loso")
        if repeats and seeds > 1:
            raise CrossSiteError("--repeats R runs one model seed per partition; give it without --seeds")
        rows = _parse_rows(methods, backbones)
        sites = load_sites(site)
        overrides = parse_overrides(set_ or [])
        if protocol == "loso":
            if runners > 1:
                raise CrossSiteError("--runners: only the kfold protocol runs as several runners")
            method = "sepnorm-contrastive" if methods == "all" else rows[0][0]
            run_loso(sites, out, preset=preset, method=method, seeds=range(seeds), overrides=overrides,
                     progress=not quiet)
            if report:
                from crosssite.reporting import build_report

                written = build_report(out)
                typer.echo(f"report (the leave-one-site-out table): {written.markdown} and {written.html}")
            return
        run_experiment(
            sites, out, preset=preset, rows=rows, folds=folds, seeds=range(seeds), repeats=repeats,
            only_folds=fold or None,
            overrides=overrides, max_runs=max_runs, runners=runners, progress=not quiet,
        )
        if report:
            from crosssite.reporting import build_report

            written = build_report(out)
            typer.echo(f"report: {written.markdown} and {written.html}")
    except CrossSiteError as e:
        raise fail(e) from None


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the run and its report go."),
    data: Path = typer.Option(
        None, "--data", help="A folder holding sars_cov2_ct/ and covid_ct/ (the paper's two sites); "
        "default: two built-in synthetic sites."
    ),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """The main job: train ours (SepNorm + contrastive) on two sites, evaluate per site, write a report."""
    from crosssite.data import load_sites
    from crosssite.experiment import run_experiment
    from crosssite.reporting import build_report

    if data is None:
        specs = list(DEMO_SITES)
        source = "two built-in synthetic sites"
    else:
        specs = [f"sars_cov2_ct={data / 'sars_cov2_ct'}", f"covid_ct={data / 'covid_ct'}"]
        source = f"the two public datasets in {data}"
    start = time.perf_counter()
    try:
        sites = load_sites(specs)
        typer.echo(f"demo: training SepNorm + Contrastive (ours) on {source}: "
                   + ", ".join(f"{s.name} ({len(s.samples)} slices)" for s in sites))
        run_experiment(
            sites, out, preset="cpu", rows=[("sepnorm-contrastive", "covidnet_redesign")], folds=4,
            only_folds=[0], overrides=DEMO_CONFIG, progress=not quiet,
        )
        written = build_report(out)
    except CrossSiteError as e:
        raise fail(e) from None
    _print_summary(out)
    typer.echo(f"report: {written.markdown}  (self-contained: {written.html})")
    typer.echo(f"demo finished in {time.perf_counter() - start:.0f} s")


def _print_summary(out: Path) -> None:
    """Per-site test metrics of the demo's run, read back from results.jsonl."""
    from rich.console import Console
    from rich.table import Table

    from crosssite.ioutil import read_jsonl

    row = read_jsonl(out / "results.jsonl")[-1]
    table = Table(title=f"test metrics, fold {row['fold']} ({row['method']}, {row['backbone']})")
    metrics = ("accuracy", "f1", "recall", "specificity", "precision", "auc")
    table.add_column("site")
    for m in metrics:
        table.add_column(m, justify="right")
    for name, values in row["sites"].items():
        table.add_row(name, *(f"{100 * values[m]:.1f}" for m in metrics))
    Console(width=120).print(table)
