"""Model registry: ``@register_model`` constructors looked up by name, as in timm.

`create_model` records the architecture name on the model (``model.arch``), and the model records its
resolved keyword arguments (``model.model_kwargs``, everything but ``num_sites``), so that
`crosssite.models.hub.save` can write them into the model card and `crosssite.models.hub.load` can
rebuild the same network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from crosssite.errors import ConfigError

__all__ = ["register_model", "create_model", "list_models", "is_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


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
    model = _MODELS[name](num_sites=num_sites, **kwargs)
    model.arch = name
    if not hasattr(model, "model_kwargs"):
        model.model_kwargs = dict(kwargs)
    return model
