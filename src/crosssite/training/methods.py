"""The paper's methods (Table I) as small configurations of one training loop.

A method says how the model is built (`create_model` keyword arguments) and which loss terms are added to the
universal head's cross-entropy. To add a method, add one `Method` row to `METHODS`; if it needs a new loss term,
add the term to `crosssite.losses` and a flag here, and one branch in `crosssite.training.engine.compute_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Method", "METHODS", "model_kwargs"]

# Backbones without any normalisation layer: the `norm` of a method does not apply to them.
_BACKBONES_WITHOUT_NORM = ("covidnet",)


@dataclass(frozen=True)
class Method:
    """One row of Table I: model options plus the loss terms the loop adds to cross-entropy."""

    name: str
    description: str
    norm: str = "site"  # "batch" (shared BN), "site" (one BN copy per site)
    adapter: str | None = None  # None, "series", "parallel"
    aux_heads: bool = False  # MS-Net's site-specific auxiliary heads
    projection: bool = False  # projection head for the contrastive loss
    contrastive: bool = False  # + alpha * supervised cross-site contrastive loss
    knowledge_transfer: bool = False  # + aux CE + kt_weight * KL(aux || universal) (MS-Net)
    per_site: bool = False  # one separate model per site


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("single", "one model per site, trained and evaluated on that site alone", norm="batch", per_site=True),
        Method("joint", "one model, sites pooled, shared BN", norm="batch"),
        Method("sepnorm", "one model, site-specific BN (DSBN)"),
        Method(
            "sepnorm-contrastive",
            "site-specific BN + supervised cross-site contrastive loss (the paper's method)",
            projection=True,
            contrastive=True,
        ),
        Method("series-adapter", "site-specific BN + site-specific 1x1 adapters in series", adapter="series"),
        Method("parallel-adapter", "site-specific BN + site-specific 1x1 adapters in parallel", adapter="parallel"),
        Method(
            "ms-net",
            "site-specific BN + auxiliary heads per site with online knowledge transfer",
            aux_heads=True,
            knowledge_transfer=True,
        ),
    )
}


def model_kwargs(
    method: Method, backbone: str, *, num_sites: int, width: float, block_act: str, init: str = "auto"
) -> dict[str, Any]:
    """Keyword arguments of `crosssite.models.create_model` for ``method`` on ``backbone`` (``init="auto"``: the
    backbone's own initialisation)."""
    kwargs: dict[str, Any] = {} if init == "auto" else {"init": init}
    return kwargs | {
        "num_sites": num_sites,
        "num_classes": 2,
        "width": width,
        "block_act": block_act,
        "norm": "none" if backbone in _BACKBONES_WITHOUT_NORM else method.norm,
        "adapter": method.adapter,
        "aux_heads": method.aux_heads,
        "projection": method.projection,
    }
