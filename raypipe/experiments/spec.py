"""The papers' experiments as data: the typed form of ``raypipe/experiments/*.yaml`` and each row's config.

An experiment file holds the tables of one paper. A table is a list of named rows; a row's ``set:`` maps dotted
keys of *any* config section (``model.name``, ``model.params.*``, ``train.loss.*``, ``train.optim.*``,
``eval.corruption.*``, ...) to values, so a row can move the model and the loss together (DMAFNet's modality
ablation), which a Tune search space over independent keys cannot express. Why a file per paper and not one
search space: the rows are the paper's, chosen by its authors; they are not a grid.

A row's config is built in a fixed order (later wins): the caller's base config (preset + ``--set``), the
experiment's ``base``, the scale's ``set``, the command line's ``--set`` overrides (``user``: they apply to every
row, e.g. ``--set train.epochs=2``), the row's ``set``; then the scale's model sizes for the row's model
fill the ``model.params`` the row did not name (``--scale tiny`` shrinks every model, ``paper`` keeps the paper's
sizes). Rows that need a key raypipe does not have yet stay in the file as ``pending: "needs ..."`` and show in
the table as not run, never dropped.

:func:`validate_rows` checks every runnable row before any trial starts: the full config validates and the model
is built on the meta device with the data's dims (see :mod:`raypipe.train`), so a bad row costs one line and
exit code 2, not a failed trial after an hour of others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from raypipe.config import ConfigError, RaypipeConfig, config_to_dict, validate_config
from raypipe.config.base import StrictModel, apply_override, format_validation_error, read_yaml
from raypipe.config.corruption import CorruptionConfig
from raypipe.config.train import TASK_METRICS

Scale = Literal["tiny", "paper"]
NAME = r"^[A-Za-z0-9_.+-]+$"
# Keys every trial sets itself: a row must not (the seed comes from --seeds, the data from --data).
RESERVED_KEYS = ("train.seed", "train.data", "train.run_name", "train.register_model", "tracking.enabled")
# What a row's pretraining stage is, before its own `pretrain:` keys: the pretraining objective, chosen on val/loss.
PRETRAIN_KEYS: dict[str, Any] = {"train.pretrain": True, "train.metric": "val/loss", "train.mode": "min",
                                 "train.early_stopping_patience": None}


class CorruptionColumn(StrictModel):
    """A column group scored on every row's trained model under one corruption (Table 5's experiments)."""

    name: str = Field(pattern=NAME)
    label: str | None = None
    corruption: dict[str, Any] = Field(default_factory=dict)  # a CorruptionConfig (validated when runnable)
    pending: str | None = None  # "needs ...": a corruption raypipe cannot apply yet

    @model_validator(mode="after")
    def _valid_corruption(self) -> CorruptionColumn:
        if self.pending is None:
            CorruptionConfig.model_validate(self.corruption)
        return self

    def config(self) -> CorruptionConfig:
        return CorruptionConfig.model_validate(self.corruption)


class RowSpec(StrictModel):
    name: str = Field(pattern=NAME)
    label: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    # The paper's own numbers for this row, by column key (metric, or "<corruption>:<metric>"), as fractions.
    paper: dict[str, float | None] = Field(default_factory=dict)
    pending: str | None = None  # "needs ...": kept in the table, reported as "not run: needs ..."
    # A pretraining stage before the row's training (DMAFNet-pretrain): dotted keys on top of the row's config and
    # PRETRAIN_KEYS (e.g. {train.epochs: 10}); the row then finetunes from the pretrained tensors (fresh head).
    pretrain: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _no_reserved(self) -> RowSpec:
        bad = sorted(k for k in [*self.set, *(self.pretrain or {})] if k in RESERVED_KEYS)
        if bad:
            raise ValueError(f"row {self.name!r} sets {bad}: the runner sets these itself (--seeds, --data)")
        staged = sorted(k for k in self.set if k.split(".")[:2] in (["train", "pretrain"], ["train", "init_from"]))
        if staged:
            raise ValueError(f"row {self.name!r} sets {staged}: give the row a `pretrain:` stage instead (the runner "
                             "pretrains, then finetunes from it in the same trial)")
        return self


class TableSpec(StrictModel):
    name: str = Field(pattern=NAME)
    title: str
    metrics: list[str] = Field(min_length=1)
    corruptions: list[CorruptionColumn] = Field(default_factory=list)
    # Row names in the paper's ascending order when its numbers are not given (a figure); else read from them.
    paper_order: list[str] | None = None
    note: str | None = None
    rows: list[RowSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> TableSpec:
        names = [r.name for r in self.rows]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"table {self.name!r}: duplicate row names {dupes}")
        for name in self.paper_order or []:
            if name not in names:
                raise ValueError(f"table {self.name!r}: paper_order names unknown row {name!r}")
        return self

    def columns(self) -> list[Column]:
        """The metric columns: every metric clean (or under the row's own eval.corruption), then per corruption."""
        cols = [Column(key=m, label=m, metric=m, corruption=None) for m in self.metrics]
        for c in self.corruptions:
            for m in self.metrics:
                label = c.label or c.name
                cols.append(Column(key=f"{c.name}:{m}", label=label if len(self.metrics) == 1 else f"{label} {m}",
                                   metric=m, corruption=c.name, pending=c.pending))
        return cols


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    metric: str
    corruption: str | None
    pending: str | None = None


class ScaleSpec(StrictModel):
    set: dict[str, Any] = Field(default_factory=dict)
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)  # model.params defaults per model name
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    videos: int = Field(default=96, ge=8)  # generated corpus size when no --data is given (tiny)


class ExperimentSpec(StrictModel):
    name: str = Field(pattern=NAME)
    paper: str
    dataset: str  # the paper's dataset: its numbers are shown as "paper (other dataset)"
    base: dict[str, Any] = Field(default_factory=dict)
    scales: dict[Scale, ScaleSpec]
    tables: list[TableSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_tables(self) -> ExperimentSpec:
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names in {names}")
        return self

    def table(self, name: str) -> TableSpec:
        return next(t for t in self.tables if t.name == name)


# ------------------------------------------------------------------------------------------------ loading


def experiments_dir() -> Path:
    return Path(str(resources.files("raypipe") / "experiments"))


def experiment_names() -> list[str]:
    return sorted(p.stem for p in experiments_dir().glob("*.yaml"))


def load_experiment(name_or_path: str) -> ExperimentSpec:
    """An experiment by name (``raypipe/experiments/NAME.yaml``) or YAML path; one ``config error`` line if bad."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = experiments_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"config error: experiment {name_or_path!r} does not exist "
                              f"(experiments: {', '.join(experiment_names())})")
    data = read_yaml(path)
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as err:
        msg = format_validation_error(err, ExperimentSpec).replace("config error: ", "")
        raise ConfigError(f"config error: experiment {path.stem}: {msg}".replace("\n", "; ")) from None


# ------------------------------------------------------------------------------------------------ row configs


def _apply_dotted(data: dict[str, Any], mapping: dict[str, Any]) -> None:
    for key, value in mapping.items():
        apply_override(data, key.split("."), json.loads(json.dumps(value)))


def row_data(base: dict[str, Any], exp: ExperimentSpec, row: RowSpec, scale: Scale,
             user: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row's config as a plain dict (before validation), in the order of the module docstring."""
    data = json.loads(json.dumps(base))
    sc = exp.scales.get(scale, ScaleSpec())
    _apply_dotted(data, exp.base)
    _apply_dotted(data, sc.set)
    _apply_dotted(data, user or {})
    _apply_dotted(data, row.set)
    model = (data.get("model") or {}).get("name", "dmafnet")
    for key, value in sc.models.get(model, {}).items():
        dotted = f"model.params.{key}"
        if dotted not in row.set:
            apply_override(data, dotted.split("."), value)
    return data


def row_config(base: dict[str, Any], exp: ExperimentSpec, table: TableSpec, row: RowSpec, scale: Scale,
               *, seed: int = 0, data_uri: str | None = None, user: dict[str, Any] | None = None) -> RaypipeConfig:
    """The validated config of one (row, seed): the runner's own keys set (seed, data, no registry, no run of its
    own: the experiment logs one MLflow child per row)."""
    data = row_data(base, exp, row, scale, user)
    fixed = {"train.seed": seed, "train.register_model": False, "tracking.enabled": False}
    if data_uri is not None:
        fixed["train.data"] = data_uri
    _apply_dotted(data, fixed)
    try:
        cfg = validate_config(data)
    except ConfigError as err:
        raise row_error(exp, table, row, str(err)) from None
    allowed = set(TASK_METRICS[cfg.train.task])
    bad = [m for m in table.metrics if m not in allowed]
    if bad:
        raise row_error(exp, table, row, f"table metrics {bad} are not produced for train.task={cfg.train.task} "
                                         f"(choose from {', '.join(sorted(allowed))})")
    return cfg


def pretrain_config(cfg: RaypipeConfig, exp: ExperimentSpec, table: TableSpec, row: RowSpec) -> RaypipeConfig | None:
    """The validated config of the row's pretraining stage (None without one): the row's own config (seed and
    data included) with :data:`PRETRAIN_KEYS` and the row's ``pretrain:`` keys on top."""
    if row.pretrain is None:
        return None
    from raypipe.models.resolve import pretrain_problem

    data = config_to_dict(cfg)
    _apply_dotted(data, {**PRETRAIN_KEYS, **row.pretrain})
    try:
        pre = validate_config(data)
    except ConfigError as err:
        raise row_error(exp, table, row, f"pretrain: {err}") from None
    problem = pretrain_problem(pre.model.name, pre.train.loss.model_dump())
    if problem:
        raise row_error(exp, table, row, f"pretrain: {problem}")
    return pre


def row_error(exp: ExperimentSpec, table: TableSpec, row: RowSpec, message: str) -> ConfigError:
    lines = [m.replace("config error: ", "") for m in str(message).strip().splitlines() if m.strip()]
    return ConfigError(f"config error: experiment {exp.name}, table {table.name}, row {row.name}: {'; '.join(lines)}")


def parse_user_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.epochs=2"]`` -> ``{"train.epochs": 2}`` (the ``--set`` syntax of every stage)."""
    from raypipe.config.base import parse_override

    return {".".join(path): value for path, value in map(parse_override, overrides or [])}


def trial_key(cfg: RaypipeConfig, pre: RaypipeConfig | None = None) -> str:
    """What a trial's result depends on (model, data, training and its eval corruption, and the pretraining stage's
    config; not where it is tracked): identical rows of different tables share one trial, and a changed row is
    trained again."""
    def relevant(c: RaypipeConfig) -> dict[str, Any]:
        data = config_to_dict(c)
        for section in ("tracking", "ray", "tune", "label", "promote", "nightly", "demo", "corpus"):
            data.pop(section, None)
        ev = data.get("eval") or {}
        if not ev.get("zero_shot"):  # the class names only matter to a zero-shot row (keys of the others unchanged)
            ev.pop("class_names", None)
            if not ev:
                data.pop("eval", None)
        return data

    parts = relevant(cfg) if pre is None else {"finetune": relevant(cfg), "pretrain": relevant(pre)}
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def runnable_rows(exp: ExperimentSpec, tables: list[str] | None = None) -> list[tuple[TableSpec, RowSpec]]:
    return [(t, r) for t in exp.tables if not tables or t.name in tables for r in t.rows if r.pending is None]


def validate_rows(base: dict[str, Any], exp: ExperimentSpec, scale: Scale,
                  spec_of: Callable[[RaypipeConfig], Any], tables: list[str] | None = None,
                  user: dict[str, Any] | None = None) -> dict[tuple[str, str], RaypipeConfig]:
    """Every runnable row's config validated and its model built on the meta device with the data's dims
    (``spec_of(cfg)``: the :class:`raypipe.data.DataSpec` of the feature shards as that row reads them). Raises
    one ``ConfigError`` naming the experiment, table and row of the first bad row; returns ``{(table, row):
    config}`` (seed 0)."""
    from raypipe.train import (
        check_holdout,
        check_metric_for_classes,
        check_model_builds,
        check_text_encoder,
        model_kwargs,
    )

    out = {}
    for table, row in runnable_rows(exp, tables):
        cfg = row_config(base, exp, table, row, scale, user=user)
        pre = pretrain_config(cfg, exp, table, row)
        for stage in (pre, cfg):
            if stage is None:
                continue
            spec = spec_of(stage)
            try:
                if not stage.train.pretrain:
                    check_holdout(stage.train.holdout_classes, spec.classes)
                    check_metric_for_classes(stage, spec.classes)
                kwargs = model_kwargs(stage, spec)
                check_text_encoder(stage.model.name, kwargs, spec)
                check_model_builds(stage.model.name, kwargs)
                if stage.eval.zero_shot:
                    check_zero_shot(stage.model.name, kwargs, stage.train.holdout_classes)
            except ConfigError as err:
                raise row_error(exp, table, row, ("pretrain: " if stage is pre else "") + str(err)) from None
        out[(table.name, row.name)] = cfg
    return out


def check_zero_shot(name: str, kwargs: dict[str, Any], holdout: list[str]) -> None:
    """A zero-shot row (``eval.zero_shot``) needs a model with a contrastively trained zero-shot head (CAV-Net with
    ``train.loss.contrastive`` > 0) and held-out classes to score (``train.holdout_classes``)."""
    import torch

    from raypipe.models import create_model

    with torch.device("meta"):
        model = create_model(name, **kwargs)
    if not (hasattr(model, "zero_shot_logits") and getattr(model, "contrastive", False)):
        raise ConfigError(f"config error: eval.zero_shot: model {name!r} has no zero-shot head trained here "
                          "(needs cavnet with train.loss.contrastive > 0)")
    if not holdout:
        raise ConfigError("config error: eval.zero_shot: set train.holdout_classes (the classes scored zero-shot; "
                          "they are kept out of train and val)")
