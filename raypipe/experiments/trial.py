"""One experiment trial: train a row's model on train, choose the epoch on val, score test once (clean and under
each corruption column; with ``eval.zero_shot`` the held-out classes' rows against their class names), in the
Tune trial's own process. Scoring is ``raypipe eval``'s (:func:`raypipe.evaluate.score_rows` on the model wrapped
as the in-memory :class:`raypipe.classifier.Classifier` that eval loads), not a second implementation.

Why not a ``TorchTrainer`` per trial: an experiment is dozens of small trials, and Ray Train's start-up (a
controller, a worker group, a placement group, Ray Data streams) costs 10-20 s per run on 2 CPUs, more than a
tiny row's whole training. A single-worker run needs none of it: this module builds the same
:class:`raypipe.train_worker.Worker` that :func:`raypipe.train_worker.setup` builds (model from the registry,
``FusionObjective``, AdamW groups, ``train.optim.schedule``, AMP on CUDA) and runs the *same*
:func:`~raypipe.train_worker.train_one_epoch` and :func:`~raypipe.train_worker.validate` over in-memory
splits (read once from the shards, shaped by :func:`raypipe.data.prepare_batch`, the function every Ray Data
read uses). Epoch choice follows :func:`~raypipe.train_worker.best_epoch`, as the Train checkpoint choice does.
What it does not do: DDP over several workers, checkpoints and restart inside a trial (a killed trial is rerun
whole; the experiment resumes by (row, seed), see :mod:`raypipe.experiments.runner`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from raypipe.config import RaypipeConfig
from raypipe.config.corruption import CorruptionConfig
from raypipe.data import DataSpec

logger = logging.getLogger(__name__)


class MemorySplit:
    """A split held in memory with the ``iter_batches`` signature of a Ray Data iterator (what the loop reads)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = dict(arrays)
        self.rows = len(self.arrays["video_id"])

    def iter_batches(self, *, batch_size: int, batch_format: str = "numpy", local_shuffle_buffer_size: int | None = None,
                     local_shuffle_seed: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        order = np.arange(self.rows)
        if local_shuffle_buffer_size:  # a seeded per-epoch permutation (the shuffle buffer covers a tiny split)
            order = np.random.default_rng(local_shuffle_seed).permutation(self.rows)
        for start in range(0, self.rows, batch_size):
            idx = order[start:start + batch_size]
            yield {k: v[idx] for k, v in self.arrays.items()}


def read_splits(spec: DataSpec) -> dict[str, dict[str, np.ndarray]]:
    """``{"train", "val", "test"}`` -> model arrays of that split (labelled rows of known classes), shard order."""
    import pyarrow.parquet as pq

    from raypipe.config import StorageConfig
    from raypipe.data import prepare_batch
    from raypipe.io import fs as rfs

    parts: dict[str, list[dict[str, np.ndarray]]] = {"train": [], "val": [], "test": []}
    for uri in spec.files:
        fs, path = rfs.resolve(uri, StorageConfig(**spec.storage))
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=spec.columns)
        for split, out in parts.items():
            batch = prepare_batch(table, info=spec.info, classes=spec.classes, task=spec.task, split=split,  # type: ignore[arg-type]
                                  val_fraction=spec.val_fraction, test_fraction=spec.test_fraction,
                                  holdout=spec.holdout_classes, keep_unlabelled=spec.keep_unlabelled)
            if len(batch["video_id"]):
                out.append(batch)
    return {split: {k: np.concatenate([p[k] for p in ps]) for k in ps[0]} for split, ps in parts.items() if ps}


def build_worker(cfg: RaypipeConfig, spec: DataSpec, model_kwargs: dict[str, Any],
                 splits: Mapping[str, Mapping[str, np.ndarray]], device: Any) -> Any:
    """The :class:`~raypipe.train_worker.Worker` of a one-process run (see the module docstring)."""
    import torch

    from raypipe.models import create_model
    from raypipe.train_worker import (
        Worker,
        amp_setup,
        base_lr,
        build_objectives,
        needs_pairs,
        param_groups,
        seed_everything,
        steps_per_epoch,
    )

    t = cfg.train
    seed_everything(t.seed)
    model = create_model(cfg.model.name, **model_kwargs).to(device)
    loss_cfg, objective, val_objective = build_objectives(cfg, model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=base_lr(cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_schedule(cfg, steps_per_epoch(spec, cfg, 1)))
    autocast, scaler = amp_setup(device, t.amp)
    return Worker(
        cfg=cfg, spec=spec, loop_config={}, rank=0, world=1, device=device, model=model, core=model,
        objective=objective, val_objective=val_objective,
        optimizer=optimizer, scheduler=scheduler, autocast=autocast, scaler=scaler,
        aux_active=needs_pairs(loss_cfg),
        train_it=MemorySplit(splits["train"]), val_it=MemorySplit(splits["val"]),
    )


def _lr_schedule(cfg: RaypipeConfig, steps: int) -> Any:
    """The Train worker's ``step -> LR factor`` for ``train.optim`` (cosine, step or constant)."""
    from raypipe.train_worker import lr_schedule

    return lr_schedule(cfg.train.optim, steps_per_epoch=steps, epochs=cfg.train.epochs)


def fit_best(w: Any, report: Any = None) -> tuple[int, list[dict[str, float]]]:
    """Train every epoch (early stopping as configured); leave the model at the best val epoch -> (epoch, history)."""
    from raypipe.train_worker import best_epoch, should_stop_early, train_one_epoch, validate

    t = w.cfg.train
    best_state, best = None, None
    for epoch in range(1, t.epochs + 1):
        metrics = train_one_epoch(w, epoch)
        metrics.update(validate(w)["metrics"])
        w.history.append(metrics)
        if report is not None:
            report({k: v for k, v in metrics.items() if isinstance(v, float)})
        if best_epoch(w.history, t.metric, t.mode) == epoch:
            best, best_state = epoch, copy.deepcopy(w.core.state_dict())
        if should_stop_early(w.history, t.metric, t.mode, t.early_stopping_patience):
            break
    if best_state is not None:
        w.core.load_state_dict(best_state)
    return best or len(w.history), w.history


def as_classifier(w: Any) -> Any:
    """The trained model in ``w`` as the :class:`raypipe.classifier.Classifier` that ``raypipe eval`` scores (in
    memory: the meta a checkpoint would carry), so that a trial is scored by eval's own code."""
    from raypipe.classifier import Classifier

    meta = {"model_name": w.cfg.model.name, "classes": w.spec.classes, "task": w.cfg.train.task,
            "shard_info": w.spec.info, "holdout_classes": w.spec.holdout_classes}
    return Classifier(w.core, meta, model_name=w.cfg.model.name, model_version="", source="experiment-trial",
                      device=str(w.device))


def score(w: Any, arrays: Mapping[str, np.ndarray], corruption: CorruptionConfig | None,
          batch_size: int = 64, class_emb: np.ndarray | None = None) -> dict[str, float]:
    """Test metrics of the model in ``w`` (unprefixed names) on ``arrays``, optionally under ``corruption``, by
    :func:`raypipe.evaluate.score_rows` (a single-label task has ``gap@20`` too, of the one-hot targets: the MFB
    tables' metric). Rows of ``train.holdout_classes`` are left out of the supervised metrics; with
    ``class_emb`` they are scored zero-shot (``zs/top1``, ``zs/top5``, ``zs/n``)."""
    from raypipe.data import TARGET_COLUMNS
    from raypipe.evaluate import score_rows

    clf = as_classifier(w)
    y = np.asarray(arrays[TARGET_COLUMNS[clf.task]])
    metrics, _ = score_rows(clf, dict(arrays), y, corruption or CorruptionConfig(), holdout=w.spec.holdout_classes,
                            class_emb=class_emb, batch_size=batch_size, prefix="")
    return metrics


def zero_shot_class_embeddings(w: Any) -> np.ndarray:
    """``(C, Dt)`` class-name embeddings as ``raypipe eval`` makes them (:func:`raypipe.evaluate.zero_shot_embeddings`,
    ``eval.class_names``), with ``embed.text`` set to the encoder the shards' text was embedded with: in an
    experiment the data fixes that encoder, so a preset's other ``embed.text`` (e.g. its ``max_len``) must not
    refuse it; eval's check that they agree still runs."""
    from raypipe.embed.text import MINILM_NAME
    from raypipe.evaluate import zero_shot_embeddings

    info = w.spec.shard_info.embedders.get("text") or {}
    cfg = w.cfg.model_copy(deep=True)
    if info.get("name"):
        cfg.embed.text.model = "minilm" if info["name"] == MINILM_NAME else info["name"]
        cfg.embed.text.max_len = int(info.get("max_len") or cfg.embed.text.max_len)
    return zero_shot_embeddings(cfg, as_classifier(w))


@dataclass
class PretrainStage:
    """A row's pretraining stage (``pretrain:`` in the experiment file): its config (``train.pretrain``), the data
    spec that keeps unlabelled rows, the model kwargs and the splits it reads."""

    cfg: RaypipeConfig
    spec: DataSpec
    model_kwargs: dict[str, Any]
    splits: Mapping[str, Mapping[str, np.ndarray]]


def pretrain(stage: PretrainStage, device: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pretrain (contrastive + MLM + VTM, epoch chosen on val/loss) -> (the best epoch's weights, a summary)."""
    w = build_worker(stage.cfg, stage.spec, stage.model_kwargs, stage.splits, device)
    epoch, history = fit_best(w)
    summary = {"best_epoch": epoch, "val_loss": history[epoch - 1].get("val/loss"),
               "rows": {k: int(len(v["video_id"])) for k, v in stage.splits.items() if k != "test"}}
    return w.core.state_dict(), summary


def run_trial(cfg: RaypipeConfig, spec: DataSpec, model_kwargs: dict[str, Any],
              splits: Mapping[str, Mapping[str, np.ndarray]], corruptions: Mapping[str, dict[str, Any]],
              *, threads: int = 1, report: Any = None, pretrain_stage: PretrainStage | None = None) -> dict[str, Any]:
    """Train, choose the epoch on val, score test clean (under the row's own ``eval.corruption``) and under every
    corruption in ``corruptions`` (name -> CorruptionConfig dict) -> the trial's result (JSON-able).

    With ``pretrain_stage`` the row is two-stage, as ``train.pretrain`` then ``train.init_from`` would be: the
    model is pretrained first and the finetune starts from its matching tensors (fresh classifier head)."""
    import torch

    from raypipe.device import pick_device

    torch.set_num_threads(max(1, threads))
    t0 = time.perf_counter()
    device = pick_device() if cfg.train.use_gpu is not False else torch.device("cpu")
    missing = [s for s in ("train", "val", "test") if s not in splits]
    if missing:
        raise ValueError(f"no {'/'.join(missing)} rows in {spec.uri} (train.val_fraction / train.test_fraction)")
    pre: dict[str, Any] | None = None
    state = None
    if pretrain_stage is not None:
        state, pre = pretrain(pretrain_stage, device)
    w = build_worker(cfg, spec, model_kwargs, splits, device)
    if state is not None and pre is not None:
        from raypipe.classifier import load_matching

        pre["init"] = load_matching(w.core, state)
    epoch, history = fit_best(w, report)
    own = cfg.eval.corruption
    class_emb = zero_shot_class_embeddings(w) if cfg.eval.zero_shot else None
    result = {
        "best_epoch": epoch,
        "val": {k.split("/", 1)[1]: v for k, v in history[epoch - 1].items() if k.startswith("val/")},
        "test": score(w, splits["test"], own if own.kind != "none" else None, class_emb=class_emb),
        "corrupted": {name: score(w, splits["test"], CorruptionConfig(**c)) for name, c in corruptions.items()},
        "num_test": int(len(splits["test"]["video_id"])),
        "history": history,
    }
    if class_emb is not None:  # eval.zero_shot: the held-out classes' test rows, scored against the class names
        result["zero_shot"] = {k.split("/", 1)[1]: v for k, v in result["test"].items() if k.startswith("zs/")}
    if pre is not None:
        result["pretrain"] = pre
    result["seconds"] = time.perf_counter() - t0
    return result
