"""Typed raypipe configuration: YAML presets plus ``--set key=value`` overrides, validated up front.

Usage::

    cfg = load_config("demo", overrides=["train.optim.lr=1e-4"])

``load_config`` raises :class:`ConfigError` whose message has one line per bad key, before anything touches Ray.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from raypipe.config.base import (
    ConfigError,
    StrictModel,
    apply_override,
    deep_merge,
    format_validation_error,
    parse_override,
    read_yaml,
)
from raypipe.config.embed import DecodeConfig, EmbedConfig, SourceConfig
from raypipe.config.label import LabelConfig
from raypipe.config.model import ModelConfig
from raypipe.config.promote import NightlyConfig, PromoteConfig
from raypipe.config.sections import CorpusConfig, DemoConfig, RayConfig, StorageConfig, TrackingConfig
from raypipe.config.train import TASK_METRICS, EvalConfig, LossConfig, OptimConfig, TrainConfig
from raypipe.config.tune import TuneConfig

__all__ = [
    "config_to_dict",
    "ConfigError",
    "CorpusConfig",
    "DecodeConfig",
    "DemoConfig",
    "EmbedConfig",
    "EvalConfig",
    "LabelConfig",
    "LossConfig",
    "ModelConfig",
    "NightlyConfig",
    "PromoteConfig",
    "OptimConfig",
    "SourceConfig",
    "StorageConfig",
    "TrainConfig",
    "TuneConfig",
    "RayConfig",
    "RaypipeConfig",
    "StrictModel",
    "TrackingConfig",
    "load_config",
    "preset_names",
    "validate_config",
]


class RaypipeConfig(StrictModel):
    """The whole job configuration; every stage reads its own section."""

    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> RaypipeConfig:
        if self.train.amp != "none" and self.train.use_gpu is False:
            raise ValueError(
                f"train.amp={self.train.amp!r} needs train.use_gpu=true (mixed precision is a GPU path; use amp=none on CPU)"
            )
        allowed = [m for m in TASK_METRICS[self.train.task] if m != "loss"]
        if self.promote.metric is not None and self.promote.metric not in allowed:
            raise ValueError(f"promote.metric {self.promote.metric!r} is not a metric of task "
                             f"{self.train.task!r}; choose one of {', '.join(allowed)}")
        if self.eval.zero_shot and not (self.eval.class_names or self.label.class_names):
            raise ValueError("eval.zero_shot needs class names: set eval.class_names (or label.class_names) to a "
                             "'code<TAB>name' file")
        return self


def config_to_dict(cfg: RaypipeConfig) -> dict[str, Any]:
    """JSON-able dump that validates back to the same config: only what was set (some sections reject options
    their mode does not read, so a full dump with every default would not round-trip), and an exported YAML stays
    short and keeps following the defaults of keys it never named."""
    return cfg.model_dump(mode="json", exclude_unset=True)


def preset_names() -> list[str]:
    return sorted(p.stem for p in _presets_dir().glob("*.yaml"))


def _presets_dir() -> Path:
    return Path(str(resources.files("raypipe") / "presets"))


def _resolve(source: str | Path | None) -> dict[str, Any]:
    if source is None:
        return {}
    p = Path(source)
    if p.suffix in {".yaml", ".yml"} or p.exists():
        return read_yaml(p)
    preset = _presets_dir() / f"{source}.yaml"
    if preset.is_file():
        return read_yaml(preset)
    raise ConfigError(
        f"config error: {str(source)!r} is neither a YAML file nor a preset (presets: {', '.join(preset_names())})"
    )


def validate_config(data: dict[str, Any]) -> RaypipeConfig:
    try:
        return RaypipeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, RaypipeConfig)) from None


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> RaypipeConfig:
    """Load a preset name or YAML path, apply ``key.path=value`` overrides, validate everything at once.

    A YAML file may name ``base: <preset or path>`` to inherit from another config and change a few keys.
    """
    data = _resolve(source)
    seen: set[str] = set()
    while "base" in data:
        base_ref = data.pop("base")
        if str(base_ref) in seen:
            raise ConfigError(f"config error: base: cycle through {base_ref!r}")
        seen.add(str(base_ref))
        data = deep_merge(_resolve(base_ref), data)
    for text in overrides or []:
        path, value = parse_override(text)
        apply_override(data, path, value)
    return validate_config(data)
