"""Config of the champion/challenger promotion and of the nightly job (owned by raypipe.promote / raypipe.nightly)."""

from __future__ import annotations

import re
from datetime import date

from pydantic import Field, field_validator

from raypipe.config.base import StrictModel
from raypipe.config.paths import PathStr


class PromoteConfig(StrictModel):
    """When ``raypipe promote`` moves ``tracking.champion_alias`` to the challenger (``tracking.alias``).

    Both models are scored on the same evaluation rows; the challenger wins only when it beats the champion on
    ``metric`` by at least ``min_improvement`` and no other metric drops by more than ``max_drop``.
    """

    # A metric of raypipe.metrics.compute_metrics for the task (f_sco, hit@1, top1, f1_macro, gap@20, map ...);
    # None: the training metric (train.metric without its "val/" prefix).
    metric: str | None = None
    min_improvement: float = Field(default=0.01, ge=0)  # absolute gain on `metric` the challenger needs
    max_drop: float = Field(default=0.05, ge=0)  # the guard: no other metric may fall by more than this
    # Metrics the guard watches; None: every metric both models report except `metric` and the row count.
    guard_metrics: list[str] | None = None
    # A named evaluation feature set (shards written by `raypipe embed`); None: the feature shards the
    # challenger was trained on (its own train.data).
    data: PathStr | None = None
    # Which rows of that set: None is raypipe.data.held_out_split: test, or val for a model trained without a test split.
    split: str | None = None
    batch_size: int = Field(default=64, ge=1)
    # Promote without comparing (still scored and recorded when possible), or roll back to a version.
    force: bool = False
    to_version: int | None = Field(default=None, ge=1)
    # One JSON report per decision (<output>/<timestamp>-v<champion>-v<challenger>.json, and latest.json).
    output: PathStr = "raypipe_runs/promotion"
    log_mlflow: bool = True


class NightlyConfig(StrictModel):
    """``jobs/nightly.py``: embed new videos, optionally retrain + promote, label with the champion, summarise."""

    # The night's id (YYYY-MM-DD); None: today in UTC. A rerun with the same id continues that night.
    night: str | None = None
    # Retrain (train.* as configured, run name nightly-<night>) and promote. The scheduler sets it on the nights
    # that should retrain (e.g. Sundays), so the other nights only embed and label.
    retrain: bool = False
    # Embed the new videos of embed.source into embed.output (the next retrain's training data).
    embed: bool = True
    # Per-night state (steps done) and summary.json under <output>/<night>/.
    output: PathStr = "raypipe_runs/nightly"

    @field_validator("night", mode="before")
    @classmethod
    def _night(cls, v: object) -> object:
        if isinstance(v, date):  # YAML and --set read 2026-01-31 as a date
            v = v.isoformat()
        if isinstance(v, str) and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("must be a folder-safe id such as 2026-01-31")
        return v
