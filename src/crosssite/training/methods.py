"""The methods of the paper's Table I, and any other, as entries of one registry read by the whole package.

A `Method` says how the model is built (its norm, adapters, heads: `create_model` keyword arguments), which loss
terms are added to the universal head's cross-entropy and with which weights (`LossTerm`), whether it trains one
model per site, and whether it can run federated. The training loop (`crosssite.training.engine`), the experiment
grid (`crosssite.experiment`), the report (`crosssite.reporting`) and the federated runner read this registry;
the paper's numbers are optional annotations keyed by (method, backbone) (`PAPER_TABLE_I`).

Adding a method is one `register_method(Method(...))` call (and, for a new objective, one `LossTerm`), e.g.::

    smooth = LossTerm("smooth", lambda out, labels, config, gather: {"smooth": -out.logits.log_softmax(1).mean()},
                      lambda config: {"smooth": 0.1})
    register_method(Method("joint-smooth", "joint + label smoothing", norm="batch", terms=(smooth,)))

after which ``crosssite train --method joint-smooth`` and ``crosssite experiment --methods joint-smooth`` run it
and the report shows it as a row of its own (tests/test_methods.py does exactly this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from crosssite.losses import ms_net_loss, supervised_contrastive_loss
from crosssite.models import ModelOutput, model_config

__all__ = [
    "Gather",
    "LossTerm",
    "Method",
    "PaperResult",
    "METHODS",
    "PAPER_TABLE_I",
    "register_method",
    "paper_result",
    "method_recipe",
    "federated_methods",
    "model_kwargs",
    "compute_loss",
    "CONTRASTIVE",
    "KNOWLEDGE_TRANSFER",
]

Gather = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LossTerm:
    """A term of the training objective: ``fn(out, labels, config, gather) -> {part: loss}`` (unweighted, float32),
    each part weighted by ``weights(config)[part]``. ``gather`` maps a rank's tensor to the global batch's in
    data-parallel training (the identity in one process)."""

    name: str
    fn: Callable[[ModelOutput, Tensor, Any, Gather], dict[str, Tensor]]
    weights: Callable[[Any], dict[str, float]]


def _contrastive(out: ModelOutput, labels: Tensor, config: Any, gather: Gather) -> dict[str, Tensor]:
    return {"con": supervised_contrastive_loss(gather(out.projection), gather(labels), config.tau,
                                               config.contrastive_form)}


def _knowledge_transfer(out: ModelOutput, labels: Tensor, config: Any, gather: Gather) -> dict[str, Tensor]:
    return ms_net_loss(out.logits, out.aux_logits, labels, config.kt_temperature)


CONTRASTIVE = LossTerm("contrastive", _contrastive, lambda c: {"con": c.alpha})
KNOWLEDGE_TRANSFER = LossTerm("knowledge_transfer", _knowledge_transfer, lambda c: {"aux_ce": 1.0, "kt": c.kt_weight})


@dataclass(frozen=True)
class Method:
    """One training method: model options, loss terms beyond cross-entropy, and how it is run."""

    name: str
    description: str
    norm: str = "site"  # "batch" (shared BN), "site" (one BN copy per site)
    adapter: str | None = None  # None, "series", "parallel"
    aux_heads: bool = False  # MS-Net's site-specific auxiliary heads
    projection: bool = False  # projection head (for a contrastive term)
    terms: tuple[LossTerm, ...] = ()  # added to the universal head's cross-entropy
    per_site: bool = False  # one separate model per site
    federated: bool = False  # can run as one Flower client per site (crosssite.federated)
    # configuration the method trains with (over a preset, under every value the caller gives:
    # `crosssite.training.config.with_recipe`): e.g. label smoothing or a weight average; ((key, value), ...) so
    # the method stays hashable
    recipe: tuple[tuple[str, Any], ...] = ()
    label: str = ""  # its row's name in reports (default: the name); the paper's rows use the paper's labels

    @property
    def contrastive(self) -> bool:
        return CONTRASTIVE in self.terms

    @property
    def knowledge_transfer(self) -> bool:
        return KNOWLEDGE_TRANSFER in self.terms


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to `METHODS` (a name registered twice is an error)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


for _method in (
    Method("single", "one model per site, trained and evaluated on that site alone", norm="batch", per_site=True),
    Method("joint", "one model, sites pooled, shared BN", norm="batch", federated=True),
    Method("sepnorm", "one model, site-specific BN (DSBN)", federated=True),
    Method("sepnorm-contrastive", "site-specific BN + supervised cross-site contrastive loss (the paper's method)",
           projection=True, terms=(CONTRASTIVE,), federated=True),
    Method("series-adapter", "site-specific BN + site-specific 1x1 adapters in series", adapter="series"),
    Method("parallel-adapter", "site-specific BN + site-specific 1x1 adapters in parallel", adapter="parallel"),
    Method("ms-net", "site-specific BN + auxiliary heads per site with online knowledge transfer", aux_heads=True,
           terms=(KNOWLEDGE_TRANSFER,)),
    # crosssite's recipe: the paper's method without the batch-norm recalibration before each validation (the
    # paper has none; the cpu preset adds it), every validation, test and later prediction averaged over the slice
    # and its left-right mirror: the two levers that gained on the validation parts under the same budget (the
    # evidence: docs/RESULTS.md, "Looking for crosssite's own recipe")
    Method("crosssite", "the paper's method (site-specific BN + contrastive loss) without BN recalibration, each "
           "prediction averaged with the slice's mirror", projection=True, terms=(CONTRASTIVE,),
           recipe=(("bn_recalibrate", False), ("tta", "flip")),
           label="crosssite: SepNorm + Contrastive, no recalibration, flip TTA"),
):
    register_method(_method)


@dataclass(frozen=True)
class PaperResult:
    """A row of the paper's Table I: its label, AUC in % on site A and B, and Tables II/III's p-values."""

    label: str
    auc: tuple[float, float]
    p: tuple[float, float] | None = None


# The paper's Table I in its order, keyed by (method, backbone); the paper's site A is `sars_cov2_ct`, B `covid_ct`.
PAPER_TABLE_I: dict[tuple[str, str], PaperResult] = {
    ("single", "covidnet"): PaperResult("Single (COVID-Net)", (84.08, 71.09)),
    ("single", "covidnet_redesign"): PaperResult("Single (Redesign)", (94.12, 84.13), (0.002, 0.004)),
    ("joint", "covidnet"): PaperResult("Joint (COVID-Net)", (74.78, 68.12)),
    ("joint", "covidnet_redesign"): PaperResult("Joint (Redesign)", (85.72, 72.48), (0.007, 0.005)),
    ("series-adapter", "covidnet_redesign"): PaperResult("Series Adapter", (92.93, 73.92), (0.009, 1e-5)),
    ("parallel-adapter", "covidnet_redesign"): PaperResult("Parallel Adapter", (89.99, 80.29), (0.012, 0.014)),
    ("ms-net", "covidnet_redesign"): PaperResult("MS-Net", (94.37, 82.19), (0.021, 0.008)),
    ("sepnorm", "covidnet_redesign"): PaperResult("SepNorm", (94.57, 83.94), (0.023, 0.009)),
    ("sepnorm-contrastive", "covidnet_redesign"): PaperResult("SepNorm + Contrastive", (96.24, 85.32)),
}


def method_recipe(method: str) -> dict[str, Any]:
    """The configuration values ``method`` trains with where the caller gives none (`Method.recipe`; empty for the
    paper's rows; applied by `crosssite.training.config.with_recipe`)."""
    return dict(METHODS[method].recipe) if method in METHODS else {}


def federated_methods() -> list[str]:
    """The registered methods that declare ``federated=True``. One site per client: a site-specific norm has one
    copy there, so `sepnorm` and `joint` build the same network; `sepnorm-contrastive` adds the projection head and
    the contrastive term on the client's own batch."""
    return [name for name, method in METHODS.items() if method.federated]


def paper_result(method: str, backbone: str) -> PaperResult | None:
    """The paper's numbers for (method, backbone), or None for a row the paper does not have."""
    return PAPER_TABLE_I.get((method, backbone))


# A request at its "off" value asks nothing of a backbone: one without that option builds without it. Any other
# request a backbone does not declare is refused by `create_model` (`crosssite.models.UnsupportedOption`).
_OFF: dict[str, Any] = {"block_act": "none", "mixstyle": 0.0, "standardise_input": False, "adapter": None,
                        "aux_heads": False, "projection": False}


def model_kwargs(
    method: Method, backbone: str, *, num_sites: int, width: float, block_act: str, init: str = "auto",
    mixstyle: float = 0.0, standardise_input: bool = False, image_size: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `crosssite.models.create_model` for ``method`` on ``backbone``: the options the
    backbone declares (`crosssite.models.ModelConfig.options`), and any other request that is not at its off value
    (which `create_model` then refuses by name). ``init="auto"``: the backbone's own initialisation; a backbone
    without norms gets ``norm="none"``."""
    config = model_config(backbone)
    wanted: dict[str, Any] = {
        "num_classes": 2,
        "width": width,
        "block_act": block_act,
        "norm": method.norm if config.has_norm else "none",
        "adapter": method.adapter,
        "aux_heads": method.aux_heads,
        "projection": method.projection,
    }
    if init != "auto":
        wanted["init"] = init
    if mixstyle:
        wanted["mixstyle"] = mixstyle
    if standardise_input:
        wanted["standardise_input"] = True
    if image_size is not None:
        wanted["image_size"] = image_size
    missing = object()
    return {"num_sites": num_sites} | {
        key: value for key, value in wanted.items() if key in config.options or _OFF.get(key, missing) != value
    }


def compute_loss(
    out: ModelOutput, labels: Tensor, method: Method, config: Any, gather: Gather | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and its unweighted parts: ``ce`` plus every part of the method's terms, all in float32.

    total = ce + sum over the method's terms and parts of weight * part
    """
    gather = gather or (lambda x: x)
    parts = {"ce": F.cross_entropy(out.logits.float(), labels, label_smoothing=config.label_smoothing)}
    weights = {"ce": 1.0}
    for term in method.terms:
        parts.update(term.fn(out, labels, config, gather))
        weights.update(term.weights(config))
    total = sum(weights[name] * value for name, value in parts.items())
    return total, parts
