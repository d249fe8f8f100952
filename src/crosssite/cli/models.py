"""``crosssite models``: the trained model files at hand (the shipped model and the user's local models), or with
``--architectures`` the networks and methods one can train (the model and method registries)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crosssite.cli.app import app


@app.command()
def models(
    folders: list[Path] = typer.Argument(None, help="More folders (or files) to list model files from."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    architectures: bool = typer.Option(False, "--architectures", help="List the registered architectures "
                                       "(--backbone) and methods (--method) instead of model files."),
) -> None:
    """List trained model files: the shipped model and those under $CROSSSITE_MODELS (default
    ~/.cache/crosssite/models). With --architectures: the networks and methods `crosssite train` can train."""
    if architectures:
        _list_architectures(as_json)
        return
    from crosssite.errors import CheckpointError
    from crosssite.pretrained import describe, local_models, models_dir, shipped_model

    try:
        shipped = [describe(shipped_model().with_suffix(".safetensors")) | {"shipped": True}]
    except CheckpointError:
        shipped = []
    local = local_models(folders or [])
    if as_json:
        typer.echo(json.dumps({"shipped": shipped, "local": local, "models_dir": str(models_dir())}))
        return
    for entry in shipped + local:
        tag = "shipped" if entry.get("shipped") else "local"
        if "error" in entry:
            typer.echo(f"{tag:8} {entry['path']}: {entry['error']}")
            continue
        aucs = ", ".join(f"{s} {100 * a:.1f}" for s, a in (entry.get("val_auc") or {}).items() if a is not None)
        sites = ",".join(entry.get("sites") or []) or "-"
        tta = f"  tta {entry['tta']}" if entry.get("tta", "none") != "none" else ""
        typer.echo(f"{tag:8} {entry['name']}  {entry.get('format')}  {entry['size_mb']} MB  sites {sites}{tta}"
                   + (f"  val AUC {aucs}" if aucs else "") + f"  {entry['path']}")
    if not shipped + local:
        typer.echo(f"no model files found (the shipped model is missing; none under {models_dir()})")


def _list_architectures(as_json: bool) -> None:
    """Every registered architecture with the options it takes, and every registered method."""
    from crosssite.models import list_models, model_config
    from crosssite.training.methods import METHODS

    archs = {name: {"options": sorted(model_config(name).options), "has_norm": model_config(name).has_norm}
             for name in list_models()}
    methods = {name: m.description for name, m in METHODS.items()}
    if as_json:
        typer.echo(json.dumps({"architectures": archs, "methods": methods}))
        return
    for name, arch in archs.items():
        typer.echo(f"architecture {name}  options: {', '.join(arch['options'])}")
    for name, description in methods.items():
        typer.echo(f"method {name}{' (federated too)' if METHODS[name].federated else ''}: {description}")
