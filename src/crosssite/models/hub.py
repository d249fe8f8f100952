"""Model weights on disk: a safetensors file plus a JSON model card beside it.

Naming: ``save(model, "runs/x/model", card)`` writes ``runs/x/model.safetensors`` (the state dict) and
``runs/x/model.json`` (the card). A path given with either suffix means the same pair. `load` accepts the
stem, either file, or a directory holding ``model.safetensors`` + ``model.json``. Both files are written
to a temporary name first and moved into place with `os.replace`, so a crash never leaves half a file.

The card is a JSON object. `save` fills in what it knows about the network; the caller supplies the rest:

    format_version   int, `FORMAT_VERSION`; `load` refuses any other
    package_version  crosssite version that wrote the files
    architecture     registered model name, e.g. "covidnet_redesign"
    model_args       keyword arguments of `create_model` (without num_sites)
    num_sites        site slots in the weights, including slots added by `adapt_norm`
    site_names, class_names, preprocessing (image_size, mean, std), train_config, metrics, threshold
                     from the caller (``site_names``, if given, must name every site slot)

A missing file, a card from another format version, unreadable JSON, a corrupt or truncated weights file,
or weights that do not fit the card's architecture raise `crosssite.errors.CheckpointError` naming the file.
`save` refuses a model with any non-finite weight or buffer (`NonFiniteModelError`) before writing anything:
every writer of a model goes through it, so a diverged fine-tuning never leaves a model that predicts NaN;
`load` refuses such a file written elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

import crosssite
from crosssite.errors import CheckpointError, CrossSiteError, NonFiniteModelError
from crosssite.ioutil import atomic_write_bytes, atomic_write_text
from crosssite.models.registry import create_model

__all__ = ["FORMAT_VERSION", "save", "load", "model_paths", "non_finite_tensors", "state_mismatch"]

FORMAT_VERSION = 1
_DEFAULT_STEM = "model"


def model_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights, card)`` paths for a stem, a ``.safetensors`` / ``.json`` path, or a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / _DEFAULT_STEM
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` holding a NaN or an infinity."""
    return [name for name, t in model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save(model: nn.Module, path: str | os.PathLike, card: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``model``'s weights and its model card; return ``(weights_path, card_path)``."""
    if not hasattr(model, "arch"):
        raise ValueError("save() needs a model built by crosssite.models.create_model")
    num_sites = int(model.num_sites)
    card = dict(card or {})
    names = card.get("site_names")
    if names is not None and len(names) != num_sites:
        raise ValueError(f"card site_names {list(names)} do not match the model's {num_sites} site slots")
    card.update(
        format_version=FORMAT_VERSION,
        package_version=crosssite.__version__,
        architecture=model.arch,
        model_args=dict(model.model_kwargs),
        num_sites=num_sites,
    )
    text = json.dumps(card, indent=2, sort_keys=True, default=str)  # fails before anything is written
    weights_path, card_path = model_paths(path)
    bad = non_finite_tensors(model)
    if bad:
        raise NonFiniteModelError(
            f"{weights_path}: not written: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. "
            f"{', '.join(bad[:3])}); the training diverged (try a lower learning rate)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = safetensors_bytes(tensors, metadata={"format_version": str(FORMAT_VERSION)})
    atomic_write_bytes(weights_path, data, "model weights")  # through Python's I/O: a full disk is an OutputError
    atomic_write_text(card_path, text + "\n", "model card")
    return weights_path, card_path


def _examples(keys: list[str], shown: int = 3) -> str:
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """A short summary of how the state dict ``found`` differs from ``expected``: counts of missing and unexpected
    keys and of tensors of another shape, each with at most three examples (not every key, as torch lists them)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_examples(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_examples(unexpected)}")
    if reshaped:
        shapes = [f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}" for k in reshaped]
        parts.append(f"{len(reshaped)} tensor(s) of another shape (file vs model): {_examples(shapes)}")
    return "; ".join(parts) or "the tensors differ"


def _read_card(card_path: Path) -> dict[str, Any]:
    if not card_path.is_file():
        raise CheckpointError(f"{card_path}: model card not found")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{card_path}: unreadable model card ({exc})") from exc
    if not isinstance(card, dict):
        raise CheckpointError(f"{card_path}: model card is not a JSON object")
    version = card.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{card_path}: model card format_version {version!r} is not supported "
            f"(this is crosssite {crosssite.__version__}, format {FORMAT_VERSION})"
        )
    for key in ("architecture", "model_args", "num_sites"):
        if key not in card:
            raise CheckpointError(f"{card_path}: model card lacks {key!r}")
    return card


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path`` (see `model_paths`) with its weights; return ``(model, card)``.

    The model is returned in evaluation mode.
    """
    weights_path, card_path = model_paths(path)
    card = _read_card(card_path)
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: weights file not found")
    try:
        state = load_file(weights_path, device=str(map_location))
    except Exception as exc:  # safetensors raises several types for truncated / garbled files
        raise CheckpointError(f"{weights_path}: corrupt or truncated weights file ({exc})") from exc
    try:
        model = create_model(card["architecture"], num_sites=int(card["num_sites"]), **card["model_args"])
    except (TypeError, ValueError, CrossSiteError) as exc:
        raise CheckpointError(f"{card_path}: cannot build the model the card describes ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{weights_path}: weights do not fit {card['architecture']} ({state_mismatch(model.state_dict(), state)})"
        ) from exc
    bad = non_finite_tensors(model)
    if bad:  # written by an older crosssite, or by hand: it would predict NaN for every slice
        raise NonFiniteModelError(f"{weights_path}: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. "
                                  f"{', '.join(bad[:3])}); the model is broken, train or add the site again")
    return model.to(map_location).eval(), card
