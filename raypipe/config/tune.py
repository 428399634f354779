"""Config of hyperparameter sweeps (owned by raypipe.tune).

A sweep is an ordinary training config plus this ``tune:`` section. The search space is keyed by dotted config
paths (``train.optim.lr``), so any training option can be swept without code changes; the shape of every
entry is checked here, and :func:`raypipe.tune.validate_search_space` checks that each key is a real config key
by pushing sample values through the full config validation before any trial starts.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raypipe.config.base import StrictModel
from raypipe.config.paths import PathStr

# kind -> what its argument must look like (used in error messages)
SEARCH_KINDS: dict[str, str] = {
    "choice": "a non-empty list of values, sampled uniformly",
    "grid": "a non-empty list of values, every one tried (multiplies num_samples)",
    "uniform": "[low, high] floats",
    "loguniform": "[low, high] floats with 0 < low",
    "randint": "[low, high) integers (high exclusive, as ray.tune.randint)",
}

# Sections a trial must not change: they describe the sweep itself, where it runs and where it logs.
UNTUNABLE_SECTIONS = ("tune", "ray", "tracking", "storage")


def _check_dimension(key: str, spec: Any) -> None:
    kinds = ", ".join(SEARCH_KINDS)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"search_space[{key!r}] must be a mapping with exactly one of {kinds}, e.g. {{choice: [1, 2]}}")
    kind, arg = next(iter(spec.items()))
    if kind not in SEARCH_KINDS:
        raise ValueError(f"search_space[{key!r}]: unknown kind {kind!r} (allowed: {kinds})")
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise ValueError(f"search_space[{key!r}].{kind} must be {SEARCH_KINDS[kind]} (got {arg!r})")
        return
    if not isinstance(arg, list) or len(arg) != 2 or not all(isinstance(v, int | float) for v in arg):
        raise ValueError(f"search_space[{key!r}].{kind} must be {SEARCH_KINDS[kind]} (got {arg!r})")
    low, high = arg
    if kind == "randint" and not all(isinstance(v, int) and not isinstance(v, bool) for v in arg):
        raise ValueError(f"search_space[{key!r}].randint bounds must be integers (got {arg!r})")
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"search_space[{key!r}].{kind} needs finite low < high (got {arg!r})")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"search_space[{key!r}].loguniform needs low > 0 (got {arg!r})")


class TrialResources(StrictModel):
    """Resources of ONE trial: its Ray Train worker group plus the small Tune function that launches it.

    ``num_workers``/``cpus_per_worker``/``gpus_per_worker`` become the trial's train ScalingConfig. The trial
    driver only builds and fits a TorchTrainer (the Train V2 controller itself takes 0 CPUs), so by default it
    reserves almost nothing: otherwise every running trial would pin a CPU that its own workers then cannot get.
    """

    num_workers: int | None = Field(default=None, ge=1)  # None: train.num_workers
    cpus_per_worker: float | None = Field(default=None, gt=0)  # None: train.cpus_per_worker
    # None: train.use_gpu / train.gpus_per_worker. 0 trains on CPU; a fraction (e.g. 0.25) packs 4 trials' workers
    # of a small model onto one GPU.
    gpus_per_worker: float | None = Field(default=None, ge=0, le=1)
    driver_cpus: float = Field(default=0.01, gt=0)


class AshaConfig(StrictModel):
    """Asynchronous successive halving over epochs (one Train report = one Tune iteration)."""

    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1)
    max_t: int | None = Field(default=None, ge=1)  # None: the largest train.epochs a trial can get


class TuneConfig(StrictModel):
    name: str = "raypipe-sweep"
    # None: <train.storage_path>; the sweep lives in <storage_path>/<name> and is resumed from there.
    storage_path: PathStr | None = None
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # What trials are ranked and early-stopped by; None: train.metric / train.mode. Trials also keep their best
    # checkpoint by it (the sweep sets train.metric/mode of every trial to these).
    metric: str | None = None
    mode: Literal["max", "min"] | None = None
    num_samples: int = Field(default=4, ge=1)
    max_concurrent_trials: int = Field(default=2, ge=1)
    scheduler: Literal["asha", "none"] = "asha"
    asha: AshaConfig = Field(default_factory=AshaConfig)
    resources: TrialResources = Field(default_factory=TrialResources)
    seed: int | None = 0  # seeds the random search so a re-created sweep samples the same trials
    max_failures: int = Field(default=0, ge=0)  # retries of a failing trial before it is recorded as errored
    resume: bool = True  # re-running a sweep of the same name continues it instead of starting over
    restart_errored: bool = False  # on resume, run errored trials again from scratch
    # Register the best trial's model in MLflow as the challenger (tracking.alias); `raypipe promote` decides.
    register_best: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ ") or v.startswith("."):
            raise ValueError(f"must be a non-empty folder name without '/', '\\' or spaces (got {v!r})")
        return v

    @field_validator("search_space")
    @classmethod
    def _space(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, spec in space.items():
            parts = key.split(".")
            if len(parts) < 2 or any(not p for p in parts):
                raise ValueError(f"search_space key {key!r} must be a dotted config key like train.optim.lr")
            if parts[0] in UNTUNABLE_SECTIONS:
                raise ValueError(
                    f"search_space key {key!r}: the {parts[0]}: section configures the sweep itself and cannot be tuned"
                )
            _check_dimension(key, spec)
        return space

    @model_validator(mode="after")
    def _sweep(self) -> TuneConfig:
        if self.scheduler == "asha" and self.asha.max_t is not None and self.asha.grace_period > self.asha.max_t:
            raise ValueError(
                f"asha.grace_period ({self.asha.grace_period}) must not exceed asha.max_t ({self.asha.max_t})"
            )
        return self
