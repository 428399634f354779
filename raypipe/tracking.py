"""MLflow tracking and the model registry, plus loading a trained classifier back (registry URI or checkpoint).

Who logs what (Train V2 has no MLflow callback, and Tune trials only call ``trainer.fit()``):

* the driver (:func:`open_train_run`, called by :func:`raypipe.train.build_trainer`) creates the run, or finds
  it again through a small link file in the Ray run folder, so a restarted or re-run training keeps logging
  into the same MLflow run; a sweep's trial becomes a nested child run of ``tracking.parent_run_id``;
* rank 0 (:class:`RunLogger`) logs the flattened config as params and the metrics of every epoch
  (``step=epoch``), and at the end the artifacts (config YAML, training curves, the best epoch's confusion
  matrix and per-class report) and the best checkpoint as an MLflow pyfunc model with an input example;
* :func:`register_run_model` registers a run's logged model under ``tracking.registered_model_name`` and
  points the challenger alias (``tracking.alias``) at the new version (used by ``raypipe train`` and by the
  sweep for its best trial); the champion alias (``tracking.champion_alias``, what the nightly job labels with)
  is only set there for a model's first version, and otherwise only moved by :mod:`raypipe.promote`.

* :func:`start_stage_run` is the one way a stage (eval, label, promote) opens its own MLflow run.

The checkpoint format, :class:`~raypipe.classifier.Classifier`, ``load_classifier`` and the pyfunc wrapper live
in :mod:`raypipe.classifier`; the plots and tables in :mod:`raypipe.reports`. Models registered before that
split pickled their pyfunc class as ``raypipe.tracking.RaypipePyfunc``: the module ``__getattr__`` below keeps
that name (and the other moved names, for code written against the old module) resolving.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.config import StorageConfig, TrackingConfig
from raypipe.config.base import flatten
from raypipe.config.paths import absolute_tracking_uri as _absolute_tracking_uri
from raypipe.io import fs as rfs

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

RUN_LINK_FILE = "mlflow_run.json"  # in the Ray run folder: which MLflow run this training logs into
TRAIN_RUN_TAG = "raypipe.train_run"  # the Ray run folder (storage_path/run_name)
MODEL_URI_TAG = "raypipe.model_uri"  # models:/m-... of the logged best model
MODEL_ARTIFACT = "model"


# ------------------------------------------------------------------------------------------------ helpers


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///relative.db`` (or a bare path) -> absolute, so Ray workers with another cwd use the same store."""
    return _absolute_tracking_uri(uri)


def default_artifact_location(tracking: TrackingConfig) -> str | None:
    """Artifacts next to a SQLite database (``<db dir>/mlartifacts``) instead of MLflow's cwd-relative default."""
    if tracking.artifact_location:
        loc = tracking.artifact_location
        return loc if "://" in loc else os.path.abspath(loc)
    uri = absolute_tracking_uri(tracking.tracking_uri)
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).parent / "mlartifacts")
    return None


def mlflow_metric_name(name: str) -> str:
    """MLflow allows ``[/\\w.\\- :]`` only: ``val/hit@1`` -> ``val/hit_at_1``."""
    return re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))


def flatten_config(data: Mapping[str, Any]) -> dict[str, str]:
    """Nested config -> MLflow params ``{"train.optim.lr": "0.001"}`` (dotted keys as in
    :func:`raypipe.config.base.flatten`); lists and empty mappings as JSON, values cut at MLflow's limit."""
    out: dict[str, str] = {}
    for name, value in flatten(data).items():
        text = json.dumps(value) if isinstance(value, list | tuple | Mapping) else str(value)
        out[name] = text[:6000]  # MLflow's param value limit
    return out


def make_client(tracking: TrackingConfig) -> MlflowClient:
    from mlflow import MlflowClient

    uri = absolute_tracking_uri(tracking.tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def client_warming(tracking: TrackingConfig, *, needed: bool = True) -> Iterator[None]:
    """Build ``tracking``'s MLflow client in a daemon thread while the ``with`` body does other start-up work.

    Why: importing MLflow and opening its SQLite store takes 1.5-4 s on 2 CPUs, and a training run paid it
    twice in series before its first step (the driver's run, then rank 0's logger; docs/PERFORMANCE.md). MLflow
    caches the store per URI, so the caller's own :func:`make_client` after the block is quick. The thread is
    joined on every way out of the block (a thread left importing races the process's next import of the same
    module, see :func:`raypipe.runtime.warm_imports`); a failure in it is left for that later call to raise.
    """

    def run() -> None:
        try:
            make_client(tracking)
        except Exception:  # noqa: BLE001 - the caller's own make_client reports it
            return

    thread = threading.Thread(target=run, name="raypipe-warm-mlflow", daemon=True)
    if needed and tracking.enabled:
        thread.start()
    try:
        yield
    finally:
        if thread.is_alive():
            thread.join()


def experiment_id(client: MlflowClient, tracking: TrackingConfig) -> str:
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(tracking.experiment, artifact_location=default_artifact_location(tracking))
    except Exception:  # created concurrently by another trial
        exp = client.get_experiment_by_name(tracking.experiment)
        if exp is None:
            raise
        return exp.experiment_id


# ----------------------------------------------------------------------------------------- the train run


def open_train_run(tracking: TrackingConfig, *, run_name: str, run_dir: str, storage: StorageConfig | None = None) -> str:
    """The MLflow run of the Ray run in ``run_dir``: found again through ``run_dir/mlflow_run.json`` (resume),
    else created (nested under ``tracking.parent_run_id`` when set). Returns the run id."""
    client = make_client(tracking)
    fs, link = rfs.resolve(rfs.join(run_dir, RUN_LINK_FILE), storage)
    if fs.exists(link):
        run_id = json.loads(fs.cat_file(link))["run_id"]
        try:
            run = client.get_run(run_id)
        except Exception:  # the tracking store was reset; start a new run
            logger.warning("MLflow run %s linked from %s no longer exists; starting a new run", run_id, run_dir)
        else:
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            logger.info("continuing MLflow run %s (%s)", run_id, run_name)
            return run_id
    tags = {TRAIN_RUN_TAG: run_dir, "raypipe.stage": "train"}
    if tracking.parent_run_id:
        tags["mlflow.parentRunId"] = tracking.parent_run_id
    run = client.create_run(experiment_id(client, tracking), run_name=run_name, tags=tags)
    rfs.atomic_write_bytes(fs, link, json.dumps({"run_id": run.info.run_id}).encode())
    logger.info("MLflow run %s (%s) in experiment %r", run.info.run_id, run_name, tracking.experiment)
    return run.info.run_id


def start_stage_run(
    tracking: TrackingConfig, *, stage: str, run_name: str, tags: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> RunLogger:
    """A new top-level MLflow run of a stage that is not training (``eval``, ``label``, ``promote``): created in
    ``tracking.experiment`` with the ``raypipe.stage`` tag and ``params`` logged; the caller logs the rest and
    calls ``finish``."""
    client = make_client(tracking)
    run = client.create_run(experiment_id(client, tracking), run_name=run_name,
                            tags={"raypipe.stage": stage, **(tags or {})})
    run_logger = RunLogger(tracking, run.info.run_id, client=client)
    if params:
        run_logger.log_params(params)
    return run_logger


def end_run(tracking: TrackingConfig, run_id: str, status: str) -> None:
    make_client(tracking).set_terminated(run_id, status=status)


class RunLogger:
    """Rank 0's handle on the training run (a client, never the fluent active-run state, except for
    ``log_model`` which MLflow only offers fluently)."""

    def __init__(self, tracking: TrackingConfig, run_id: str, *, client: MlflowClient | None = None) -> None:
        self.tracking = tracking
        self.run_id = run_id
        self.client = client or make_client(tracking)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params not logged yet (a resumed run keeps its params; MLflow rejects changed values)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(mlflow_metric_name(k), float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float | np.number) and np.isfinite(v)
        ]
        for i in range(0, len(rows), 500):
            self.client.log_batch(self.run_id, metrics=rows[i : i + 500])

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, checkpoint_dir: str, input_example: Mapping[str, np.ndarray]) -> str:
        """Log the checkpoint as a pyfunc model (with an input example) and tag its URI on the run."""
        import mlflow

        from raypipe.classifier import inference_files, pip_requirements, pyfunc_class

        with tempfile.TemporaryDirectory(prefix="raypipe-model-") as parent:
            # Only what inference needs: the optimizer state would double the model's size in the registry.
            tmp = Path(parent) / "checkpoint"  # the folder name becomes the artifact's name
            tmp.mkdir()
            for name in inference_files():
                shutil.copy2(Path(checkpoint_dir) / name, tmp / name)
            mlflow.set_tracking_uri(absolute_tracking_uri(self.tracking.tracking_uri))
            with mlflow.start_run(run_id=self.run_id, nested=bool(self.tracking.parent_run_id)):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT,
                    python_model=pyfunc_class()(),
                    artifacts={"checkpoint": str(tmp)},
                    input_example=dict(input_example),
                    # Explicit: MLflow's import capture would run the model in a subprocess just to list them.
                    pip_requirements=pip_requirements(),
                )
        self.client.set_tag(self.run_id, MODEL_URI_TAG, info.model_uri)
        return info.model_uri

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def register_run_model(cfg: Any, *, run_id: str) -> str | None:
    """Register the model logged by ``run_id`` as a new version of ``tracking.registered_model_name`` and point
    the challenger alias (``tracking.alias``) at it. Returns the version, or None when the run logged no model.

    Never moves the champion (only :mod:`raypipe.promote` does), except that a model without a champion (its
    first version ever) gets one: the new version. Idempotent: a run registered before (a rerun after a crash)
    gets its existing version back instead of a duplicate.
    """
    import mlflow

    tracking: TrackingConfig = cfg.tracking
    client = make_client(tracking)
    name = tracking.registered_model_name
    model_uri = client.get_run(run_id).data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        logger.warning("MLflow run %s has no logged model (tag %s); nothing registered", run_id, MODEL_URI_TAG)
        return None
    version = _version_of_run(client, name, run_id)
    if version is None:
        mlflow.set_tracking_uri(absolute_tracking_uri(tracking.tracking_uri))
        mlflow.set_registry_uri(absolute_tracking_uri(tracking.tracking_uri))
        version = str(mlflow.register_model(model_uri, name, tags={REGISTERED_RUN_TAG: run_id}).version)
    client.set_registered_model_alias(name, tracking.alias, version)
    first = alias_version(client, name, tracking.champion_alias) is None
    if first:
        client.set_registered_model_alias(name, tracking.champion_alias, version)
    logger.info(
        "registered %s version %s (alias %r%s) from run %s", name, version, tracking.alias,
        f", and {tracking.champion_alias!r}: the model had no champion yet" if first else "", run_id,
    )
    return version


REGISTERED_RUN_TAG = "raypipe.run_id"  # on a model version: the MLflow run whose model it is


def _version_of_run(client: MlflowClient, name: str, run_id: str) -> str | None:
    """The version already registered from ``run_id`` (None when there is none, or no such model yet)."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # no registered model of that name yet
        return None
    mine = [v for v in versions if (v.tags or {}).get(REGISTERED_RUN_TAG) == run_id]
    return str(min(int(v.version) for v in mine)) if mine else None


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``name@alias`` points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(tracking: TrackingConfig, alias: str, version: str) -> None:
    """Point ``registered_model_name@alias`` at ``version`` (the one place promotion moves an alias)."""
    make_client(tracking).set_registered_model_alias(tracking.registered_model_name, alias, str(version))


TEST_METRICS_TAG = "raypipe.test_metrics"  # on the run and the registered version: JSON, or "none"
TEST_METRICS_FILE = "test_metrics.json"


def record_test_metrics(
    cfg: Any, *, run_id: str, version: str | None, report: Mapping[str, Any]
) -> None:
    """Put a run's held-out test result on the MLflow run (``test/*`` metrics, ``test_metrics.json``, a tag) and
    on its registered version (one tag per metric plus the JSON), so whoever compares versions reads test
    numbers, not the val numbers the epoch was chosen on. ``report["metrics"]`` is empty when the run had no
    test rows: the tag then says ``none`` and no metric is claimed."""
    client = make_client(cfg.tracking)
    metrics = dict(report.get("metrics") or {})
    summary = json.dumps(report, default=float) if metrics else "none"
    if metrics:
        RunLogger(cfg.tracking, run_id).log_metrics(metrics, step=0)
        client.log_text(run_id, json.dumps(report, indent=1, default=float), TEST_METRICS_FILE)
    client.set_tag(run_id, TEST_METRICS_TAG, summary[:5000])
    if version is None:
        return
    name = cfg.tracking.registered_model_name
    client.set_model_version_tag(name, version, TEST_METRICS_TAG, summary[:5000])
    for key, value in metrics.items():
        client.set_model_version_tag(name, version, mlflow_metric_name(key), f"{float(value):.6g}")


# Names that moved out of this module (see the module docstring). ``RaypipePyfunc`` must resolve here for as long
# as registered models pickled under this path exist; the rest keep code written against the old module working.
_MOVED = {
    "RaypipePyfunc": "raypipe.classifier",
    "Classifier": "raypipe.classifier",
    "load_classifier": "raypipe.classifier",
    "load_checkpoint_dir": "raypipe.classifier",
    "example_from_shaped": "raypipe.classifier",
    "pyfunc_class": "raypipe.classifier",
    "MODEL_FILE": "raypipe.classifier",
    "META_FILE": "raypipe.classifier",
    "TRAIN_STATE_FILE": "raypipe.classifier",
    "VAL_PREDICTIONS_FILE": "raypipe.classifier",
    "plot_training_curves": "raypipe.reports",
    "plot_confusion_matrix": "raypipe.reports",
    "write_report_csv": "raypipe.reports",
    "evaluation_artifacts": "raypipe.reports",
}


def __getattr__(name: str) -> Any:
    if name == "RaypipePyfunc":
        from raypipe.classifier import pyfunc_class

        return pyfunc_class()
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
