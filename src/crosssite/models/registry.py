"""Model registry: ``@register_model`` constructors looked up by name, each with a `ModelConfig`, as in timm.

`create_model` records the architecture name on the model (``model.arch``), and the model records its
resolved keyword arguments (``model.model_kwargs``, everything but ``num_sites``), so that
`crosssite.models.hub.save` can write them into the model card and `crosssite.models.hub.load` can
rebuild the same network. `model_config` answers what the rest of the package needs to know about an
architecture without building it (input size, fallback normalisation, classifier, norms, schedule, init, and
the options it takes). An option a backbone does not declare is refused (`UnsupportedOption`), never dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from crosssite.errors import ConfigError

__all__ = ["BASE_OPTIONS", "ModelConfig", "UnsupportedOption", "register_model", "create_model", "list_models",
           "is_model", "model_config"]

# What every backbone built on `crosssite.models.heads.SiteClassifier` takes: what the methods of the registry ask,
# and the input side (a backbone checks it fits its downsampling, or sizes a layer by it)
BASE_OPTIONS = frozenset({"num_classes", "width", "norm", "adapter", "aux_heads", "projection", "image_size"})


class UnsupportedOption(ConfigError):
    """An option given to a backbone that does not declare it in its `ModelConfig.options`."""


@dataclass(frozen=True)
class ModelConfig:
    """What an architecture needs from the data and the training loop.

    Attributes:
        input_size: the paper's input side (3 x input_size x input_size).
        mean, std: per-channel normalisation used when a model card carries none (a trained model's card holds
            its own training part's values).
        classifier: attribute path of the module `get_classifier` returns (its last layer is ``<classifier>.fc``).
        has_norm: whether the architecture has normalisation layers for a method's ``norm`` to act on.
        schedule: the learning-rate schedule it is trained with (``"cosine"`` or ``"step"``).
        init: its default weight initialisation.
        options: the keyword arguments its constructor takes beyond ``num_sites`` (`create_model` refuses others).
    """

    input_size: int = 224
    mean: tuple[float, float, float] = (0.63, 0.63, 0.63)
    std: tuple[float, float, float] = (0.29, 0.29, 0.29)
    classifier: str = "head"
    has_norm: bool = True
    schedule: str = "cosine"
    init: str = "default"
    options: frozenset[str] = BASE_OPTIONS


_MODELS: dict[str, tuple[Callable[..., nn.Module], ModelConfig]] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None, *, config: ModelConfig | None = None
) -> Callable[..., nn.Module] | Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model constructor under its function name: ``@register_model`` or
    ``@register_model(config=ModelConfig(...))``."""

    def add(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if constructor.__name__ in _MODELS:
            raise ValueError(f"model {constructor.__name__!r} is registered twice")
        _MODELS[constructor.__name__] = (constructor, config or ModelConfig())
        return constructor

    return add if fn is None else add(fn)


def model_config(name: str) -> ModelConfig:
    """The `ModelConfig` of the registered model ``name``."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name][1]


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, *, num_sites: int, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` for ``num_sites`` sites with the options ``kwargs``, each of which the
    model's `ModelConfig.options` must name (else `UnsupportedOption`).

    Every backbone takes `BASE_OPTIONS`: ``num_classes=2, width=1.0, norm=None ("batch" | "site" | "none"; None =
    the architecture's default), adapter=None ("series" | "parallel"), aux_heads=False, projection=False,
    image_size=224``; the COVID-Net family also ``block_act``, ``init``, ``mixstyle`` and ``standardise_input``.
    """
    config = model_config(name)
    refused = sorted(set(kwargs) - config.options)
    if refused:
        raise UnsupportedOption(f"model {name!r} does not take {', '.join(refused)}; it takes "
                                f"{', '.join(sorted(config.options))}")
    model = _MODELS[name][0](num_sites=num_sites, **kwargs)
    model.arch = name
    if not hasattr(model, "model_kwargs"):
        model.model_kwargs = dict(kwargs)
    return model
