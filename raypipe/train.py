"""Distributed training of a fusion model with Ray Train (V2) on feature shards, tracked in MLflow.

One training loop (:func:`raypipe.train_worker.train_loop_per_worker`, the worker side) serves ``raypipe train`` (:func:`fit`) and every Tune trial
(the sweep calls :func:`build_trainer` with a ``TuneReportCallback`` inside its trial function and fits it).

Why it is built this way:

* **Validated before Ray starts.** :func:`build_trainer` inspects the shards on the driver (dims, classes,
  split sizes), resolves the model's builder kwargs and builds the model once on the ``meta`` device, so an
  unknown model, a misspelt model option, a metric the task does not produce or an empty split fails with a
  one-line ``ConfigError`` naming the key, not a worker traceback minutes later.
* **Data streamed with Ray Data.** ``train`` is split across workers (``streaming_split``, equal row counts so
  every rank runs the same number of steps); ``preserve_order`` makes the split and the order deterministic,
  and a per-epoch seeded local shuffle gives each epoch its own order. That is what makes a resumed run
  reproduce the uninterrupted one. Validation runs on every rank, each scoring every world-th batch of the whole
  val split; the predictions are gathered on all ranks (macro-F1 and F_sco are not averageable over shards), so
  no rank idles in a collective while another validates, and every rank reports the same numbers. Loss uses
  the classification term only.
* **GPU path.** NCCL and ``train.gpus_per_worker`` GPUs per worker (fractions pack small models), autocast and
  the fp16 loss scaler follow the worker's device, the loss is accumulated on the device (one host sync per
  epoch), and DDP skips its unused-parameter search (``train.find_unused_parameters``).
* **Every rank reports, rank 0 writes the checkpoint** (model, optimizer, scheduler, scaler, epoch, classes,
  model config, ShardInfo, the history so far and the epoch's val predictions); ``CheckpointConfig`` keeps the
  best ``keep_best`` by ``train.metric``, the earlier epoch of equal values first (``checkpoint_rank``), and Ray
  always keeps the latest, for resuming.
* **Fault tolerance.** ``FailureConfig(max_failures)`` restarts the worker group from
  ``ray.train.get_checkpoint()``; the RNGs are re-seeded from (seed, epoch, rank) at every epoch start, so the
  epochs after a restart are the epochs an uninterrupted run would have had. Re-running with the same
  ``run_name`` + ``storage_path`` continues an interrupted run (Ray finds the run's state; MLflow the run linked
  in its folder). ``RAYPIPE_FAULT_CRASH_AT_EPOCH=N`` injects one worker crash after epoch N (a marker file in
  the run folder keeps the restarted attempt from crashing again).
* **MLflow from rank 0** (Train V2 has no MLflow callback): params once, metrics every epoch (``step=epoch``),
  and after the last epoch the artifacts and the best checkpoint as a pyfunc model; ``fit`` then registers it.
"""

# Long module: the driver's checks before Ray (data, model, holdout, pretraining, warm start), the trainer and
# the steps after fit (test split, registration) are read in that order; the worker's loop is raypipe.train_worker.

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raypipe.config import ConfigError, RaypipeConfig, config_to_dict, validate_config
from raypipe.config.base import apply_override
from raypipe.config.paths import resolve_paths
from raypipe.config.train import SCHEDULE_KEYS, TASK_METRICS, auto_schedule, optimizer_steps
from raypipe.data import DataError, DataSpec, prepare_data
from raypipe.io import fs as rfs
from raypipe.train_timeline import log_phases, mark, phase_seconds
from raypipe.train_worker import FAULT_ENV, FAULT_MARKER, RANK_KEY, base_lr, selection_key, train_loop_per_worker

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

logger = logging.getLogger(__name__)

__all__ = ["FAULT_ENV", "FAULT_MARKER", "TrainResult", "build_trainer", "fit", "prepare", "run", "score_test_split"]


@dataclass
class TrainResult:
    """What a finished training run produced."""

    run_name: str
    run_dir: str
    metric: str
    best_metrics: dict[str, float]
    best_checkpoint: str | None
    latest_checkpoint: str | None
    mlflow_run_id: str | None = None
    registered_model_name: str | None = None
    registered_model_version: str | None = None
    model_uri: str | None = None  # the logged MLflow model (models:/m-...)
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0  # > 0 when the last attempt started from a checkpoint (restart or re-run)
    # The best (val-chosen) checkpoint scored once on the held-out test split; empty when there are no test rows.
    test_metrics: dict[str, float] = field(default_factory=dict)
    num_test: int = 0
    best_epoch: int | None = None
    # train.init_from: tensors loaded / skipped (see raypipe.classifier.init_from_checkpoint); None without it.
    init_from: dict[str, Any] | None = None
    # Wall-clock marks of the run (driver and rank 0, in order) and the seconds of each phase between them: where
    # the start-up before the first optimizer step goes (see :func:`phase_seconds`).
    timeline: list[tuple[str, float]] = field(default_factory=list)

    @property
    def phases(self) -> dict[str, float]:
        return phase_seconds(self.timeline)

    @property
    def best_value(self) -> float | None:
        return self.best_metrics.get(self.metric)


# ---------------------------------------------------------------------------------------------- validation


def _builder_params(name: str) -> list[str]:
    from raypipe.models import builder_params, list_models

    try:
        return builder_params(name)
    except KeyError:
        raise ConfigError(
            f"config error: model.name: unknown model {name!r} (registered: {', '.join(list_models())})"
        ) from None


def model_kwargs(cfg: RaypipeConfig, spec: DataSpec) -> dict[str, Any]:
    """Builder kwargs from the shards, ``train.loss`` and ``model.params`` (:func:`raypipe.models.resolve_kwargs`),
    with the builder's defaults written out (the checkpoint records them all); a key that cannot be used is a
    one-line ``ConfigError``."""
    from raypipe.models import ModelOptionError, resolve_kwargs
    from raypipe.models.registry import with_defaults

    _builder_params(cfg.model.name)
    try:
        kwargs = resolve_kwargs(
            cfg.model.name, info=spec.shard_info, num_classes=len(spec.classes),
            multi_label=spec.task == "multi_label", loss_weights=cfg.train.loss.model_dump(),
            params=dict(cfg.model.params),
        )
    except ModelOptionError as exc:
        raise ConfigError(f"config error: {exc}") from None
    return with_defaults(cfg.model.name, kwargs)


def with_values(cfg: RaypipeConfig, values: dict[str, Any]) -> RaypipeConfig:
    """A copy of ``cfg`` with dotted ``values`` set, through the dict, so that each counts as set and MLflow's params,
    the checkpoint and the run's config name the number the run trained with (not ``auto``)."""
    data = config_to_dict(cfg)
    for key, value in values.items():
        apply_override(data, key.split("."), value)
    return validate_config(data)


def resolve_lr(cfg: RaypipeConfig) -> RaypipeConfig:
    """``train.optim.lr: auto`` -> the model's registry default (:func:`raypipe.train_worker.base_lr`)."""
    if cfg.train.optim.lr != "auto":
        return cfg
    return with_values(cfg, {"train.optim.lr": base_lr(cfg)})


def schedule_needs_data(cfg: RaypipeConfig) -> bool:
    return "auto" in (cfg.train.epochs, cfg.train.batch_size)


def resolve_schedule(cfg: RaypipeConfig, num_train: int | None, workers: int) -> RaypipeConfig:
    """``train.epochs`` / ``batch_size`` / ``early_stopping_patience: auto`` -> numbers for ``num_train`` training rows
    over ``workers`` workers (:func:`raypipe.config.train.auto_schedule`); logged once, since they set the run's
    length. ``num_train`` may be None when :func:`schedule_needs_data` is false."""
    t = cfg.train
    if "auto" not in (getattr(t, k) for k in SCHEDULE_KEYS):
        return cfg
    values = auto_schedule(t, num_train, workers)
    if schedule_needs_data(cfg):
        logger.info("train: %s epochs of batch %s per worker (%d steps each; %s training rows, %d worker(s)), early "
                    "stopping after %s epochs without a better %s (train.epochs / batch_size: auto)",
                    values["epochs"], values["batch_size"],
                    optimizer_steps((num_train or 0) // workers, values["batch_size"], t.optim.grad_accum),
                    num_train, workers, values["early_stopping_patience"] or "no", t.metric)
    return with_values(cfg, {f"train.{k}": values[k] for k in SCHEDULE_KEYS})


def check_model_builds(name: str, kwargs: dict[str, Any]) -> None:
    """Build the model on the meta device (no memory, no weights) so a bad option fails before Ray starts."""
    import torch

    from raypipe.models import create_model

    try:
        with torch.device("meta"):
            create_model(name, **kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"config error: model.params: model {name!r} rejects its options: {exc}") from None
    except (NotImplementedError, RuntimeError) as exc:  # e.g. pretrained weights cannot load on meta
        logger.debug("meta-device build of %r skipped: %s", name, exc)


def check_text_encoder(name: str, kwargs: dict[str, Any], spec: DataSpec) -> None:
    """A pretrained text tower must read the vocabulary the shards were tokenised with (one line otherwise)."""
    import inspect

    from raypipe.models.layers import check_text_tokenizer
    from raypipe.models.registry import get_builder

    defaults = {k: p.default for k, p in inspect.signature(get_builder(name)).parameters.items()
                if p.default is not inspect.Parameter.empty}
    eff = {**defaults, **kwargs}
    path = eff.get("text_encoder_path")
    reads_tokens = "text" in eff.get("modalities", ("text",)) and eff.get("text_source", "tokens") == "tokens"
    if not path or not reads_tokens:
        return
    try:
        check_text_tokenizer(path, spec.shard_info.tokenizer)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config error: model.params.text_encoder_path: {exc}".replace("\n", " ")) from None


def check_metric_for_classes(cfg: RaypipeConfig, classes: list[str]) -> None:
    """An f_sco metric needs WBDC codes as classes (one line naming the scores that work otherwise)."""
    example = _first_non_wbdc(classes)
    if cfg.train.metric.partition("/")[2] == "f_sco" and example is not None:
        others = ", ".join(f"val/{m}" for m in TASK_METRICS[cfg.train.task] if m != "f_sco")
        raise ConfigError(
            f"config error: train.metric: val/f_sco needs 4-digit WBDC level-2 codes as classes (found {example!r}); "
            f"use one of {others}"
        )


def selection_metric(t: Any, classes: list[str]) -> str:
    """What a run with the ``train`` section ``t`` selects by on these classes: ``t.metric`` as set, or, left at its
    default (val/f_sco), the score the classes allow (:func:`raypipe.metrics.score_for_classes`). One rule for
    training (:func:`resolve_metric`) and ``raypipe promote``."""
    from raypipe.metrics import score_for_classes

    if "metric" in t.model_fields_set or t.metric != "val/f_sco":
        return t.metric
    return f"val/{score_for_classes(classes)}"


def resolve_metric(cfg: RaypipeConfig, classes: list[str]) -> RaypipeConfig:
    """The default ``train.metric`` (val/f_sco) becomes val/f1_macro when the classes are not WBDC codes
    (:func:`selection_metric`).

    Why: class folders and manifests name classes freely, and a first run on them should train with the defaults
    instead of stopping at a metric it cannot compute. A metric the user set (command line, YAML, preset) is kept
    and checked (:func:`check_metric_for_classes`). The resolved name is set in the returned config, so the
    workers, MLflow's params, the checkpoint and the sweep's trials see what the run selects by.
    """
    metric = selection_metric(cfg.train, classes)
    if metric == cfg.train.metric:
        check_metric_for_classes(cfg, classes)
        return cfg
    logger.info("train.metric: %s (the default val/f_sco needs 4-digit WBDC codes as classes, found %r); "
                "set train.metric to choose", metric, _first_non_wbdc(classes))
    return with_values(cfg, {"train.metric": metric})


def _first_non_wbdc(classes: list[str]) -> str | None:
    from raypipe.metrics import is_wbdc_code

    return next((c for c in classes if not is_wbdc_code(c)), None)


def check_holdout(holdout: list[str], classes: list[str]) -> None:
    """``train.holdout_classes`` must name classes of the vocabulary (taxonomy or data) and leave 2 to train on."""
    unknown = sorted(set(holdout) - set(classes))
    if unknown:
        shown = ", ".join(classes[:8]) + (" ..." if len(classes) > 8 else "")
        raise ConfigError(f"config error: train.holdout_classes: {unknown} are not classes of the taxonomy / data "
                          f"({len(classes)} classes: {shown})")
    if len(classes) - len(set(holdout)) < 2:
        raise ConfigError(f"config error: train.holdout_classes: holding out {len(set(holdout))} of {len(classes)} "
                          "classes leaves fewer than 2 to train on")


def check_pretrain_model(cfg: RaypipeConfig) -> None:
    """``train.pretrain`` needs a model with a weighted auxiliary head (:func:`raypipe.models.resolve.pretrain_problem`)."""
    from raypipe.models.resolve import pretrain_problem

    problem = pretrain_problem(cfg.model.name, cfg.train.loss.model_dump()) if cfg.train.pretrain else None
    if problem:
        raise ConfigError(f"config error: train.pretrain: {problem}")


def check_init_from(cfg: RaypipeConfig) -> None:
    """``train.init_from`` must be a readable checkpoint of the same model (one line otherwise, before Ray)."""
    from raypipe.classifier import read_checkpoint_meta

    uri = cfg.train.init_from
    if not uri:
        return
    tracking = cfg.tracking.tracking_uri if cfg.tracking.enabled else None
    try:
        meta = read_checkpoint_meta(uri, cfg.storage, tracking_uri=tracking)
    except Exception as exc:  # noqa: BLE001 - missing folder, bad URI, unknown registry version: one line each
        raise ConfigError(f"config error: train.init_from: cannot read checkpoint {uri!r}: {exc}".replace("\n", " ")) from None
    if meta.get("model_name") != cfg.model.name:
        raise ConfigError(
            f"config error: train.init_from: {uri!r} holds a {meta.get('model_name')!r} model, not "
            f"{cfg.model.name!r} (model.name); weights only carry over within one model"
        )


def check_workers(cfg: RaypipeConfig, spec: DataSpec) -> None:
    """Every worker needs training rows (checked again once ``auto`` is planned); the amp/GPU pairing too."""
    if cfg.train.use_gpu is False and cfg.train.amp != "none":
        raise ConfigError(f"config error: train.amp={cfg.train.amp} needs a GPU (train.use_gpu resolved to false)")
    if isinstance(cfg.train.num_workers, int) and spec.num_train < cfg.train.num_workers:
        raise ConfigError(
            f"config error: train.num_workers: {spec.num_train} training rows cannot feed "
            f"{cfg.train.num_workers} workers (more data or fewer workers)"
        )


def prepare(cfg: RaypipeConfig) -> tuple[RaypipeConfig, DataSpec, dict[str, Any]]:
    """Everything checked before Ray starts -> ``(cfg with absolute paths, data spec, model kwargs)``."""
    _builder_params(cfg.model.name)
    cfg = resolve_lr(resolve_paths(cfg))
    if cfg.train.use_gpu is False and cfg.train.amp != "none":  # also enforced by the config model
        raise ConfigError("config error: train.amp needs train.use_gpu=true")
    try:
        spec = prepare_data(
            cfg.train.data,
            task=cfg.train.task,
            val_fraction=cfg.train.val_fraction,
            test_fraction=cfg.train.test_fraction,
            taxonomy=cfg.train.taxonomy,
            storage=cfg.storage,
            holdout=cfg.train.holdout_classes,
            keep_unlabelled=cfg.train.pretrain,
        )
    except DataError as exc:
        raise ConfigError(f"config error: train.data: {exc}") from None
    check_holdout(cfg.train.holdout_classes, spec.classes)
    cfg = resolve_metric(cfg, spec.classes)
    check_workers(cfg, spec)
    check_pretrain_model(cfg)
    check_init_from(cfg)
    if spec.num_val == 0:
        raise ConfigError(
            f"config error: train.val_fraction: no validation rows among {spec.num_train} labelled rows; raise it"
        )
    if spec.num_test == 0 and not cfg.train.pretrain:
        logger.warning("no test rows (train.test_fraction=%g): this run will report no test metrics",
                       cfg.train.test_fraction)
    kwargs = model_kwargs(cfg, spec)
    check_text_encoder(cfg.model.name, kwargs, spec)
    check_model_builds(cfg.model.name, kwargs)
    return cfg, spec, kwargs


# ------------------------------------------------------------------------------------------- the trainer


def _run_dir(cfg: RaypipeConfig, run_name: str) -> str:
    return rfs.join(cfg.train.storage_path, run_name)


def worker_group_configs(t: Any) -> tuple[Any, Any]:
    """``(TorchConfig, ScalingConfig)`` of the Train worker group: NCCL and ``gpus_per_worker`` GPUs (1 by default)
    per worker on GPUs, gloo on CPUs. ``t`` is the ``train`` config section."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    resources: dict[str, float] = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    return (
        TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
    )


def build_trainer(
    cfg: RaypipeConfig, *, run_name: str | None = None, callbacks: list[Any] | None = None
) -> TorchTrainer:
    """A ready-to-fit ``TorchTrainer`` for ``cfg`` (validated up front; see the module docstring).

    ``run_name`` defaults to ``train.run_name``; with the same ``train.storage_path`` it names the Ray run folder,
    so building the same run again continues it. ``callbacks`` are Ray Train ``UserCallback`` objects (the
    sweep passes ``TuneReportCallback()``).
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raypipe.runtime import ensure_ray, planned
    from raypipe.tracking import client_warming

    marks: list[tuple[str, float]] = []
    mark(marks, "build_start")
    cfg, spec, kwargs = prepare(cfg)
    mark(marks, "prepare")
    with client_warming(cfg.tracking):  # MLflow's import and store open run beside ray.init
        ensure_ray(cfg)
        mark(marks, "ray_init")
        cfg, _ = planned(cfg, "train")  # auto workers / CPUs / GPU from the cluster; refuses what cannot be placed
        check_workers(cfg, spec)
    cfg = resolve_schedule(cfg, spec.num_train, cfg.train.num_workers)  # auto epochs / batch for the planned workers
    run_name = run_name or cfg.train.run_name
    run_dir = _run_dir(cfg, run_name)
    from raypipe.data import ray_datasets

    mlflow_run_id = None
    if cfg.tracking.enabled:
        from raypipe.tracking import open_train_run

        mlflow_run_id = open_train_run(cfg.tracking, run_name=run_name, run_dir=run_dir, storage=cfg.storage)
    mark(marks, "mlflow_open")
    datasets = ray_datasets(spec, materialize=cfg.train.cache_data)
    mark(marks, "datasets")

    fault = None
    if os.environ.get(FAULT_ENV):
        fault = {"crash_at_epoch": int(os.environ[FAULT_ENV]), "marker": rfs.join(run_dir, FAULT_MARKER)}
        logger.warning("fault injection: one worker crashes after epoch %d", fault["crash_at_epoch"])

    loop_config = {
        "cfg": config_to_dict(cfg),
        "spec": spec.to_dict(),
        "model_kwargs": kwargs,
        "run_name": run_name,
        "mlflow_run_id": mlflow_run_id,
        "fault": fault,
        "timeline": marks,
    }
    t = cfg.train
    torch_config, scaling_config = worker_group_configs(t)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=torch_config,
        scaling_config=scaling_config,
        datasets=datasets,
        # Only train is split (one worker reads it whole: a split of one would only add a coordinator actor);
        # every rank reads the whole val stream and scores its share of the batches (see raypipe.train_worker.validate).
        # preserve_order: deterministic split and order.
        dataset_config=DataConfig(
            datasets_to_split=["train"] if t.num_workers > 1 else [],
            execution_options=ExecutionOptions(preserve_order=True),
            enable_shard_locality=False,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=t.storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_best, checkpoint_score_attribute=RANK_KEY, checkpoint_score_order="max"
            ),
            callbacks=list(callbacks or []),
        ),
    )


# ---------------------------------------------------------------------------------------------- driver


class _EpochProgress:
    """The driver's one progress line per epoch while ``trainer.fit()`` blocks: the epoch metrics rank 0 logs to
    MLflow, read back every few seconds (the workers' own log lines stay in Ray's logs unless -v)."""

    def __init__(self, cfg: RaypipeConfig, run_id: str | None, *, enabled: bool, every_s: float = 3.0) -> None:
        import threading

        self.cfg, self.run_id, self.every_s = cfg, run_id if enabled else None, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="raypipe-train-progress", daemon=True)
        self.seen = 0

    def __enter__(self) -> _EpochProgress:
        if self.run_id:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self._report()

    def _poll(self) -> None:
        while not self.stop.wait(self.every_s):
            self._report()

    def _report(self) -> None:
        if not self.run_id:
            return
        from raypipe.tracking import make_client, mlflow_metric_name

        t = self.cfg.train
        try:
            client = make_client(self.cfg.tracking)
            hist = client.get_metric_history(self.run_id, mlflow_metric_name(t.metric))
            losses = {m.step: m.value for m in client.get_metric_history(self.run_id, "train/loss")}
        except Exception:  # progress is cosmetic; tracking problems surface elsewhere
            return
        every = max(1, t.epochs // 8)  # at most ~8 lines per run
        for m in sorted(hist, key=lambda m: m.step):
            if m.step > self.seen:
                self.seen = m.step
                if m.step % every and m.step != t.epochs:
                    continue
                logger.info("train: epoch %d/%d, train/loss %.4f, %s %.4f", m.step, t.epochs,
                            losses.get(m.step, float("nan")), t.metric, m.value)


def fit(
    cfg: RaypipeConfig, *, run_name: str | None = None, callbacks: list[Any] | None = None
) -> TrainResult:
    """Train (or continue) the run, then register the best model when ``train.register_model`` and tracking."""
    from raypipe.tracking import end_run, register_run_model

    trainer = build_trainer(cfg, run_name=run_name, callbacks=callbacks)
    loop_config = trainer.train_loop_config
    run_cfg = RaypipeConfig.model_validate(loop_config["cfg"])
    run_name = loop_config["run_name"]
    mlflow_run_id = loop_config["mlflow_run_id"]
    marks = [tuple(m) for m in loop_config["timeline"]]
    mark(marks, "trainer_built")
    try:
        with _EpochProgress(run_cfg, mlflow_run_id, enabled=callbacks is None):
            result = trainer.fit()
    except BaseException:
        if mlflow_run_id:
            end_run(run_cfg.tracking, mlflow_run_id, "FAILED")
        raise
    summary = result.return_value or {}
    best_ckpt = None
    best_metrics: dict[str, float] = summary.get("best_metrics", {})
    if result.best_checkpoints:
        t = run_cfg.train
        ckpt, metrics = max(result.best_checkpoints, key=lambda cm: selection_key(cm[1], t.metric, t.mode))
        best_ckpt = ckpt.path
        best_metrics = best_metrics or {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    out = TrainResult(
        run_name=run_name,
        run_dir=_run_dir(run_cfg, run_name),
        metric=run_cfg.train.metric,
        best_metrics=best_metrics,
        best_checkpoint=summary.get("best_checkpoint", best_ckpt),
        latest_checkpoint=result.checkpoint.path if result.checkpoint else None,
        mlflow_run_id=mlflow_run_id,
        model_uri=summary.get("model_uri"),
        history=list(summary.get("history", [])),
        resumed_from_epoch=int(summary.get("resumed_from_epoch", 0)),
        timeline=marks + [tuple(m) for m in summary.get("timeline", [])],
    )
    mark(out.timeline, "fit_returned")
    out.best_epoch = int(best_metrics["epoch"]) if "epoch" in best_metrics else None
    out.init_from = summary.get("init_from")
    spec = DataSpec.from_dict(loop_config["spec"])
    if run_cfg.train.pretrain:  # no labels were scored; the test split stays unread for the finetune's numbers
        report = {"split": "test", "num_rows": 0, "metrics": {}, "reason": "pretraining run: no test metrics"}
    else:
        report = score_test_split(run_cfg, spec, out.best_checkpoint)
    out.test_metrics, out.num_test = dict(report["metrics"]), int(report["num_rows"])
    mark(out.timeline, "test_scored")
    if mlflow_run_id and wants_registration(run_cfg) and out.model_uri:
        out.registered_model_version = register_run_model(run_cfg, run_id=mlflow_run_id)
        out.registered_model_name = run_cfg.tracking.registered_model_name
    if mlflow_run_id:
        from raypipe.tracking import record_test_metrics

        record_test_metrics(run_cfg, run_id=mlflow_run_id, version=out.registered_model_version, report=report)
    mark(out.timeline, "registered")
    log_phases(out.phases)
    return out


def wants_registration(cfg: RaypipeConfig) -> bool:
    """``train.register_model``; a pretraining run (its head is untrained) registers only when it is set explicitly."""
    t = cfg.train
    return t.register_model and (not t.pretrain or "register_model" in t.model_fields_set)


def score_test_split(cfg: RaypipeConfig, spec: DataSpec, checkpoint: str | None) -> dict[str, Any]:
    """The held-out test metrics of the best checkpoint, computed once after training (driver side).

    Only here is the test split read: epochs were chosen and training stopped on val, so these numbers are the
    run's unbiased estimate. With no test rows (or no checkpoint) the report says why and holds no metrics.
    """
    from raypipe.classifier import load_classifier
    from raypipe.evaluate import holdout_rows, score_split
    from raypipe.metrics import compute_metrics

    report: dict[str, Any] = {"split": "test", "num_rows": spec.num_test, "metrics": {},
                              "test_fraction": spec.test_fraction, "checkpoint": checkpoint}
    if spec.num_test == 0 or checkpoint is None:
        report["reason"] = "no test rows" if spec.num_test == 0 else "no checkpoint"
        return report
    try:
        clf = load_classifier(checkpoint, cfg.storage)
        scores, _, y, _ = score_split(clf, spec, "test", cfg.storage, batch_size=64)
    except (OSError, DataError) as exc:  # the model is trained and registered; say why there is no test number
        logger.error("could not score the test split with checkpoint %s: %s", checkpoint, exc)
        report["reason"] = f"test scoring failed: {exc}"
        return report
    seen = ~holdout_rows(y, clf.classes, spec.holdout_classes, clf.task)  # held-out classes are zero-shot's rows
    report["num_rows"] = int(seen.sum())
    if not seen.any():
        report["reason"] = "every test row is of a held-out class"
        return report
    report["metrics"] = compute_metrics(scores[seen], y[seen], task=clf.task, classes=clf.classes, prefix="test/")
    report["epoch"] = int(clf.meta.get("epoch", 0))
    return report


def run(cfg: RaypipeConfig) -> int:
    """``raypipe train``: 0 on success (errors become exit codes in :func:`raypipe.cli.run_stage`)."""
    result = fit(cfg)  # a ConfigError becomes exit code 2 in raypipe.cli.run_stage
    value = result.best_value
    logger.info(
        "trained %s: best %s=%s (epoch %s), checkpoint %s%s",
        result.run_name, result.metric, f"{value:.4f}" if value is not None else "n/a", result.best_epoch,
        result.best_checkpoint,
        f", registered {result.registered_model_name} v{result.registered_model_version}"
        if result.registered_model_version else "",
    )
    if result.init_from:
        c = result.init_from
        logger.info("started from %s: %d tensors loaded, %d of the classifier head and %d of another shape skipped",
                    c["uri"], c["loaded"], c["skipped_head"], c["skipped_shape"])
    if cfg.train.pretrain:
        logger.info("pretraining run: no test metrics claimed; finetune with --set train.init_from=%s",
                    result.best_checkpoint)
    elif result.test_metrics:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in result.test_metrics.items() if not k.endswith("/n"))
        logger.info("held-out test split (%d rows, read once after training): %s", result.num_test, shown)
    else:
        logger.info("no test rows (train.test_fraction=%g): no test metrics claimed", cfg.train.test_fraction)
    return 0
