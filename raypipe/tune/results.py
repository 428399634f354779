"""What a sweep produced: one summary per trial, the best trial and its training config."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from raypipe.config import RaypipeConfig, config_to_dict, validate_config
from raypipe.config.base import apply_override, flatten
from raypipe.config.paths import resolve_paths
from raypipe.io import fs as rfs
from raypipe.tune.space import plain, sweep_metric

log = logging.getLogger(__name__)


BEST_CONFIG_NAME = "best_config.yaml"
PLOT_NAME = "trials_metric.png"
TABLE_NAME = "trials.csv"


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
    data = config_to_dict(resolve_paths(cfg))
    data.pop("tune", None)
    train = data.setdefault("train", {})
    train["run_name"] = f"{cfg.tune.name}-best"
    train["metric"], train["mode"] = sweep_metric(cfg)
    data.setdefault("tracking", {}).pop("parent_run_id", None)
    for key, value in best.params.items():
        apply_override(data, key.split("."), plain(value))
    validate_config(data)  # the exported file must load as it is
    return data
