"""Normalisation layers that know which site each sample comes from.

A site is an integer index carried in a LongTensor ``site`` of shape (B,) from the sampler down to these
modules. Every norm module here is called as ``norm(x, site)`` so that a network can be written once and
receive shared batch norm, site-specific batch norm or no norm from a factory, in the manner of
torchvision's ``norm_layer`` argument (see `get_norm_layer`).

* `SiteBatchNorm` is domain-specific batch normalisation (DSBN; Chang et al., CVPR 2019, used as
  "SepNorm" by Wang, Liu, Dou, JBHI 2020): one set of statistics and affine parameters per site, shared
  by nothing else. A batch mixing sites passes through in one call: the samples of each site present are
  normalised with that site's batch statistics (training) or running statistics (evaluation), which is
  exactly what running each site's sub-batch through its own `torch.nn.BatchNorm2d` would give, running
  statistics updates included (PyTorch momentum semantics, unbiased running variance). It works on
  (B, C) and (B, C, H, W) inputs alike, so it serves as both the BN1d of the heads and the BN2d of the
  trunk.
* ``site=None`` at evaluation time means "an unknown site": it is normalised with the mean of every site
  slot's running mean, running variance, weight and bias.
* `adapt_norm` implements AdaBN (Li, Wang, Shi, Liu, Hou, "Revisiting Batch Normalization For Practical
  Domain Adaptation", 2016) for an unseen site: it appends one slot to every site-specific module and
  re-estimates the new slot's statistics from that site's images.

One defined corner case: a training-mode group with a single value per channel (one sample of a site in a
(B, C) input, e.g. the BN1d of a head) has no batch variance. Such a group is normalised with its slot's
running statistics and does not update them; it is never dropped and never raises.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosssite.errors import ConfigError

__all__ = [
    "NORMS",
    "standardise_images",
    "SiteLayout",
    "Sites",
    "SiteModule",
    "SlotBatchNorm",
    "BatchNorm",
    "SiteBatchNorm",
    "NoNorm",
    "NormLayer",
    "NORM_FACTORIES",
    "register_norm",
    "get_norm_layer",
    "cumulative_statistics",
    "norm_state_keys",
    "per_site",
    "adapt_norm",
]

NORMS = ("batch", "site", "none")

NormLayer = Callable[[int], nn.Module]


class SiteLayout(NamedTuple):
    """The sites of a batch whose samples come in contiguous runs, as Python ints: ``runs = ((site, count), ...)``.

    What the multi-site sampler yields (16 of site 0, then 16 of site 1, ...) is known before the batch exists, so
    the training step passes it down instead of the (B,) site tensor: every site-specific module then splits its
    input by these counts without reading the tensor back (no ``unique``, no host sync, no data-dependent shape),
    which keeps the step one static graph for `torch.compile`.
    """

    runs: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, site: Tensor) -> SiteLayout:
        """The layout of a (B,) site tensor whose sites come in contiguous runs (one read of the tensor)."""
        sites, counts = torch.unique_consecutive(site, return_counts=True)
        if torch.unique(sites).numel() != sites.numel():
            raise ValueError(f"sites do not come in contiguous runs: {site.tolist()}")
        return cls(tuple(zip(sites.tolist(), counts.tolist())))

    @property
    def batch_size(self) -> int:
        return sum(count for _, count in self.runs)

    def tensor(self, device: torch.device | str | None = None) -> Tensor:
        """The (B,) LongTensor of site indices."""
        return torch.cat([torch.full((n,), s, dtype=torch.long, device=device) for s, n in self.runs])


# The site of every sample: a (B,) LongTensor, a `SiteLayout`, or None (a single-site model, or an unknown site).
Sites = Tensor | SiteLayout | None


def per_site(x: Tensor, site: Tensor | SiteLayout, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Apply ``fn(x_s, s)`` to the samples ``x_s`` of each site ``s`` present and reassemble the batch.

    A `SiteLayout` splits by its counts; a tensor with one site costs nothing extra; a tensor whose sites come in
    contiguous runs (what the multi-site sampler yields) is split into views; any other order is sorted once and
    restored once.
    """
    if not isinstance(site, SiteLayout):
        sites, counts = torch.unique_consecutive(site, return_counts=True)
        if torch.unique(sites).numel() != sites.numel():  # a site in several runs: sort once, restore once
            order = torch.argsort(site, stable=True)
            out = per_site(x.index_select(0, order), site.index_select(0, order), fn)
            return out.index_select(0, torch.argsort(order))
        site = SiteLayout(tuple(zip(sites.tolist(), counts.tolist())))
    if len(site.runs) == 1:
        return fn(x, site.runs[0][0])
    chunks = x.split([n for _, n in site.runs])
    return torch.cat([fn(chunk, s) for chunk, (s, _) in zip(chunks, site.runs)])


class SiteModule(nn.Module):
    """A module holding one slot of parameters per site; `adapt_norm` grows every such module by a slot."""

    num_sites: int

    def add_site(self) -> None:
        """Append a slot for a new site, initialised from the existing slots."""
        raise NotImplementedError


class SlotBatchNorm(nn.modules.batchnorm._BatchNorm):
    """One batch-norm copy: PyTorch's batch norm (statistics, momentum, affine parameters, `reset_running_stats`,
    `torch.nn.SyncBatchNorm.convert_sync_batchnorm`) for (B, C) and (B, C, H, W) inputs alike.

    A training batch with a single value per channel (one sample in a (B, C) input) has no batch variance: it is
    normalised with the running statistics and does not update them, instead of raising as PyTorch does.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected a (B, C), (B, C, L) or (B, C, H, W) input, got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        if self.training and input.numel() == input.shape[1]:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        return super().forward(input)


class _SlotMomentum:
    """``momentum`` of a norm module: read from its first slot, written to every slot."""

    def __get__(self, module: nn.Module, owner: type | None = None) -> float | None:
        return next(module.slots()).momentum

    def __set__(self, module: nn.Module, value: float | None) -> None:
        for slot in module.slots():
            slot.momentum = value


class BatchNorm(nn.Module):
    """Batch norm shared by every site; ``site`` is accepted and ignored. Input (B, C) or (B, C, H, W)."""

    momentum = _SlotMomentum()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.slot = SlotBatchNorm(num_features, eps=eps, momentum=momentum)

    def slots(self) -> Iterator[SlotBatchNorm]:
        yield self.slot

    def forward(self, x: Tensor, site: Sites = None) -> Tensor:
        return self.slot(x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class SiteBatchNorm(SiteModule):
    """One batch-norm copy per site in a single module. Input (B, C) or (B, C, H, W), ``site`` (B,).

    Slot ``s`` (``self.sites[s]``, a `SlotBatchNorm`) holds site ``s``'s weight, bias and running statistics as
    separate tensors, so the copies of sites absent from a batch receive no gradient at all.
    """

    momentum = _SlotMomentum()

    def __init__(self, num_features: int, num_sites: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        if num_sites < 1:
            raise ConfigError(f"num_sites must be >= 1, got {num_sites}")
        self.num_features = num_features
        self.eps = eps
        self.sites = nn.ModuleList(SlotBatchNorm(num_features, eps=eps, momentum=momentum) for _ in range(num_sites))

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def slots(self) -> Iterator[SlotBatchNorm]:
        yield from self.sites

    def forward(self, x: Tensor, site: Sites = None) -> Tensor:
        if site is None:
            if self.num_sites == 1:
                return self.sites[0](x)
            if self.training:
                raise ValueError("SiteBatchNorm in training mode needs the site of every sample (site=None given)")
            return self._normalise_mean(x)
        return per_site(x, site, lambda xs, s: self.sites[s](xs))

    def _normalise_mean(self, x: Tensor) -> Tensor:
        """Evaluation with the mean of every slot's statistics and affine parameters (an unknown site)."""
        mean, var, weight, bias = (
            torch.stack([getattr(slot, name) for slot in self.sites]).mean(0)
            for name in ("running_mean", "running_var", "weight", "bias")
        )
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)

    @torch.no_grad()
    def add_site(self) -> None:
        """Append a slot: affine parameters = mean of the existing slots', statistics reset (mean 0, var 1)."""
        slot = SlotBatchNorm(self.num_features, eps=self.eps, momentum=self.momentum).to(self.sites[0].weight)
        slot.weight.copy_(torch.stack([s.weight for s in self.sites]).mean(0))
        slot.bias.copy_(torch.stack([s.bias for s in self.sites]).mean(0))
        self.sites.append(slot)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_sites={self.num_sites}, eps={self.eps}, momentum={self.momentum}"


class NoNorm(nn.Module):
    """The identity, with the norm-layer call signature ``(x, site)``."""

    def __init__(self, num_features: int) -> None:
        super().__init__()

    def forward(self, x: Tensor, site: Sites = None) -> Tensor:
        return x


# name -> factory ``num_sites -> NormLayer``, filled by `register_norm` (MONAI's factory style)
NORM_FACTORIES: dict[str, Callable[[int], NormLayer]] = {}


def register_norm(name: str) -> Callable[[Callable[[int], NormLayer]], Callable[[int], NormLayer]]:
    """Register ``factory(num_sites) -> NormLayer`` under ``name``, as a decorator (a name registered twice is an
    error); `get_norm_layer` and a method's ``norm`` then accept ``name``."""

    def add(factory: Callable[[int], NormLayer]) -> Callable[[int], NormLayer]:
        if name in NORM_FACTORIES:
            raise ValueError(f"norm {name!r} is registered twice")
        NORM_FACTORIES[name] = factory
        return factory

    return add


@register_norm("batch")
def _batch(num_sites: int) -> NormLayer:
    return BatchNorm  # shared by every site


@register_norm("site")
def _site(num_sites: int) -> NormLayer:
    return partial(SiteBatchNorm, num_sites=num_sites)  # one copy per site (DSBN / SepNorm)


@register_norm("none")
def _none(num_sites: int) -> NormLayer:
    return NoNorm


NORMS = tuple(NORM_FACTORIES)


def get_norm_layer(norm: str, num_sites: int) -> NormLayer:
    """Factory ``num_features -> module`` for the registered norm ``norm`` (`NORM_FACTORIES`: shared BN, one BN
    per site, or none)."""
    if norm not in NORM_FACTORIES:
        raise ConfigError(f"unknown norm {norm!r}; expected one of {', '.join(NORM_FACTORIES)}")
    return NORM_FACTORIES[norm](num_sites)


def norm_state_keys(model: nn.Module) -> list[str]:
    """The ``state_dict`` keys of every batch-norm copy in ``model`` (weight, bias and running statistics), in
    state-dict order: what a federated client keeps to itself under FedBN."""
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return [key for key in model.state_dict() if key.startswith(prefixes)]


def _image_batches(images: Tensor | Iterable, batch_size: int) -> Iterable[Tensor]:
    """Image tensors (B, 3, H, W) from a tensor (N, 3, H, W) or an iterable of tensors / batch dicts."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    for item in images:
        yield item["image"] if isinstance(item, dict) else item


@contextlib.contextmanager
def cumulative_statistics(model: nn.Module, norms: Iterable[nn.Module], *, reset: bool = False) -> Iterator[None]:
    """Within the body, ``norms`` (batch-norm modules of ``model``) are in training mode with ``momentum=None``,
    so each forward adds its batch to a plain cumulative average of the running statistics (``reset``: started
    from scratch), and every other layer is in evaluation mode; modes and momenta are restored afterwards. The
    one estimator behind BN recalibration (`crosssite.training.validation.recalibrate_bn`) and AdaBN."""
    norms = list(norms)
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for m in norms:
        if reset:
            for slot in m.modules():
                if isinstance(slot, nn.modules.batchnorm._BatchNorm):
                    slot.reset_running_stats()
        m.train()
        m.momentum = None
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


@torch.no_grad()
def adapt_norm(model: nn.Module, images: Tensor | Iterable, *, batch_size: int = 32) -> int:
    """Add an unseen site to ``model`` with AdaBN and return its new site index.

    Every `SiteModule` gains one slot (site-specific BN: affine parameters = mean of the known sites',
    adapters and auxiliary heads: mean of the known sites' weights). The new BN slots' running statistics
    are then re-estimated from ``images`` -- a tensor (N, 3, H, W), or an iterable of image tensors or of
    batch dicts with an ``"image"`` key -- as the cumulative average of the per-batch statistics
    (``momentum=None``), with every other layer in evaluation mode. The model keeps its training mode.
    """
    norms = [m for m in model.modules() if isinstance(m, SiteBatchNorm)]
    if not norms:
        raise ConfigError("adapt_norm needs a model with site-specific norms (create it with norm='site')")
    batches = iter(_image_batches(images, batch_size))
    first = next(batches, None)
    if first is None:
        raise ValueError("adapt_norm was given no images")
    for module in model.modules():
        if isinstance(module, SiteModule):
            module.add_site()
    new_site = norms[0].num_sites - 1
    if hasattr(model, "num_sites"):
        model.num_sites = new_site + 1
    device = next(model.parameters()).device
    with cumulative_statistics(model, norms):
        for batch in itertools.chain([first], batches):
            batch = batch.to(device)
            model(batch, torch.full((batch.shape[0],), new_site, dtype=torch.long, device=device))
    return new_site


def standardise_images(images: Tensor, eps: float = 1e-6) -> Tensor:
    """(B, C, H, W) -> each image and channel shifted and scaled to mean 0, standard deviation 1 (over its pixels):
    what a scanner's window, level and contrast change is undone, whichever site the image comes from."""
    mean = images.mean(dim=(2, 3), keepdim=True)
    std = images.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (images - mean) / std.clamp_min(eps)
