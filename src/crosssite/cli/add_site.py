"""``crosssite add-site``: a new hospital's slot in a trained model (AdaBN, or fine-tuning on a few labels).

    crosssite add-site MODEL --site hospital_c=PATH --out models/with_c                    # unlabelled: AdaBN
    crosssite add-site MODEL --site hospital_c=PATH --labels folders --out models/with_c   # COVID/ non-COVID/
    crosssite add-site MODEL --site hospital_c=PATH --labels labels.csv --out models/with_c
"""

from __future__ import annotations

from pathlib import Path

import typer

from crosssite.cli.app import app, fail
from crosssite.errors import CrossSiteError


def _model_stem(path: Path) -> Path:
    if path.is_dir():
        return path / "model"
    return path.with_suffix("") if path.suffix.lower() in (".safetensors", ".json") else path


def _labelled_site(name: str, root: Path, labels: str):
    from crosssite.data import load_site

    if labels == "folders":
        return load_site(f"{name}={root}")
    manifest = Path(labels)
    if not manifest.is_file():
        raise CrossSiteError(f"--labels {labels}: neither 'folders', 'none' nor an existing CSV file")
    return load_site((name, manifest, "csv"))


def _unlabelled_images(root: Path, preprocess):
    """Every slice under ``root`` (files, folders, volumes, as `crosssite predict` reads them) as model inputs;
    the unreadable ones are listed, and none readable is an error."""
    import sys

    import torch

    from crosssite.inference.export import calibration_slices

    images, errors = calibration_slices([root], preprocess, limit=sys.maxsize)
    for e in errors[:5]:
        typer.echo(f"skipped: {e}", err=True)
    if errors:
        typer.echo(f"skipped {len(errors)} unreadable input(s) of {root}", err=True)
    if not images:
        raise CrossSiteError(f"{root}: no readable image, DICOM or NIfTI slice found"
                             + (f" ({len(errors)} unreadable)" if errors else ""))
    return torch.stack(images)


def _new_site_slices(name: str, root: Path, labels: str, preprocess):
    """(unlabelled images, None) or (None, labelled slices) of the new site, as ``--labels`` says."""
    from crosssite.training.add_site import decode_site

    if not root.exists():
        raise CrossSiteError(f"{root}: the new site's folder (--site {name}=...) does not exist")
    mode = labels
    if mode == "auto":
        mode = "folders" if any((root / d).is_dir() for d in ("COVID", "CT_COVID", "covid")) else "none"
    if mode == "none":
        return _unlabelled_images(root, preprocess), None
    labelled = decode_site(_labelled_site(name, root, mode), preprocess)
    for line in labelled.skipped[:5]:
        typer.echo(f"skipped: {line}", err=True)
    if labelled.skipped:
        typer.echo(f"skipped {len(labelled.skipped)} unreadable slice(s)", err=True)
    return None, labelled


def _known_site(spec: str, preprocess):
    from crosssite.data import load_site, parse_site_spec
    from crosssite.training.add_site import decode_site

    name, root, layout = parse_site_spec(spec)
    return decode_site(load_site((name, root, layout)), preprocess), name


def _print_report(report, name: str) -> None:
    if report.mode == "adabn":
        typer.echo(f"site {name!r}: slot {report.site_index} estimated on {report.images} slices (AdaBN)")
        return
    auc = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    typer.echo(f"site {name!r}: slot {report.site_index}, AdaBN on {report.images} slices, fine-tuned "
               f"{report.tuned_parameters} parameters on {report.train} labelled slices for {report.steps} "
               f"steps (kept: step {report.best_step}); validation AUC ({report.val} slices, by {report.grouped_by}) "
               f"{auc(report.val_auc_adabn)} after AdaBN -> {auc(report.val_auc)}")
    if not report.known_sites_unchanged:
        typer.echo("note: --train-head changed the shared head, so the known sites' predictions changed too",
                   err=True)


@app.command("add-site")
def add_site(
    model: Path = typer.Argument(None, metavar="[MODEL]", help="Model (stem, .safetensors, run folder); default: "
                                 "the shipped one."),
    site: str = typer.Option(..., "--site", help="NAME=PATH of the new hospital's slices."),
    labels: str = typer.Option("auto", "--labels", help="folders (PATH holds COVID/ and non-COVID/), a CSV with "
                               "path,label[,patient] columns, none (AdaBN only), or auto (folders if present)."),
    out: Path = typer.Option(..., "--out", help="Stem of the new model (writes OUT.safetensors and OUT.json)."),
    known: list[str] = typer.Option(None, "--known", help="NAME=PATH of a known site's labelled slices, mixed "
                                    "into the contrastive batches (repeatable; NAME as the model calls it)."),
    steps: int = typer.Option(300, "--steps", min=1, help="Optimiser steps of fine-tuning (16 slices each)."),
    lr: float = typer.Option(1e-2, "--lr", help="Learning rate of the fine-tuned parameters."),
    train_head: bool = typer.Option(False, "--train-head", help="Also fine-tune the shared classifier head "
                                    "(changes the known sites' predictions)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Add a hospital: a new site slot estimated on its slices (AdaBN), fine-tuned when labels are given."""
    from crosssite import models as model_lib
    from crosssite.data import parse_site_spec
    from crosssite.inference.predictor import Preprocess
    from crosssite.ioutil import ensure_dir
    from crosssite.pretrained import shipped_model
    from crosssite.training.add_site import add_site as add

    try:
        name, root, _ = parse_site_spec(site)
        stem = _model_stem(model) if model is not None else shipped_model()
        net, card = model_lib.load(stem)
        preprocess = Preprocess.from_card(card, stem)
        ensure_dir(out.parent, "the --out folder")  # before any work: a bad output path fails at once
        images, labelled = _new_site_slices(name, root, labels, preprocess)
        known_slices = [_known_site(spec, preprocess) for spec in known or []]
        new, new_card, report = add(net, card, name, images=images, labelled=labelled, known=known_slices,
                                    steps=steps, lr=lr, train_head=train_head, seed=seed)
        weights, _ = model_lib.save(new, out, new_card)
    except CrossSiteError as e:
        raise fail(e) from None
    _print_report(report, name)
    typer.echo(f"wrote {weights} (sites: {', '.join(new_card['site_names'])})")
