"""`Service`: one loaded model behind the HTTP API -- uploads in, P(COVID) per slice and per scan out.

    service = Service.from_file("runs/x/model", site=None, adapt=["local_scans/"])
    service.start()                                   # the micro-batching worker; `stop()` ends it
    answer = service.predict([Upload("scan.zip", f)], cam=True)

The model is a crosssite model file (PyTorch; Grad-CAM available) or an ONNX export (fp32 or int8; the
normalisation was fixed at export). Normalisation of the PyTorch model: a known site (``site``), each slice
standardised and the mean of the known sites (the default, as in `predict`), or AdaBN estimated once at start-up
on the hospital's own slices (``adapt``), so
every request is scored with the same, fixed normalisation.

Each request is scored by `Predictor` on files written to a private folder (`crosssite.serve.uploads`), its
forward passes merged with those of concurrent requests (`crosssite.serve.batching`); Grad-CAM requests run
the PyTorch model directly (they need a gradient). The answer names files only by the names the client gave,
holds no pixel data unless overlays or slice images were asked for, and no DICOM attributes at all.

A request's work stops when its ``cancel`` event is set (the HTTP layer sets it at the request timeout): storing
and extraction check it between chunks, scoring before every forward pass (each batch of decoded slices), so a
timed-out upload does not keep decoding. Request folders live in the service's own temporary folder, created by
`Service.start` and removed by `Service.stop` (which first cancels every request still running), so a stopped
server (SIGTERM included) leaves no uploads behind.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image

from crosssite.data import read_image
from crosssite.errors import CrossSiteError
from crosssite.inference import InferenceError, Predictor, Record
from crosssite.inference.predictor import TorchBackend
from crosssite.serve.batching import BatchedBackend, MicroBatcher
from crosssite.serve.uploads import (
    UploadError,
    check_cancel,
    display_name,
    extract_zip,
    is_zip,
    request_folder,
    save_upload,
)

__all__ = ["Limits", "Upload", "Service", "ServiceError", "NOTICE"]

log = logging.getLogger("crosssite.serve")

NOTICE = "Research tool, not a medical device: not for diagnosis or treatment decisions."
MiB = 2**20


_FAR = "far from every training site"


class ServiceError(CrossSiteError):
    """A request the service refuses as a whole (e.g. Grad-CAM asked of an ONNX export)."""


@dataclass(frozen=True)
class Limits:
    """What one request may send and how long it may take; every figure is configurable (`crosssite serve`)."""

    # sized to a CT series: 600 slices of 512 x 512 at 16 bits are 315 MB uncompressed
    max_upload_bytes: int = 512 * MiB  # request body
    max_files: int = 64  # uploaded files per request
    max_unzipped_bytes: int = 512 * MiB  # all members of one zip archive, decompressed
    max_zip_entries: int = 2048  # members of one zip archive
    timeout_s: float = 120.0  # receiving the upload and scoring it; then its work is stopped
    max_pending: int = 32  # requests admitted at once (waiting or being scored); more get 503
    retry_after_s: int = 2  # the Retry-After of a 503

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_files", "max_unzipped_bytes", "max_zip_entries", "max_pending"):
            if getattr(self, name) < 1:
                raise ServiceError(f"limit {name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ServiceError(f"request timeout must be > 0 s, got {self.timeout_s}")


class Upload(NamedTuple):
    """One uploaded file: the client's file name and the open file (read from its current position)."""

    filename: str | None
    file: BinaryIO


@dataclass
class _FileResult:
    """What one upload produced; ``archive`` uploads name their members ``<upload>/<member path>``."""

    name: str
    archive: bool = False
    slices: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """Every row's warnings as ``"<name>: <warning>"``, each once; the slices of a series that is itself far
        from the training sites are not each said to be (its volume row says it)."""
        far = {v["name"] for v in self.volumes if v["ood"]}
        lines: list[str] = []
        for row in [*self.slices, *self.volumes]:
            for w in row["warnings"]:
                if row.get("volume") in far and w.startswith(_FAR):
                    continue
                if f"{row['name']}: {w}" not in lines:
                    lines.append(f"{row['name']}: {w}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.name, "slices": self.slices, "volumes": self.volumes, "errors": self.errors,
                "skipped": self.skipped, "warnings": self.warnings()}


def describe_normalisation(norm: str) -> str:
    """A `Predictor` normalisation label (``mean-of-sites+standardise``, ``B``, ``adabn:40``, ...) in words."""
    base, standardised = norm.removesuffix("+standardise"), norm.endswith("+standardise")
    kind, _, count = base.partition(":")
    if base == "mean-of-sites":
        text = "scanner differences evened out with the average of the training hospitals' statistics"
    elif base == "shared":
        text = "one normalisation shared by every training hospital"
    elif kind in ("adabn", "tent"):
        text = f"normalisation re-estimated on {count} slices of this hospital ({kind.upper()})"
    elif kind == "ensemble":
        text = f"P(COVID) averaged over the normalisations of the {count} training hospitals"
    else:
        text = f"normalised as the training hospital {base!r}"
    if standardised:
        text = "each slice first brought to the training images' brightness and contrast, then " + text
    return text


def _cancellable(backend: Any, cancel: threading.Event) -> Any:
    """A shallow copy of ``backend`` (of the same class, so `Predictor` treats it alike) whose forward passes
    first check ``cancel``: the scoring of a cancelled request stops before its next batch."""
    checked = copy.copy(backend)
    for name in ("probabilities", "grad_cam"):
        method = getattr(backend, name, None)
        if method is not None:
            def guarded(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
                check_cancel(cancel)
                return _method(*args, **kwargs)

            setattr(checked, name, guarded)
    return checked


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _png_base64(rgb_or_grey: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb_or_grey).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Service:
    """A model served to HTTP requests; see the module docstring.

    Args:
        predictor: the model's `Predictor`, its normalisation already chosen (site, mean, or AdaBN).
        model_file: the weights or ONNX file, hashed for the model's version.
        limits: request limits.
        max_batch: most slices in one forward pass.
        max_wait_s: how long the first waiting slice waits for others to join its forward pass.
    """

    def __init__(self, predictor: Predictor, model_file: Path, limits: Limits = Limits(), *,
                 max_batch: int = 32, max_wait_s: float = 0.01) -> None:
        self.direct = predictor
        self.limits = limits
        self.batcher = MicroBatcher(predictor.backend.probabilities, max_batch=max_batch, max_wait_s=max_wait_s)
        self.batched = copy.copy(predictor)
        self.batched.backend = BatchedBackend(self.batcher, getattr(predictor.backend, "model", None))
        self.grad_cam = isinstance(predictor.backend, TorchBackend)
        card = predictor.card
        self.model_id = str(card.get("model_id") or model_file.name.removesuffix(model_file.suffix))
        self.model_version = f"sha256:{_file_digest(model_file)[:16]}"
        self.backend_name = "pytorch" if self.grad_cam else "onnxruntime"
        self._pending = 0
        self._lock = threading.Lock()
        self._ready = False
        self._running: set[threading.Event] = set()  # the cancel events of the requests being scored
        self._tmp: Path | None = None  # the service's temporary folder, between `start` and `stop`

    @classmethod
    def from_file(cls, path: str | os.PathLike, site: str | None = None, adapt: Sequence[str | os.PathLike] = (),
                  limits: Limits = Limits(), *, top_k: int | None = 5, max_batch: int = 32,
                  max_wait_s: float = 0.01) -> Service:
        """Load a crosssite model or ONNX export; with ``adapt`` paths, AdaBN on their slices, once."""
        from crosssite.models import model_paths

        path = Path(path)
        if adapt and site is not None:
            raise ServiceError("choose either a known site or AdaBN adaptation (--adapt), not both")
        from crosssite.models.adaptation import DEFAULT_STRATEGY

        # an unseen hospital by default, as `crosssite predict`: each slice standardised (DEFAULT_STRATEGY)
        default = DEFAULT_STRATEGY if site is None and not adapt else None
        predictor = Predictor.from_file(path, site=site, adapt=default, batch_size=max_batch, top_k=top_k)
        if adapt:
            predictor.adapt_to(list(adapt))
        model_file = path if path.suffix.lower() == ".onnx" else model_paths(path)[0]
        return cls(predictor, model_file, limits, max_batch=max_batch, max_wait_s=max_wait_s)

    # ------------------------------------------------------------------------------------------ life

    def start(self) -> None:
        """Create the temporary folder, start the micro-batching worker and run one forward pass, so the first
        request is not slow."""
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="crosssite-serve-"))
        self.batcher.start()
        size = self.direct.preprocess.image_size
        self.batcher.submit(torch.zeros(1, 3, size, size))
        self._ready = True

    def stop(self, wait_s: float = 10.0) -> None:
        """Cancel the requests still running, wait up to ``wait_s`` for them to stop, end the worker and remove
        the temporary folder with every upload in it."""
        self._ready = False
        with self._lock:
            running = list(self._running)
        for cancel in running:
            cancel.set()
        deadline = time.monotonic() + wait_s
        while self._running and time.monotonic() < deadline:
            time.sleep(0.02)
        self.batcher.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @property
    def ready(self) -> bool:
        return self._ready and self.batcher.running

    def try_admit(self) -> bool:
        """Take one of the ``max_pending`` request slots; False when all are taken (answer 503)."""
        with self._lock:
            if self._pending >= self.limits.max_pending:
                return False
            self._pending += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._pending -= 1

    @property
    def pending(self) -> int:
        return self._pending

    # ------------------------------------------------------------------------------------------ model

    def model_info(self) -> dict[str, Any]:
        """The model card as the API shows it: what the model is, how inputs are prepared, how it scored."""
        card = self.direct.card
        keys = ("architecture", "model_args", "method", "site_names", "class_names", "preprocessing",
                "metrics", "added_sites", "quantization", "package_version")
        return {
            "id": self.model_id, "version": self.model_version, "backend": self.backend_name,
            "grad_cam": self.grad_cam, "normalisation": self.direct.norm,
            "normalisation_text": describe_normalisation(self.direct.norm), "threshold": self.direct.threshold,
            "ood_threshold": self.direct.ood_threshold,
            "tta": self.direct.tta, "top_k": self.direct.top_k, **{k: card.get(k) for k in keys}, "notice": NOTICE,
        }

    # ------------------------------------------------------------------------------------- predicting

    def check(self, cam: bool) -> None:
        """Refuse, before anything is uploaded, what this model cannot do."""
        if cam and not self.grad_cam:
            raise ServiceError("Grad-CAM overlays (cam=true) need the PyTorch model file; this server runs an ONNX "
                               "export")

    def predict(self, uploads: Sequence[Upload], *, cam: bool = False, images: bool = False,
                cancel: threading.Event | None = None) -> dict[str, Any]:
        """Score every upload; a file that cannot be used is reported by name and the others still run. Setting
        ``cancel`` stops the work (`crosssite.serve.uploads.RequestCancelled`)."""
        self.check(cam)
        cancel = cancel or threading.Event()
        with self._lock:
            self._running.add(cancel)
        try:
            return self._predict(uploads, cam, images, cancel)
        finally:
            with self._lock:
                self._running.discard(cancel)

    def _predict(self, uploads: Sequence[Upload], cam: bool, images: bool, cancel: threading.Event) -> dict[str, Any]:
        started = time.perf_counter()
        with request_folder(self._tmp) as tmp:
            results, inputs = self._store(uploads, tmp, cancel)
            records: list[Record] = []
            if inputs:
                base = self.direct if cam else self.batched
                predictor = copy.copy(base)  # this request's: its own warnings, and a backend that can be cancelled
                predictor.backend = _cancellable(base.backend, cancel)
                try:
                    records = predictor.predict(inputs, cam_dir=tmp / "cam" if cam else None, progress=False)
                except InferenceError:  # only archives without a single image file: no rows at all
                    for r in results:
                        if r.archive and not r.errors:
                            r.errors.append({"name": r.name, "error": "archive holds no supported image files"})
            for record in records:
                self._add(record, tmp, results, images)
        answer = self._answer(results)
        counts = answer["counts"]
        log.info("scored %d file(s): %d slice(s), %d volume(s), %d error(s) in %.0f ms", counts["files"],
                 counts["slices"], counts["volumes"], counts["errors"], 1e3 * (time.perf_counter() - started))
        return answer

    def _store(self, uploads: Sequence[Upload], tmp: Path, cancel: threading.Event
               ) -> tuple[list[_FileResult], list[Path]]:
        results, inputs = [], []
        for i, upload in enumerate(uploads):
            check_cancel(cancel)
            result = _FileResult(display_name(upload.filename, i))
            results.append(result)
            folder = tmp / f"{i:04d}"
            head = upload.file.read(4)
            upload.file.seek(0)
            result.archive = is_zip(result.name, head)
            try:
                if result.archive:
                    inputs.append(extract_zip(upload.file, folder, max_bytes=self.limits.max_unzipped_bytes,
                                              max_entries=self.limits.max_zip_entries, cancel=cancel))
                else:
                    inputs.append(save_upload(upload.file, folder, result.name, cancel))
            except UploadError as e:
                result.errors.append({"name": result.name, "error": str(e)})
        return results, inputs

    def _where(self, path: str, tmp: Path, results: list[_FileResult]) -> tuple[_FileResult, str]:
        """The upload a stored path belongs to, and the name the client knows it by."""
        parts = Path(path).relative_to(tmp).parts
        result = results[int(parts[0])]
        if not result.archive or len(parts) == 1:
            return result, result.name
        return result, "/".join((result.name, *parts[1:]))

    def _warnings(self, r: Record) -> list[str]:
        """What `crosssite predict` warns of for this row: why the file may not be a chest-CT slice, and a scan
        far from every training site."""
        found = r.warning.split("; ") if r.warning else []
        if r.ood:
            found.append(f"{_FAR} (ood_score {r.ood_score:.2f} > {self.direct.ood_threshold:g}):"
                         " the prediction may be unreliable")
        return found

    def _add(self, r: Record, tmp: Path, results: list[_FileResult], images: bool) -> None:
        result, name = self._where(r.path, tmp, results)
        warnings = self._warnings(r)
        if r.kind == "slice":
            entry: dict[str, Any] = {"name": name, "frame": r.frame, "slice": r.slice, "p_covid": r.p_covid,
                                     "label": r.label, "warnings": warnings, "ood": r.ood, "ood_score": r.ood_score}
            entry["volume"] = None if r.volume is None else self._where(r.volume, tmp, results)[1]
            if r.cam is not None:
                entry["cam_png"] = base64.b64encode(Path(r.cam).read_bytes()).decode("ascii")
            if images or r.cam is not None:
                entry["image_png"] = self._model_view(Path(r.path), r.frame)
            result.slices.append(entry)
        elif r.kind == "volume":
            result.volumes.append({"name": name, "p_covid": r.p_covid, "label": r.label, "n_slices": r.n_slices,
                                   "top_k": r.top_k, "warnings": warnings, "ood": r.ood, "ood_score": r.ood_score})
        elif r.kind == "error":
            reason = (r.error or "cannot be read").replace(r.path, name).replace(str(tmp), "")
            result.errors.append({"name": name, "error": reason})
        else:
            result.skipped.append(name)

    def _model_view(self, path: Path, frame: int | None) -> str:
        """The slice as the model sees it (resized, central square, grey), as base64 PNG."""
        pre = self.direct.preprocess
        grey = pre.grey(pre(read_image(path, frame)))  # (S, S) in [0, 1]
        return _png_base64(np.round(255.0 * grey).astype(np.uint8))

    def _answer(self, results: list[_FileResult]) -> dict[str, Any]:
        return {
            "model": {"id": self.model_id, "version": self.model_version, "backend": self.backend_name},
            "normalisation": self.direct.norm,
            "threshold": self.direct.threshold,
            "ood_threshold": self.direct.ood_threshold,
            "tta": self.direct.tta,
            "class_names": list(self.direct.class_names),
            "files": [r.to_dict() for r in results],
            "counts": {
                "files": len(results),
                "slices": sum(len(r.slices) for r in results),
                "volumes": sum(len(r.volumes) for r in results),
                "errors": sum(len(r.errors) for r in results),
                "warnings": sum(len(r.warnings()) for r in results),
            },
            "notice": NOTICE,
        }
