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

import itertools
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosssite.errors import ConfigError

__all__ = [
    "NORMS",
    "SiteModule",
    "BatchNorm",
    "SiteBatchNorm",
    "NoNorm",
    "NormLayer",
    "get_norm_layer",
    "norm_state_keys",
    "per_site",
    "adapt_norm",
]

NORMS = ("batch", "site", "none")

NormLayer = Callable[[int], nn.Module]


def per_site(x: Tensor, site: Tensor, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Apply ``fn(x_s, s)`` to the samples ``x_s`` of each site ``s`` present and reassemble the batch.

    A batch holding one site costs nothing extra; a batch whose sites come in contiguous runs (what the
    multi-site sampler yields) is split into views; any other order is sorted once and restored once.
    """
    sites, counts = torch.unique_consecutive(site, return_counts=True)
    if sites.numel() == 1:
        return fn(x, int(sites[0]))
    if torch.unique(sites).numel() == sites.numel():  # every site forms a single contiguous run
        chunks = x.split(counts.tolist())
        return torch.cat([fn(chunk, s) for chunk, s in zip(chunks, sites.tolist())])
    order = torch.argsort(site, stable=True)
    out = per_site(x.index_select(0, order), site.index_select(0, order), fn)
    return out.index_select(0, torch.argsort(order))


class SiteModule(nn.Module):
    """A module holding one slot of parameters per site; `adapt_norm` grows every such module by a slot."""

    num_sites: int

    def add_site(self) -> None:
        """Append a slot for a new site, initialised from the existing slots."""
        raise NotImplementedError


class _NormSlot(nn.Module):
    """Statistics and affine parameters of one batch-norm copy (what `torch.nn.BatchNorm2d` holds)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    # Optional hook ``sync_stats(slot, x, momentum, eps) -> Tensor`` that replaces training-mode normalisation,
    # set while a data-parallel runner synchronises batch statistics across processes
    # (crosssite.training.distributed); None normalises with this process's batch alone.
    sync_stats: Callable[..., Tensor] | None = None

    def normalise(self, x: Tensor, *, training: bool, momentum: float | None, eps: float) -> Tensor:
        """Batch-normalise ``x`` (B, C, ...) with this slot, updating its running statistics in training."""
        if training and self.sync_stats is not None:
            return self.sync_stats(self, x, momentum, eps)
        if training and x.numel() > x.shape[1]:  # more than one value per channel
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if momentum is None else momentum
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, factor, eps)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, eps)


class BatchNorm(nn.Module):
    """Batch norm shared by every site; ``site`` is accepted and ignored. Input (B, C) or (B, C, H, W)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.slot = _NormSlot(num_features)

    def forward(self, x: Tensor, site: Tensor | None = None) -> Tensor:
        return self.slot.normalise(x, training=self.training, momentum=self.momentum, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class SiteBatchNorm(SiteModule):
    """One batch-norm copy per site in a single module. Input (B, C) or (B, C, H, W), ``site`` (B,).

    Slot ``s`` (``self.sites[s]``) holds site ``s``'s weight, bias and running statistics as separate
    tensors, so the copies of sites absent from a batch receive no gradient at all.
    """

    def __init__(self, num_features: int, num_sites: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        if num_sites < 1:
            raise ConfigError(f"num_sites must be >= 1, got {num_sites}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.sites = nn.ModuleList(_NormSlot(num_features) for _ in range(num_sites))

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def forward(self, x: Tensor, site: Tensor | None) -> Tensor:
        if site is None:
            if self.num_sites == 1:
                return self._normalise(x, 0)
            if self.training:
                raise ValueError("SiteBatchNorm in training mode needs the site of every sample (site=None given)")
            return self._normalise_mean(x)
        return per_site(x, site, self._normalise)

    def _normalise(self, x: Tensor, s: int) -> Tensor:
        return self.sites[s].normalise(x, training=self.training, momentum=self.momentum, eps=self.eps)

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
        slot = _NormSlot(self.num_features).to(self.sites[0].weight)
        slot.weight.copy_(torch.stack([s.weight for s in self.sites]).mean(0))
        slot.bias.copy_(torch.stack([s.bias for s in self.sites]).mean(0))
        self.sites.append(slot)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_sites={self.num_sites}, eps={self.eps}, momentum={self.momentum}"


class NoNorm(nn.Module):
    """The identity, with the norm-layer call signature ``(x, site)``."""

    def __init__(self, num_features: int) -> None:
        super().__init__()

    def forward(self, x: Tensor, site: Tensor | None = None) -> Tensor:
        return x


def get_norm_layer(norm: str, num_sites: int) -> NormLayer:
    """Factory ``num_features -> module`` for ``norm`` in `NORMS`: shared BN, one BN per site, or none."""
    if norm == "batch":
        return BatchNorm
    if norm == "site":
        return partial(SiteBatchNorm, num_sites=num_sites)
    if norm == "none":
        return NoNorm
    raise ConfigError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")


def norm_state_keys(model: nn.Module) -> list[str]:
    """The ``state_dict`` keys of every batch-norm copy in ``model`` (weight, bias and running statistics), in
    state-dict order: what a federated client keeps to itself under FedBN."""
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, _NormSlot))
    return [key for key in model.state_dict() if key.startswith(prefixes)]


def _image_batches(images: Tensor | Iterable, batch_size: int) -> Iterable[Tensor]:
    """Image tensors (B, 3, H, W) from a tensor (N, 3, H, W) or an iterable of tensors / batch dicts."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    for item in images:
        yield item["image"] if isinstance(item, dict) else item


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
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.train()
        m.momentum = None
    device = next(model.parameters()).device
    try:
        for batch in itertools.chain([first], batches):
            batch = batch.to(device)
            model(batch, torch.full((batch.shape[0],), new_site, dtype=torch.long, device=device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return new_site
