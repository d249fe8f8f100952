"""The trained model shipped inside the package, and the models a user keeps locally.

`shipped_model()` is the model `crosssite predict FILES` and `crosssite serve` use when no model is given: the
row the committed grid ranks first on validation among those training one model for every site (crosssite's
recipe: SepNorm + Contrastive on the redesigned COVID-Net, no BN recalibration, flip test-time averaging;
docs/RESULTS.md), trained on every slice of both public sites but a validation part, stored in float16
(`SHIPPED_NAME`.safetensors + .json, under 8 MB). Its card says how it was trained (command,
commit, validation metrics) and under which licences: site A (SARS-CoV-2 CT-scan) is CC BY-NC-SA 4.0, so the
weights are for non-commercial research only; site B (COVID-CT) states no licence. It is a research tool, not a
medical device.

`local_models()` lists the models under ``$CROSSSITE_MODELS`` (default ``~/.cache/crosssite/models``) and any
folders given: every ``*.safetensors`` with its card, and every ``*.onnx``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from crosssite.errors import CheckpointError
from crosssite.ioutil import cache_root

__all__ = ["SHIPPED_NAME", "shipped_model", "models_dir", "local_models", "describe"]

SHIPPED_NAME = "crosssite-recipe-cpu64"
HERE = Path(__file__).resolve().parent


def shipped_model() -> Path:
    """Path (stem) of the shipped model; a `CheckpointError` if this installation lacks its files."""
    stem = HERE / SHIPPED_NAME
    if not stem.with_suffix(".safetensors").is_file() or not stem.with_suffix(".json").is_file():
        raise CheckpointError(f"{stem}.safetensors: the shipped model is missing from this installation; "
                              "give a model file instead")
    return stem


def models_dir() -> Path:
    """Where a user's own models live: ``$CROSSSITE_MODELS`` or ``~/.cache/crosssite/models``."""
    return Path(os.environ.get("CROSSSITE_MODELS", cache_root() / "models")).expanduser()


def describe(path: Path) -> dict[str, Any]:
    """Name, file, size, sites, architecture, method, test-time augmentation and validation AUC of one model file
    (its card read, not the weights); an unreadable card gives an ``error`` entry instead."""
    from crosssite.data import card_tta  # torch comes with it: only when a model is described

    path = Path(path)
    entry: dict[str, Any] = {"name": path.stem, "path": str(path), "size_mb": round(path.stat().st_size / 2**20, 2)}
    card_path = path.with_suffix(".json")
    if path.suffix == ".onnx":
        entry["format"] = "onnx"
        return entry
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return entry | {"error": f"{card_path}: unreadable model card ({e})"}
    val = ((card.get("metrics") or {}).get("val") or {})
    return entry | {
        "format": "safetensors",
        "architecture": card.get("architecture"),
        "method": card.get("method"),
        "tta": card_tta(card),
        "sites": card.get("site_names"),
        "val_auc": {site: m.get("auc") for site, m in val.items() if isinstance(m, dict)},
        "licence": card.get("licence"),
    }


def local_models(folders: Iterable[Path] = ()) -> list[dict[str, Any]]:
    """`describe` of every model file under `models_dir` and ``folders`` (recursively), sorted by path."""
    found: set[Path] = set()
    for folder in [models_dir(), *map(Path, folders)]:
        if folder.is_file():
            found.add(folder)
        elif folder.is_dir():
            found.update(p for p in folder.rglob("*.safetensors"))
            found.update(p for p in folder.rglob("*.onnx"))
    return [describe(p) for p in sorted(found)]
