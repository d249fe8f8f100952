"""Prediction on new files: `Predictor` (slices, DICOM series, NIfTI volumes; known-site, mean-of-sites or
AdaBN, standardise, TENT or ensemble; out-of-distribution flags;
Grad-CAM overlays), output rows, and ONNX export with an ONNX Runtime backend.

    from crosssite.inference import Predictor, export_onnx
    records = Predictor.from_file("runs/x/model", site=None).predict(["scans/"])
    export_onnx("runs/x/model", "model.onnx")
    Predictor.from_file("model.onnx").predict(["scans/"])        # same probabilities, ONNX Runtime
    export_int8("runs/x/model", "model.int8.onnx", ["site_a_slices/"], site="site_a")  # about 2x faster on CPU
"""

from crosssite.inference.export import OnnxBackend, export_int8, export_onnx
from crosssite.inference.inputs import InputPlan, SliceItem, collect_inputs
from crosssite.inference.predictor import (
    MEAN_OF_SITES,
    MIN_ADAPT_IMAGES,
    OOD_THRESHOLD,
    STRATEGIES,
    InferenceError,
    Predictor,
    Preprocess,
    resolve_site,
    site_names_of,
)
from crosssite.inference.records import DEFAULT_TOP_K, KINDS, Record, failed, volume_score, write_records

__all__ = [
    "DEFAULT_TOP_K", "KINDS", "MEAN_OF_SITES", "MIN_ADAPT_IMAGES", "OOD_THRESHOLD", "STRATEGIES",
    "InferenceError", "InputPlan", "OnnxBackend", "Predictor", "Preprocess", "Record", "SliceItem",
    "collect_inputs", "export_int8", "export_onnx", "failed", "resolve_site", "site_names_of", "volume_score", "write_records",
]
