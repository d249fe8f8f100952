"""``crosssite train``: train one method of the paper on any set of sites.

    crosssite train --site A=../shared/data/sars_cov2_ct --site B=../shared/data/covid_ct \\
        --method sepnorm-contrastive --backbone covidnet_redesign --out runs/ours \\
        [--config cpu.yaml] [--set epochs=20 --set image_size=128]
    crosssite train --resume runs/ours
    crosssite train --nproc 2 --site A=... --site B=... --out runs/ddp
    torchrun --nproc_per_node=2 -m crosssite train --site A=... --site B=... --out runs/ddp   # the same

Configuration precedence: defaults < the method's recipe (`crosssite.training.methods.Method.recipe`, added when
the run starts, as for every entry point: `crosssite.training.config.with_recipe`) < ``--config`` YAML <
``--method``/``--backbone`` < ``--set``.
``--resume DIR`` continues the run in DIR from its last checkpoint (a finished run just prints its metrics);
DIR's ``config.yaml`` and ``sites.json`` stand in for ``--config`` and ``--site``. Any `CrossSiteError` prints
one line and exits with status 1.

``--nproc N`` (N > 1) starts the same command as N data-parallel processes on this machine through
`torch.distributed.run` (torchrun) and exits with its status (ignored when already started by a launcher, i.e.
``WORLD_SIZE`` is set); only rank 0 prints the summary. See `crosssite.training.distributed`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from crosssite.cli.app import app, fail
from crosssite.errors import CrossSiteError

__all__ = ["train_command"]


@app.command("train")
def train_command(
    site: list[str] = typer.Option(None, "--site", help="NAME=PATH[:LAYOUT] (repeat for each site)."),
    method: str = typer.Option(None, "--method", help="A registered method (default: crosssite); each trains with "
                               "its recipe under your --config and --set values. `crosssite models --architectures` "
                               "lists the methods and backbones (read from the registries, so the help imports no "
                               "torch)."),
    backbone: str = typer.Option(None, "--backbone", help="A registered backbone (default: covidnet_redesign)."),
    out: Path = typer.Option(None, "--out", help="Run directory (required unless --resume)."),
    config: Path = typer.Option(None, "--config", help="YAML file of config keys."),
    set_: list[str] = typer.Option(None, "--set", help="key=value config override (repeatable)."),
    resume: Path = typer.Option(
        None, "--resume", metavar="DIR", help="Continue the run in DIR from its last checkpoint."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or per-epoch lines."),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Skip unreadable images (listed in DIR/skipped.json) instead of stopping."
    ),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel processes on this machine (via torchrun)."),
    strict: bool = typer.Option(False, "--strict", help="Refuse DICOM files that may not be chest-CT slices "
                                "(Modality MR, RT dose, ..., localizer, non-axial) instead of warning."),
) -> None:
    """Train a method on sites; write the run directory and print per-site test metrics."""
    set_ = [*(set_ or []), *(["skip_bad=true"] if skip_bad else [])]
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        args = _cli_args(site or [], method, backbone, out, config, set_ or [], resume, quiet) + (
            ["--strict"] if strict else [])
        raise typer.Exit(_launch(nproc, args))
    try:
        if resume is not None and out is not None and resume.resolve() != out.resolve():
            raise CrossSiteError(f"--resume {resume} and --out {out} name different run directories")
        out = resume if resume is not None else out
        if out is None:
            raise CrossSiteError("missing --out DIR (or --resume DIR to continue a run)")
        metrics = _run(site or [], method, backbone, out, config, set_ or [], resume is not None, not quiet, strict)
    except CrossSiteError as error:
        raise fail(error) from None
    if int(os.environ.get("RANK", 0)) == 0:
        _print_summary(metrics, out)


def _cli_args(
    specs: list[str], method: str | None, backbone: str | None, out: Path | None, config_file: Path | None,
    overrides: list[str], resume: Path | None, quiet: bool,
) -> list[str]:
    """The ``crosssite train`` arguments that reproduce these options (without ``--nproc``)."""
    args = [arg for spec in specs for arg in ("--site", spec)]
    options = (("--method", method), ("--backbone", backbone), ("--out", out), ("--config", config_file),
               ("--resume", resume))
    args += [arg for name, value in options if value is not None for arg in (name, str(value))]
    args += [arg for override in overrides for arg in ("--set", override)]
    return args + (["--quiet"] if quiet else [])


def _launch(nproc: int, args: list[str]) -> int:
    """Run ``crosssite train args`` as ``nproc`` processes under torchrun on this machine; its exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "crosssite", "train", *args]
    return subprocess.run(command, check=False).returncode


def _run(
    specs: list[str], method: str | None, backbone: str | None, out: Path, config_file: Path | None,
    overrides: list[str], resume: bool, progress: bool, strict: bool = False,
) -> dict[str, Any]:
    from crosssite.data import load_sites
    from crosssite.training import load_config, train
    from crosssite.training.config import apply_overrides, parse_overrides
    from crosssite.rundir import read_sites

    saved = out / "config.yaml"
    if config_file is None and resume and saved.is_file():
        config_file = saved
    elif config_file is None and resume and (out / "sites.json").is_file():
        raise CrossSiteError(f"{saved}: not found, so the run in {out} never started and its configuration is "
                             "unknown; start it again without --resume (or give --config)")
    options = {k: v for k, v in (("method", method), ("backbone", backbone)) if v is not None}
    # every value here is given: `train` adds the method's recipe to the keys none of them names (a resumed run's
    # config.yaml names every key, so it resumes exactly what it saved)
    config = apply_overrides(load_config(config_file), options | parse_overrides(overrides))
    sites = load_sites(specs) if specs else (read_sites(out) if resume else None)
    if not sites:
        raise CrossSiteError("no site given: use --site NAME=PATH (at least one)")
    _check_non_ct(sites, strict)
    return train(config, sites, out, resume=resume, progress=progress)


def _check_non_ct(sites: list[Any], strict: bool) -> None:
    """Name the DICOM files that may not be chest-CT slices (once, on rank 0); refuse them with ``strict``."""
    from crosssite.cli.data import not_ct_lines
    from crosssite.data.check import dicom_warnings

    found = {site.name: dicom_warnings(site) for site in sites}
    if int(os.environ.get("RANK", 0)) == 0:
        for name, files in found.items():
            for line in not_ct_lines(name, files):
                typer.echo(line, err=True)
    total = sum(len(files) for files in found.values())
    if strict and total:
        raise CrossSiteError(f"--strict: {total} DICOM file(s) may not be chest-CT slices (listed above); remove "
                             "them from the sites")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_summary(metrics: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{metrics['method']} ({metrics['backbone']}), fold {metrics['fold']}, seed "
                        f"{metrics['seed']}: test metrics of the best-on-validation model")
    columns = ("accuracy", "f1", "recall", "specificity", "precision", "auc")
    table.add_column("site")
    for column in columns:
        table.add_column(column, justify="right")
    table.add_column("val auc", justify="right")
    for name, site in metrics["sites"].items():
        table.add_row(name, *(_fmt(site["test"][c]) for c in columns), _fmt(site["val"]["auc"]))
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    console.print(table)
    console.print(f"run directory: {out}  (metrics.json, predictions.csv, model.safetensors, log.csv)", markup=False)
