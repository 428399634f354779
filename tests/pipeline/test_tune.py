"""Sweeps with Ray Tune over the real training path (raypipe.train.build_trainer), every trial in MLflow.

The first tests need no Ray: search spaces are checked when the config loads and before any trial starts.
The sweep tests run real DDP training trials (1 gloo worker each, tiny models) on the session feature shards.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml

from raypipe.config import ConfigError, load_config
from raypipe.tune import (
    apply_params,
    flatten,
    format_table,
    sample_values,
    to_param_space,
    validate_search_space,
)

# ------------------------------------------------------------------------------------------ no Ray


def _space(text: str) -> list[str]:
    return [f"tune.search_space={text}"]


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ("{train.optim.lr: {logunif: [1, 2]}}", "unknown kind 'logunif' (allowed: choice, grid, uniform"),
        ("{train.optim.lr: {loguniform: [0, 1]}}", "loguniform needs low > 0"),
        ("{train.optim.lr: {uniform: [2, 1]}}", "needs finite low < high"),
        ("{train.epochs: {randint: [1.5, 3]}}", "randint bounds must be integers"),
        ("{train.batch_size: {choice: []}}", "must be a non-empty list"),
        ("{train.batch_size: {choice: [8], grid: [16]}}", "exactly one of choice, grid"),
        ("{lr: {choice: [1]}}", "must be a dotted config key"),
        ("{tune.num_samples: {choice: [1, 2]}}", "configures the sweep itself and cannot be tuned"),
    ],
)
def test_search_space_entries_are_checked_on_load(space: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("test", _space(space))
    assert "tune.search_space" in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ("{train.optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}}", "tune.search_space.train.optim.lrr: value 0.0001 is "
         "rejected: train.optim.lrr: unknown key (allowed: "),
        ("{train.epochs: {choice: [2, 0]}}", "tune.search_space.train.epochs: value 0 is rejected: train.epochs: "
         "Input should be greater than or equal to 1"),
        ("{train.optim: {choice: [1]}}", "tune.search_space.train.optim: value 1 is rejected"),
        ("{model.params.no_such_option: {choice: [1]}}", "'no_such_option' is not an option of model 'dmafnet'"),
    ],
)
def test_search_space_keys_must_be_real_config_keys(space: str, expected: str) -> None:
    cfg = load_config("test", _space(space))
    with pytest.raises(ConfigError) as info:
        validate_search_space(cfg)
    assert expected in str(info.value)


def test_sweep_settings_are_checked_against_training() -> None:
    good = _space("{train.optim.lr: {choice: [0.001]}}")
    validate_search_space(load_config("test", good))
    with pytest.raises(ConfigError, match="tune.asha.grace_period: 4 exceeds the trials' epochs"):
        validate_search_space(load_config("test", [*good, "train.epochs=3", "tune.asha.grace_period=4"]))
    with pytest.raises(ConfigError, match="metric 'val/nope' is not produced"):
        validate_search_space(load_config("test", [*good, "tune.metric=val/nope", "tune.mode=max"]))
    with pytest.raises(ConfigError, match="tune.search_space: is empty"):
        validate_search_space(load_config("test"))


def test_search_space_becomes_tune_domains_and_overrides() -> None:
    from ray import tune as rt

    space = {
        "train.optim.lr": {"loguniform": [1e-4, 1e-2]},
        "train.batch_size": {"choice": [8, 16]},
        "train.epochs": {"randint": [1, 4]},
        "model.params.dim": {"grid": [32, 64]},
        "train.optim.weight_decay": {"uniform": [0.0, 0.1]},
    }
    ps = to_param_space(space)
    assert isinstance(ps["train"]["optim"]["lr"], rt.search.sample.Float)
    lr = ps["train"]["optim"]["lr"]
    assert "LogUniform" in type(lr.sampler).__name__ and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert ps["train"]["batch_size"].categories == [8, 16]
    assert ps["model"]["params"]["dim"] == {"grid_search": [32, 64]}
    assert (ps["train"]["epochs"].lower, ps["train"]["epochs"].upper) == (1, 4)
    assert sample_values(space["train.epochs"]) == [1, 3]  # randint's high is exclusive, as Ray's

    trial = {"train": {"optim": {"lr": 3e-3}, "batch_size": 8}, "model": {"params": {"dim": 64}}}
    assert flatten(trial) == {"train.optim.lr": 3e-3, "train.batch_size": 8, "model.params.dim": 64}
    cfg = apply_params(load_config("test").model_dump(mode="json", exclude_unset=True), flatten(trial))
    assert cfg.train.optim.lr == pytest.approx(3e-3)
    assert cfg.train.batch_size == 8
    assert cfg.model.params == {"dim": 64}


def test_summary_table_lists_params_metric_epochs_and_early_stops() -> None:
    from raypipe.tune import TrialSummary

    rows = [
        TrialSummary("a_00000", {"train.optim.lr": 1e-3}, "TERMINATED", 0.61, 0.61, 4, False),
        TrialSummary("a_00001", {"train.optim.lr": 1e3}, "TERMINATED", 0.05, 0.05, 1, True),
        TrialSummary("a_00002", {"train.optim.lr": 1e-2}, "ERROR", None, None, 0, False, error="boom"),
    ]
    table = format_table(rows, metric="val/f_sco", best_id="a_00000")
    lines = table.splitlines()
    assert lines[0].split() == ["trial", "train.optim.lr", "best", "val/f_sco", "epochs", "early", "stop", "status"]
    assert lines[2].split()[:6] == ["a_00000", "*", "0.001", "0.61", "4", "no"]
    assert lines[3].split()[:5] == ["a_00001", "1000", "0.05", "1", "yes"]
    assert "ERROR: boom" in lines[4]
