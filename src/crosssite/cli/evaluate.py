"""``crosssite evaluate`` (a trained model on sites, with 95% bootstrap intervals) and ``crosssite report``.

    crosssite evaluate RUN_DIR|MODEL --site NAME=PATH ... [--external NAME=PATH ... [--adapt-strategy NAME ...]]
                       [--all] [--json] [--out DIR]
    crosssite report EXPERIMENT_DIR [--out DIR]

SOURCE is a run directory (``model.safetensors`` + ``model.json`` + ``split.json``; a `single` run holds one
such directory per site) or a model file / stem. For a run directory and a site it trained on, only that
site's test part (from ``split.json``) is scored unless ``--all`` is given. ``--external`` sites were never
trained on: they are scored once per normalisation strategy (each known site's statistics, their mean, AdaBN,
and ``standardise``, the default for an unseen site, whose row has ``"default": true``), and once more per
``--adapt-strategy`` (``tent``, ``ensemble``; repeatable).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

from crosssite.cli.app import app, fail
from crosssite.errors import CheckpointError, CrossSiteError
from crosssite.ioutil import ensure_dir



@dataclass
class _Model:
    """One model of the source with the run directory it came from (None for a bare model file)."""

    model: Any
    card: dict[str, Any]
    run_dir: Path | None

    @property
    def site_names(self) -> list[str]:
        names = self.card.get("site_names")
        return list(names) if names else [f"site{i}" for i in range(int(self.card["num_sites"]))]


def _load_models(source: Path, device: str) -> list[_Model]:
    """The model of a run directory, the per-site models of a `single` run, or a model file."""
    from crosssite.models import load

    if source.is_dir() and not (source / "model.safetensors").is_file():
        subdirs = sorted(p for p in source.iterdir() if (p / "model.safetensors").is_file())
        if not subdirs:
            raise CheckpointError(f"{source}: no model.safetensors in it or in its site folders")
        return [_Model(*load(p, map_location=device), run_dir=p) for p in subdirs]
    model, card = load(source, map_location=device)
    return [_Model(model, card, source if source.is_dir() else None)]


def _test_indices(run_dir: Path, site: Any) -> np.ndarray:
    """Indices into `site.samples` of the files that were `site`'s test part in run_dir/split.json."""
    from crosssite.errors import SiteError
    from crosssite.rundir import SPLIT, split_files

    path = run_dir / SPLIT
    if not path.is_file():
        raise SiteError(f"{path}: not found; pass --all to score every image of {site.name!r}")
    files = split_files(run_dir, site.name, "test")
    where = {(str(s.path), s.frame): i for i, s in enumerate(site.samples)}
    missing = [p for p, f in files if (p, f) not in where]
    if missing:
        raise SiteError(
            f"{path}: {len(missing)} test file(s) of {site.name!r} are not in the given site, e.g. {missing[0]}"
        )
    return np.array([where[(p, f)] for p, f in files], dtype=np.int64)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _print(results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    for r in results:
        level = int(round(100 * r["ci_level"]))
        part = "its test part" if r["part"] == "test" else "every image"
        console.print(
            f"\n{r['site']}: {r['n']} slices ({r['n_covid']} COVID, {part}); model {r['model']}; "
            f"normalisation: {r['description']}" + (" (the default for an unseen site)" if r.get("default") else ""),
            markup=False,
            style="bold",
        )
        table = Table()
        for column in ("metric", "%", f"{level}% CI"):
            table.add_column(column, justify="right")
        for name, value in r["metrics"].items():
            low, high = r["ci"][name]
            table.add_row(name, _fmt(value), f"{_fmt(low)} - {_fmt(high)}")
        console.print(table)
        cm = r["confusion_matrix"]
        matrix = Table(title=f"confusion matrix at threshold {r['threshold']:g}", title_justify="left")
        matrix.add_column("true \\ predicted")
        for label in cm["labels"]:
            matrix.add_column(label, justify="right")
        for label, row in zip(cm["labels"], cm["counts"]):
            matrix.add_row(label, *map(str, row))
        console.print(matrix)


def _save(out: Path, report: dict[str, Any], results: list[Any]) -> None:
    from crosssite.ioutil import atomic_write_text

    atomic_write_text(out / "metrics.json", json.dumps(report, indent=1) + "\n", "evaluation metrics")
    for r, row in zip(results, report["results"]):
        stem = f"confusion_{row['model']}_{r.site}_{r.strategy}".replace(":", "-").replace("/", "-")
        atomic_write_text(out / f"{stem}.csv", r.confusion.to_csv(), "confusion matrix")


def _evaluate_one(m: _Model, source: Path, known_sites: list, external_sites: list, all_images: bool,
                  batch_size: int, workers: int, device: str, bootstrap: int, seed: int,
                  strategies: Sequence[str] = ()) -> list[tuple[Any, dict]]:
    """Every (evaluation, JSON row) of model ``m`` on its known sites (test parts, or every image with --all) and
    on the external sites under each normalisation strategy (and each extra test-time ``strategies``)."""
    from crosssite.data import card_tta
    from crosssite.evaluation import card_loader, evaluate_model
    from crosssite.models.adaptation import DEFAULT_STRATEGY

    mine = [s for s in known_sites if s.name in m.site_names]
    if not mine and not external_sites:
        return []

    def indices(s: Any) -> np.ndarray | None:
        return None if all_images or m.run_dir is None else _test_indices(m.run_dir, s)

    known = {s.name: card_loader(s, m.card, indices(s), batch_size=batch_size, workers=workers) for s in mine}
    ext = {s.name: card_loader(s, m.card, None, batch_size=batch_size, workers=workers) for s in external_sites}
    label = m.run_dir.name if m.run_dir is not None else source.stem
    out = []
    for r in evaluate_model(m.model, m.site_names, known, ext, device=device,
                            threshold=float(m.card.get("threshold", 0.5)), n_boot=bootstrap, seed=seed,
                            strategies=strategies, tta=card_tta(m.card)):
        part = "all" if all_images or m.run_dir is None or r.strategy != "own" else "test"
        default = r.site in ext and r.strategy == DEFAULT_STRATEGY  # what predict / serve use on an unseen site
        out.append((r, r.to_dict() | {"model": label, "part": part, "default": default}))
    return out


def _check_strategies(strategies: list[str], external: list[str]) -> None:
    """``--adapt-strategy`` values: known strategies, and only with ``--external`` sites."""
    from crosssite.models.adaptation import STRATEGIES, adaptation_strategies

    for key in strategies:
        if key not in STRATEGIES:
            raise CrossSiteError(f"--adapt-strategy: unknown strategy {key!r}; choose from "
                                 f"{', '.join(adaptation_strategies())}")
    if strategies and not external:
        raise CrossSiteError("--adapt-strategy applies to --external sites; give at least one --external")


@app.command()
def evaluate(
    source: Path = typer.Argument(..., metavar="RUN_DIR|MODEL", help="Run directory or model file."),
    site: list[str] = typer.Option(None, "--site", help="NAME=PATH[:LAYOUT] of a site the model trained on."),
    external: list[str] = typer.Option(None, "--external", help="NAME=PATH[:LAYOUT] of a site never trained on."),
    adapt: list[str] = typer.Option(
        None, "--adapt-strategy", metavar="NAME",
        help="Also score --external sites with this test-time strategy: tent, ensemble (standardise, the "
             "default for an unseen site, and adabn are always scored); repeatable.",
    ),
    all_images: bool = typer.Option(False, "--all", help="Score every image of a known site, not its test part."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    out: Path = typer.Option(None, "--out", help="Write metrics.json and confusion matrices (CSV) here."),
    bootstrap: int = typer.Option(1000, min=1, help="Bootstrap resamples for the 95% intervals."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    batch_size: int = typer.Option(64, min=1),
    workers: int = typer.Option(0, min=0, help="Data loader worker processes."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Accuracy, F1, recall, specificity, precision and AUC per site (COVID positive), with 95% bootstrap
    intervals and confusion matrices."""
    import torch

    from crosssite.data import load_site
    from crosssite.inference.threads import torch_threads
    from crosssite.models.adaptation import DEFAULT_STRATEGY
    from crosssite.training.step import resolve_device

    try:
        device = str(resolve_device(device))
        if not site and not external:
            raise CrossSiteError("give at least one --site or --external")
        _check_strategies(adapt or [], external or [])
        if out is not None:
            ensure_dir(out, "the --out folder")  # before any work: a bad output path fails at once
        models = _load_models(source, device)
        known_sites = [load_site(s) for s in site or []]
        external_sites = [load_site(s) for s in external or []]
        report: dict[str, Any] = {"source": str(source), "results": []}
        results = []
        for name in [s.name for s in known_sites]:
            if not any(name in m.site_names for m in models):
                raise CrossSiteError(
                    f"site {name!r} is not one {source} was trained on "
                    f"({', '.join(n for m in models for n in m.site_names)}); pass it with --external"
                )
        # external sites: always the default strategy for an unseen site, then every --adapt-strategy
        strategies = tuple(dict.fromkeys([DEFAULT_STRATEGY, *(adapt or [])])) if external_sites else ()
        # torch on the cores that are free: OpenMP threads spinning on a core another process holds slow every
        # forward pass many times over (crosssite.inference.threads)
        with torch_threads(None if device == "cpu" else torch.get_num_threads()):
            for m in models:
                for r, row in _evaluate_one(m, source, known_sites, external_sites, all_images, batch_size, workers,
                                            device, bootstrap, seed, strategies):
                    report["results"].append(row)
                    results.append(r)
    except CrossSiteError as e:
        raise fail(e) from None
    _output(report, results, out, as_json)


def _output(report: dict[str, Any], results: list[Any], out: Path | None, as_json: bool) -> None:
    """The report as JSON or tables on stdout, and its files under ``out``."""
    if out is not None:
        _save(out, report, results)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        _print(report["results"])
        if out is not None:
            typer.echo(f"saved {out / 'metrics.json'} and {len(results)} confusion matrices")


@app.command()
def report(
    experiment_dir: Path = typer.Argument(..., metavar="DIR", help="Experiment folder holding results.jsonl."),
    out: Path = typer.Option(None, "--out", help="Where report.md, report.html and figures/ go (default DIR)."),
    gradcam: bool = typer.Option(True, help="Draw Grad-CAM panels from a saved model of ours."),
    cases: int = typer.Option(4, min=1, help="Cases per Grad-CAM panel."),
) -> None:
    """Tables I-III, ROC curves (Fig. 3) and Grad-CAM panels (Fig. 4, 5) as report.md and report.html."""
    from crosssite.reporting import build_report

    try:
        written = build_report(experiment_dir, out, gradcam=gradcam, gradcam_cases=cases, log=typer.echo)
    except CrossSiteError as e:
        raise fail(e) from None
    typer.echo(f"report: {written.markdown}  (self-contained: {written.html}); {len(written.figures)} figures")
