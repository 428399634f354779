"""Running (or resuming) a sweep: the trial driver, the Tuner, the summary, the CLI stage."""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

from raypipe import tracking
from raypipe.config import ConfigError, RaypipeConfig
from raypipe.config.base import flatten
from raypipe.config.train import SCHEDULE_KEYS
from raypipe.io import fs as rfs
from raypipe.reports import plot_trials
from raypipe.reports import trials_table as format_table
from raypipe.tune.asha import ASHA_STATE_NAME, ResumableASHA
from raypipe.tune.results import (
    BEST_CONFIG_NAME,
    PLOT_NAME,
    SweepResult,
    TrialSummary,
    best_training_config,
    pick_best,
    summarize_trials,
)
from raypipe.tune.space import (
    apply_params,
    expected_trials,
    fingerprint,
    max_epochs_of,
    portable_base,
    sweep_metric,
    sweep_path,
    to_param_space,
    trial_run_name,
    validate_search_space,
)
from raypipe.tune.tracker import SweepTracker, tag_children

log = logging.getLogger(__name__)


def run_trial(config: dict[str, Any], *, base: dict[str, Any], sweep: str, parent_run_id: str | None) -> None:
    """One Tune trial: the base config with this trial's values, trained by the same code as ``raypipe train``.

    Metrics reach Tune through TuneReportCallback (rank 0's report per epoch); an exception here marks only
    this trial as errored.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypipe.train import fit

    trial_id = ray.tune.get_context().get_trial_id()
    run_name = trial_run_name(sweep, trial_id)
    params = flatten(config)
    data = json.loads(json.dumps(base))
    data.setdefault("train", {})["run_name"] = run_name
    if parent_run_id is not None:
        data.setdefault("tracking", {})["parent_run_id"] = parent_run_id
    cfg = apply_params(data, params)
    log.info("trial %s: %s", trial_id, ", ".join(f"{k}={v}" for k, v in params.items()))
    # fit() is `raypipe train` itself: build_trainer(cfg, run_name=, callbacks=) then TorchTrainer.fit(), and
    # it marks the MLflow run FAILED if training raises. A restarted trial continues its Train run's checkpoint.
    fit(cfg, run_name=run_name, callbacks=[TuneReportCallback()])


# --------------------------------------------------------------------------------------------------------------
# the sweep


def tune(cfg: RaypipeConfig, *, callbacks: list[Any] | None = None) -> SweepResult:
    """Run (or resume) the sweep described by ``cfg.tune`` over the training config ``cfg``.

    ``callbacks`` are extra ``ray.tune.Callback`` objects for the Tune loop (progress hooks, notifications).
    Tune saves them with the sweep, so a resumed sweep runs with the callbacks it was started with.
    """
    from ray import tune as rt

    from raypipe.runtime import ensure_ray, fit_tuner, planned
    from raypipe.train import prepare, resolve_schedule, with_values

    validate_search_space(cfg)
    t = cfg.tune
    path = sweep_path(cfg)
    name = path.rsplit("/", 1)[1]
    # Trial resources are planned once here (every trial gets the same), from the cluster seen at start; a trial
    # that could never be placed is refused now instead of pending forever.
    ensure_ray(cfg)
    trial_cfg, _ = planned(cfg, "tune")
    fp = fingerprint(cfg)  # of the config as given: a resumed sweep sizes its schedule again the same way
    # auto epochs / batch: sized once for the sweep from the training rows over one trial's workers, into the
    # trials' base, MLflow's sweep params and the exported best config (a value the search space sets still wins);
    # the default train.metric as the data's classes resolve it (raypipe.train.resolve_metric), likewise
    prepared, spec, _ = prepare(trial_cfg)
    sized = resolve_schedule(trial_cfg, spec.num_train, trial_cfg.train.num_workers).train
    values = {f"train.{k}": getattr(sized, k) for k in SCHEDULE_KEYS}
    if prepared.train.metric != trial_cfg.train.metric:
        values["train.metric"] = prepared.train.metric
    cfg, trial_cfg = (with_values(c, values) for c in (cfg, trial_cfg))
    validate_search_space(trial_cfg)
    base = portable_base(trial_cfg)
    max_epochs = int(max_epochs_of(trial_cfg))
    metric, mode = sweep_metric(cfg)

    tracker = SweepTracker(cfg, path) if cfg.tracking.enabled else None
    restorable = _can_restore(path)
    if restorable and not t.resume:
        raise ConfigError(
            f"config error: tune.name: a sweep {name!r} already exists at {path}; set tune.resume=true to continue "
            "it or choose another tune.name"
        )
    if tracker is not None:
        old = tracker.fingerprint()
        if restorable and old is not None and old != fp:
            raise ConfigError(
                f"config error: tune.search_space: sweep {name!r} at {path} was started with a different search "
                "space or base config; resuming would mix two sweeps. Choose another tune.name"
            )
        tracker.log_spec(cfg, fp)
    parent_run_id = tracker.run_id if tracker is not None else None

    trainable = rt.with_resources(
        functools.partial(run_trial, base=base, sweep=name, parent_run_id=parent_run_id),
        {"cpu": t.resources.driver_cpus},
    )
    if restorable:
        log.info("resuming sweep %s from %s (finished trials are kept)", name, path)
        tuner = rt.Tuner.restore(path, trainable=trainable, resume_unfinished=True, restart_errored=t.restart_errored)
    else:
        tuner = _new_tuner(cfg, trainable, path=path, max_epochs=max_epochs, callbacks=callbacks)
    grid = fit_tuner(tuner)
    return _finish(cfg, grid.experiment_path, tracker=tracker, max_epochs=max_epochs, resumed=restorable)


def _new_tuner(cfg: RaypipeConfig, trainable: Any, *, path: str, max_epochs: int, callbacks: list[Any] | None) -> Any:
    """A fresh ``Tuner`` for the sweep at ``path``: ASHA (resumable) or FIFO, seeded basic-variant search."""
    from ray import tune as rt
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = cfg.tune
    metric, mode = sweep_metric(cfg)
    storage_root, name = path.rsplit("/", 1)
    if t.scheduler == "asha":
        scheduler = ResumableASHA(
            state_uri=rfs.join(path, ASHA_STATE_NAME),
            storage=cfg.storage,
            # The trainer reports its epoch: unlike Tune's iteration count, it stays right when a restarted
            # trial continues its Train run from a checkpoint.
            time_attr="epoch",
            max_t=t.asha.max_t or max_epochs,
            grace_period=t.asha.grace_period,
            reduction_factor=t.asha.reduction_factor,
            # A trial that reaches train.epochs ends by itself; stopping it on that last report (ASHA's default)
            # kills it before rank 0 logs the best model, and the sweep's best trial then has none to register.
            stop_last_trials=(t.asha.max_t or max_epochs) < max_epochs,
        )
    else:
        scheduler = FIFOScheduler()
    # BasicVariantGenerator limits concurrency itself (Tune's max_concurrent_trials only wraps Searchers)
    # and, seeded, samples the same trials when a sweep is re-created.
    search_alg = BasicVariantGenerator(random_state=t.seed, max_concurrent=t.max_concurrent_trials)
    return rt.Tuner(
        trainable,
        param_space=to_param_space(t.search_space),
        tune_config=rt.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=t.num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
        ),
        run_config=rt.RunConfig(
            name=name,
            storage_path=storage_root,
            failure_config=rt.FailureConfig(max_failures=t.max_failures, fail_fast=False),
            callbacks=list(callbacks or []),
            verbose=0,
        ),
    )


def _can_restore(path: str) -> bool:
    from ray import tune as rt

    try:
        return bool(rt.Tuner.can_restore(path))
    except (OSError, ValueError):
        return False


def _finish(
    cfg: RaypipeConfig, path: str, *, tracker: SweepTracker | None, max_epochs: int,
    resumed: bool,
) -> SweepResult:
    from ray.tune import ExperimentAnalysis

    t = cfg.tune
    metric, mode = sweep_metric(cfg)
    analysis = ExperimentAnalysis(path, default_metric=metric, default_mode=mode)
    trials = summarize_trials(analysis, metric=metric, mode=mode, max_epochs=max_epochs)
    best = pick_best(trials, mode)
    if tracker is not None:
        tag_children(tracker, trials, t.name)
    table = format_table(trials, metric=metric, best_id=best.trial_id if best else None)

    out_dir = _local_out_dir(path)
    plot_path = str(Path(out_dir) / PLOT_NAME)
    plot_trials(trials, metric=metric, path=plot_path, best_id=best.trial_id if best else None)
    best_config_path = None
    if best is not None:
        best_config_path = str(Path(out_dir) / BEST_CONFIG_NAME)
        Path(best_config_path).write_text(
            f"# Best trial {best.trial_id} of sweep {t.name} ({metric}={best.best_metric:.4g}).\n"
            f"# Train it with: raypipe train -c {best_config_path}\n"
            + yaml.safe_dump(best_training_config(cfg, best), sort_keys=False)
        )
    result = SweepResult(
        name=t.name, path=path, metric=metric, mode=mode, trials=trials, best=best,
        parent_run_id=tracker.run_id if tracker else None, best_config_path=best_config_path, plot_path=plot_path,
        table=table, resumed=resumed, expected_trials=expected_trials(cfg),
    )
    if tracker is not None and best is not None and t.register_best:
        result.registered_version = _register_best(cfg, best)
    if tracker is not None:
        tracker.finish(result)
    return result


def _local_out_dir(path: str) -> str:
    """Summary files go beside the sweep when it is local, else into a local folder of the same name."""
    if not rfs.is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        return path
    out = Path(tempfile.gettempdir()) / "raypipe-sweeps" / path.rsplit("/", 1)[1]
    out.mkdir(parents=True, exist_ok=True)
    return str(out)


def _register_best(cfg: RaypipeConfig, best: TrialSummary) -> str | None:
    """Register the best trial's model as the challenger (``tracking.alias``); the champion stays (see promote)."""
    if not best.mlflow_run_id:
        log.warning("best trial %s has no MLflow run; nothing to register", best.trial_id)
        return None
    return tracking.register_run_model(cfg, run_id=best.mlflow_run_id)


# --------------------------------------------------------------------------------------------------------------
# CLI stage


def run(cfg: RaypipeConfig) -> int:
    """``raypipe tune -c sweep_demo``: run or resume the sweep, print the trial table, 0 when a best trial exists."""
    result = tune(cfg)  # a ConfigError becomes exit code 2 in raypipe.cli.run_stage
    log.info("sweep %s (%s%s):\n%s", result.name, result.path, ", resumed" if result.resumed else "", result.table)
    if not result.complete:
        log.warning("sweep %s was interrupted after %d of %d trials; run the same command again to finish it",
                    result.name, len(result.trials), result.expected_trials)
        return 130
    if result.best is None:
        log.error("no trial of sweep %s reported %s; see the table above", result.name, result.metric)
        return 1
    log.info(
        "best trial %s: %s=%.4g; train it with: raypipe train -c %s",
        result.best.trial_id, result.metric, result.best.best_metric, result.best_config_path,
    )
    if result.parent_run_id:
        log.info("MLflow parent run %s (%d trial runs); plot %s", result.parent_run_id, len(result.trials),
                 result.plot_path)
    return 0
