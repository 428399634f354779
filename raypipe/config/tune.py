"""Config of hyperparameter sweeps (owned by raypipe.tune)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from raypipe.config.base import StrictModel


class TuneConfig(StrictModel):
    name: str = "raypipe-sweep"
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metric: str = "val/f_sco"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(default=4, ge=1)
    max_concurrent_trials: int = Field(default=2, ge=1)
    scheduler: Literal["asha", "none"] = "asha"
