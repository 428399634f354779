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

:func:`load_classifier` is what ``raypipe eval`` and the labelling job use: it accepts ``models:/name@alias``,
``models:/name/version`` or a checkpoint folder, and always rebuilds the same torch model from the checkpoint
files (``model.pt`` + ``meta.json``). The pyfunc wrapper (``RaypipePyfunc``) wraps the same
:class:`Classifier`, so ``mlflow.pyfunc.load_model`` gives identical scores.

Checkpoint folder layout (written by :mod:`raypipe.train`): ``model.pt`` (state dict), ``meta.json`` (model
name and builder kwargs, classes, task, ShardInfo, epoch, metrics, history), ``train_state.pt`` (optimizer,
scheduler, scaler; only for resuming) and ``val_predictions.npz`` (the epoch's validation scores/targets).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.config import StorageConfig, TrackingConfig
from raypipe.config.paths import absolute_tracking_uri as _absolute_tracking_uri
from raypipe.io import fs as rfs
from raypipe.schema import ShardInfo

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"
VAL_PREDICTIONS_FILE = "val_predictions.npz"
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


def flatten_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.optim.lr": "0.001"}``; lists and empty mappings as JSON."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple | Mapping) else str(value)
            out[name] = text[:6000]  # MLflow's param value limit
    return out


def make_client(tracking: TrackingConfig) -> MlflowClient:
    from mlflow import MlflowClient

    uri = absolute_tracking_uri(tracking.tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


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


def end_run(tracking: TrackingConfig, run_id: str, status: str) -> None:
    make_client(tracking).set_terminated(run_id, status=status)


class RunLogger:
    """Rank 0's handle on the training run (a client, never the fluent active-run state, except for
    ``log_model`` which MLflow only offers fluently)."""

    def __init__(self, tracking: TrackingConfig, run_id: str) -> None:
        self.tracking = tracking
        self.run_id = run_id
        self.client = make_client(tracking)

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

        with tempfile.TemporaryDirectory(prefix="raypipe-model-") as parent:
            # Only what inference needs: the optimizer state would double the model's size in the registry.
            tmp = Path(parent) / "checkpoint"  # the folder name becomes the artifact's name
            tmp.mkdir()
            for name in (MODEL_FILE, META_FILE):
                shutil.copy2(Path(checkpoint_dir) / name, tmp / name)
            mlflow.set_tracking_uri(absolute_tracking_uri(self.tracking.tracking_uri))
            with mlflow.start_run(run_id=self.run_id, nested=bool(self.tracking.parent_run_id)):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT,
                    python_model=pyfunc_class()(),
                    artifacts={"checkpoint": str(tmp)},
                    input_example=dict(input_example),
                    # Explicit: MLflow's import capture would run the model in a subprocess just to list them.
                    pip_requirements=_pip_requirements(),
                )
        self.client.set_tag(self.run_id, MODEL_URI_TAG, info.model_uri)
        return info.model_uri

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "numpy", "pyarrow", "mlflow", "transformers", "pydantic", "pyyaml", "fsspec"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs


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


# ------------------------------------------------------------------------------------------ artifacts


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | Path, *, metric: str) -> None:
    """Loss terms and the selection metric per epoch (matplotlib Agg: no display needed on workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    losses = sorted({k for h in history for k in h if k.startswith(("train/", "val/")) and k.endswith("loss")}
                    | {k for h in history for k in h if k.startswith("train/loss_")})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key in losses:
        axes[0].plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_title("losses")
    axes[0].legend(fontsize=7)
    axes[1].plot(epochs, [h.get(metric, np.nan) for h in history], marker="o", color="C3")
    axes[1].set_xlabel("epoch")
    axes[1].set_title(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    if n <= 60:
        ax.set_xticks(range(n), [str(c) for c in classes], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [str(c) for c in classes], fontsize=7)
        if n <= 30:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report_csv(report: Mapping[str, Sequence[Any]], path: str | Path) -> None:
    import csv

    keys = list(report)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for row in zip(*(report[k] for k in keys), strict=True):
            w.writerow(row)


def evaluation_artifacts(
    out_dir: str | Path, *, scores: np.ndarray, targets: np.ndarray, classes: Sequence[str], task: str, title: str
) -> list[Path]:
    """Confusion matrix PNG + per-class report CSV (single label) or per-class AP CSV (multi label)."""
    from raypipe import metrics as M

    out = Path(out_dir)
    paths = []
    if task == "single_label":
        pred = scores.argmax(axis=1)
        cm = M.confusion_matrix(targets, pred, len(classes))
        plot_confusion_matrix(cm, classes, out / "confusion_matrix.png", title=title)
        write_report_csv(M.per_class_report(targets, pred, classes), out / "per_class_report.csv")
        paths += [out / "confusion_matrix.png", out / "per_class_report.csv"]
    else:
        ap = M.average_precision_per_class(scores, targets)
        write_report_csv(
            {"class": list(classes), "ap": ap.tolist(), "support": np.asarray(targets).sum(axis=0).tolist()},
            out / "per_class_report.csv",
        )
        paths.append(out / "per_class_report.csv")
    return paths


# ------------------------------------------------------------------------------------------ classifier


class Classifier:
    """A trained model ready for inference on feature-shard batches (numpy in, numpy out).

    ``predict_proba`` accepts the flat shard columns (as Ray Data / pyarrow / the pyfunc input example give
    them) or already shaped model arrays; scores are softmax (single label) or sigmoid (multi label).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        meta: Mapping[str, Any],
        *,
        model_name: str,
        model_version: str,
        source: str,
        device: str = "cpu",
    ) -> None:
        self.model = model.eval().to(device)
        self.meta = dict(meta)
        self.classes: list[str] = list(meta["classes"])
        self.task: str = meta["task"]
        self.arch: str = meta["model_name"]
        self.model_name = model_name
        self.model_version = model_version
        self.source = source
        self.shard_info = ShardInfo(**meta["shard_info"])
        self.device = device

    def to_device(self, device: Any) -> Classifier:
        """Move the model; batches are collated straight onto the same device."""
        self.model.to(device)
        self.device = str(device)
        return self

    def _batch(self, np_batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        from raypipe.data import collate

        return collate(np_batch, self.shard_info, device=self.device)

    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Model logits ``(B, C)`` for a collated (possibly corrupted) torch batch."""
        import torch

        with torch.inference_mode():
            return self.model(batch)["logits"].float()

    def scores_from_logits(self, logits: torch.Tensor) -> np.ndarray:
        import torch

        probs = torch.softmax(logits, dim=-1) if self.task == "single_label" else torch.sigmoid(logits)
        return probs.cpu().numpy().astype(np.float32)

    def predict_proba(self, np_batch: Mapping[str, Any], *, chunk: int = 256) -> np.ndarray:
        """``(B, C)`` class scores for a batch of shard rows."""
        n = len(next(iter(np_batch.values())))
        if n == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        outs = []
        for start in range(0, n, chunk):
            part = {k: v[start : start + chunk] for k, v in np_batch.items()}
            outs.append(self.scores_from_logits(self.logits(self._batch(part))))
        return np.concatenate(outs)

    @property
    def zero_shot_proba(self) -> Any:
        """Open-vocabulary scores ``(B, C')`` against class-name embeddings ``(C', Dt)``; only for models with a
        ``zero_shot_logits`` head (CAV-Net built with ``contrastive=True``), otherwise absent (AttributeError)."""
        if not hasattr(self.model, "zero_shot_logits") or not getattr(self.model, "contrastive", False):
            raise AttributeError(f"model {self.arch!r} has no zero-shot head (needs CAV-Net with contrastive=True)")
        return self._zero_shot_proba

    def _zero_shot_proba(self, np_batch: Mapping[str, Any], class_text_emb: np.ndarray) -> np.ndarray:
        import torch

        batch = self._batch(np_batch)
        with torch.inference_mode():
            sims = self.model.zero_shot_logits(batch, torch.as_tensor(np.asarray(class_text_emb), dtype=torch.float32, device=self.device))
            scale = self.model.logit_scale.exp() if hasattr(self.model, "logit_scale") else 1.0
            return torch.softmax(sims * scale, dim=-1).cpu().numpy().astype(np.float32)

    def input_example(self, np_batch: Mapping[str, Any], rows: int = 2) -> dict[str, np.ndarray]:
        """A small pyfunc input example in the flat shard layout (2-d arrays, float32 features)."""
        from raypipe.data import shape_columns

        shaped = shape_columns({k: v[:rows] for k, v in np_batch.items()}, self.shard_info)
        return example_from_shaped(shaped)


def example_from_shaped(shaped: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Shaped model arrays -> the flat shard layout a pyfunc caller sends (one 2-d array per column)."""
    n = len(shaped["frame_feats"])
    return {
        "frame_emb": np.asarray(shaped["frame_feats"], np.float32).reshape(n, -1),
        "frame_mask": np.asarray(shaped["frame_mask"], bool),
        "audio_emb": np.asarray(shaped["audio_feats"], np.float32).reshape(n, -1),
        "audio_mask": np.asarray(shaped["audio_mask"], bool),
        "input_ids": np.asarray(shaped["input_ids"], np.int32),
        "attention_mask": np.asarray(shaped["attention_mask"], np.int32),
        "text_emb": np.asarray(shaped["text_emb"], np.float32),
    }


def build_model_from_meta(meta: Mapping[str, Any]) -> torch.nn.Module:
    from raypipe.models import create_model

    return create_model(meta["model_name"], **meta["model_kwargs"])


def load_checkpoint_dir(path: str | Path, *, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a local checkpoint folder -> ``(model in eval mode, meta)``."""
    import torch

    p = Path(path)
    if not (p / META_FILE).is_file() or not (p / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a raypipe checkpoint (needs {MODEL_FILE} and {META_FILE})")
    meta = json.loads((p / META_FILE).read_text())
    model = build_model_from_meta(meta)
    state = torch.load(p / MODEL_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), meta


def _make_pyfunc_class() -> type:
    import mlflow.pyfunc

    class RaypipePyfunc(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper: ``predict`` takes the flat shard columns (dict of 2-d arrays) -> ``(B, C)`` scores."""

        def load_context(self, context: Any) -> None:
            self.clf = _classifier_from_dir(context.artifacts["checkpoint"], model_name="", model_version="", source="")

        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 (MLflow reads the hints)
            if hasattr(model_input, "to_dict") and not isinstance(model_input, dict):  # a pandas DataFrame
                model_input = {c: np.stack(model_input[c].to_numpy()) for c in model_input.columns}
            return self.clf.predict_proba(model_input)

    RaypipePyfunc.__module__ = __name__
    RaypipePyfunc.__qualname__ = "RaypipePyfunc"
    return RaypipePyfunc


def pyfunc_class() -> type:
    """The ``mlflow.pyfunc.PythonModel`` subclass, created on first use so that importing this module (label
    actors, eval) does not pay for importing mlflow.pyfunc; pickled by reference as
    ``raypipe.tracking.RaypipePyfunc`` (resolved by the module ``__getattr__``)."""
    cls = globals().get("RaypipePyfunc")
    if cls is None:
        cls = globals()["RaypipePyfunc"] = _make_pyfunc_class()
    return cls


def __getattr__(name: str) -> Any:
    if name == "RaypipePyfunc":
        return pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _classifier_from_dir(path: str, *, model_name: str, model_version: str, source: str) -> Classifier:
    model, meta = load_checkpoint_dir(path)
    return Classifier(
        model, meta, model_name=model_name or meta["model_name"], model_version=model_version, source=source
    )


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    rest = uri[len("models:/") :]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version, None
    raise ValueError(f"model URI {uri!r} must be models:/<name>@<alias> or models:/<name>/<version>")


def load_classifier(uri: str, storage: StorageConfig | None = None, *, tracking_uri: str | None = None) -> Classifier:
    """A :class:`Classifier` from ``models:/name@alias``, ``models:/name/version`` or a checkpoint folder.

    Registry URIs resolve through the current MLflow tracking/registry URI (``mlflow.set_tracking_uri`` or
    ``MLFLOW_TRACKING_URI``) unless ``tracking_uri`` is given. ``model_version`` is the registry version, or
    ``ckpt-<hash>`` of the folder for a checkpoint path, so predictions of different models never mix.
    """
    if uri.startswith("models:/"):
        import mlflow
        from mlflow import MlflowClient

        if tracking_uri:
            tracking_uri = absolute_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        name, version, alias = _parse_models_uri(uri)
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        with tempfile.TemporaryDirectory(prefix="raypipe-load-") as tmp:
            if tracking_uri:
                mlflow.set_tracking_uri(tracking_uri)
                mlflow.set_registry_uri(tracking_uri)
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp)
            found = sorted((Path(local) / "artifacts").glob(f"*/{META_FILE}"))
            ckpt = found[0].parent if found else None
            if ckpt is None:
                raise FileNotFoundError(f"{uri}: the registered model has no raypipe checkpoint artifact")
            return _classifier_from_dir(str(ckpt), model_name=name, model_version=str(mv.version), source=uri)
    local, tmp = rfs.local_copy(uri, storage)
    try:
        digest = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:10]
        return _classifier_from_dir(local, model_name="", model_version=f"ckpt-{digest}", source=uri)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
