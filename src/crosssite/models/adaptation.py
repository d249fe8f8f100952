"""Test-time strategies for a hospital the model never saw (a registry), and a distance of its images to the known
sites.

A strategy is one function registered by name (MONAI's factory style): it takes the trained model, the unseen
site's images (an iterable of (B, 3, S, S) batches, read only by strategies that fit something to them) and the
number of known sites, and returns an `Adapted` -- the model to run, the site slots whose predictions are
averaged, and whether each input is standardised first. `Predictor` (``adapt="name"``), `evaluate_model`
(``strategies=``) and the ``--adapt-strategy`` options all read `STRATEGIES`, so a registration is all a new
strategy needs::

    @register_strategy("first-site", "the first known site's statistics")
    def first_site(model, images, num_sites):
        return Adapted(model, sites=(0,))

The registered strategies:

* ``mean-of-sites`` (`MEAN_OF_SITES`): no adaptation, the mean of the known sites' statistics and affine
  parameters (site ``None`` in the forward pass).
* ``adabn`` (`adapt_norm`): AdaBN (Li et al. 2016), a new site slot whose BN statistics are re-estimated on the
  unseen site's images, on a copy of the model.
* ``standardise`` (`standardise_images`): each model input is standardised on its own, per channel, to mean 0
  and standard deviation 1. Since the input is ``(grey - mean) / std`` with the training part's pixel mean /
  std (the model card's ``preprocessing``), this maps each slice's grey values affinely so that their mean and
  std equal the training sites' (without clipping), undoing a global contrast / brightness change.
* ``tent`` (`tent_adapt`): TENT (Wang, Shelhamer, Liu, Olshausen, Darrell, "Tent: Fully test-time adaptation
  by entropy minimization", ICLR 2021). AdaBN first, then the new slot's BN affine parameters -- and nothing
  else -- are trained to minimise the mean entropy of the predictions on the unseen site's unlabelled images:
  ``epochs`` passes, Adam at ``lr``, batch statistics in the forward pass as in the paper. On a copy.
* ``ensemble``: P(COVID) averaged over every known site's normalisation branch (`Adapted` with every known site).

`FirstNormShift` measures how far a batch of images sits from every known site at the input of the first
normalisation layer (the output of the shared stem convolution, before anything site-specific): see its doc.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from crosssite.errors import ConfigError
from crosssite.models.norms import BatchNorm, SiteBatchNorm, SiteModule, _image_batches, adapt_norm, standardise_images

__all__ = ["Adapted", "Strategy", "STRATEGIES", "register_strategy", "get_strategy", "adaptation_strategies",
           "MEAN_OF_SITES", "DEFAULT_STRATEGY", "MIN_ADAPT_IMAGES", "TENT_EPOCHS", "TENT_LR", "standardise_images",
           "tent_adapt", "has_site_modules", "FirstNormShift"]

MEAN_OF_SITES = "mean-of-sites"
"""The strategy (and normalisation label) of no adaptation: the mean of the known sites' statistics."""

DEFAULT_STRATEGY = "standardise"
"""What ``predict`` (without ``--site``, or with a bare ``--adapt``), ``serve`` and ``evaluate --external`` use for
a site the model never saw: the strategy that the unseen-hospital protocol's rule chose together with the shipped
model's frame, on 48 simulated held-out hospitals (docs/RESULTS.md, "A new hospital"; results/unseen-v1)."""

MIN_ADAPT_IMAGES = 8
"""Fewest readable slices of a new site that AdaBN (predict ``--adapt``, ``add-site``) accepts: batch statistics of
fewer images are too noisy to normalise with."""

TENT_EPOCHS = 1
TENT_LR = 1e-3


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Adapted:
    """A model ready to score an unseen site's images.

    Args:
        model: the network to run (the trained model itself, or an adapted copy).
        sites: the site slots to normalise with, P(COVID) averaged over them (None: the mean of the known sites).
        standardise: standardise each input on its own first (`standardise_images`).
        images: how many of the site's images the strategy fitted itself on (0: none read).
    """

    model: nn.Module
    sites: tuple[int | None, ...] = (None,)
    standardise: bool = False
    images: int = 0

    @torch.no_grad()
    def probabilities(self, images: Tensor, tta: str = "none") -> Tensor:
        """P(COVID) (B,) of ``images`` (B, 3, S, S); ``tta="flip"`` averages each image with its left-right mirror,
        both views in one forward pass per site (mirrors first, so a hook keeping the last rows sees the images as
        given)."""
        if tta not in ("none", "flip"):
            raise ConfigError(f"tta: {tta!r} is not one of none, flip")
        x = standardise_images(images) if self.standardise else images
        n = x.shape[0]
        views = torch.cat([x.flip(-1), x]) if tta == "flip" else x  # (V * B, 3, S, S)
        total = torch.zeros(views.shape[0], device=x.device)
        for s in self.sites:
            site = None if s is None else torch.full((views.shape[0],), s, dtype=torch.long, device=x.device)
            out = self.model(views, site)
            total += torch.softmax(getattr(out, "logits", out).float(), dim=1)[:, 1]
        p = total / len(self.sites)
        return (p[:n] + p[n:]) / 2 if tta == "flip" else p


StrategyFn = Callable[[nn.Module, Iterable, int], Adapted]


@dataclass(frozen=True)
class Strategy:
    """A registered test-time strategy: its name, what it does in words, its function, whether it reads the
    unseen site's images before predicting (``fits``) and whether it needs site-specific batch norm."""

    name: str
    description: str
    fn: StrategyFn
    fits: bool = False
    needs_site_bn: bool = False

    def __call__(self, model: nn.Module, images: Iterable = (), num_sites: int = 1) -> Adapted:
        if self.needs_site_bn and not any(isinstance(m, SiteBatchNorm) for m in model.modules()):
            raise ConfigError(f"strategy {self.name} needs a model with site-specific batch norm")
        return self.fn(model, images, num_sites)


class _Registry(dict):
    """Name -> `Strategy`; iterating gives the names, so ``", ".join(STRATEGIES)`` lists them."""

    def __getitem__(self, name: str) -> Strategy:
        try:
            return super().__getitem__(name)
        except KeyError:
            raise ConfigError(f"unknown test-time strategy {name!r}; choose one of {', '.join(self)}") from None


STRATEGIES: _Registry = _Registry()
"""Every registered test-time strategy by name (`register_strategy`)."""


def register_strategy(name: str, description: str, *, fits: bool = False,
                      needs_site_bn: bool = False) -> Callable[[StrategyFn], StrategyFn]:
    """Register ``fn(model, images, num_sites) -> Adapted`` as the test-time strategy ``name``; a name is taken
    once. ``fits``: it reads the unseen site's images first (the caller hands it them); ``needs_site_bn``: it is
    refused for a model without site-specific batch norm."""

    def add(fn: StrategyFn) -> StrategyFn:
        if name in STRATEGIES:
            raise ConfigError(f"test-time strategy {name!r} is registered already")
        STRATEGIES[name] = Strategy(name, description, fn, fits, needs_site_bn)
        return fn

    return add


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name`` (`ConfigError` naming the choices otherwise)."""
    return STRATEGIES[name]


def adaptation_strategies() -> list[str]:
    """The strategies a user picks for an unseen site (``--adapt-strategy``): all but no adaptation."""
    return [name for name in STRATEGIES if name != MEAN_OF_SITES]


@register_strategy(MEAN_OF_SITES, "mean of the known sites' statistics")
def _mean_of_sites(model: nn.Module, images: Iterable, num_sites: int) -> Adapted:
    return Adapted(model)


@register_strategy("adabn", "AdaBN: statistics re-estimated on this site's images", fits=True, needs_site_bn=True)
def _adabn(model: nn.Module, images: Iterable, num_sites: int) -> Adapted:
    adapted = copy.deepcopy(model)
    counted = _Counted(images)
    site = adapt_norm(adapted, counted)
    return Adapted(adapted.eval(), sites=(site,), images=counted.n)


@register_strategy("standardise", "each slice standardised to the training sites' pixel mean / std")
def _standardise(model: nn.Module, images: Iterable, num_sites: int) -> Adapted:
    return Adapted(model, standardise=True)


@register_strategy("tent", "TENT: AdaBN, then entropy minimisation of the new BN affine parameters on this site's "
                   "images", fits=True, needs_site_bn=True)
def _tent(model: nn.Module, images: Iterable, num_sites: int) -> Adapted:
    adapted = copy.deepcopy(model)
    counted = _Counted(images)
    site = tent_adapt(adapted, counted)
    return Adapted(adapted.eval(), sites=(site,), images=counted.n)


@register_strategy("ensemble", "P(COVID) averaged over every known site's statistics", needs_site_bn=True)
def _ensemble(model: nn.Module, images: Iterable, num_sites: int) -> Adapted:
    if num_sites < 1:
        raise ConfigError(f"the ensemble needs at least one known site, got {num_sites}")
    return Adapted(model, sites=tuple(range(num_sites)))


class _Counted:
    """An iterable of image batches (tensors or batch dicts) that counts the images it hands out."""

    def __init__(self, images: Tensor | Iterable) -> None:
        self.images, self.n = images, 0

    def __iter__(self) -> Iterator[Tensor]:
        for batch in _image_batches(self.images, 32):
            self.n += batch.shape[0]
            yield batch


def has_site_modules(model: nn.Module) -> bool:
    """Whether any module of ``model`` holds per-site parameters (site BN, adapters, auxiliary heads)."""
    return any(isinstance(m, SiteModule) for m in model.modules())


# ---------------------------------------------------------------------------------------------- the fits


def _entropy(logits: Tensor) -> Tensor:
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def tent_adapt(
    model: nn.Module,
    images: Tensor | Iterable,
    *,
    epochs: int = TENT_EPOCHS,
    lr: float = TENT_LR,
    batch_size: int = 32,
) -> int:
    """TENT on ``model`` (modified in place: pass a copy) for the unseen site of ``images``; return its new site
    index. ``images``: a tensor (N, 3, H, W) or an iterable of image tensors / batch dicts (read once, kept).

    AdaBN (`adapt_norm`) adds the slot; then ``epochs`` passes of Adam (``lr``) on the entropy of the
    predictions update only the new slot's BN weight and bias, every other layer frozen and in evaluation
    mode, the new slots normalising with each batch's statistics. The slot's running statistics stay AdaBN's.
    """
    if epochs < 1 or not lr > 0:
        raise ConfigError(f"TENT needs epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}")
    batches = [b.detach() for b in _image_batches(images, batch_size)]
    new_site = adapt_norm(model, batches)
    norms = [m for m in model.modules() if isinstance(m, SiteBatchNorm)]
    slots = [m.sites[new_site] for m in norms]
    params = [p for slot in slots for p in (slot.weight, slot.bias)]
    was_training = model.training
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    saved = [(s.running_mean.clone(), s.running_var.clone(), s.num_batches_tracked.clone()) for s in slots]
    optimiser = torch.optim.Adam(params, lr=lr)
    device = next(model.parameters()).device
    model.eval()
    for m in norms:
        m.train()  # batch statistics, as TENT normalises
    try:
        for batch in itertools.chain.from_iterable(itertools.repeat(batches, epochs)):
            batch = batch.to(device)
            site = torch.full((batch.shape[0],), new_site, dtype=torch.long, device=device)
            loss = _entropy(model(batch, site).logits)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        with torch.no_grad():
            for slot, (mean, var, count) in zip(slots, saved):
                slot.running_mean.copy_(mean)
                slot.running_var.copy_(var)
                slot.num_batches_tracked.copy_(count)
        for p, flag in requires.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return new_site


class FirstNormShift:
    """Out-of-distribution score of each image: its distance to the closest known site at the first norm layer.

    A forward hook on the model's first batch-norm module (shared or site-specific) reads its input, the shared
    stem's output (B, C, H, W). For image ``i`` and known site ``s`` (that layer's slot ``s``, holding the
    running mean mu_s and variance var_s of site ``s``'s training images):

        d_s(i) = sqrt(mean_c ((m_ic - mu_sc)^2 / var_sc)) + sqrt(mean_c (log(v_ic / var_sc))^2)

    with m_ic, v_ic image i's mean and variance of channel c over its pixels; the score is min_s d_s(i). The
    first term measures a shifted brightness, the second a changed contrast or texture (a log-ratio of
    variances). A model without batch norm (or None, an ONNX backend) gives no score (`scores` stays None).
    Only forward passes of the thread that entered it are read, so threads sharing one model (the server's
    requests) each measure their own slices.
    """

    def __init__(self, model: nn.Module | None, num_known: int) -> None:
        modules = () if model is None else model.modules()
        self.norm = next((m for m in modules if isinstance(m, (SiteBatchNorm, BatchNorm))), None)
        self.num_known = num_known
        self.scores: Tensor | None = None
        self._handle = None
        self._thread: int | None = None

    @torch.no_grad()
    def measure(self, model: nn.Module, images: Tensor) -> Tensor | None:
        """The scores of ``images`` alone, as the model would see them unadapted: the stem only (its first norm
        layer's input) where the model has one, else a whole forward pass. Used when the forward pass that
        predicts sees other inputs (per-image standardisation), so the score still measures the raw slices."""
        with self:
            stem = getattr(model, "stem", None)
            if stem is not None:
                stem(images, None)
            else:
                model(images)
        return self.scores

    def __enter__(self) -> FirstNormShift:
        if self.norm is not None:
            self._thread = threading.get_ident()
            self._handle = self.norm.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _slots(self) -> list:
        if isinstance(self.norm, BatchNorm):
            return [self.norm.slot]
        return list(self.norm.sites)[: self.num_known]

    @torch.no_grad()
    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        x = args[0].float()
        if x.dim() != 4 or threading.get_ident() != self._thread:
            return
        m = x.mean(dim=(2, 3))  # (B, C)
        v = x.var(dim=(2, 3), unbiased=False).clamp_min(1e-8)
        distances = []
        for slot in self._slots():
            var = slot.running_var.float().clamp_min(1e-8)
            shift = ((m - slot.running_mean.float()) ** 2 / var).mean(dim=1).sqrt()
            spread = (torch.log(v / var) ** 2).mean(dim=1).sqrt()
            distances.append(shift + spread)
        self.scores = torch.stack(distances).min(dim=0).values.cpu()
