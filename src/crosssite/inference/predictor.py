"""`Predictor`: a trained model (or its ONNX export) applied to new files, slice by slice and per volume.

    predictor = Predictor.from_file("runs/x/model", site=None)     # mean of the known sites' statistics
    records = predictor.predict(["scan/", "slice.png"])          # list[Record]

Preprocessing is the evaluation pipeline's (`crosssite.inference.preprocess`). Slices are decoded by a thread
pool a few batches ahead of the forward pass, so decoding and the network overlap; torch runs on the cores that
are free (`crosssite.inference.threads`).

Normalisation of an unseen hospital's images (site-specific BN):

* ``site="NAME"``: a known site's statistics;
* ``site=None``: the mean of every known site's statistics and affine parameters (``mean-of-sites``);
* ``adapt="name"``: a test-time strategy of the registry `crosssite.models.adaptation.STRATEGIES` (``True``:
  ``"adabn"``). A strategy that fits itself to the site's images (AdaBN, TENT) does so on every call of
  `Predictor.predict`, on the readable slices it was given (at least `MIN_ADAPT_IMAGES`) and on a copy of the
  loaded model; `Predictor.save_adapted` keeps the adapted copy as an ordinary model file with one more site.

A model without site-specific modules has one shared normalisation ("shared") whatever the choice.

Test-time augmentation: ``tta="flip"`` averages P(COVID) over each slice and its left-right mirror, both views in
one forward pass, for crosssite model files and ONNX exports alike; the default is the model card's ``tta``, the
setting the model was validated and selected with.

Out-of-distribution flag: every slice gets ``ood_score``, its distance at the first batch-norm layer to the
closest known site (`crosssite.models.adaptation.FirstNormShift`), read in the same forward pass as the
prediction, and a volume the mean over its slices; ``ood`` is set where the score exceeds the card's
``ood_threshold`` or `OOD_THRESHOLD`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crosssite.data import CLASS_NAMES, TTA_MODES, card_tta
from crosssite.data.io import input_warnings
from crosssite.data.transforms import WHOLE_SLICE
from crosssite.errors import ImageReadError, InferenceError
from crosssite.inference.backends import Backend, TorchBackend
from crosssite.inference.cams import save_cams
from crosssite.inference.inputs import InputPlan, SliceItem, collect_inputs
from crosssite.inference.preprocess import Preprocess
from crosssite.inference.records import DEFAULT_TOP_K, Record, volume_score
from crosssite.inference.threads import free_cores, split_cores, torch_threads, usable_cores
from crosssite.models.adaptation import (
    MEAN_OF_SITES,
    MIN_ADAPT_IMAGES,
    STRATEGIES,
    FirstNormShift,
    adaptation_strategies,
    has_site_modules,
    standardise_images,
)

__all__ = [
    "MIN_ADAPT_IMAGES",
    "MEAN_OF_SITES",
    "OOD_THRESHOLD",
    "STRATEGIES",
    "InferenceError",
    "Preprocess",
    "TorchBackend",
    "site_names_of",
    "resolve_site",
    "Predictor",
]


OOD_THRESHOLD = 0.75
"""`FirstNormShift` score above which a slice (or a volume, by its slices' mean) is flagged out of
distribution, unless the model card holds an ``ood_threshold``. A fixed value from tiny synthetic-site models
(tests/test_unseen.py): the known sites' slices score below it, sites rendered at half or twice the contrast
mostly above; to be recalibrated on the real sites' validation slices.
"""

SHARED = "shared"
EMPTY_FOLDER = "folder holds no supported image files (searched recursively)"
PREFETCH_BATCHES = 2
"""Batches decoded ahead of the one the network runs on: enough to keep the decoding threads busy while it runs."""


# ----------------------------------------------------------------------------------------- the model card


def site_names_of(card: dict[str, Any]) -> list[str]:
    """The card's site names, or ``site0, site1, ...`` for a card without them."""
    names = card.get("site_names")
    return list(names) if names else [f"site{i}" for i in range(int(card.get("num_sites", 1)))]


def resolve_site(card: dict[str, Any], site: str | None) -> int | None:
    """Site index of the known site ``site`` (None stays None: the mean of the known sites)."""
    if site is None:
        return None
    names = site_names_of(card)
    if site not in names:
        raise InferenceError(f"unknown site {site!r}; the model knows: {', '.join(names)}")
    return names.index(site)


def resolve_strategy(adapt: bool | str | None) -> str | None:
    """``adapt`` as a strategy of `STRATEGIES` (True: ``"adabn"``; False / None / ``"mean-of-sites"``: no
    adaptation)."""
    if adapt is True:
        return "adabn"
    if adapt is False or adapt is None or adapt == MEAN_OF_SITES:
        return None
    if adapt not in STRATEGIES:
        raise InferenceError(f"adapt: unknown strategy {adapt!r}; choose one of {', '.join(adaptation_strategies())}")
    return adapt




def _decoded(items: Sequence[SliceItem], size: int, load: Callable[[SliceItem], Any], pool: ThreadPoolExecutor
             ) -> Iterator[tuple[Sequence[SliceItem], list]]:
    """``(items, loaded)`` per batch of ``size`` items, decoded by ``pool`` `PREFETCH_BATCHES` batches ahead."""
    batches = [items[i : i + size] for i in range(0, len(items), size)]
    pending: deque[list[Future]] = deque()
    for k, batch in enumerate(batches):
        while len(pending) <= PREFETCH_BATCHES and k + len(pending) < len(batches):
            pending.append([pool.submit(load, item) for item in batches[k + len(pending)]])
        yield batch, [f.result() for f in pending.popleft()]


class _Progress:
    """A transient rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task(description, total=total)

    def __enter__(self) -> Callable[[int], None]:
        if self.bar is None:
            return lambda n: None
        self.bar.start()
        return lambda n: self.bar.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


class Predictor:
    """P(COVID) for slices and volumes of new files; see the module docstring.

    Args:
        model: a crosssite model (from `crosssite.models.load`) or a backend (the ONNX Runtime one).
        card: its model card (preprocessing, class names, site names, threshold).
        site: a known site's name, or None for the mean of the known sites' statistics.
        adapt: a test-time strategy of `STRATEGIES` (True: ``"adabn"``) applied to the images given to each
            `predict` call (exclusive with ``site``); see the module docstring.
        batch_size: slices per forward pass.
        top_k: slices averaged into a volume's score (None: all).
        threshold: P(COVID) at which a slice is labelled COVID; default the card's ``threshold`` or 0.5.
        device: where the PyTorch model runs.
        workers: threads decoding files (None: half the free cores, `crosssite.inference.threads.split_cores`).
        strict: refuse (as ``"error"`` rows) the slices of files that would otherwise be scored with a
            ``warning`` (a DICOM whose Modality is not CT, a localizer or non-axial slice, a tiny image).
        ood_threshold: `FirstNormShift` score above which a slice / volume is flagged ``ood``; default the
            card's ``ood_threshold`` or `OOD_THRESHOLD`.
        tta: test-time augmentation (`crosssite.data.TTA_MODES`); default the card's ``tta`` (``"none"`` where it
            has none).
        draft: decode JPEGs much larger than the model input at a reduced DCT scale
            (`crosssite.inference.preprocess`); off by default: it moved site B's test AUC by more than 0.2 points
            (docs/PERFORMANCE.md), so every file decodes in full, as evaluation does.
        threads: torch threads while predicting (None: the free cores the decoding threads leave, counted at
            the start of each `predict` call, `crosssite.inference.threads.split_cores`; 0: leave torch's setting
            alone).
    """

    def __init__(
        self,
        model: nn.Module | Backend,
        card: dict[str, Any],
        site: str | None = None,
        adapt: bool | str | None = False,
        *,
        batch_size: int = 32,
        top_k: int | None = DEFAULT_TOP_K,
        threshold: float | None = None,
        device: str | torch.device = "cpu",
        workers: int | None = None,
        source: object = "model",
        strict: bool = False,
        ood_threshold: float | None = None,
        tta: str | None = None,
        draft: bool = False,
        threads: int | None = None,
    ) -> None:
        adapt = resolve_strategy(adapt)
        if site is not None and adapt:
            raise InferenceError(f"choose either a known site or adaptation ({adapt}), not both")
        if batch_size < 1:
            raise InferenceError(f"batch size must be >= 1, got {batch_size}")
        if top_k is not None and top_k < 1:
            raise InferenceError(f"top-k must be >= 1 (or all slices), got {top_k}")
        self.card = card
        self.source = source
        self.preprocess = Preprocess.from_card(card, source, draft=draft)
        self.class_names = tuple(card.get("class_names") or CLASS_NAMES)
        self.threshold = float(card.get("threshold", 0.5) if threshold is None else threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise InferenceError(f"threshold must lie in [0, 1], got {self.threshold}")
        self.batch_size = batch_size
        self.top_k = top_k
        self.device = torch.device(device)
        self.workers = workers
        self.decoders = 1  # decoding threads of the current call
        self.threads = threads
        self.adapt = adapt
        self.strict = strict
        self.ood_threshold = float(card.get("ood_threshold", OOD_THRESHOLD) if ood_threshold is None else ood_threshold)
        if not self.ood_threshold > 0:
            raise InferenceError(f"ood_threshold must be positive, got {self.ood_threshold}")
        self.tta = card_tta(card) if tta is None else tta
        if self.tta not in TTA_MODES:
            raise InferenceError(f"{source}: test-time augmentation {self.tta!r} is not one of {', '.join(TTA_MODES)}")
        self._warnings: dict[Path, list[str]] = {}  # per input file, for the current `predict` call
        self.adapted: tuple[nn.Module, int] | None = None  # (adapted model, images used) after AdaBN / TENT
        self.adapted_with = ""  # the strategy that adapted it, once adapted
        self.standardise = False  # each input standardised on its own before the network
        self._set_backend(model, site)

    def _set_backend(self, model: nn.Module | Backend, site: str | None) -> None:
        """The backend and normalisation label for ``site`` / ``self.adapt`` (a fitting strategy replaces it
        later, in `adapt_to`)."""
        strategy = None if self.adapt is None else STRATEGIES[self.adapt]
        if isinstance(model, nn.Module):
            self.model: nn.Module | None = model.to(self.device).eval()
            self.site = resolve_site(self.card, site)
            self.backend: Backend = TorchBackend(self.model, self.site, self.device)
            self.norm = site if site is not None else MEAN_OF_SITES
            if not has_site_modules(self.model):
                if strategy is not None and strategy.needs_site_bn:
                    raise InferenceError(f"{self.source}: {self.adapt} needs site-specific layers; this model has "
                                         "one shared normalisation")
                self.norm = SHARED
            if strategy is not None and not strategy.fits:  # fixed from the start: no image to read first
                adapted = strategy(self.model, (), len(self.site_names))
                self.backend = TorchBackend(adapted.model, adapted.sites, self.device)
                self.standardise = adapted.standardise
                if adapted.sites != (None,):
                    self.norm = f"{self.adapt}:{len(adapted.sites)}"
        else:
            if site is not None or self.adapt not in (None, "standardise"):
                raise InferenceError(
                    f"{self.source}: an ONNX export has its normalisation fixed at export ({self.card.get('norm')}); "
                    "--site and every --adapt strategy but standardise apply to crosssite model files only"
                )
            self.model, self.site, self.backend = None, None, model
            self.norm = str(self.card.get("norm", MEAN_OF_SITES))
            self.standardise = self.adapt == "standardise"
        if self.standardise:
            self.norm += "+standardise"

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, site: str | None = None, adapt: bool | str | None = False, **kwargs: Any
    ) -> Predictor:
        """Load a crosssite model (stem, ``.safetensors``, ``.json`` or run folder) or an ONNX export
        (``.onnx``, run with ONNX Runtime); keyword arguments as for `Predictor`."""
        path = Path(path)
        if path.suffix.lower() == ".onnx":
            from crosssite.inference.onnx_runtime import OnnxBackend

            backend = OnnxBackend(path)
            return cls(backend, backend.card, site, adapt, source=path, **kwargs)
        from crosssite.models import load

        model, card = load(path, map_location=kwargs.get("device", "cpu"))
        return cls(model, card, site, adapt, source=path, **kwargs)

    @property
    def site_names(self) -> list[str]:
        return site_names_of(self.card)

    # ----------------------------------------------------------------------------------------- reading

    def _readable_batches(self, items: Sequence[SliceItem], counter: list[int]) -> Iterator[torch.Tensor]:
        """Batches of the readable slices' model inputs; ``counter[0]`` counts the slices yielded."""
        batch_size = max(self.batch_size, MIN_ADAPT_IMAGES)
        with ThreadPoolExecutor(self.decoders) as pool:
            for _, loaded in _decoded(items, batch_size, self.preprocess.load, pool):
                images = [x for x in loaded if isinstance(x, torch.Tensor)]
                if images:
                    counter[0] += len(images)
                    yield torch.stack(images)

    def _threads(self) -> tuple[int, int]:
        """(decoding threads, torch threads) for this call (see the ``workers`` and ``threads`` arguments)."""
        free = free_cores() if self.threads is None or self.workers is None else usable_cores()
        decoders, torch_n = split_cores(free, self.workers)
        return decoders, torch_n if self.threads is None else self.threads

    def _torch_threads(self, n: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.threads == 0 else torch_threads(n)

    # ------------------------------------------------------------------------------------ adaptation

    def adapt_to(self, paths: Iterable[Path | str] | InputPlan, method: str = "adabn") -> int:
        """Fit the strategy ``method`` (one that reads the site's images first: ``"adabn"``, ``"tent"``) on the
        readable slices of ``paths``, on a copy of the loaded model, and predict with it from now on; return the
        number of slices used."""
        strategy = STRATEGIES.get(method)
        if strategy is None or not strategy.fits:
            fitting = [name for name, s in STRATEGIES.items() if s.fits]
            raise InferenceError(f"adapt_to: method must be one of {', '.join(fitting)}, got {method!r}")
        what = {"adabn": "AdaBN", "tent": "TENT"}.get(method, method)
        if self.model is None:
            raise InferenceError(f"{self.source}: {what} needs a crosssite model file, not an ONNX export")
        plan = paths if isinstance(paths, InputPlan) else collect_inputs(paths)
        if len(plan.items) < MIN_ADAPT_IMAGES:
            raise InferenceError(
                f"{what} needs at least {MIN_ADAPT_IMAGES} images of the new site, got {len(plan.items)}"
            )
        counter = [0]
        adapted = None
        try:
            self.decoders, torch_n = self._threads()
            with self._torch_threads(torch_n):
                adapted = strategy(self.model, self._readable_batches(plan.items, counter), len(self.site_names))
        except ValueError:
            if counter[0]:
                raise
        if counter[0] < MIN_ADAPT_IMAGES or adapted is None:
            raise InferenceError(
                f"{what} needs at least {MIN_ADAPT_IMAGES} readable images of the new site, got {counter[0]}"
            )
        self.adapted = (adapted.model, counter[0])
        self.adapted_with = what
        self.backend = TorchBackend(adapted.model, adapted.sites, self.device)
        self.standardise = adapted.standardise
        self.norm = f"{method}:{counter[0]}"
        return counter[0]

    def save_adapted(self, path: str | os.PathLike, name: str = "adapted") -> tuple[Path, Path]:
        """Write the AdaBN-adapted model as an ordinary model file whose new site is called ``name``."""
        from crosssite.models import save

        if self.adapted is None:
            raise InferenceError("no adapted model to save: predict with adapt='adabn' or 'tent' (--adapt) first")
        names = self.site_names
        if name in names:
            raise InferenceError(f"site name {name!r} is taken; the model already knows: {', '.join(names)}")
        model, n = self.adapted
        card = {**self.card, "site_names": [*names, name]}
        # the same record `crosssite add-site` writes (its unlabelled mode), so a card lists every added site alike
        entry = {"name": name, "site_index": len(names), "mode": self.adapted_with.lower(), "images": n,
                 "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        card["added_sites"] = [*card.get("added_sites", []), entry]
        return save(model, path, card)

    # --------------------------------------------------------------------------------------- predicting

    def _label(self, p: float) -> str:
        return self.class_names[1] if p >= self.threshold else self.class_names[0]

    def _ood(self, score: float | None) -> bool | None:
        return None if score is None else bool(score > self.ood_threshold)

    def _slice_record(self, item: SliceItem, p: float, cam: Path | None, ood_score: float | None,
                      whole: bool = False) -> Record:
        notes = self._warnings_of(item) + ([WHOLE_SLICE] if whole else [])
        return Record(
            kind="slice", path=str(item.ref.path), frame=item.ref.frame,
            volume=None if item.volume is None else str(item.volume), slice=item.index,
            p_covid=p, label=self._label(p), norm=self.norm, cam=None if cam is None else str(cam),
            warning="; ".join(notes) or None, ood=self._ood(ood_score), ood_score=ood_score,
        )

    def _warnings_of(self, item: SliceItem) -> list[str]:
        """`input_warnings` of the item's file, read once per file and `predict` call."""
        path = item.ref.path
        if path not in self._warnings:
            self._warnings[path] = input_warnings(path)
        return self._warnings[path]

    def _refused(self, inputs: list, items: Sequence[SliceItem]) -> list:
        """With ``strict``, the inputs whose file has a warning become `ImageReadError`s naming it."""
        return [ImageReadError(item.ref.path, "refused (strict): " + "; ".join(self._warnings_of(item)))
                if isinstance(x, torch.Tensor) and self._warnings_of(item) else x for x, item in zip(inputs, items)]

    def _predict_batch(self, items: Sequence[SliceItem], inputs: list, start: int,
                       cam_dir: Path | None, whole: set[tuple[Path, int | None]]) -> list[Record]:
        if self.strict:
            inputs = self._refused(inputs, items)
        good = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        records: dict[int, Record] = {
            i: Record(kind="error", path=str(x.path), frame=items[i].ref.frame, error=x.reason)
            for i, x in enumerate(inputs) if isinstance(x, ImageReadError)
        }
        if good:
            images = torch.stack([inputs[i] for i in good])  # (B, 3, S, S)
            p, scores, cams = self._score(images, [items[i] for i in good], start, cam_dir)
            for i, pi, cam, score in zip(good, p, cams, scores):
                records[i] = self._slice_record(items[i], float(pi), cam, score,
                                                (items[i].ref.path, items[i].ref.frame) in whole)
        return [records[i] for i in range(len(items))]

    def _score(self, images: torch.Tensor, items: Sequence[SliceItem], start: int, cam_dir: Path | None
               ) -> tuple[np.ndarray, list[float | None], list[Path | None]]:
        """P(COVID), out-of-distribution scores and Grad-CAM files of one batch (B, 3, S, S)."""
        model = getattr(self.backend, "model", None)
        n = images.shape[0]
        raw_shift = None
        # the distance to the known sites is of the slices as they came, measured apart when the forward pass that
        # predicts sees other inputs (standardised ones) or runs in another thread (the server's micro-batcher)
        if self.standardise or not isinstance(self.backend, TorchBackend):
            raw_shift = FirstNormShift(model, len(self.site_names))
            if model is not None:
                raw_shift.measure(model, images.to(self.device))
        if self.standardise:
            images = standardise_images(images)
        cams: list[Path | None] = [None] * n
        if cam_dir is not None:  # the maps are of the slices as given
            p, maps = self.backend.grad_cam(images)
            cams = list(save_cams(cam_dir, start, items, images, maps, self.preprocess))
        # the distance to the known sites, read in the forward pass at the first norm layer's input
        with FirstNormShift(None if raw_shift is not None else model, len(self.site_names)) as shift:
            if cam_dir is None or self.tta != "none":
                views = torch.cat([images.flip(-1), images]) if self.tta == "flip" else images  # mirrors first
                p = self.backend.probabilities(views)
                p = (p[:n] + p[n:]) / 2 if self.tta == "flip" else p
        shift = raw_shift or shift
        scores: list[float | None] = [None] * n if shift.scores is None else [float(v) for v in shift.scores[-n:]]
        return p, scores, cams

    def _volume_records(self, slices: list[Record]) -> list[Record]:
        """Slice rows with a volume row after the last slice of each volume."""
        scores: dict[str, list[float]] = {}
        shifts: dict[str, list[float]] = {}
        last: dict[str, int] = {}
        for i, r in enumerate(slices):
            if r.kind == "slice" and r.volume is not None:
                scores.setdefault(r.volume, []).append(r.p_covid)
                if r.ood_score is not None:
                    shifts.setdefault(r.volume, []).append(r.ood_score)
                last[r.volume] = i
        after = {i: v for v, i in last.items()}
        out: list[Record] = []
        for i, r in enumerate(slices):
            out.append(r)
            if i in after:
                v = after[i]
                score, k = volume_score(scores[v], self.top_k)
                shift = float(np.mean(shifts[v])) if v in shifts else None
                out.append(Record(kind="volume", path=v, p_covid=score, label=self._label(score), norm=self.norm,
                                  n_slices=len(scores[v]), top_k=k, ood=self._ood(shift), ood_score=shift))
        return out

    def predict(
        self,
        paths: Iterable[Path | str] | Path | str,
        *,
        cam_dir: str | os.PathLike | None = None,
        progress: bool | None = None,
    ) -> list[Record]:
        """Rows for ``paths`` (one path or several: files, folders searched recursively, DICOM series
        folders, NIfTI volumes): the inputs that failed first, then every slice in input order with each
        volume's row after its last slice, then the skipped non-image files.

        An unreadable file becomes an ``"error"`` row and the rest still run; inputs without any image file
        at all raise `InferenceError` (an empty folder among other inputs is an ``"error"`` row). With
        ``cam_dir`` a Grad-CAM overlay PNG of each slice is written there. ``progress`` (None: when stderr is a
        terminal and there is more than one batch) shows a progress bar.
        """
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self._warnings = {}
        plan = collect_inputs(paths)
        if not plan.items and not plan.errors:
            shown = ", ".join(str(p) for p in paths) or "(no input given)"
            raise InferenceError(f"no image files found in {shown}")
        if cam_dir is not None and not isinstance(self.backend, TorchBackend):
            raise InferenceError(f"{self.source}: Grad-CAM needs a crosssite model file, not an ONNX export")
        if self.adapt is not None and STRATEGIES[self.adapt].fits:
            self.adapt_to(plan, self.adapt)
        if progress is None:
            progress = sys.stderr.isatty() and len(plan.items) > self.batch_size
        cam_path = None if cam_dir is None else Path(cam_dir)
        slices: list[Record] = [Record(kind="error", path=str(e.path), error=e.reason) for e in plan.errors]
        slices += [Record(kind="error", path=str(p), error=EMPTY_FOLDER) for p in plan.empty]
        self.decoders, torch_n = self._threads()
        with ThreadPoolExecutor(self.decoders) as pool, _Progress(
            progress, len(plan.items), f"predicting {len(plan.items)} slices"
        ) as advance, torch.inference_mode(cam_path is None), self._torch_threads(torch_n):
            start = 0
            whole: set[tuple[Path, int | None]] = set()  # slices a canonical frame shows whole, this call's
            load = functools.partial(self.preprocess.load, whole=whole)
            for batch, loaded in _decoded(plan.items, self.batch_size, load, pool):
                slices.extend(self._predict_batch(batch, loaded, start, cam_path, whole))
                start += len(batch)
                advance(len(batch))
        skipped = [Record(kind="skipped", path=str(p), error="not an image file (unsupported type)")
                   for p in plan.skipped]
        return self._volume_records(slices) + skipped
