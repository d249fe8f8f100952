"""Running an ONNX export: the session, the crosssite metadata it carries, and `OnnxBackend` for `Predictor`.

Needs the optional ``onnx`` extra (``pip install 'crosssite[onnx]'``); `require_onnx` says so in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

import crosssite
from crosssite.errors import CheckpointError, InferenceError

__all__ = ["METADATA_KEY", "EXPORT_FORMAT", "missing_onnx_packages", "require_onnx", "open_session", "read_metadata",
           "OnnxBackend"]

METADATA_KEY = "crosssite"
EXPORT_FORMAT = 1


def missing_onnx_packages() -> list[str]:
    """Which of the optional packages ONNX export and ONNX models need (onnx, onnxruntime) are not installed."""
    import importlib.util

    return [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]


def require_onnx() -> None:
    """Raise a one-line error naming the install command when the optional ONNX packages are missing."""
    missing = missing_onnx_packages()
    if missing:
        raise InferenceError(f"ONNX export and ONNX models need {' and '.join(missing)}: "
                             "pip install 'crosssite[onnx]'")


def open_session(path: Path) -> Any:
    """An ONNX Runtime CPU session of ``path``; a missing or unreadable file is a `CheckpointError`."""
    require_onnx()
    import onnxruntime as ort

    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX file not found")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for invalid or truncated files
        raise CheckpointError(f"{path}: not a readable ONNX model ({' '.join(str(exc).split())})") from exc


def read_metadata(session: Any, path: Path) -> dict[str, Any]:
    """The crosssite metadata of an exported model, as a card `Predictor` understands."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise CheckpointError(f"{path}: not a crosssite ONNX export (no {METADATA_KEY!r} metadata)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable crosssite metadata ({exc})") from exc
    if meta.get("export_format") != EXPORT_FORMAT:
        raise CheckpointError(
            f"{path}: crosssite ONNX export format {meta.get('export_format')!r} is not supported "
            f"(this is crosssite {crosssite.__version__}, format {EXPORT_FORMAT})"
        )
    return meta


class OnnxBackend:
    """Runs an exported model with ONNX Runtime on the CPU; ``card`` holds its metadata."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.session = open_session(self.path)
        self.card = read_metadata(self.session, self.path)
        self.input_name = self.session.get_inputs()[0].name

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        x = images.detach().cpu().float().numpy()  # (B, 3, S, S)
        probs = self.session.run(None, {self.input_name: x})[0]  # (B, num_classes)
        return probs[:, 1].astype(np.float64)
