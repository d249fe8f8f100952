"""Site-specific residual adapters around a convolution of a block (COVID-Net's depthwise 3x3, ResNet's second
3x3), and their registry (`register_adapter`, `get_adapter_layer`).

* Series adapter: Rebuffi, Bilen, Vedaldi, "Learning multiple visual domains with residual adapters",
  NeurIPS 2017 -- a site-specific 1x1 convolution after the shared 3x3, residual: ``y + W_s y``.
* Parallel adapter: Rebuffi, Bilen, Vedaldi, "Efficient parametrization of multi-domain deep neural
  networks", CVPR 2018 -- a site-specific 1x1 convolution beside the shared 3x3: ``dw(x) + W_s x``.

Both adapters are bias-free 1x1 convolutions whose weights start at zero, so a freshly built adapted
network computes exactly what the shared network computes and each site then learns its own correction.
Every adapter has the signature ``adapter(x, y, site)`` with ``x`` the input and ``y`` the output of the
wrapped convolution (same channels), so the block calls it without knowing which kind (if any) it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crosssite.errors import ConfigError
from crosssite.models.norms import SiteModule, Sites, per_site

__all__ = ["ADAPTERS", "ADAPTER_FACTORIES", "SiteConv1x1", "SeriesAdapter", "ParallelAdapter", "NoAdapter",
           "register_adapter", "get_adapter_layer"]

AdapterLayer = Callable[[int], nn.Module]


class SiteConv1x1(SiteModule):
    """A bias-free 1x1 convolution with one zero-initialised weight per site. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, num_sites: int) -> None:
        super().__init__()
        self.channels = channels
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(channels, channels, 1, 1)) for _ in range(num_sites))

    @property
    def num_sites(self) -> int:
        return len(self.weights)

    def forward(self, x: Tensor, site: Sites) -> Tensor:
        if site is None:  # an unknown site: the mean adapter (the mean of the per-site outputs)
            return F.conv2d(x, torch.stack(list(self.weights)).mean(0))
        return per_site(x, site, lambda xs, s: F.conv2d(xs, self.weights[s]))

    @torch.no_grad()
    def add_site(self) -> None:
        """Append a slot holding the mean of the known sites' weights."""
        self.weights.append(nn.Parameter(torch.stack(list(self.weights)).mean(0)))

    def extra_repr(self) -> str:
        return f"{self.channels}, num_sites={self.num_sites}"


class SeriesAdapter(nn.Module):
    """``y + W_s y``: a site-specific 1x1 convolution in series after the depthwise conv, residual."""

    def __init__(self, channels: int, num_sites: int) -> None:
        super().__init__()
        self.conv = SiteConv1x1(channels, num_sites)

    def forward(self, x: Tensor, y: Tensor, site: Sites) -> Tensor:
        return y + self.conv(y, site)


class ParallelAdapter(nn.Module):
    """``y + W_s x``: a site-specific 1x1 convolution in parallel with the depthwise conv."""

    def __init__(self, channels: int, num_sites: int) -> None:
        super().__init__()
        self.conv = SiteConv1x1(channels, num_sites)

    def forward(self, x: Tensor, y: Tensor, site: Sites) -> Tensor:
        return y + self.conv(x, site)


class NoAdapter(nn.Module):
    """No adapter: returns the depthwise conv's output ``y`` unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: Tensor, y: Tensor, site: Sites) -> Tensor:
        return y


# name -> factory ``num_sites -> AdapterLayer`` (None: no adapter), filled by `register_adapter`
ADAPTER_FACTORIES: dict[str | None, Callable[[int], AdapterLayer]] = {}


def register_adapter(name: str | None) -> Callable[[Callable[[int], AdapterLayer]], Callable[[int], AdapterLayer]]:
    """Register ``factory(num_sites) -> AdapterLayer`` under ``name``, as a decorator (a name registered twice is an
    error); `get_adapter_layer` and a method's ``adapter`` then accept ``name``."""

    def add(factory: Callable[[int], AdapterLayer]) -> Callable[[int], AdapterLayer]:
        if name in ADAPTER_FACTORIES:
            raise ValueError(f"adapter {name!r} is registered twice")
        ADAPTER_FACTORIES[name] = factory
        return factory

    return add


@register_adapter(None)
def _none(num_sites: int) -> AdapterLayer:
    return NoAdapter


@register_adapter("series")
def _series(num_sites: int) -> AdapterLayer:
    return partial(SeriesAdapter, num_sites=num_sites)


@register_adapter("parallel")
def _parallel(num_sites: int) -> AdapterLayer:
    return partial(ParallelAdapter, num_sites=num_sites)


ADAPTERS = tuple(ADAPTER_FACTORIES)


def get_adapter_layer(adapter: str | None, num_sites: int) -> AdapterLayer:
    """Factory ``channels -> module`` for the registered adapter ``adapter`` (`ADAPTER_FACTORIES`)."""
    if adapter not in ADAPTER_FACTORIES:
        raise ConfigError(f"unknown adapter {adapter!r}; expected one of {', '.join(map(repr, ADAPTER_FACTORIES))}")
    return ADAPTER_FACTORIES[adapter](num_sites)
