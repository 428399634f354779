"""The sweep's parent MLflow run (one per sweep, found again on resume) and its trials' child runs."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from raypipe import tracking
from raypipe.config import RaypipeConfig
from raypipe.io import fs as rfs
from raypipe.reports import trials_csv as table_csv
from raypipe.tune.results import TABLE_NAME, SweepResult, TrialSummary
from raypipe.tune.space import describe_dimension, sweep_metric, trial_run_name

log = logging.getLogger(__name__)


TRIAL_TAG = "raypipe.trial_id"
SWEEP_PATH_TAG = "raypipe.sweep_path"
SWEEP_FINGERPRINT_TAG = "raypipe.sweep_fingerprint"


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


def tag_children(tracker: SweepTracker, trials: list[TrialSummary], sweep: str) -> None:
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
