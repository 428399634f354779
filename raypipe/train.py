"""Distributed training of a fusion model with Ray Train (V2) on feature shards, tracked in MLflow.

One training loop (:func:`train_loop_per_worker`) serves ``raypipe train`` (:func:`fit`) and every Tune trial
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
  best ``keep_best`` by ``train.metric`` (and Ray always keeps the latest, for resuming).
* **Fault tolerance.** ``FailureConfig(max_failures)`` restarts the worker group from
  ``ray.train.get_checkpoint()``; the RNGs are re-seeded from (seed, epoch, rank) at every epoch start, so the
  epochs after a restart are the epochs an uninterrupted run would have had. Re-running with the same
  ``run_name`` + ``storage_path`` continues an interrupted run (Ray finds the run's state; MLflow the run linked
  in its folder). ``RAYPIPE_FAULT_CRASH_AT_EPOCH=N`` injects one worker crash after epoch N (a marker file in
  the run folder keeps the restarted attempt from crashing again).
* **MLflow from rank 0** (Train V2 has no MLflow callback): params once, metrics every epoch (``step=epoch``),
  and after the last epoch the artifacts and the best checkpoint as a pyfunc model; ``fit`` then registers it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from raypipe.config import ConfigError, LossConfig, RaypipeConfig
from raypipe.config import paths as config_paths
from raypipe.config.train import TASK_METRICS
from raypipe.data import DataError, DataSpec, prepare_data
from raypipe.io import fs as rfs

if TYPE_CHECKING:
    import torch
    from ray.train.torch import TorchTrainer

logger = logging.getLogger(__name__)

FAULT_ENV = "RAYPIPE_FAULT_CRASH_AT_EPOCH"
FAULT_MARKER = ".raypipe_fault_injected"
AUX_TERMS = ("contrastive", "mlm", "vtm")
VAL_CACHE_BYTES = 256 * 2**20  # each rank keeps a val split up to this size in memory after the first epoch


class InjectedFault(RuntimeError):
    """Raised by the fault-injection hook; a real worker failure as far as Ray Train is concerned."""


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

    @property
    def best_value(self) -> float | None:
        return self.best_metrics.get(self.metric)


# ---------------------------------------------------------------------------------------------- validation


def resolve_paths(cfg: RaypipeConfig) -> RaypipeConfig:
    """Absolute local paths and tracking URI: Ray workers run with another cwd (see :mod:`raypipe.config.paths`)."""
    return config_paths.resolve_paths(cfg)


def config_to_dict(cfg: RaypipeConfig) -> dict[str, Any]:
    """JSON-able dump that validates back to the same config (only explicitly set fields: some sections reject
    options that their mode does not read, so a full dump with every default would not round-trip)."""
    return cfg.model_dump(mode="json", exclude_unset=True)


def _builder_params(name: str) -> list[str]:
    from raypipe.models import builder_params, list_models

    try:
        return builder_params(name)
    except KeyError:
        raise ConfigError(
            f"config error: model.name: unknown model {name!r} (registered: {', '.join(list_models())})"
        ) from None


def effective_loss(cfg: RaypipeConfig) -> LossConfig:
    """The loss weights this model can honour: an auxiliary term whose switch the builder lacks is off."""
    accepted = set(_builder_params(cfg.model.name))
    weights = cfg.train.loss.model_dump()
    for term in AUX_TERMS:
        if weights[term] > 0 and term not in accepted:
            logger.info("model %r has no %s branch: train.loss.%s=%s ignored", cfg.model.name, term, term, weights[term])
            weights[term] = 0.0
    return LossConfig(**weights)


def model_kwargs(cfg: RaypipeConfig, spec: DataSpec) -> dict[str, Any]:
    """Builder kwargs: data-derived dims and vocabulary + the loss switches + ``model.params``.

    The data-derived ones (``num_classes``, ``frame_dim`` ...) and the loss switches are passed only to builders
    whose signature has them; setting them in ``model.params`` is an error (they follow from the shards and from
    ``train.loss``), as is any key the builder does not accept.
    """
    name = cfg.model.name
    accepted = _builder_params(name)
    info = spec.shard_info
    tok = info.tokenizer or {}
    derived: dict[str, Any] = {
        "num_classes": len(spec.classes),
        "frame_dim": info.frame_dim,
        "audio_dim": info.audio_dim,
        "text_dim": info.text_dim,
        "vocab_size": int(tok.get("vocab_size") or 0),
        "max_frames": info.max_frames,
        "multi_label": spec.task == "multi_label",
    }
    if tok.get("mask_token_id") is not None:
        derived["mask_token_id"] = int(tok["mask_token_id"])
    if tok.get("special_ids") is not None:
        derived["special_token_ids"] = [int(i) for i in tok["special_ids"]]
    loss = effective_loss(cfg)
    switches = {term: getattr(loss, term) > 0 for term in AUX_TERMS if term in accepted}
    params = dict(cfg.model.params)
    for key in params:
        if key not in accepted:
            allowed = [p for p in accepted if p not in derived and p not in switches]
            raise ConfigError(f"config error: model.params.{key}: not an option of model {name!r} (allowed: {', '.join(allowed)})")
        if key in derived:
            raise ConfigError(f"config error: model.params.{key}: set from the feature shards / task, do not set it")
        if key in switches:
            raise ConfigError(f"config error: model.params.{key}: set by train.loss.{key} (0 turns the branch off)")
    kwargs = {k: v for k, v in derived.items() if k in accepted}
    kwargs.update(switches)
    kwargs.update(params)
    return kwargs


def contrastive_loss_kind(model: Any, name: str) -> str:
    """MIL-NCE (DMAFNet) or InfoNCE (CAV-Net): a model may declare ``contrastive_loss``; CAV-Net's paper uses InfoNCE."""
    return getattr(model, "contrastive_loss", None) or ("infonce" if name == "cavnet" else "milnce")


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
    from raypipe.metrics import is_wbdc_code

    name = cfg.train.metric.partition("/")[2]
    if name == "f_sco" and not all(is_wbdc_code(c) for c in classes):
        example = next(c for c in classes if not is_wbdc_code(c))
        others = ", ".join(f"val/{m}" for m in TASK_METRICS[cfg.train.task] if m != "f_sco")
        raise ConfigError(
            f"config error: train.metric: val/f_sco needs 4-digit WBDC level-2 codes as classes (found {example!r}); "
            f"use one of {others}"
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
    cfg = resolve_paths(cfg)
    _builder_params(cfg.model.name)
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
        )
    except DataError as exc:
        raise ConfigError(f"config error: train.data: {exc}") from None
    check_metric_for_classes(cfg, spec.classes)
    check_workers(cfg, spec)
    if spec.num_val == 0:
        raise ConfigError(
            f"config error: train.val_fraction: no validation rows among {spec.num_train} labelled rows; raise it"
        )
    if spec.num_test == 0:
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

    cfg, spec, kwargs = prepare(cfg)
    ensure_ray(cfg)
    cfg, _ = planned(cfg, "train")  # auto workers / CPUs / GPU from the cluster; refuses what cannot be placed
    check_workers(cfg, spec)
    run_name = run_name or cfg.train.run_name
    run_dir = _run_dir(cfg, run_name)
    from raypipe.data import ray_datasets

    mlflow_run_id = None
    if cfg.tracking.enabled:
        from raypipe.tracking import open_train_run

        mlflow_run_id = open_train_run(cfg.tracking, run_name=run_name, run_dir=run_dir, storage=cfg.storage)

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
    }
    t = cfg.train
    torch_config, scaling_config = worker_group_configs(t)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=torch_config,
        scaling_config=scaling_config,
        datasets=ray_datasets(spec, materialize=t.cache_data),
        # Only train is split (one worker reads it whole: a split of one would only add a coordinator actor);
        # every rank reads the whole val stream and scores its share of the batches (see _validate).
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
                num_to_keep=t.keep_best, checkpoint_score_attribute=t.metric, checkpoint_score_order=t.mode
            ),
            callbacks=list(callbacks or []),
        ),
    )


# --------------------------------------------------------------------------------------------- the loop


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def param_groups(model: torch.nn.Module, cfg: RaypipeConfig) -> list[dict[str, Any]]:
    """AdamW groups: text encoder at ``text_lr``, the rest at ``lr``; no weight decay on biases, norms and the
    temperature (decaying them only fights the normalisation)."""
    o = cfg.train.optim
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_text = "text_encoder." in f"{name}."
        no_decay = p.ndim < 2 or name.endswith("logit_scale")
        groups.setdefault((is_text, no_decay), []).append(p)
    out = []
    for (is_text, no_decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": o.text_lr if is_text else o.lr,
                "weight_decay": 0.0 if no_decay else o.weight_decay,
                "name": f"{'text' if is_text else 'main'}{'_no_decay' if no_decay else ''}",
            }
        )
    return out


def _steps_per_epoch(spec: DataSpec, cfg: RaypipeConfig, world: int) -> int:
    rows = spec.num_train // world  # the equal streaming split truncates the remainder
    batches = math.ceil(rows / cfg.train.batch_size)
    return max(1, math.ceil(batches / cfg.train.optim.grad_accum))


def _maybe_inject_fault(fault: dict[str, Any] | None, epoch: int, rank: int, world: int, storage: Any) -> None:
    if not fault or epoch != fault["crash_at_epoch"] or rank != world - 1:
        return
    fs, marker = rfs.resolve(fault["marker"], storage)
    if fs.exists(marker):
        return
    rfs.atomic_write_bytes(fs, marker, f"crashed after epoch {epoch}\n".encode())
    raise InjectedFault(f"injected worker crash after epoch {epoch} (rank {rank}; {FAULT_ENV})")


def amp_setup(device: torch.device, amp: str) -> tuple[Any, Any]:
    """``(autocast factory, GradScaler)`` following the device: mixed precision only on CUDA (``train.amp`` on a CPU
    worker trains in fp32), loss scaling only for fp16 (bf16 has fp32's range)."""
    import torch

    use = amp != "none" and device.type == "cuda"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use and amp == "fp16")

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=use)

    return autocast, scaler


def restore_scaler(scaler: Any, state: dict[str, Any] | None) -> None:
    """Load a checkpoint's loss scale when both sides use one. A run resumed with another ``train.amp`` has a
    scaler state of the wrong kind: a bf16/fp32 checkpoint saved an empty state (GradScaler refuses it), and an fp16
    scale means nothing to bf16. Then the scaler starts fresh (it re-calibrates within a few steps)."""
    if not scaler.is_enabled():
        return
    if not state:
        logger.info("resuming with fp16 from a checkpoint without a loss scale: starting from the default scale")
        return
    scaler.load_state_dict(state)


def forward_backward(
    model: Any, batch: dict[str, Any], objective: Any, *, autocast: Any, scaler: Any, grad_accum: int,
    sync_grads: bool,
) -> tuple[Any, dict[str, Any]]:
    """One micro-batch: forward + loss under autocast, scaled backward; DDP all-reduces only at accumulation
    boundaries (``no_sync`` otherwise). Returns the loss and its terms as tensors (no host sync here)."""
    sync = contextlib.nullcontext() if sync_grads or not hasattr(model, "no_sync") else model.no_sync()
    with sync:
        with autocast():
            outputs = model(batch)
            total, terms = objective(outputs, batch)
        scaler.scale(total / grad_accum).backward()
    return total, terms


@dataclass
class ValResult:
    """Validation of one epoch, identical on every rank: predictions in val-stream order, the mean loss."""

    scores: np.ndarray | None
    targets: np.ndarray | None
    ids: np.ndarray | None
    loss: float
    first: dict[str, np.ndarray] | None  # the first val batch (the MLflow input example)


def _validate(
    model: Any, source: Any, *, rank: int, world: int, device: Any, autocast: Any, objective: Any, task: str,
    target_key: str, cache: list[dict[str, np.ndarray]] | None,
) -> ValResult:
    """Every rank reads the whole (unsplit) val stream and scores batches ``rank, rank + world, ...``; one
    ``all_gather_object`` then gives every rank all predictions, put back in stream order.

    Why: validating on rank 0 alone leaves the other ranks blocked in the next collective for the whole
    validation (NCCL's timeout then kills a long one); split this way every rank works for 1/world of it, and the
    metrics (macro-F1, F_sco: not averageable over shards) are computed from the same full prediction set as on
    one worker, so they do not depend on the number of workers.
    """
    import torch
    import torch.distributed as dist

    from raypipe.classifier import scores_from_logits
    from raypipe.data import to_torch

    mine: list[tuple[int, Any, np.ndarray, np.ndarray, Any]] = []
    first = None
    with torch.no_grad():
        for i, np_batch in enumerate(source):
            if cache is not None:
                cache.append(np_batch)
            first = np_batch if first is None else first
            if i % world != rank:
                continue
            batch = to_torch(np_batch, device)
            with autocast():
                logits = model(batch)["logits"].float()
            loss, _ = objective({"logits": logits}, batch)
            probs = scores_from_logits(logits, task)
            mine.append((i, probs, np.asarray(np_batch[target_key]), np.asarray(np_batch["video_id"]),
                         loss.detach().double() * len(logits)))
    # One device->host copy of this rank's predictions and losses (not one sync per batch).
    local = [(i, p.cpu().numpy(), y, v, float(w)) for i, p, y, v, w in mine]
    parts = local
    if world > 1 and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local)
        parts = [part for rank_parts in gathered for part in rank_parts]
    parts.sort(key=lambda part: part[0])
    if not parts:
        return ValResult(None, None, None, 0.0, first)
    n = sum(len(p[1]) for p in parts)
    return ValResult(
        scores=np.concatenate([p[1] for p in parts]),
        targets=np.concatenate([p[2] for p in parts]),
        ids=np.concatenate([p[3] for p in parts]),
        loss=sum(p[4] for p in parts) / max(n, 1),
        first=first,
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The one training loop (every worker). ``loop_config``: ``cfg`` (RaypipeConfig dump), ``spec`` (DataSpec),
    ``model_kwargs``, ``run_name``, ``mlflow_run_id`` and ``fault`` (see :func:`build_trainer`)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from raypipe.classifier import read_train_state, write_checkpoint
    from raypipe.data import to_torch
    from raypipe.losses import FusionObjective
    from raypipe.metrics import compute_metrics
    from raypipe.models import create_model

    cfg = RaypipeConfig.model_validate(loop_config["cfg"])
    spec = DataSpec.from_dict(loop_config["spec"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    distributed = dist.is_available() and dist.is_initialized() and world > 1

    # ---- model, objective, optimizer (identical init on every rank; DDP broadcasts rank 0's anyway)
    seed_everything(t.seed)
    model = create_model(cfg.model.name, **loop_config["model_kwargs"])
    loss_cfg = effective_loss(cfg)
    objective = FusionObjective.from_config(loss_cfg, t.task, contrastive_loss=contrastive_loss_kind(model, cfg.model.name))
    val_objective = FusionObjective(task=t.task, classification=1.0, contrastive=0.0, mlm=0.0, vtm=0.0)

    checkpoint = ray.train.get_checkpoint()
    start_epoch, history, train_state = 1, [], None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            train_state, meta = read_train_state(d, model)
        start_epoch, history = int(meta["epoch"]) + 1, list(meta["history"])
        logger.info("rank %d: resuming from epoch %d checkpoint", rank, start_epoch - 1)

    # Every parameter gets a gradient (an aux branch exists only when its loss weight is > 0, and an MLM batch
    # without maskable tokens still returns a zero that depends on the logits), so DDP skips the unused-parameter
    # search unless train.find_unused_parameters asks for it.
    ddp_model = ray.train.torch.prepare_model(
        model, parallel_strategy="ddp" if world > 1 else None,
        parallel_strategy_kwargs={"find_unused_parameters": t.find_unused_parameters} if world > 1 else None,
    )
    core = ddp_model.module if hasattr(ddp_model, "module") else ddp_model
    optimizer = torch.optim.AdamW(param_groups(core, cfg), lr=t.optim.lr)
    steps_per_epoch = _steps_per_epoch(spec, cfg, world)
    total_steps = steps_per_epoch * t.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup=t.optim.warmup_steps, total=total_steps)
    )
    autocast, scaler = amp_setup(device, t.amp)
    if train_state is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        restore_scaler(scaler, train_state.get("scaler"))

    run_logger = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        from raypipe.tracking import RunLogger, flatten_config

        run_logger = RunLogger(cfg.tracking, loop_config["mlflow_run_id"])
        params = flatten_config({k: v for k, v in loop_config["cfg"].items() if k in ("model", "train", "embed")})
        params.update(
            {
                "data.num_classes": str(len(spec.classes)),
                "data.num_train": str(spec.num_train),
                "data.num_val": str(spec.num_val),
                "data.num_test": str(spec.num_test),
                "data.shard_info": json.dumps({k: spec.info[k] for k in ("frame_dim", "audio_dim", "text_dim", "text_len", "max_frames")}),
                "run.world_size": str(world),
                "run.name": loop_config["run_name"],
            }
        )
        run_logger.log_params(params)

    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard("val")
    aux_active = any(getattr(loss_cfg, term) > 0 for term in AUX_TERMS)
    target_key = "label" if t.task == "single_label" else "labels"
    example_rows: dict[str, np.ndarray] | None = None
    val_cache: list[dict[str, np.ndarray]] | None = None

    for epoch in range(start_epoch, t.epochs + 1):
        # Re-seeded per (epoch, rank): dropout, MLM masks and hard negatives of an epoch do not depend on
        # whether the run was restarted before it.
        seed_everything(t.seed * 100_003 + epoch * 1_009 + rank)
        ddp_model.train()
        sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per step, one .item() per epoch
        n_batches = n_samples = 0
        t0 = time.perf_counter()
        micro = 0
        batches = train_it.iter_batches(
            batch_size=t.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=t.shuffle_buffer or None,
            local_shuffle_seed=(t.seed * 7_919 + epoch) if t.shuffle_buffer else None,
        )
        for np_batch in batches:
            if aux_active and len(np_batch["video_id"]) < 2:
                continue  # in-batch negatives need 2 rows; equal splits make this the same on every rank
            batch = to_torch(np_batch, device)
            micro += 1
            boundary = micro % t.optim.grad_accum == 0
            total, terms = forward_backward(
                ddp_model, batch, objective, autocast=autocast, scaler=scaler, grad_accum=t.optim.grad_accum,
                sync_grads=boundary,
            )
            if boundary:
                _optimizer_step(ddp_model, optimizer, scheduler, scaler, t.optim.grad_clip)
            for name, value in {"loss": total, **{f"loss_{k}": v for k, v in terms.items()}}.items():
                value = torch.as_tensor(value, device=device).detach().double()
                sums[name] = sums[name] + value if name in sums else value
            n_batches += 1
            n_samples += len(np_batch["video_id"])
        if micro % t.optim.grad_accum:
            _optimizer_step(ddp_model, optimizer, scheduler, scaler, t.optim.grad_clip)
        train_time = time.perf_counter() - t0

        # ---- reduce train statistics over ranks
        keys = sorted(sums)
        counts = torch.tensor([n_batches, n_samples], dtype=torch.float64, device=device)
        stats = torch.cat([torch.stack([sums[k] for k in keys]), counts]) if keys else counts
        if distributed:
            dist.all_reduce(stats)
        stats = stats.cpu()  # the epoch's one host sync for the training statistics
        total_batches, total_samples = float(stats[-2]), float(stats[-1])
        metrics: dict[str, float] = {"epoch": float(epoch)}
        for i, k in enumerate(keys):
            metrics[f"train/{k}"] = float(stats[i]) / max(total_batches, 1.0)
        metrics["train/samples_per_s"] = total_samples / max(train_time, 1e-9)
        metrics["train/epoch_s"] = train_time
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            metrics["lr_text" if group["name"].startswith("text") else "lr"] = float(lr)

        # ---- validation: every rank scores its share of the val batches, all ranks get all predictions
        if val_cache is None:
            val_source: Any = val_it.iter_batches(batch_size=t.batch_size, batch_format="numpy")
            cache: list[dict[str, np.ndarray]] | None = []
        else:
            val_source, cache = val_cache, None
        core.eval()
        val = _validate(
            core, val_source, rank=rank, world=world, device=device, autocast=autocast, objective=val_objective,
            task=t.task, target_key=target_key, cache=cache,
        )
        if cache is not None and sum(v.nbytes for b in cache for v in b.values()) <= VAL_CACHE_BYTES:
            val_cache = cache  # the val split never changes: later epochs skip re-reading it
        if example_rows is None and val.first is not None:
            example_rows = {k: np.asarray(v[:2]) for k, v in val.first.items() if k != "video_id"}
        val_scores = val.scores if val.scores is not None else np.zeros((0, len(spec.classes)), np.float32)
        val_targets = val.targets if val.targets is not None else np.zeros(
            (0,) if t.task == "single_label" else (0, len(spec.classes)))
        val_ids = val.ids if val.ids is not None else np.zeros((0,), dtype=object)
        val_metrics = compute_metrics(val_scores, val_targets, task=t.task, classes=spec.classes, prefix="val/")
        val_metrics["val/loss"] = val.loss
        metrics.update(val_metrics)
        history.append(dict(metrics))

        if run_logger is not None:
            run_logger.log_metrics(metrics, step=epoch)
        logger.info(
            "epoch %d/%d rank %d: train/loss %.4f %s %.4f (%.1f samples/s)",
            epoch, t.epochs, rank, metrics.get("train/loss", float("nan")), t.metric,
            metrics.get(t.metric, float("nan")), metrics["train/samples_per_s"],
        )

        # ---- report: every rank, rank 0 with the checkpoint
        if rank == 0:
            meta = {
                "model_name": cfg.model.name,
                "model_kwargs": loop_config["model_kwargs"],
                "classes": spec.classes,
                "task": t.task,
                "shard_info": spec.info,
                "val_fraction": spec.val_fraction,
                "test_fraction": spec.test_fraction,
                "has_split_column": spec.has_split_column,
                "epoch": epoch,
                "metrics": metrics,
                "history": history,
                "run_name": loop_config["run_name"],
                "mlflow_run_id": loop_config.get("mlflow_run_id"),
                "config": loop_config["cfg"],
            }
            with tempfile.TemporaryDirectory(prefix="raypipe-ckpt-") as tmp:
                write_checkpoint(
                    tmp, model=core, optimizer=optimizer, scheduler=scheduler, scaler=scaler, meta=meta,
                    val_scores=val_scores, val_targets=val_targets, val_ids=val_ids,
                )
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
                )
        else:
            ray.train.report(metrics, checkpoint=None)
        _maybe_inject_fault(loop_config.get("fault"), epoch, rank, world, cfg.storage)
        if should_stop_early(history, t.metric, t.mode, t.early_stopping_patience):
            # Every rank holds the same (broadcast) val metrics, so every rank stops after the same epoch.
            logger.info("early stop after epoch %d: %s has not improved for %d epochs", epoch, t.metric,
                        t.early_stopping_patience)
            break

    if rank != 0:
        return None
    summary: dict[str, Any] = {"history": history, "resumed_from_epoch": start_epoch - 1}
    if run_logger is not None:
        summary.update(_log_final(run_logger, cfg, spec, history, example_rows))
    return summary


def best_epoch(history: list[dict[str, float]], metric: str, mode: str) -> int | None:
    """The epoch with the best ``metric`` (first one on ties), as the checkpoint choice makes it; None if unseen."""
    seen = [h for h in history if metric in h and math.isfinite(float(h[metric]))]
    if not seen:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return int(max(seen, key=lambda h: (sign * float(h[metric]), -float(h["epoch"])))["epoch"])


def should_stop_early(history: list[dict[str, float]], metric: str, mode: str, patience: int | None) -> bool:
    """True when the last ``patience`` epochs did not beat the best epoch before them (reads val metrics only)."""
    if not patience or not history:
        return False
    best = best_epoch(history, metric, mode)
    return best is not None and int(history[-1]["epoch"]) - best >= patience


def _optimizer_step(model: Any, optimizer: Any, scheduler: Any, scaler: Any, grad_clip: float | None) -> None:
    import torch

    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def _best_reported(metric: str, mode: str) -> tuple[Any, dict[str, Any]] | None:
    import ray.train

    reported = [r for r in ray.train.get_all_reported_checkpoints() if metric in r.metrics]
    if not reported:
        return None
    pick = max if mode == "max" else min
    best = pick(reported, key=lambda r: (float(r.metrics[metric]), -float(r.metrics.get("epoch", 0))))
    return best.checkpoint, dict(best.metrics)


def _log_final(
    run_logger: Any,
    cfg: RaypipeConfig,
    spec: DataSpec,
    history: list[dict[str, float]],
    example_rows: dict[str, np.ndarray] | None,
) -> dict[str, Any]:
    """Rank 0 after the last epoch: artifacts of the best epoch and the best checkpoint as the MLflow model."""
    from raypipe.classifier import example_from_shaped, read_val_predictions
    from raypipe.data import shape_columns
    from raypipe.reports import evaluation_artifacts, plot_training_curves

    t = cfg.train
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="raypipe-artifacts-") as tmp:
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        run_logger.log_file(Path(tmp) / "config.yaml")
        plot_training_curves(history, Path(tmp) / "training_curves.png", metric=t.metric)
        run_logger.log_file(Path(tmp) / "training_curves.png")
        run_logger.log_text(json.dumps(history, indent=1), "history.json")
    best = _best_reported(t.metric, t.mode)
    if best is None:
        run_logger.finish("FINISHED")
        return out
    checkpoint, best_metrics = best
    out["best_metrics"] = {k: float(v) for k, v in best_metrics.items() if isinstance(v, int | float)}
    out["best_checkpoint"] = checkpoint.path
    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory(prefix="raypipe-artifacts-") as tmp:
        preds = read_val_predictions(d)
        title = f"{cfg.model.name} epoch {int(best_metrics.get('epoch', 0))} ({t.metric}={best_metrics.get(t.metric, float('nan')):.3f})"
        for p in evaluation_artifacts(tmp, scores=preds["scores"], targets=preds["targets"], classes=spec.classes,
                                      task=t.task, title=title):
            run_logger.log_file(p, "best")
        if example_rows is not None:
            example = example_from_shaped(shape_columns(example_rows, spec.shard_info))
            out["model_uri"] = run_logger.log_model(d, example)
    run_logger.finish("FINISHED")
    return out


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
        pick = max if run_cfg.train.mode == "max" else min
        ckpt, metrics = pick(result.best_checkpoints, key=lambda cm: float(cm[1].get(run_cfg.train.metric, float("nan"))))
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
    )
    out.best_epoch = int(best_metrics["epoch"]) if "epoch" in best_metrics else None
    spec = DataSpec.from_dict(loop_config["spec"])
    report = score_test_split(run_cfg, spec, out.best_checkpoint)
    out.test_metrics, out.num_test = dict(report["metrics"]), int(report["num_rows"])
    if mlflow_run_id and run_cfg.train.register_model and out.model_uri:
        out.registered_model_version = register_run_model(run_cfg, run_id=mlflow_run_id)
        out.registered_model_name = run_cfg.tracking.registered_model_name
    if mlflow_run_id:
        from raypipe.tracking import record_test_metrics

        record_test_metrics(run_cfg, run_id=mlflow_run_id, version=out.registered_model_version, report=report)
    return out


def score_test_split(cfg: RaypipeConfig, spec: DataSpec, checkpoint: str | None) -> dict[str, Any]:
    """The held-out test metrics of the best checkpoint, computed once after training (driver side).

    Only here is the test split read: epochs were chosen and training stopped on val, so these numbers are the
    run's unbiased estimate. With no test rows (or no checkpoint) the report says why and holds no metrics.
    """
    from raypipe.classifier import load_classifier
    from raypipe.evaluate import score_split
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
    report["metrics"] = compute_metrics(scores, y, task=clf.task, classes=clf.classes, prefix="test/")
    report["epoch"] = int(clf.meta.get("epoch", 0))
    return report


def run(cfg: RaypipeConfig) -> int:
    """``raypipe train``: 0 on success, 2 on a config error (printed as one line per problem)."""
    try:
        result = fit(cfg)
    except ConfigError as err:
        logger.error("%s", err)
        return 2
    value = result.best_value
    logger.info(
        "trained %s: best %s=%s (epoch %s), checkpoint %s%s",
        result.run_name, result.metric, f"{value:.4f}" if value is not None else "n/a", result.best_epoch,
        result.best_checkpoint,
        f", registered {result.registered_model_name} v{result.registered_model_version}"
        if result.registered_model_version else "",
    )
    if result.test_metrics:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in result.test_metrics.items() if not k.endswith("/n"))
        logger.info("held-out test split (%d rows, read once after training): %s", result.num_test, shown)
    else:
        logger.info("no test rows (train.test_fraction=%g): no test metrics claimed", cfg.train.test_fraction)
    return 0
