"""Config of the nightly labelling job (owned by raypipe.label)."""

from __future__ import annotations

from pydantic import Field

from raypipe.config.base import StrictModel


class LabelConfig(StrictModel):
    model_uri: str = "models:/raypipe-classifier@candidate"
    output: str = "demo_out/labels"
    top_k: int = Field(default=5, ge=1)
    max_failure_rate: float = Field(default=0.2, ge=0, le=1)
