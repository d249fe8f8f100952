"""Model registry: ``@register_model`` constructors looked up by name, each with a `ModelConfig`, as in timm.

`create_model` records the architecture name on the model (``model.arch``), and the model records its
resolved keyword arguments (``model.model_kwargs``, everything but ``num_sites``), so that
`crosssite.models.hub.save` can write them into the model card and `crosssite.models.hub.load` can
rebuild the same network. `model_config` answers what the rest of the package needs to know about an
architecture without building it (input size, fallback normalisation, classifier, norms, schedule, init).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from crosssite.errors import ConfigError

__all__ = ["ModelConfig", "register_model", "create_model", "list_models", "is_model", "model_config"]


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
    """

    input_size: int = 224
    mean: tuple[float, float, float] = (0.63, 0.63, 0.63)
    std: tuple[float, float, float] = (0.29, 0.29, 0.29)
    classifier: str = "head"
    has_norm: bool = True
    schedule: str = "cosine"
    init: str = "default"


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
    """Build the registered model ``name`` for ``num_sites`` sites.

    Keyword arguments of the COVID-Net family: ``num_classes=2, width=1.0, block_act="none",
    norm=None ("batch" | "site" | "none"; None = the architecture's default), adapter=None
    ("series" | "parallel"), aux_heads=False, projection=False, image_size=224``.
    """
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    model = _MODELS[name][0](num_sites=num_sites, **kwargs)
    model.arch = name
    if not hasattr(model, "model_kwargs"):
        model.model_kwargs = dict(kwargs)
    return model
