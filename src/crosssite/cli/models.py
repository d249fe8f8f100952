"""``crosssite models``: the shipped model and the user's local models."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crosssite.cli.app import app


@app.command()
def models(
    folders: list[Path] = typer.Argument(None, help="More folders (or files) to list models from."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """List the shipped model and the models under $CROSSSITE_MODELS (default ~/.cache/crosssite/models)."""
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
        typer.echo(f"no models found (the shipped model is missing; none under {models_dir()})")
