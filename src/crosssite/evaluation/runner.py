"""Running a model over loaders: P(COVID) per slice (`collect_probabilities`), and a model scored on the sites it
was trained on and on unseen sites under every test-time strategy (`evaluate_model`).

The strategies come from the registry `crosssite.models.adaptation.STRATEGIES`: an external site is scored under
each known site's statistics, the mean of the sites' (``mean-of-sites``), AdaBN, and the strategies asked for.
Each strategy's adaptation runs once per site, and the site's batches are read from its loader once and kept
(up to `REPLAY_BYTES`) for every strategy that follows.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from crosssite.data import TTA_MODES
from crosssite.evaluation.metrics import EvaluationError, SiteEvaluation, evaluate_predictions
from crosssite.models.adaptation import (
    MEAN_OF_SITES,
    STRATEGIES,
    Adapted,
    Strategy,
    has_site_modules,
    standardise_images,
)
from crosssite.models.norms import SiteBatchNorm

__all__ = ["MEAN_OF_SITES", "ENSEMBLE", "Probabilities", "collect_probabilities", "norm_strategies", "patients_of",
           "card_loader", "evaluate_model"]

ENSEMBLE = "ensemble"  # `site_override` value: P(COVID) averaged over every known site's statistics
REPLAY_BYTES = 1 << 30
"""An external site's batches are kept in memory for the next strategy while they take at most this much (above,
its loader is read again per strategy)."""


class Probabilities(NamedTuple):
    """What a model predicted for each item of a loader, in loader order."""

    index: np.ndarray  # (N,) int64, dataset index of each item
    site: np.ndarray  # (N,) int64, site index the batch carried
    label: np.ndarray  # (N,) int64, true class
    p_covid: np.ndarray  # (N,) float64, softmax(logits)[:, 1]


def _adapted(model: torch.nn.Module, site_override: int | str, num_sites: int, standardise: bool) -> Adapted:
    if site_override == MEAN_OF_SITES:
        return Adapted(model, (None,), standardise)
    if site_override == ENSEMBLE:
        return Adapted(model, tuple(range(num_sites)), standardise)
    return Adapted(model, (int(site_override),), standardise)


def _own_sites(model: torch.nn.Module, image: torch.Tensor, site: torch.Tensor, tta: str) -> torch.Tensor:
    """P(COVID) (B,) with each item's own site; ``flip``: both views in one forward pass."""
    n = image.shape[0]
    views, sites = (torch.cat([image.flip(-1), image]), torch.cat([site, site])) if tta == "flip" else (image, site)
    out = model(views, sites)
    p = torch.softmax(getattr(out, "logits", out).float(), dim=1)[:, 1]  # logits (V * B, 2)
    return (p[:n] + p[n:]) / 2 if tta == "flip" else p


@torch.inference_mode()
def _collect(model: torch.nn.Module, loader: Iterable, device: str | torch.device, tta: str,
             adapted: Adapted | None, standardise: bool, channels_last: bool = False) -> Probabilities:
    was_training = model.training
    model.eval()
    dtype = next((p.dtype for p in model.parameters()), None)  # float64 weights (precision=fp64) take float64 inputs
    parts: dict[str, list[np.ndarray]] = {"index": [], "site": [], "label": [], "p_covid": []}
    try:
        for batch in loader:
            image = batch["image"].to(device, dtype, non_blocking=True)
            if channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            if adapted is not None:
                p = adapted.probabilities(image, tta)
            else:
                image = standardise_images(image) if standardise else image
                p = _own_sites(model, image, batch["site"].to(device), tta)
            parts["p_covid"].append(p.cpu().double().numpy())
            parts["index"].append(batch["index"].cpu().numpy().astype(np.int64))
            parts["site"].append(batch["site"].cpu().numpy().astype(np.int64))
            parts["label"].append(batch["label"].cpu().numpy().astype(np.int64))
    finally:
        model.train(was_training)
    if not parts["index"]:
        raise EvaluationError("the loader yielded no batch: nothing to evaluate")
    return Probabilities(**{k: np.concatenate(v) for k, v in parts.items()})


def collect_probabilities(
    model: torch.nn.Module,
    loader: object,
    device: str | torch.device = "cpu",
    site_override: int | str | None = None,
    *,
    num_sites: int = 0,
    standardise: bool = False,
    tta: str = "none",
) -> Probabilities:
    """Run `model` in eval mode over `loader` (dict batches: image, label, site, index) and collect P(COVID).

    Args:
        site_override: None normalises each item with its own site's statistics (the batch's `site`);
            an int uses that site's statistics for every item (a known site's BN on an unseen site);
            `MEAN_OF_SITES` (``"mean-of-sites"``) passes `site=None`, the mean of the known sites' statistics;
            `ENSEMBLE` (``"ensemble"``) averages P(COVID) over the statistics of sites ``0 .. num_sites - 1``.
        standardise: standardise each image on its own first (`crosssite.models.adaptation.standardise_images`).
        tta: test-time augmentation (`crosssite.data.TTA_MODES`): ``"flip"`` averages P(COVID) over each image
            and its left-right mirror (both in one forward pass).
    """
    if site_override not in (None, MEAN_OF_SITES, ENSEMBLE) and not isinstance(site_override, int):
        raise EvaluationError(
            f"site_override must be None, an int, {MEAN_OF_SITES!r} or {ENSEMBLE!r}, got {site_override!r}"
        )
    if site_override == ENSEMBLE and num_sites < 1:
        raise EvaluationError("site_override='ensemble' needs num_sites >= 1 (the known sites)")
    if tta not in TTA_MODES:
        raise EvaluationError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    adapted = None if site_override is None else _adapted(model, site_override, num_sites, standardise)
    return _collect(model, loader, device, tta, adapted, standardise)


class _Site:
    """A strategy row of `norm_strategies`: its key, its description and what scores the site."""

    def __init__(self, key: str, description: str, strategy: Strategy | None = None, site: int | None = None):
        self.key, self.description, self.strategy, self.site = key, description, strategy, site

    def adapt(self, model: torch.nn.Module, images: Iterable, num_sites: int) -> Adapted:
        if self.strategy is None:  # a known site's statistics (or the one shared normalisation)
            return Adapted(model, (self.site,))
        return self.strategy(model, images, num_sites)


def _strategy_rows(model: torch.nn.Module, site_names: list[str], extra: Sequence[str]) -> list[_Site]:
    unknown = [key for key in extra if key not in STRATEGIES]
    if unknown:
        raise EvaluationError(f"adapt: unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    site_bn = any(isinstance(m, SiteBatchNorm) for m in model.modules())
    needs_bn = [key for key in extra if STRATEGIES[key].needs_site_bn and not site_bn]
    if needs_bn:
        raise EvaluationError(f"adapt: {needs_bn[0]} needs a model with site-specific batch norm")
    if not has_site_modules(model):
        rows = [_Site("shared", "shared statistics (the model has no site-specific layers)", site=0)]
        return rows + [_Site(key, STRATEGIES[key].description, STRATEGIES[key]) for key in dict.fromkeys(extra)]
    rows = [_Site(f"site:{name}", f"statistics of known site {name!r}", site=i) for i, name in enumerate(site_names)]
    defaults = [MEAN_OF_SITES, "adabn"] if site_bn else [MEAN_OF_SITES]
    return rows + [_Site(key, STRATEGIES[key].description, STRATEGIES[key])
                   for key in dict.fromkeys([*defaults, *extra])]


def norm_strategies(model: torch.nn.Module, site_names: list[str], extra: Sequence[str] = ()) -> list[tuple[str, str]]:
    """How a site the model was never trained on is normalised, as (key, description) in scoring order.

    With site-specific layers: each known site's statistics (``site:NAME``, and its adapters / heads), the mean of
    the known sites' statistics (``mean-of-sites``), AdaBN (with site-specific BN), then ``extra`` strategies of
    `crosssite.models.adaptation.STRATEGIES`. Without any site-specific layer there is nothing to choose: one
    ``shared`` row, then ``extra``; a strategy that needs site-specific BN is refused.
    """
    return [(row.key, row.description) for row in _strategy_rows(model, site_names, extra)]


def patients_of(loader: Iterable, probs: Probabilities) -> list[str] | None:
    """Patient id of each collected slice, when ``loader``'s dataset has them for every slice (else None)."""
    sites = getattr(getattr(loader, "dataset", None), "sites", None)
    if not sites or not all(site.has_patients for site in sites):
        return None
    ids = [sites[s].samples[i].patient for s, i in zip(probs.site, probs.index)]
    return None if any(pid is None for pid in ids) else [str(pid) for pid in ids]


def card_loader(site: Any, card: dict[str, Any], indices: np.ndarray | None = None, *, batch_size: int = 64,
                workers: int = 0) -> Any:
    """Batches of ``site`` (``indices`` of its samples, or all) preprocessed as the model card says: its frame,
    image size and the training part's mean / std."""
    from crosssite.data import build_cache, eval_loader, preprocessing_transform

    transform = preprocessing_transform(card.get("preprocessing") or {"image_size": 224})
    ix = [indices]
    cache = build_cache([site], ix, transform.image_size, frame=transform.frame)
    return eval_loader([site], ix, cache, transform.image_size, batch_size=batch_size, workers=workers,
                       transform=transform)


class _Replay:
    """A loader read once, its batches kept for the next pass while they fit in `REPLAY_BYTES`."""

    def __init__(self, loader: Iterable) -> None:
        self.loader, self.kept, self.dataset = loader, None, getattr(loader, "dataset", None)

    def __iter__(self) -> Iterator[dict]:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[dict] | None = []
        size = 0
        for batch in self.loader:
            if kept is not None:
                size += sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))
                kept = kept + [batch] if size <= REPLAY_BYTES else None
            yield batch
        self.kept = kept


def evaluate_model(
    model: torch.nn.Module,
    site_names: list[str],
    known: Mapping[str, Iterable],
    external: Mapping[str, Iterable] | None = None,
    *,
    device: str | torch.device = "cpu",
    threshold: float = 0.5,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    strategies: Sequence[str] = (),
    tta: str = "none",
) -> list[SiteEvaluation]:
    """Evaluate `model` on sites it was trained on (`known`) and on sites it never saw (`external`).

    Args:
        model: a registry model; it is not modified (AdaBN and TENT work on a copy).
        site_names: the model's site slots in order (the model card's `site_names`).
        known: site name -> loader of that site alone; the name must be in `site_names`.
        external: site name -> loader; evaluated once per row of `norm_strategies`.
        strategies: extra test-time strategies for the external sites (names of
            `crosssite.models.adaptation.STRATEGIES`, e.g. ``standardise``, ``tent``, ``ensemble``).
        tta: test-time augmentation of every prediction (`collect_probabilities`; the model card's ``tta``).
    Returns:
        One `SiteEvaluation` per known site, then per external site and strategy.
    """
    results = []
    # a channels-last copy: oneDNN's convolutions run about twice as fast on it, with the same values to float32
    # rounding, and the caller's model keeps its layout
    model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)

    def scored(name: str, loader: Iterable, probs: Probabilities, key: str, description: str) -> SiteEvaluation:
        return evaluate_predictions(name, probs.label, probs.p_covid, strategy=key, description=description,
                                    threshold=threshold, n_boot=n_boot, alpha=alpha, seed=seed,
                                    patients=patients_of(loader, probs))

    for name, loader in known.items():
        if name not in site_names:
            raise EvaluationError(
                f"site {name!r} is not one the model was trained on ({', '.join(site_names)}); "
                "evaluate it as an external site"
            )
        own = _adapted(model, site_names.index(name), len(site_names), False)
        probs = _collect(model, loader, device, tta, own, False, channels_last=True)
        results.append(scored(name, loader, probs, "own", "the site's own statistics"))
    rows = _strategy_rows(model, site_names, strategies) if external else []
    for name, loader in (external or {}).items():
        replay = _Replay(loader)
        for row in rows:
            images = (batch["image"].to(device) for batch in replay)
            adapted = row.adapt(model, images, len(site_names))  # AdaBN / TENT: a new slot, on a copy
            probs = _collect(adapted.model, replay, device, tta, adapted, False, channels_last=True)
            results.append(scored(name, loader, probs, row.key, row.description))
    return results
