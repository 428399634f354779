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
from ray.tune import Callback

from raypipe.config import ConfigError, load_config
from raypipe.config.base import flatten
from raypipe.tune import (
    apply_params,
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
         "must be a whole number >= 1 or 'auto'"),
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
    assert cfg.model.params["dim"] == 64  # merged into the preset's model.params, like --set


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


def test_asha_rung_records_survive_a_restore(tmp_path) -> None:
    """Tune rebuilds schedulers from their start-of-sweep pickle on restore; ours reloads its rungs."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from raypipe.tune import ResumableASHA

    def make():
        return ResumableASHA(state_uri=str(tmp_path / "rungs.json"), time_attr="epoch", metric="val/f_sco",
                             mode="max", max_t=4, grace_period=1, reduction_factor=2)

    before = make()
    good = SimpleNamespace(trial_id="t_00000")
    before.on_trial_add(None, good)
    assert before.on_trial_result(None, good, {"epoch": 1.0, "val/f_sco": 0.5}) == TrialScheduler.CONTINUE

    after = make()  # a resumed sweep: fresh object, same sweep folder
    bad = SimpleNamespace(trial_id="t_00001")
    after.on_trial_add(None, bad)
    assert after.on_trial_result(None, bad, {"epoch": 1.0, "val/f_sco": 0.0}) == TrialScheduler.STOP


# ------------------------------------------------------------------------------------------ real sweeps

TINY = [
    "model.name=frames_only",
    "model.params={aggregation: avgpool, hidden: 32}",
    "train.batch_size=8",
    "train.num_workers=1",
    "tune.resources.num_workers=1",
]


@pytest.fixture(scope="module")
def sweep_config(feature_shards, test_config_factory):
    """A sweep over the session shards: tiny frames-only model, 1 gloo worker per trial."""
    shards_cfg, _ = feature_shards

    def make(name: str, *overrides: str):
        return test_config_factory(f"train.data={shards_cfg.embed.output}", *TINY, f"tune.name={name}", *overrides,
                                   name=name)

    return make


def _mlflow(cfg):
    from raypipe.tracking import experiment_id, make_client

    client = make_client(cfg.tracking)
    return client, experiment_id(client, cfg.tracking)


def _children(cfg, parent_run_id: str):
    client, exp = _mlflow(cfg)
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_sweep_logs_every_trial_as_a_child_run_and_exports_a_trainable_best_config(sweep_config, tmp_path) -> None:
    from raypipe.cli import main
    from raypipe.tune import tune

    cfg = sweep_config(
        "sweep4", "train.epochs=2", "tune.num_samples=4", "tune.max_concurrent_trials=2", "tune.scheduler=none",
        "tune.search_space={train.optim.lr: {loguniform: [1.0e-4, 3.0e-2]}}",
        "tune.register_best=true", "tracking.registered_model_name=sweep4-best",
        "train.batch_size=auto",  # sized once for the whole sweep from its training rows (one worker per trial)
    )
    from raypipe.config.train import auto_schedule
    from raypipe.train import prepare

    batch = auto_schedule(cfg.train, prepare(cfg)[1].num_train, cfg.tune.resources.num_workers or 1)["batch_size"]
    sigint = signal.getsignal(signal.SIGINT)
    result = tune(cfg)

    # Tune's fit() leaves its own SIGINT handler installed; tune() puts the caller's back (Ctrl+C, the watchdog)
    assert signal.getsignal(signal.SIGINT) is sigint
    assert len(result.trials) == 4 and result.num_errors == 0 and result.complete
    assert all(t.status == "TERMINATED" and t.epochs_run == 2 and not t.stopped_early for t in result.trials)
    lrs = sorted(t.params["train.optim.lr"] for t in result.trials)
    assert len(set(lrs)) == 4 and lrs[0] >= 1e-4 and lrs[-1] <= 3e-2
    assert result.best is not None and result.best.best_metric == max(t.best_metric for t in result.trials)

    # every trial is a child run of the sweep's run, with its sampled lr and both epochs of metrics
    client, _ = _mlflow(cfg)
    children = {r.info.run_id: r for r in _children(cfg, result.parent_run_id)}
    assert len(children) == 4
    for t in result.trials:
        run = children[t.mlflow_run_id]
        assert run.data.tags["raypipe.trial_id"] == t.trial_id
        assert float(run.data.params["train.optim.lr"]) == pytest.approx(t.params["train.optim.lr"])
        assert run.data.params["train.batch_size"] == str(batch)  # the number, not auto
        history = client.get_metric_history(run.info.run_id, "val/f_sco")
        assert sorted(m.step for m in history) == [1, 2]
        assert run.info.status == "FINISHED"
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["space.train.optim.lr"] == "loguniform[0.0001, 0.03]"
    assert parent.data.metrics["best/val/f_sco"] == pytest.approx(result.best.best_metric)
    assert parent.data.tags["raypipe.best_trial_id"] == result.best.trial_id
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"best_config.yaml", "trials_metric.png", "trials.csv", "trials.txt", "search_space.yaml"} <= artifacts
    assert Path(result.plot_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for t in result.trials:
        assert t.trial_id in result.table

    # register_best: the best trial's own logged model, under the alias, loadable by models:/
    from raypipe.classifier import load_classifier

    assert cfg.tracking.alias == "challenger"  # a sweep's best trial is a challenger too; promote decides
    version = client.get_model_version_by_alias("sweep4-best", cfg.tracking.alias)
    assert result.registered_version == str(version.version) and version.tags["raypipe.run_id"] == result.best.mlflow_run_id
    assert load_classifier("models:/sweep4-best@" + cfg.tracking.alias, tracking_uri=cfg.tracking.tracking_uri).model_version == str(version.version)

    # the exported best config is a plain training YAML: `raypipe train -c best_config.yaml` runs as it is
    best = yaml.safe_load(Path(result.best_config_path).read_text())
    assert "tune" not in best and "parent_run_id" not in best.get("tracking", {})
    assert best["train"]["optim"]["lr"] == pytest.approx(result.best.params["train.optim.lr"])
    assert best["train"]["batch_size"] == batch
    assert main(["train", "-c", result.best_config_path, "--epochs", "1"]) == 0
    retrained = client.search_runs([_mlflow(cfg)[1]], filter_string="attributes.run_name = 'sweep4-best'")
    assert len(retrained) == 1 and "mlflow.parentRunId" not in retrained[0].data.tags
    assert float(retrained[0].data.params["train.optim.lr"]) == pytest.approx(result.best.params["train.optim.lr"])


class InterruptAfterFirstTrial(Callback):
    """Stops the whole sweep (SIGUSR1, which Tune handles like Ctrl+C) once the first trial has finished."""

    def __init__(self, flag: Path) -> None:
        self.flag = str(flag)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if not os.path.exists(self.flag):  # Tune restores callbacks with the sweep: fire only once
            Path(self.flag).touch()
            os.kill(os.getpid(), signal.SIGUSR1)


def test_asha_stops_a_diverging_trial_and_a_rerun_finishes_only_the_remaining_trials(sweep_config, tmp_path) -> None:
    from raypipe.tune import tune

    cfg = sweep_config(
        "asha_resume", "train.epochs=4", "tune.max_concurrent_trials=1", "tune.num_samples=1",
        "tune.scheduler=asha", "tune.asha.grace_period=1", "tune.asha.reduction_factor=2",
        # Ranked by validation loss: on an 11-row validation set F_sco of a collapsed model can tie a sane one,
        # the loss of a diverged one cannot.
        "tune.metric=val/loss", "tune.mode=min",
        "tune.search_space={train.optim.lr: {grid: [0.003, 10.0]}}",
    )
    first = tune(cfg, callbacks=[InterruptAfterFirstTrial(tmp_path / "interrupted")])
    assert [t.status for t in first.trials] == ["TERMINATED"] and not first.complete
    done = first.trials[0]
    assert done.params["train.optim.lr"] == 0.003 and done.epochs_run == 4
    assert len(_children(cfg, first.parent_run_id)) == 1

    second = tune(cfg)  # same sweep again: restored, not restarted
    assert second.resumed and second.complete and second.parent_run_id == first.parent_run_id
    by_lr = {t.params["train.optim.lr"]: t for t in second.trials}
    assert set(by_lr) == {0.003, 10.0}
    assert by_lr[0.003].trial_id == done.trial_id and by_lr[0.003].history == done.history
    children = _children(cfg, second.parent_run_id)
    assert sorted(r.info.run_name for r in children) == sorted(f"asha_resume_{t.trial_id}" for t in second.trials)
    assert by_lr[0.003].mlflow_run_id == done.mlflow_run_id  # the finished trial's run was not re-created
    # The trial that ran every epoch was not stopped by ASHA on its last report: rank 0 logged its model
    # (what register_best registers).
    from raypipe.tracking import MODEL_URI_TAG

    client, _ = _mlflow(cfg)
    assert client.get_run(done.mlflow_run_id).data.tags.get(MODEL_URI_TAG), "the full trial logged no model"

    # ASHA: at the first rung the diverging trial is below the sane one's result and is stopped there
    bad = by_lr[10.0]
    assert bad.status == "TERMINATED" and bad.stopped_early and bad.epochs_run == 1
    assert bad.best_metric > by_lr[0.003].history[0][1]
    assert second.best.trial_id == done.trial_id
    assert "yes" in next(line for line in second.table.splitlines() if line.startswith(bad.trial_id))
