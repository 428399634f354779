"""Config of the fusion model: a registry name plus the builder's keyword arguments."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from raypipe.config.base import StrictModel


class ModelConfig(StrictModel):
    """``name`` is a key of :mod:`raypipe.models` registry; ``params`` are its builder's keyword arguments.

    The builder validates ``params`` itself (keyword-only arguments), so a wrong key fails at build time with
    the builder's own message; :func:`raypipe.config.validate_model_params` runs that check up front.
    """

    name: str = "dmafnet"
    params: dict[str, Any] = Field(default_factory=dict)
