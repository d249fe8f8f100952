"""ONNX export of a crosssite model, and an ONNX Runtime backend for `Predictor`.

The exported graph takes one input, ``image`` float32 (B, 3, S, S) with a dynamic batch dimension, and
returns ``probabilities`` (B, num_classes) (softmax of the logits; P(COVID) is column 1). The
normalisation of site-specific modules is fixed at export: a known site's, or the mean of the known sites'
("mean-of-sites"). Everything `Predictor` needs besides the graph -- preprocessing (image size, mean,
std), class names, threshold, the normalisation used, the source model's site names, its test-time augmentation
(which `Predictor` applies by running the graph on the mirrored slices too) -- is stored in the ONNX file itself,
as JSON under the metadata key ``crosssite``, so the ``.onnx`` file is enough to deploy.

Exporter: PyTorch's TorchScript-based exporter (``dynamo=False``). The ``torch.export``-based exporter,
PyTorch's default, needs the ``onnxscript`` package, which crosssite does not depend on. The exporter's
tracer warnings about data-dependent branches are expected and silenced: the site is a constant of the
exported graph, so the branch each per-site module takes is fixed too. That exporter cannot express
`torch.nn.AdaptiveAvgPool2d` when the output size does not divide the input size (the redesign pools a 7x7 map
to 2x2 at 224 px, a 3x3 map at 48 px), so the export swaps each such pool for `BinnedAvgPool2d`, the same bins
written as slices and means.

int8 (`export_int8`, ``crosssite export --int8 --calibrate PATH``): the fp32 export is quantised statically
with ONNX Runtime's quantisation tool -- QDQ format, int8 weights per output channel, uint8 activations whose
ranges are calibrated (min/max) on slices of the site the export is for. On CPUs with integer dot-product
instructions this roughly doubles throughput; on AVX2-only CPUs, which lack them, weights are quantised to 7 bits
(``reduce_range``) so that the 16-bit intermediate sums of the uint8 x int8 products cannot saturate. The
quantisation settings and the calibration slice count are stored in the metadata.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import crosssite
from crosssite.data import card_tta
from crosssite.errors import ImageReadError
from crosssite.ioutil import atomic_write
from crosssite.inference.inputs import collect_inputs
from crosssite.inference.onnx_runtime import (
    EXPORT_FORMAT,
    METADATA_KEY,
    OnnxBackend,
    missing_onnx_packages,
    open_session,
    read_metadata,
    require_onnx,
)
from crosssite.inference.predictor import MEAN_OF_SITES, SHARED, InferenceError, Preprocess, has_site_modules
from crosssite.inference.predictor import resolve_site, site_names_of

__all__ = ["METADATA_KEY", "OPSET", "MIN_CALIBRATION_SLICES", "BinnedAvgPool2d", "Int8Export", "exportable",
           "missing_onnx_packages", "require_onnx", "export_onnx", "export_int8", "quantize_int8", "calibration_slices", "max_difference",
           "read_metadata", "OnnxBackend"]

OPSET = 17
MIN_CALIBRATION_SLICES = 16


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
    from crosssite.models import load

    require_onnx()
    model, card = load(model_path)
    pre = Preprocess.from_card(card, model_path)
    index = resolve_site(card, site)
    norm = SHARED if not has_site_modules(model) else (site if site is not None else MEAN_OF_SITES)
    wrapper = _FixedSite(exportable(model), index).eval()
    example = torch.zeros(2, 3, pre.image_size, pre.image_size)
    meta = {
        "export_format": EXPORT_FORMAT,
        "package_version": crosssite.__version__,
        "architecture": card.get("architecture"),
        "preprocessing": pre.to_dict(),
        "class_names": card.get("class_names"),
        "threshold": card.get("threshold", 0.5),
        "tta": card_tta(card),  # applied by the predictor around the graph: it runs the mirror too
        "norm": norm,
        "site_names": site_names_of(card),
        "source_model": str(model_path),
    }

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                wrapper, (example,), tmp, dynamo=False, opset_version=opset,
                input_names=["image"], output_names=["probabilities"],
                dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
            )
        _write_metadata(Path(tmp), meta)

    return atomic_write(onnx_path, write, "ONNX export")  # a failed export leaves no partial file


def _write_metadata(onnx_path: Path, meta: dict[str, Any]) -> None:
    """Store ``meta`` as the file's crosssite metadata, replacing any there."""
    import onnx

    graph = onnx.load(str(onnx_path))
    kept = [(p.key, p.value) for p in graph.metadata_props if p.key != METADATA_KEY]
    del graph.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, json.dumps(meta))]:
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(onnx_path))


def quantize_int8(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, batches: Iterable[torch.Tensor], *,
                  reduce_range: bool = True) -> Path:
    """Quantise an fp32 export statically to int8 (see the module docstring), calibrating activation ranges
    on ``batches`` of model inputs (B, 3, S, S); the crosssite metadata is carried over, with the quantisation
    settings and the number of calibration slices added under ``quantization``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    meta = read_metadata(open_session(fp32_path), fp32_path)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds: Iterator[torch.Tensor] = iter(batches)
            self.slices = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.feeds, None)
            if x is None:
                return None
            self.slices += len(x)
            return {"image": x.detach().cpu().float().numpy()}

    reader = Reader()

    def write(target: str) -> None:
        with tempfile.TemporaryDirectory() as tmp, _quiet_quantisation():
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(fp32_path), str(prepared))  # shape inference + graph clean-up, as ORT advises
            quantize_static(str(prepared), target, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        meta["quantization"] = {"format": "QDQ",
                                "weights": "int8 per channel" + (" (7-bit range)" if reduce_range else ""),
                                "activations": "uint8, min/max calibrated", "calibration_slices": reader.slices}
        _write_metadata(Path(target), meta)

    return atomic_write(int8_path, write, "int8 ONNX export")  # a failed export leaves no partial file


@contextlib.contextmanager
def _quiet_quantisation() -> Iterator[None]:
    """ONNX Runtime's quantiser logs a warning for each 1-D norm weight it leaves in fp32; nothing is lost."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def calibration_slices(paths: Sequence[str | os.PathLike], preprocess: Preprocess, limit: int
                       ) -> tuple[list[torch.Tensor], list[ImageReadError]]:
    """Model inputs of at most ``limit`` slices spread evenly over the inputs ``paths`` (files, folders,
    volumes, as `crosssite predict` reads them), and the errors of every input that could not be read."""
    plan = collect_inputs(paths)
    items = plan.items
    if len(items) > limit:
        items = [items[round(k * (len(items) - 1) / (limit - 1))] for k in range(limit)] if limit > 1 else items[:1]
    loaded = [preprocess.load(item) for item in items]
    errors = list(plan.errors) + [x for x in loaded if isinstance(x, ImageReadError)]
    return [x for x in loaded if isinstance(x, torch.Tensor)], errors


@dataclass
class Int8Export:
    """What `export_int8` wrote and measured."""

    path: Path
    calibration_slices: int  # slices the activation ranges were calibrated on
    errors: list[ImageReadError]  # calibration inputs that could not be read
    max_abs_p_diff: float  # largest |P(COVID)| difference to the PyTorch model on the calibration slices
    mean_abs_p_diff: float


def export_int8(
    model_path: str | os.PathLike,
    onnx_path: str | os.PathLike,
    calibration: Sequence[str | os.PathLike],
    site: str | None = None,
    *,
    max_slices: int = 256,
    batch_size: int = 16,
    reduce_range: bool = True,
) -> Int8Export:
    """Export the model at ``model_path`` to int8 ONNX at ``onnx_path`` (see the module docstring), with the
    activation ranges calibrated on up to ``max_slices`` slices of ``calibration`` (images of the site the
    export is for: ``site``, or any of the known sites for the mean-of-sites normalisation)."""
    from crosssite.inference.backends import TorchBackend
    from crosssite.models import load

    require_onnx()
    if max_slices < MIN_CALIBRATION_SLICES:
        raise InferenceError(f"int8 calibration needs at least {MIN_CALIBRATION_SLICES} slices, asked for {max_slices}")
    model, card = load(model_path)
    images, errors = calibration_slices(calibration, Preprocess.from_card(card, model_path), max_slices)
    if len(images) < MIN_CALIBRATION_SLICES:
        where = ", ".join(str(p) for p in calibration)
        first = f"; first: {errors[0]}" if errors else ""
        raise InferenceError(f"int8 calibration needs at least {MIN_CALIBRATION_SLICES} readable slices; {where} "
                             f"gave {len(images)} ({len(errors)} unreadable{first})")
    x = torch.stack(images)
    batches = list(x.split(batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model_path, Path(tmp) / "fp32.onnx", site)
        path = quantize_int8(fp32, onnx_path, batches, reduce_range=reduce_range)
    expected = np.concatenate([TorchBackend(model, resolve_site(card, site)).probabilities(b) for b in batches])
    backend = OnnxBackend(path)
    got = np.concatenate([backend.probabilities(b) for b in batches])
    diff = np.abs(got - expected)
    return Int8Export(path, len(images), errors, float(diff.max()), float(diff.mean()))


def max_difference(model_path: str | os.PathLike, onnx_path: str | os.PathLike, site: str | None = None,
                   n: int = 4, seed: int = 0) -> float:
    """Largest |P(COVID)| difference between the PyTorch model and its export on ``n`` random inputs."""
    from crosssite.inference.backends import TorchBackend
    from crosssite.models import load

    model, card = load(model_path)
    size = Preprocess.from_card(card, model_path).image_size
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    expected = TorchBackend(model, resolve_site(card, site)).probabilities(images)
    return float(np.abs(OnnxBackend(onnx_path).probabilities(images) - expected).max())
