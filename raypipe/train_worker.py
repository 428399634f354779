"""The training worker: what every Ray Train worker runs (:func:`train_loop_per_worker`), cut the way
torchtune's recipes and open_clip's ``train_one_epoch`` / ``evaluate`` are cut:

* :func:`setup` -- model, objective, optimizer, scheduler, AMP, resume from ``ray.train.get_checkpoint()``, and
  rank 0's MLflow handle (params once);
* :func:`train_one_epoch` -- the streamed, shuffled, gradient-accumulated epoch and its statistics reduced over
  ranks;
* :func:`validate` -- every rank scores its share of the val batches with the classifier's own score function
  (:func:`raypipe.classifier.scores_from_logits`), all ranks get all predictions and the same metrics;
* :func:`save_checkpoint` -- every rank reports, rank 0 with the checkpoint (:func:`raypipe.classifier.write_checkpoint`).

The driver side (validation of the config, building the ``TorchTrainer``, registering the model) is
:mod:`raypipe.train`; why the loop is built this way (determinism on resume, validation on every rank, the GPU
path, fault injection) is in that module's docstring.
"""

# Long module: the worker's loop and the building blocks only it uses (AMP, optimizer steps, validation
# gathering, fault injection); each function is short and the pieces are read in loop order.

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from raypipe.config import LossConfig, RaypipeConfig, config_to_dict
from raypipe.config.train import optimizer_steps
from raypipe.data import DataSpec
from raypipe.io import fs as rfs
from raypipe.schema import SHARD_DIMS

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FAULT_ENV = "RAYPIPE_FAULT_CRASH_AT_EPOCH"
FAULT_DELAY_S = 5.0  # > two of Ray Train's 2 s health-check polls (see _maybe_inject_fault)
FAULT_MARKER = ".raypipe_fault_injected"
VAL_CACHE_BYTES = 256 * 2**20  # each rank keeps a val split up to this size in memory after the first epoch


class InjectedFault(RuntimeError):
    """Raised by the fault-injection hook; a real worker failure as far as Ray Train is concerned."""


# --------------------------------------------------------------------------------------------- building blocks


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(
    step: int, *, warmup: int, total: int, schedule: str = "cosine", step_size: int = 1, gamma: float = 1.0,
    max_decays: int | None = None,
) -> float:
    """The LR multiplier at optimizer step ``step`` (see :class:`raypipe.config.train.OptimConfig`): linear
    warm-up to 1 over ``warmup`` steps, then ``cosine`` decay to 0 at ``total``, ``step`` decay by ``gamma``
    every ``step_size`` steps (at most ``max_decays`` times) or ``constant`` 1."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        decays = step // max(1, step_size)
        return gamma ** (decays if max_decays is None else min(decays, max_decays))
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def lr_schedule(optim: Any, *, steps_per_epoch: int, epochs: int) -> Any:
    """``step -> LR factor`` for ``train.optim`` over a run of ``epochs x steps_per_epoch`` optimizer steps."""
    return functools.partial(
        lr_factor, warmup=optim.warmup_steps, total=steps_per_epoch * epochs, schedule=optim.schedule,
        step_size=optim.step_epochs * steps_per_epoch, gamma=optim.gamma, max_decays=optim.max_decays,
    )


def base_lr(cfg: RaypipeConfig) -> float:
    """``train.optim.lr``, or where it is ``auto`` the model's own default from the registry."""
    lr = cfg.train.optim.lr
    if lr == "auto":
        from raypipe.models import default_lr

        return default_lr(cfg.model.name)
    return float(lr)


def param_groups(model: torch.nn.Module, cfg: RaypipeConfig) -> list[dict[str, Any]]:
    """AdamW groups: text encoder at ``text_lr``, the rest at :func:`base_lr`; no weight decay on biases, norms
    and the temperature (decaying them only fights the normalisation)."""
    o, lr = cfg.train.optim, base_lr(cfg)
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
                "lr": o.text_lr if is_text else lr,
                "weight_decay": 0.0 if no_decay else o.weight_decay,
                "name": f"{'text' if is_text else 'main'}{'_no_decay' if no_decay else ''}",
            }
        )
    return out


def steps_per_epoch(spec: DataSpec, cfg: RaypipeConfig, world: int) -> int:
    # the equal streaming split truncates the remainder
    return optimizer_steps(spec.num_train // world, cfg.train.batch_size, cfg.train.optim.grad_accum)


def _maybe_inject_fault(fault: dict[str, Any] | None, epoch: int, rank: int, world: int, storage: Any) -> None:
    if not fault or epoch != fault["crash_at_epoch"] or rank != world - 1:
        return
    fs, marker = rfs.resolve(fault["marker"], storage)
    if fs.exists(marker):
        return
    rfs.atomic_write_bytes(fs, marker, f"crashed after epoch {epoch}\n".encode())
    # Ray Train's controller polls the worker group every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); an error it sees
    # in the same poll as this epoch's report drops the report and its checkpoint (seen once in CI: the restart
    # began at epoch 1). A crash after two polls is one that lands after a registered checkpoint, as the test means.
    time.sleep(FAULT_DELAY_S)
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


def validate_batches(
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


# --------------------------------------------------------------------------------------------- the loop


@dataclass
class Worker:
    """What :func:`setup` builds for one worker and the epochs then use."""

    cfg: RaypipeConfig
    spec: DataSpec
    loop_config: dict[str, Any]
    rank: int
    world: int
    device: Any
    model: Any  # the DDP-wrapped (or plain, world 1) model that trains
    core: Any  # the bare model: validation and checkpoints
    objective: Any
    val_objective: Any
    optimizer: Any
    scheduler: Any
    autocast: Any
    scaler: Any
    aux_active: bool
    start_epoch: int = 1
    history: list[dict[str, float]] = field(default_factory=list)
    run_logger: Any = None
    train_it: Any = None
    val_it: Any = None
    example_rows: dict[str, np.ndarray] | None = None
    val_cache: list[dict[str, np.ndarray]] | None = None
    init: dict[str, Any] | None = None  # train.init_from counts (None: not used, or resumed from the run's own)
    # Wall-clock marks of this worker (start-up, first batch, first step, epochs); rank 0 returns them.
    timeline: list[tuple[str, float]] = field(default_factory=list)

    @property
    def target_key(self) -> str:
        return "label" if self.cfg.train.task == "single_label" else "labels"

    @property
    def distributed(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and self.world > 1


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The one training loop (every worker). ``loop_config``: ``cfg`` (RaypipeConfig dump), ``spec`` (DataSpec),
    ``model_kwargs``, ``run_name``, ``mlflow_run_id`` and ``fault`` (see :func:`raypipe.train.build_trainer`)."""
    timeline = [("worker_start", time.time())]
    w = setup(loop_config, timeline)
    timeline.append(("model_ready", time.time()))
    t = w.cfg.train
    for epoch in range(w.start_epoch, t.epochs + 1):
        metrics = train_one_epoch(w, epoch)
        timeline.append((f"epoch_{epoch}_train", time.time()))
        val = validate(w)
        timeline.append((f"epoch_{epoch}_val", time.time()))
        metrics.update(val["metrics"])
        w.history.append(dict(metrics))
        if w.run_logger is not None:
            w.run_logger.log_metrics(metrics, step=epoch)
        logger.info(
            "epoch %d/%d rank %d: train/loss %.4f %s %.4f (%.1f samples/s)",
            epoch, t.epochs, w.rank, metrics.get("train/loss", float("nan")), t.metric,
            metrics.get(t.metric, float("nan")), metrics["train/samples_per_s"],
        )
        save_checkpoint(w, epoch, metrics, val)
        timeline.append((f"epoch_{epoch}_checkpoint", time.time()))
        _maybe_inject_fault(loop_config.get("fault"), epoch, w.rank, w.world, w.cfg.storage)
        if should_stop_early(w.history, t.metric, t.mode, t.early_stopping_patience):
            # Every rank holds the same (broadcast) val metrics, so every rank stops after the same epoch.
            logger.info("early stop after epoch %d: %s has not improved for %d epochs", epoch, t.metric,
                        t.early_stopping_patience)
            break
    if w.rank != 0:
        return None
    summary: dict[str, Any] = {"history": w.history, "resumed_from_epoch": w.start_epoch - 1, "init_from": w.init}
    if w.run_logger is not None:
        summary.update(_log_final(w.run_logger, w.cfg, w.spec, w.history, w.example_rows))
    timeline.append(("final_logging", time.time()))
    summary["timeline"] = timeline  # rank 0's wall-clock marks (raypipe.train_timeline.phase_seconds)
    return summary


def setup(loop_config: dict[str, Any], timeline: list[tuple[str, float]] | None = None) -> Worker:
    """Model, objective, optimizer (identical init on every rank; DDP broadcasts rank 0's anyway), resumed from
    the run's checkpoint when there is one. ``timeline`` gets the start-up marks (imports, model, MLflow)."""
    import ray.train
    import ray.train.torch
    import torch

    from raypipe.models import create_model
    from raypipe.tracking import client_warming

    timeline = timeline if timeline is not None else []
    timeline.append(("worker_imports", time.time()))

    cfg = RaypipeConfig.model_validate(loop_config["cfg"])
    spec = DataSpec.from_dict(loop_config["spec"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    seed_everything(t.seed)
    # Rank 0's MLflow client (import, store) is built beside the model (transformers, MiniLM), not after it.
    with client_warming(cfg.tracking, needed=_logs_to_mlflow(loop_config, rank)):
        model = create_model(cfg.model.name, **loop_config["model_kwargs"])
    timeline.append(("model_built", time.time()))
    loss_cfg, objective, val_objective = build_objectives(cfg, model)
    init = _init_from(model, cfg, rank) if t.init_from and ray.train.get_checkpoint() is None else None
    start_epoch, history, train_state = _resume(model, rank)

    # Every parameter gets a gradient (an aux branch exists only when its loss weight is > 0, and an MLM batch
    # without maskable tokens still returns a zero that depends on the logits), so DDP skips the unused-parameter
    # search unless train.find_unused_parameters asks for it.
    ddp_model = ray.train.torch.prepare_model(
        model, parallel_strategy="ddp" if world > 1 else None,
        parallel_strategy_kwargs={"find_unused_parameters": t.find_unused_parameters} if world > 1 else None,
    )
    core = ddp_model.module if hasattr(ddp_model, "module") else ddp_model
    optimizer = torch.optim.AdamW(param_groups(core, cfg), lr=base_lr(cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(t.optim, steps_per_epoch=steps_per_epoch(spec, cfg, world), epochs=t.epochs)
    )
    autocast, scaler = amp_setup(device, t.amp)
    if train_state is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        restore_scaler(scaler, train_state.get("scaler"))
    run_logger = _open_run_logger(cfg, spec, loop_config, rank, world)
    timeline.append(("mlflow_params", time.time()))
    return Worker(
        cfg=cfg, spec=spec, loop_config=loop_config, rank=rank, world=world, device=device, model=ddp_model,
        core=core, objective=objective, val_objective=val_objective,
        optimizer=optimizer, scheduler=scheduler, autocast=autocast, scaler=scaler,
        aux_active=needs_pairs(loss_cfg), start_epoch=start_epoch,
        history=history, run_logger=run_logger, timeline=timeline,
        train_it=ray.train.get_dataset_shard("train"), val_it=ray.train.get_dataset_shard("val"), init=init,
    )


def needs_pairs(loss_cfg: LossConfig) -> bool:
    """Whether a weighted label-free term draws its negatives from the batch (a batch of one is then skipped)."""
    from raypipe.models.resolve import SELF_SUPERVISED_TERMS

    return any(getattr(loss_cfg, term) > 0 for term in SELF_SUPERVISED_TERMS)


def build_objectives(cfg: RaypipeConfig, model: Any) -> tuple[LossConfig, Any, Any]:
    """``(loss weights, training objective, validation objective)`` of ``cfg`` for ``model``: one place for the
    Train worker and the experiment trials (:mod:`raypipe.experiments.trial`).

    Pretraining scores no labels: the classification weight is 0 and the head is frozen (DDP would otherwise wait
    for a gradient it never gets); it validates its own objective per rank (no cross-rank negatives: ranks score
    different batches). Otherwise validation is the classification loss alone.
    """
    from raypipe.classifier import is_head_parameter
    from raypipe.losses import FusionObjective
    from raypipe.models.resolve import contrastive_loss_kind, effective_loss_weights

    t = cfg.train
    weights = effective_loss_weights(cfg.model.name, t.loss.model_dump())
    if t.pretrain:
        weights["classification"] = 0.0
        for name, p in model.named_parameters():
            p.requires_grad_(p.requires_grad and not is_head_parameter(name))
    loss_cfg = LossConfig(**weights)
    kind = contrastive_loss_kind(model)
    objective = FusionObjective.from_config(loss_cfg, t.task, contrastive_loss=kind)
    if t.pretrain:
        return loss_cfg, objective, FusionObjective.from_config(loss_cfg, t.task, contrastive_loss=kind, gather=False)
    return loss_cfg, objective, FusionObjective(task=t.task, classification=1.0, contrastive=0.0, mlm=0.0, vtm=0.0)


def _init_from(model: Any, cfg: RaypipeConfig, rank: int) -> dict[str, Any]:
    """``train.init_from``: the matching tensors of another run's checkpoint (fresh head); logs the counts."""
    from raypipe.classifier import init_from_checkpoint

    counts = init_from_checkpoint(model, cfg.train.init_from, cfg.storage, model_name=cfg.model.name,
                                  tracking_uri=cfg.tracking.tracking_uri if cfg.tracking.enabled else None)
    if rank == 0:
        logger.info("init_from %s: loaded %d tensors; skipped %d of the classifier head, %d of another shape; "
                    "%d of the model not in the checkpoint, %d of the checkpoint not in the model", counts["uri"],
                    counts["loaded"], counts["skipped_head"], counts["skipped_shape"], counts["missing"],
                    counts["unused"])
    return counts


def _resume(model: Any, rank: int) -> tuple[int, list[dict[str, float]], dict[str, Any] | None]:
    """``(first epoch to run, history so far, optimizer/scheduler/scaler state)`` from the run's checkpoint."""
    import ray.train

    from raypipe.classifier import read_train_state

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 1, [], None
    with checkpoint.as_directory() as d:
        train_state, meta = read_train_state(d, model)
    logger.info("rank %d: resuming from epoch %d checkpoint", rank, int(meta["epoch"]))
    return int(meta["epoch"]) + 1, list(meta["history"]), train_state


def _logs_to_mlflow(loop_config: dict[str, Any], rank: int) -> bool:
    return rank == 0 and bool(loop_config.get("mlflow_run_id"))


def _open_run_logger(cfg: RaypipeConfig, spec: DataSpec, loop_config: dict[str, Any], rank: int, world: int) -> Any:
    """Rank 0's MLflow handle with the run's params logged (None on other ranks or without tracking)."""
    if not _logs_to_mlflow(loop_config, rank):
        return None
    from raypipe.tracking import RunLogger, flatten_config

    run_logger = RunLogger(cfg.tracking, loop_config["mlflow_run_id"])
    params = flatten_config({k: v for k, v in loop_config["cfg"].items() if k in ("model", "train", "embed")})
    params.update(
        {
            "data.num_classes": str(len(spec.classes)),
            "data.num_train": str(spec.num_train),
            "data.num_val": str(spec.num_val),
            "data.num_test": str(spec.num_test),
            "data.shard_info": json.dumps({k: spec.info[k] for k in SHARD_DIMS}),
            "run.world_size": str(world),
            "run.name": loop_config["run_name"],
        }
    )
    run_logger.log_params(params)
    return run_logger


def train_one_epoch(w: Worker, epoch: int) -> dict[str, float]:
    """One pass over this rank's share of ``train`` -> the epoch's training metrics (reduced over ranks)."""
    import torch

    from raypipe.data import to_torch

    t = w.cfg.train
    # Re-seeded per (epoch, rank): dropout, MLM masks and hard negatives of an epoch do not depend on
    # whether the run was restarted before it.
    seed_everything(t.seed * 100_003 + epoch * 1_009 + w.rank)
    w.model.train()
    sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per step, one .item() per epoch
    n_batches = n_samples = micro = 0
    t0 = time.perf_counter()
    batches = w.train_it.iter_batches(
        batch_size=t.batch_size,
        batch_format="numpy",
        local_shuffle_buffer_size=t.shuffle_buffer or None,
        local_shuffle_seed=(t.seed * 7_919 + epoch) if t.shuffle_buffer else None,
    )
    for np_batch in batches:
        if w.aux_active and len(np_batch["video_id"]) < 2:
            continue  # in-batch negatives need 2 rows; equal splits make this the same on every rank
        if epoch == w.start_epoch and n_batches == 0:
            w.timeline.append(("first_batch", time.time()))
        batch = to_torch(np_batch, w.device)
        micro += 1
        boundary = micro % t.optim.grad_accum == 0
        total, terms = forward_backward(
            w.model, batch, w.objective, autocast=w.autocast, scaler=w.scaler, grad_accum=t.optim.grad_accum,
            sync_grads=boundary,
        )
        if boundary:
            optimizer_step(w.model, w.optimizer, w.scheduler, w.scaler, t.optim.grad_clip)
            if w.timeline and w.timeline[-1][0] == "first_batch":
                w.timeline.append(("first_step", time.time()))
        for name, value in {"loss": total, **{f"loss_{k}": v for k, v in terms.items()}}.items():
            value = torch.as_tensor(value, device=w.device).detach().double()
            sums[name] = sums[name] + value if name in sums else value
        n_batches += 1
        n_samples += len(np_batch["video_id"])
    if micro % t.optim.grad_accum:
        optimizer_step(w.model, w.optimizer, w.scheduler, w.scaler, t.optim.grad_clip)
    return _epoch_metrics(w, epoch, sums, n_batches, n_samples, time.perf_counter() - t0)


def _epoch_metrics(
    w: Worker, epoch: int, sums: dict[str, Any], n_batches: int, n_samples: int, train_time: float
) -> dict[str, float]:
    """Reduce the training statistics over ranks (one host sync) -> ``epoch``, ``train/*`` and learning rates."""
    import torch
    import torch.distributed as dist

    keys = sorted(sums)
    counts = torch.tensor([n_batches, n_samples], dtype=torch.float64, device=w.device)
    stats = torch.cat([torch.stack([sums[k] for k in keys]), counts]) if keys else counts
    if w.distributed:
        dist.all_reduce(stats)
    stats = stats.cpu()  # the epoch's one host sync for the training statistics
    total_batches, total_samples = float(stats[-2]), float(stats[-1])
    metrics: dict[str, float] = {"epoch": float(epoch)}
    for i, k in enumerate(keys):
        metrics[f"train/{k}"] = float(stats[i]) / max(total_batches, 1.0)
    metrics["train/samples_per_s"] = total_samples / max(train_time, 1e-9)
    metrics["train/epoch_s"] = train_time
    for group, lr in zip(w.optimizer.param_groups, w.scheduler.get_last_lr(), strict=True):
        metrics["lr_text" if group["name"].startswith("text") else "lr"] = float(lr)
    return metrics


def validate(w: Worker) -> dict[str, Any]:
    """Every rank scores its share of the val batches, all ranks get all predictions -> ``scores``, ``targets``,
    ``ids`` (val-stream order) and the ``val/*`` ``metrics``. The val split is cached after the first epoch when
    it is small."""
    from raypipe.metrics import compute_metrics

    t, n_classes = w.cfg.train, len(w.spec.classes)
    if t.pretrain:
        return validate_pretrain(w)
    if w.val_cache is None:
        source: Any = w.val_it.iter_batches(batch_size=t.batch_size, batch_format="numpy")
        cache: list[dict[str, np.ndarray]] | None = []
    else:
        source, cache = w.val_cache, None
    w.core.eval()
    val = validate_batches(
        w.core, source, rank=w.rank, world=w.world, device=w.device, autocast=w.autocast,
        objective=w.val_objective, task=t.task, target_key=w.target_key, cache=cache,
    )
    if cache is not None and sum(v.nbytes for b in cache for v in b.values()) <= VAL_CACHE_BYTES:
        w.val_cache = cache  # the val split never changes: later epochs skip re-reading it
    if w.example_rows is None and val.first is not None:
        w.example_rows = {k: np.asarray(v[:2]) for k, v in val.first.items() if k != "video_id"}
    scores = val.scores if val.scores is not None else np.zeros((0, n_classes), np.float32)
    targets = val.targets if val.targets is not None else np.zeros((0,) if t.task == "single_label" else (0, n_classes))
    ids = val.ids if val.ids is not None else np.zeros((0,), dtype=object)
    metrics = compute_metrics(scores, targets, task=t.task, classes=w.spec.classes, prefix="val/")
    metrics["val/loss"] = val.loss
    return {"scores": scores, "targets": targets, "ids": ids, "metrics": metrics}


def validate_pretrain(w: Worker) -> dict[str, Any]:
    """``train.pretrain``: ``val/loss`` = the pretraining objective on the val rows (every rank scores batches
    ``rank, rank + world, ...``; the row-weighted mean over all ranks). No labels, so no class scores.

    The auxiliary branches run only when the model is in training mode, so the top module is switched to it while
    every submodule stays in eval mode (no dropout), and the MLM masks / VTM negatives are drawn from a fixed
    seed: every epoch's val/loss is measured on the same masked tokens and negatives, and the training RNG
    state is left as it was.
    """
    import torch
    import torch.distributed as dist

    from raypipe.data import to_torch

    t = w.cfg.train
    source: Any = w.val_cache if w.val_cache is not None else w.val_it.iter_batches(batch_size=t.batch_size,
                                                                                     batch_format="numpy")
    cache: list[dict[str, np.ndarray]] | None = [] if w.val_cache is None else None
    w.core.eval()
    w.core.training = True  # the top module only: dmafnet's forward adds MLM / VTM outputs
    total, rows = 0.0, 0
    with torch.no_grad(), torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
        torch.manual_seed(t.seed * 7_919 + w.rank)
        for i, np_batch in enumerate(source):
            if cache is not None:
                cache.append(np_batch)
            if w.example_rows is None:
                w.example_rows = {k: np.asarray(v[:2]) for k, v in np_batch.items() if k != "video_id"}
            n = len(np_batch["video_id"])
            if i % w.world != w.rank or n < 2:  # in-batch negatives need 2 rows
                continue
            batch = to_torch(np_batch, w.device)
            with w.autocast():
                loss, _ = w.val_objective(w.core(batch), batch)
            total, rows = total + float(loss) * n, rows + n
    w.core.training = False
    if cache is not None and sum(v.nbytes for b in cache for v in b.values()) <= VAL_CACHE_BYTES:
        w.val_cache = cache
    if w.distributed:
        parts: list[Any] = [None] * w.world
        dist.all_gather_object(parts, (total, rows))
        total, rows = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return {"scores": np.zeros((0, len(w.spec.classes)), np.float32), "targets": np.zeros((0,), np.int64),
            "ids": np.zeros((0,), dtype=str),
            "metrics": {"val/loss": total / rows if rows else float("nan")}}


def save_checkpoint(w: Worker, epoch: int, metrics: dict[str, float], val: dict[str, Any]) -> None:
    """Every rank reports the epoch's metrics; rank 0 with the checkpoint (model, train state, meta, val
    predictions), which ``CheckpointConfig`` keeps or drops by its :func:`checkpoint_rank`."""
    import ray.train

    from raypipe.classifier import write_checkpoint

    t = w.cfg.train
    reported = {**metrics, RANK_KEY: checkpoint_rank(metrics, t.metric, t.mode)}
    if w.rank != 0:
        ray.train.report(reported, checkpoint=None)
        return
    lc, spec = w.loop_config, w.spec
    meta = {
        "model_name": w.cfg.model.name,
        "model_kwargs": lc["model_kwargs"],
        "classes": spec.classes,
        "task": w.cfg.train.task,
        "shard_info": spec.info,
        "val_fraction": spec.val_fraction,
        "test_fraction": spec.test_fraction,
        "has_split_column": spec.has_split_column,
        "holdout_classes": spec.holdout_classes,
        "epoch": epoch,
        "metrics": metrics,
        "history": w.history,
        "run_name": lc["run_name"],
        "mlflow_run_id": lc.get("mlflow_run_id"),
        "config": lc["cfg"],
        "pretrain": w.cfg.train.pretrain,
        "init_from": w.init,
    }
    with tempfile.TemporaryDirectory(prefix="raypipe-ckpt-") as tmp:
        write_checkpoint(
            tmp, model=w.core, optimizer=w.optimizer, scheduler=w.scheduler, scaler=w.scaler, meta=meta,
            val_scores=val["scores"], val_targets=val["targets"], val_ids=val["ids"],
        )
        ray.train.report(
            reported,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
        )


# --------------------------------------------------------------------------------------------- selection / final


def best_epoch(history: list[dict[str, float]], metric: str, mode: str) -> int | None:
    """The epoch with the best ``metric`` (first one on ties), as the checkpoint choice makes it; None if unseen."""
    seen = [h for h in history if metric in h and math.isfinite(float(h[metric]))]
    if not seen:
        return None
    return int(max(seen, key=lambda h: selection_key(h, metric, mode))["epoch"])


def should_stop_early(history: list[dict[str, float]], metric: str, mode: str, patience: int | None) -> bool:
    """True when the last ``patience`` epochs did not beat the best epoch before them (reads val metrics only)."""
    if not patience or not history:
        return False
    best = best_epoch(history, metric, mode)
    return best is not None and int(history[-1]["epoch"]) - best >= patience


def optimizer_step(model: Any, optimizer: Any, scheduler: Any, scaler: Any, grad_clip: float | None) -> None:
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
    best = max(reported, key=lambda r: selection_key(r.metrics, metric, mode))
    return best.checkpoint, dict(best.metrics)


def selection_key(metrics: dict[str, Any], metric: str, mode: str) -> tuple[float, float]:
    """Sort key (higher = better) of a reported epoch: its ``metric``, then the earlier epoch on ties, the rule
    of :func:`best_epoch` and early stopping, so the checkpoint chosen is the epoch that they call best."""
    sign = 1.0 if mode == "max" else -1.0
    return sign * float(metrics.get(metric, float("nan"))), -float(metrics.get("epoch", 0))


RANK_KEY = "checkpoint_rank"


def checkpoint_rank(metrics: dict[str, Any], metric: str, mode: str) -> float:
    """:func:`selection_key` as one float (higher = better), the single attribute that ``CheckpointConfig`` orders
    by. Ray ranks the *later* of two equal scores higher, so with ``train.metric`` itself as the attribute three
    equal val scores dropped the first of them, the epoch that :func:`best_epoch` and early stopping call best,
    and the run was scored on another epoch's weights. Here the earlier epoch of equal values ranks higher, by
    1e-12 an epoch: below any real difference of two metric values, above float64 resolution at their scale."""
    value, neg_epoch = selection_key(metrics, metric, mode)
    return value + 1e-12 * neg_epoch


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
        for p in ([] if t.pretrain else evaluation_artifacts(tmp, scores=preds["scores"], targets=preds["targets"],
                                                             classes=spec.classes, task=t.task, title=title)):
            run_logger.log_file(p, "best")
        if example_rows is not None:
            example = example_from_shaped(shape_columns(example_rows, spec.shard_info))
            out["model_uri"] = run_logger.log_model(d, example)
    run_logger.finish("FINISHED")
    return out
