"""Hyperparameter sweeps: Ray Tune over the exact training code path of ``raypipe train``.

Why this shape (Ray 2.60, Train V2):

- Tune runs a small *function* trainable per trial (the "trial driver"). It turns the trial's sampled values
  into dotted-key overrides of the base config, then builds and fits a TorchTrainer through
  :func:`raypipe.train.build_trainer` with a :class:`~ray.tune.integration.ray_train.TuneReportCallback`. Each
  trial is therefore a complete DDP training run, identical to ``raypipe train`` with those overrides; passing a
  trainer object to the Tuner is deprecated in Train V2 and is not used.
- The driver reserves (by default) no CPU: the Train V2 controller takes 0 CPUs and the worker group asks for
  its own resources, so a reserved driver CPU would only starve the trial's own workers.
- MLflow: one parent run per sweep (search space, best result, summary table, plot, best config) and one child
  run per trial, created by :mod:`raypipe.tracking` on rank 0 because the trial config carries
  ``tracking.parent_run_id``. The parent run is found again by the sweep's path on resume, so a resumed sweep
  keeps one parent with all its children.
- Resume: the sweep lives in ``<storage_path>/<name>``; running the same sweep again restores it with
  ``Tuner.restore`` (finished trials are kept, not re-run). A failing trial is recorded in the result grid
  and the summary; it never stops the sweep.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune.schedulers import ASHAScheduler

from raypipe import tracking
from raypipe.config import ConfigError, RaypipeConfig, validate_config
from raypipe.config.base import apply_override
from raypipe.config.paths import resolve_paths
from raypipe.config.tune import SEARCH_KINDS
from raypipe.io import fs as rfs
from raypipe.reports import plot_trials
from raypipe.reports import trials_csv as table_csv
from raypipe.reports import trials_table as format_table

log = logging.getLogger(__name__)

TRIAL_TAG = "raypipe.trial_id"
SWEEP_PATH_TAG = "raypipe.sweep_path"
SWEEP_FINGERPRINT_TAG = "raypipe.sweep_fingerprint"
BEST_CONFIG_NAME = "best_config.yaml"
PLOT_NAME = "trials_metric.png"
TABLE_NAME = "trials.csv"
ASHA_STATE_NAME = "asha_rungs.json"


# --------------------------------------------------------------------------------------------------------------
# search space


def sample_values(spec: dict[str, Any]) -> list[Any]:
    """Values that stand in for a dimension when checking it against the config: every listed value, or both
    ends of a range (the ends are where a type or bound error shows)."""
    kind, arg = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return list(arg)
    low, high = arg
    if kind == "randint":
        return [int(low), int(high) - 1]
    return [float(low), float(high)]


def to_param_space(search_space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Dotted keys -> a nested Tune param space (``{"train": {"optim": {"lr": tune.loguniform(..)}}}``).

    Nested rather than flat dotted keys so trial configs read like the YAML they override.
    """
    from ray import tune as rt

    makers = {
        "choice": lambda a: rt.choice(list(a)),
        "grid": lambda a: rt.grid_search(list(a)),
        "uniform": lambda a: rt.uniform(float(a[0]), float(a[1])),
        "loguniform": lambda a: rt.loguniform(float(a[0]), float(a[1])),
        "randint": lambda a: rt.randint(int(a[0]), int(a[1])),
    }
    space: dict[str, Any] = {}
    for key, spec in search_space.items():
        kind, arg = next(iter(spec.items()))
        node = space
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = makers[kind](arg)
    return space


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"optim": {"lr": 1e-3}}}`` -> ``{"train.optim.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def _base_dict(cfg: RaypipeConfig) -> dict[str, Any]:
    """What the user set (not every default): re-validating this gives back the same config, and an exported
    YAML stays short and keeps following the defaults of keys it never named."""
    return cfg.model_dump(mode="json", exclude_unset=True)


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> RaypipeConfig:
    """The base config with dotted-key ``params`` applied, validated in full (the same rules as ``--set``)."""
    data = json.loads(json.dumps(base))  # deep copy; base is plain JSON
    for key, value in params.items():
        apply_override(data, key.split("."), _plain(value))
    return validate_config(data)


def _plain(value: Any) -> Any:
    """numpy scalars from Tune's samplers -> Python scalars, so pydantic and YAML see ordinary numbers."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, list | dict | str) else value


def validate_search_space(cfg: RaypipeConfig) -> None:
    """Fail before Ray starts if a search-space key is not a real config key or a sampled value is invalid.

    Each key is checked by applying representative values through the full config validation, so the error
    is the same one-line message ``--set`` would give, prefixed with the search-space key.
    """
    space = cfg.tune.search_space
    if not space:
        raise ConfigError("config error: tune.search_space: is empty; name at least one dotted config key to sweep")
    base = _base_dict(cfg)
    errors: list[str] = []
    for key, spec in space.items():
        for value in sample_values(spec):
            try:
                trial = apply_params(base, {key: value})
            except ConfigError as err:
                first = str(err).splitlines()[0].removeprefix("config error: ")
                errors.append(f"config error: tune.search_space.{key}: value {value!r} is rejected: {first}")
                break
            if key.startswith("model.params."):
                problem = _model_param_problem(trial, key.split(".", 2)[2])
                if problem:
                    errors.append(f"config error: tune.search_space.{key}: {problem}")
                    break
    max_epochs = max_epochs_of(cfg)
    if cfg.tune.scheduler == "asha" and cfg.tune.asha.grace_period > (cfg.tune.asha.max_t or max_epochs):
        errors.append(
            f"config error: tune.asha.grace_period: {cfg.tune.asha.grace_period} exceeds the trials' epochs "
            f"({cfg.tune.asha.max_t or max_epochs}); ASHA could never stop a trial"
        )
    try:
        validate_config(_portable_base(cfg))
    except ConfigError as err:  # e.g. tune.metric not produced for the task, amp without GPUs
        errors += [line.replace("config error: train.", "config error: tune (applied as train.)", 1)
                   for line in str(err).splitlines()]
    if errors:
        raise ConfigError("\n".join(errors))


def _model_param_problem(cfg: RaypipeConfig, name: str) -> str | None:
    """model.params are free-form in the config; the model builder's keyword arguments are the real keys."""
    from raypipe.models.resolve import option_problem

    try:
        return option_problem(cfg.model.name, name.split(".")[0])
    except KeyError:
        return None  # unknown model name: the trainer reports it with the registry's own message


def expected_trials(cfg: RaypipeConfig) -> int:
    """num_samples x the size of every grid (Tune's count of trials for a basic-variant search)."""
    n = cfg.tune.num_samples
    for spec in cfg.tune.search_space.values():
        if "grid" in spec:
            n *= len(spec["grid"])
    return n


def max_epochs_of(cfg: RaypipeConfig) -> int:
    """The most epochs any trial can run (train.epochs, or the largest value it is swept over)."""
    spec = cfg.tune.search_space.get("train.epochs")
    if not spec:
        return cfg.train.epochs
    return max(int(v) for v in sample_values(spec))


def describe_dimension(spec: dict[str, Any]) -> str:
    kind, arg = next(iter(spec.items()))
    return f"{kind}{list(arg)}" if kind in SEARCH_KINDS else str(spec)


# --------------------------------------------------------------------------------------------------------------
# paths


def sweep_path(cfg: RaypipeConfig) -> str:
    root = rfs.absolute(cfg.tune.storage_path or cfg.train.storage_path)
    assert root is not None
    return rfs.join(root, cfg.tune.name)


def _portable_base(cfg: RaypipeConfig) -> dict[str, Any]:
    """The base config every trial starts from: absolute paths, trial resources applied, tune section dropped
    from what trials see as "their" settings (it is kept only as defaults)."""
    data = _base_dict(resolve_paths(cfg))
    train = data.setdefault("train", {})
    train["storage_path"] = rfs.join(sweep_path(cfg), "train_runs")
    res = cfg.tune.resources
    if res.num_workers is not None:
        train["num_workers"] = res.num_workers
    if res.cpus_per_worker is not None:
        train["cpus_per_worker"] = res.cpus_per_worker
    if res.gpus_per_worker is not None:
        train["use_gpu"] = res.gpus_per_worker > 0
        if res.gpus_per_worker > 0:
            train["gpus_per_worker"] = res.gpus_per_worker
    # Every trial keeps (and the sweep registers) the checkpoint that is best by the sweep's own metric; the
    # sweep registers only its best trial's model.
    train["metric"], train["mode"] = sweep_metric(cfg)
    train["register_model"] = False
    data.pop("tune", None)
    return data


def sweep_metric(cfg: RaypipeConfig) -> tuple[str, str]:
    return cfg.tune.metric or cfg.train.metric, cfg.tune.mode or cfg.train.mode


def fingerprint(cfg: RaypipeConfig) -> str:
    """Identifies what a sweep searches; a resumed sweep must search the same thing."""
    t = cfg.tune
    payload = {
        "space": t.search_space,
        "metric": sweep_metric(cfg),
        "num_samples": t.num_samples,
        "scheduler": t.scheduler,
        "asha": t.asha.model_dump(),
        "base": {k: v for k, v in _portable_base(cfg).items() if k not in ("tracking", "tune")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# the trial driver (runs inside a Tune trial actor)


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}_{trial_id}"


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
# results


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    status: str  # TERMINATED | ERROR | PENDING | RUNNING | PAUSED
    best_metric: float | None
    last_metric: float | None
    epochs_run: int
    stopped_early: bool
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, metric)
    error: str | None = None
    mlflow_run_id: str | None = None
    checkpoint_path: str | None = None


@dataclass
class SweepResult:
    name: str
    path: str
    metric: str
    mode: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    parent_run_id: str | None
    best_config_path: str | None
    plot_path: str | None
    table: str
    resumed: bool
    expected_trials: int = 0
    registered_version: str | None = None

    @property
    def num_errors(self) -> int:
        return sum(t.status == "ERROR" for t in self.trials)

    @property
    def complete(self) -> bool:
        """False after an interruption (Ctrl+C, SIGUSR1, driver stop): run the sweep again to finish it."""
        finished = all(t.status in ("TERMINATED", "ERROR") for t in self.trials)
        return finished and len(self.trials) >= self.expected_trials


def _is_better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def summarize_trials(analysis: Any, *, metric: str, mode: str, max_epochs: int) -> list[TrialSummary]:
    """One row per trial from a Tune ``ExperimentAnalysis`` (finished, stopped, errored and restored alike)."""
    frames = analysis.trial_dataframes
    rows: list[TrialSummary] = []
    for trial in sorted(analysis.trials, key=lambda tr: tr.trial_id):
        df = frames.get(trial.trial_id)
        history: list[tuple[int, float]] = []
        if df is not None and metric in df.columns:
            epoch_col = "epoch" if "epoch" in df.columns else "training_iteration"
            for epoch, value in zip(df[epoch_col].tolist(), df[metric].tolist(), strict=True):
                v = _finite(value)
                history.append((int(epoch), v if v is not None else float("nan")))
        finite = [v for _, v in history if math.isfinite(v)]
        best = (max(finite) if mode == "max" else min(finite)) if finite else None
        epochs_run = max((e for e, _ in history), default=0)
        error = None
        if trial.status == "ERROR":
            error = _trial_error(trial)
        ckpt = trial.last_result.get("checkpoint_path")
        rows.append(
            TrialSummary(
                trial_id=trial.trial_id,
                params=flatten(trial.config),
                status=trial.status,
                best_metric=best,
                last_metric=history[-1][1] if history else None,
                epochs_run=epochs_run,
                stopped_early=trial.status == "TERMINATED" and epochs_run < max_epochs_for(trial.config, max_epochs),
                history=history,
                error=error,
                checkpoint_path=str(ckpt) if ckpt else None,
            )
        )
    return rows


def max_epochs_for(config: dict[str, Any], default: int) -> int:
    epochs = flatten(config).get("train.epochs")
    return int(epochs) if epochs is not None else default


def _trial_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    text = ""
    try:
        fs, p = rfs.resolve(str(path))
        if path and fs.exists(p):
            with fs.open(p, "r") as f:
                text = f.read()
    except (OSError, ValueError):
        text = ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "trial failed (no error file)"


def pick_best(trials: Sequence[TrialSummary], mode: str) -> TrialSummary | None:
    best: TrialSummary | None = None
    for t in trials:
        if t.best_metric is None:
            continue
        if best is None or _is_better(t.best_metric, best.best_metric, mode):  # type: ignore[arg-type]
            best = t
    return best


def best_training_config(cfg: RaypipeConfig, best: TrialSummary) -> dict[str, Any]:
    """The best trial as a plain training YAML: what the user set, the trial's values, the sweep's metric, no
    tune section or parent run, absolute paths (it may be run from anywhere) and its own run name."""
    data = _base_dict(resolve_paths(cfg))
    data.pop("tune", None)
    train = data.setdefault("train", {})
    train["run_name"] = f"{cfg.tune.name}-best"
    train["metric"], train["mode"] = sweep_metric(cfg)
    data.setdefault("tracking", {}).pop("parent_run_id", None)
    for key, value in best.params.items():
        apply_override(data, key.split("."), _plain(value))
    validate_config(data)  # the exported file must load as it is
    return data


# --------------------------------------------------------------------------------------------------------------
# MLflow parent run


class SweepTracker:
    """The sweep's parent MLflow run: created once, found again by the sweep's path when the sweep resumes."""

    def __init__(self, cfg: RaypipeConfig, path: str) -> None:
        self.cfg = cfg
        self.path = path
        self.client = tracking.make_client(cfg.tracking)
        self.experiment_id = tracking.experiment_id(self.client, cfg.tracking)
        self.run_id, self.resumed_run = self._find_or_create()

    def _find_or_create(self) -> tuple[str, bool]:
        quoted = self.path.replace("'", "\\'")
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{SWEEP_PATH_TAG}` = '{quoted}'", max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if found:
            run = found[0]
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id, True
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.cfg.tune.name,
            tags={SWEEP_PATH_TAG: self.path, "raypipe.stage": "tune"},
        )
        return run.info.run_id, False

    def fingerprint(self) -> str | None:
        return self.client.get_run(self.run_id).data.tags.get(SWEEP_FINGERPRINT_TAG)

    def log_spec(self, cfg: RaypipeConfig, fp: str) -> None:
        from mlflow.entities import Param, RunTag

        t = cfg.tune
        params = {f"space.{k}": describe_dimension(v) for k, v in t.search_space.items()}
        params |= {
            "metric": sweep_metric(cfg)[0], "mode": sweep_metric(cfg)[1], "num_samples": t.num_samples,
            "max_concurrent_trials": t.max_concurrent_trials, "scheduler": t.scheduler,
            "model.name": cfg.model.name, "train.epochs": cfg.train.epochs,
        }
        if t.scheduler == "asha":
            params |= {f"asha.{k}": v for k, v in t.asha.model_dump().items()}
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        self.client.log_batch(self.run_id, params=new, tags=[RunTag(SWEEP_FINGERPRINT_TAG, fp)])
        self.log_text(yaml.safe_dump({"tune": t.model_dump(mode="json")}, sort_keys=False), "search_space.yaml")

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(text)
            self.client.log_artifact(self.run_id, str(p))

    def log_file(self, path: str) -> None:
        self.client.log_artifact(self.run_id, path)

    def child_runs(self) -> dict[str, list[Any]]:
        """trial run name -> child runs (newest first)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'", max_results=5000,
            order_by=["attributes.start_time DESC"],
        )
        out: dict[str, list[Any]] = {}
        for r in runs:
            out.setdefault(r.info.run_name, []).append(r)
        return out

    def finish(self, result: SweepResult) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [
            Metric("trials_total", len(result.trials), now, 0),
            Metric("trials_errored", result.num_errors, now, 0),
            Metric("trials_stopped_early", sum(t.stopped_early for t in result.trials), now, 0),
        ]
        tags = []
        if result.best is not None and result.best.best_metric is not None:
            metrics.append(Metric(tracking.mlflow_metric_name(f"best/{result.metric}"), result.best.best_metric, now, 0))
            metrics.append(Metric("best/epochs_run", result.best.epochs_run, now, 0))
            tags.append(RunTag("raypipe.best_trial_id", result.best.trial_id))
            if result.best.mlflow_run_id:
                tags.append(RunTag("raypipe.best_run_id", result.best.mlflow_run_id))
            for k, v in result.best.params.items():
                tags.append(RunTag(f"best.{k}", str(v)))
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        self.log_text(result.table + "\n", "trials.txt")
        self.log_text(table_csv(result.trials, metric=result.metric), TABLE_NAME)
        for p in (result.plot_path, result.best_config_path):
            if p and not rfs.is_remote(p) and Path(p).exists():
                self.log_file(p)
        status = "KILLED" if not result.complete else "FINISHED" if result.best is not None else "FAILED"
        self.client.set_terminated(self.run_id, status=status)


def _tag_children(tracker: SweepTracker, trials: list[TrialSummary], sweep: str) -> None:
    """Link each trial to its child run (by the run name the trial driver gave it) and close runs of trials
    that Tune stopped early: rank 0 was killed mid-run, so nobody else would end them."""
    children = tracker.child_runs()
    for t in trials:
        runs = children.get(trial_run_name(sweep, t.trial_id), [])
        if not runs:
            continue
        run = runs[0]
        t.mlflow_run_id = run.info.run_id
        tags = {TRIAL_TAG: t.trial_id, "raypipe.stopped_early": str(t.stopped_early).lower()}
        for k, v in tags.items():
            if run.data.tags.get(k) != v:
                tracker.client.set_tag(run.info.run_id, k, v)
        if run.info.status == "RUNNING" and t.status in ("TERMINATED", "ERROR"):
            tracker.client.set_terminated(run.info.run_id, status="KILLED" if t.status == "TERMINATED" else "FAILED")


# --------------------------------------------------------------------------------------------------------------
# ASHA that survives a resume


class ResumableASHA(ASHAScheduler):
    """ASHA whose rung records survive ``Tuner.restore``.

    Tune checkpoints the searcher and the callbacks but rebuilds the scheduler from the pickle made when the
    sweep started, so after a resume ASHA would have no results at any rung and could not stop the remaining
    trials. This subclass writes its rung records beside the sweep after every decision and reads them back
    once, before its first decision in a resumed run (rungs are keyed by the stable trial ids).
    """

    def __init__(self, *, state_uri: str, storage: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_uri = state_uri
        self._storage = storage
        self._loaded = False

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        fs, p = rfs.resolve(self._state_uri, self._storage)
        if not fs.exists(p):
            return
        saved = json.loads(fs.cat_file(p))
        for bracket, rungs in zip(self._brackets, saved["brackets"], strict=False):
            for (_, recorded), saved_recorded in zip(bracket._rungs, rungs, strict=False):
                recorded.update({k: float(v) for k, v in saved_recorded.items()})
        self._num_stopped = int(saved.get("num_stopped", 0))
        log.info("ASHA rung records restored from %s", self._state_uri)

    def _save(self) -> None:
        state = {
            "brackets": [[dict(recorded) for _, recorded in b._rungs] for b in self._brackets],
            "num_stopped": self._num_stopped,
        }
        fs, p = rfs.resolve(self._state_uri, self._storage)
        rfs.atomic_write_bytes(fs, p, json.dumps(state).encode())

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load_once()
        decision = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return decision


# --------------------------------------------------------------------------------------------------------------
# the sweep


def tune(cfg: RaypipeConfig, *, callbacks: list[Any] | None = None) -> SweepResult:
    """Run (or resume) the sweep described by ``cfg.tune`` over the training config ``cfg``.

    ``callbacks`` are extra ``ray.tune.Callback`` objects for the Tune loop (progress hooks, notifications).
    Tune saves them with the sweep, so a resumed sweep runs with the callbacks it was started with.
    """
    from ray import tune as rt
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raypipe.runtime import ensure_ray, planned

    validate_search_space(cfg)
    t = cfg.tune
    path = sweep_path(cfg)
    storage_root, name = path.rsplit("/", 1)
    # Trial resources are planned once here (every trial gets the same), from the cluster seen at start; a trial
    # that could never be placed is refused now instead of pending forever.
    ensure_ray(cfg)
    trial_cfg, _ = planned(cfg, "tune")
    base = _portable_base(trial_cfg)
    fp = fingerprint(cfg)
    max_epochs = max_epochs_of(cfg)
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
            )
        else:
            scheduler = FIFOScheduler()
        # BasicVariantGenerator limits concurrency itself (Tune's max_concurrent_trials only wraps Searchers)
        # and, seeded, samples the same trials when a sweep is re-created.
        search_alg = BasicVariantGenerator(random_state=t.seed, max_concurrent=t.max_concurrent_trials)
        tuner = rt.Tuner(
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
    grid = tuner.fit()
    return _finish(cfg, grid.experiment_path, tracker=tracker, max_epochs=max_epochs, resumed=restorable)


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
        _tag_children(tracker, trials, t.name)
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
    try:
        result = tune(cfg)
    except ConfigError as err:
        log.error("%s", err)
        return 2
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
