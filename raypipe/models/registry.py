"""One registry and one ``create_model``, in the manner of timm.

Each paper model lives in its own module and registers its builder with ``@register_model("name")``.
Builders take keyword-only arguments, so a misspelt option fails loudly at build time. An entry also carries the
model's default learning rate (``train.optim.lr: auto``): the architectures differ by more than a factor of 10 in
the rate they train best at (docs/GENERALIZATION.md measures it), so one global default fits none of them well.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

ModelBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelBuilder] = {}
_DEFAULT_LR: dict[str, float] = {}

# The learning rate of a model registered without one: the rate the fusion models were measured at first.
FALLBACK_LR = 3e-4


def register_model(name: str, *, default_lr: float = FALLBACK_LR) -> Callable[[ModelBuilder], ModelBuilder]:
    """``default_lr``: the AdamW rate of everything but a pretrained text tower (that has ``train.optim.text_lr``)
    when ``train.optim.lr`` is ``auto``; an explicit ``train.optim.lr`` always wins."""
    if not default_lr > 0:
        raise ValueError(f"model {name!r}: default_lr must be > 0, got {default_lr}")

    def decorator(fn: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        _DEFAULT_LR[name] = default_lr
        return fn

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_builder(name: str) -> ModelBuilder:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name]


def default_lr(name: str) -> float:
    """The learning rate ``train.optim.lr: auto`` resolves to for model ``name``."""
    get_builder(name)  # the one error message for an unknown name
    return _DEFAULT_LR[name]


def builder_params(name: str) -> list[str]:
    """Keyword arguments the builder of ``name`` accepts (used to validate configs up front)."""
    return [
        p.name
        for p in inspect.signature(get_builder(name)).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def with_defaults(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus the builder's defaults for every option not given: what a checkpoint records, so that a
    later change of a default (e.g. the text tower) never rebuilds an old checkpoint as another architecture."""
    sig = inspect.signature(get_builder(name)).parameters.values()
    defaults = {p.name: p.default for p in sig if p.default is not inspect.Parameter.empty}
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}, **kwargs}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    builder = get_builder(name)
    unknown = sorted(set(kwargs) - set(builder_params(name)))
    if unknown:
        raise TypeError(f"model {name!r} got unknown option(s) {unknown}; allowed: {builder_params(name)}")
    return builder(**kwargs)
