"""Atomic files and the full training state (`checkpoints/last.pt`).

Every file of a run directory is written to a temporary file beside its destination, flushed to disk, and moved
over the destination with `os.replace` (`crosssite.ioutil.atomic_write_bytes`), so a run killed at any instant, or a
write that fails on a full disk, leaves either the old or the new file, never a truncated one; the failure is an
`OutputError` naming the file.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

from torch import nn

import numpy as np
import torch

from crosssite.errors import CheckpointError
from crosssite.ioutil import atomic_write_bytes
from crosssite.models.hub import non_finite_tensors  # re-exported: the one finite check of a model

__all__ = [
    "non_finite_tensors",
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_VERSION = 1
def rng_state() -> dict[str, Any]:
    """Every random generator the loop draws from (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save a training state (model, optimizer, counters, RNG states, best metric) atomically."""
    buffer = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue(), "training checkpoint")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a state written by `save_checkpoint`; a missing, corrupt or foreign file raises `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: checkpoint version {found!r}, expected {CHECKPOINT_VERSION}")
    return state


