"""ONNX export of a crosssite model, and an ONNX Runtime backend for `Predictor`.

The exported graph takes one input, ``image`` float32 (B, 3, S, S) with a dynamic batch dimension, and
returns ``probabilities`` (B, num_classes) (softmax of the logits; P(COVID) is column 1). The
normalisation of site-specific modules is fixed at export: a known site's, or the mean of the known sites'
("mean-of-sites"). Everything `Predictor` needs besides the graph -- preprocessing (image size, mean,
std), class names, threshold, the normalisation used, the source model's site names -- is stored in the
ONNX file itself, as JSON under the metadata key ``crosssite``, so the ``.onnx`` file is enough to deploy.

Exporter: PyTorch's TorchScript-based exporter (``dynamo=False``). The ``torch.export``-based exporter,
PyTorch's default, needs the ``onnxscript`` package, which crosssite does not depend on. The exporter's
tracer warnings about data-dependent branches are expected and silenced: the site is a constant of the
exported graph, so the branch each per-site module takes is fixed too. That exporter cannot express
`torch.nn.AdaptiveAvgPool2d` when the output size does not divide the input size (the redesign pools a 7x7 map
to 2x2 at 224 px, a 3x3 map at 48 px), so the export swaps each such pool for `BinnedAvgPool2d`, the same bins
written as slices and means.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import crosssite
from crosssite.errors import CheckpointError
from crosssite.inference.predictor import MEAN_OF_SITES, SHARED, Preprocess, has_site_modules, resolve_site
from crosssite.inference.predictor import site_names_of

__all__ = ["METADATA_KEY", "OPSET", "BinnedAvgPool2d", "exportable", "export_onnx", "max_difference", "read_metadata",
           "OnnxBackend"]

METADATA_KEY = "crosssite"
OPSET = 17
EXPORT_FORMAT = 1


class BinnedAvgPool2d(nn.Module):
    """`torch.nn.AdaptiveAvgPool2d` as slices and means, for export: bin ``i`` of ``o`` over a side ``n`` spans
    ``[floor(i n / o), ceil((i + 1) n / o))``, PyTorch's rule (bins overlap when ``o`` does not divide ``n``).
    The input size becomes a constant of the traced graph, which is fixed by the model card anyway."""

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    @staticmethod
    def _bins(n: int, o: int) -> list[tuple[int, int]]:
        return [((i * n) // o, -(-((i + 1) * n) // o)) for i in range(o)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, oh, ow)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        rows = [
            torch.stack([x[..., r0:r1, c0:c1].mean(dim=(-2, -1)) for c0, c1 in self._bins(w, self.output_size[1])],
                        dim=-1)
            for r0, r1 in self._bins(h, self.output_size[0])
        ]
        return torch.stack(rows, dim=-2)


def exportable(model: nn.Module) -> nn.Module:
    """``model`` itself, or a copy with every `AdaptiveAvgPool2d` replaced by the equivalent `BinnedAvgPool2d`."""
    pools = [name for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools:
        return model
    model = copy.deepcopy(model)
    for name in pools:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, BinnedAvgPool2d(getattr(parent, child).output_size))
    return model


class _FixedSite(nn.Module):
    """``image -> softmax(logits)`` with the site fixed (an index, or None for the mean of the sites)."""

    def __init__(self, model: nn.Module, site: int | None) -> None:
        super().__init__()
        self.model = model
        self.site = site

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        site = None
        if self.site is not None:
            site = torch.full_like(image[:, 0, 0, 0], self.site, dtype=torch.long)  # (B,), follows the batch
        return torch.softmax(self.model(image, site).logits, dim=1)  # (B, num_classes)


def export_onnx(
    model_path: str | os.PathLike,
    onnx_path: str | os.PathLike,
    site: str | None = None,
    *,
    opset: int = OPSET,
) -> Path:
    """Export the crosssite model at ``model_path`` to ``onnx_path`` with the normalisation of the known
    site ``site`` (None: the mean of the known sites); return the ONNX path."""
    import onnx

    from crosssite.models import load

    model, card = load(model_path)
    pre = Preprocess.from_card(card, model_path)
    index = resolve_site(card, site)
    norm = SHARED if not has_site_modules(model) else (site if site is not None else MEAN_OF_SITES)
    wrapper = _FixedSite(exportable(model), index).eval()
    example = torch.zeros(2, 3, pre.image_size, pre.image_size)
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            wrapper, (example,), str(onnx_path), dynamo=False, opset_version=opset,
            input_names=["image"], output_names=["probabilities"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
        )
    meta = {
        "export_format": EXPORT_FORMAT,
        "package_version": crosssite.__version__,
        "architecture": card.get("architecture"),
        "preprocessing": pre.to_dict(),
        "class_names": card.get("class_names"),
        "threshold": card.get("threshold", 0.5),
        "norm": norm,
        "site_names": site_names_of(card),
        "source_model": str(model_path),
    }
    graph = onnx.load(str(onnx_path))
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.save(graph, str(onnx_path))
    return onnx_path


def _session(path: Path) -> Any:
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
        self.session = _session(self.path)
        self.card = read_metadata(self.session, self.path)
        self.input_name = self.session.get_inputs()[0].name

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        x = images.detach().cpu().float().numpy()  # (B, 3, S, S)
        probs = self.session.run(None, {self.input_name: x})[0]  # (B, num_classes)
        return probs[:, 1].astype(np.float64)


def max_difference(model_path: str | os.PathLike, onnx_path: str | os.PathLike, site: str | None = None,
                   n: int = 4, seed: int = 0) -> float:
    """Largest |P(COVID)| difference between the PyTorch model and its export on ``n`` random inputs."""
    from crosssite.inference.predictor import TorchBackend
    from crosssite.models import load

    model, card = load(model_path)
    size = Preprocess.from_card(card, model_path).image_size
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    expected = TorchBackend(model, resolve_site(card, site)).probabilities(images)
    return float(np.abs(OnnxBackend(onnx_path).probabilities(images) - expected).max())
