"""``raypipe eval``: metrics of a trained model on feature shards, clean and under a corruption.

The model comes from the registry (``models:/name@alias``) or a checkpoint folder, through the same
:func:`raypipe.classifier.load_classifier` the labelling job uses. Rows are selected with the same hash split the
model was trained with (the model's own ``val_fraction`` / ``test_fraction``), so "val" and "test" really are data
the model never trained on. The default ``eval.split=auto`` scores the test split when the model has one: the
training run chose its epoch on val, so val scores are optimistic; a model trained without a test split is
scored on val, and the report says so (``split: val``). :func:`score_split` is also what ``raypipe train`` uses
to compute the run's ``test/*`` metrics once, after training.

Robustness (DMAFNet's study): ``eval.corruption`` applies :func:`raypipe.corruptions.apply_corruption` to every
batch after collation (drop 30 % of the frame/audio features, Gaussian noise on the frame features, or a whole
modality missing), with one seeded generator for the whole pass so two evaluations corrupt identically. Every
batch is scored clean and corrupted in the same pass, so the report shows the drop directly.

Reading is a plain streaming pyarrow scan on the driver (one batch in memory at a time): evaluation sets are
small next to training corpora, and this keeps ``raypipe eval`` usable without a Ray cluster. Bulk scoring of a
large corpus is the labelling job's business (a Ray Data actor pool).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.config import ConfigError, RaypipeConfig
from raypipe.data import TARGET_COLUMNS, DataError, DataSpec, prepare_batch, prepare_data, to_torch
from raypipe.io import fs as rfs
from raypipe.schema import SHARD_DIMS, ShardInfo

logger = logging.getLogger(__name__)



def check_compatible(model_info: ShardInfo, data_info: ShardInfo, data_uri: str) -> None:
    """The model can only read features with the dims it was trained on."""
    bad = [f"{d} {getattr(data_info, d)} (model expects {getattr(model_info, d)})" for d in SHARD_DIMS
           if getattr(model_info, d) != getattr(data_info, d)]
    if bad:
        raise DataError(f"features at {data_uri!r} do not fit the model: {', '.join(bad)}; embed them with the "
                        "model's embedders")
    if model_info.embedders and data_info.embedders and model_info.embedders != data_info.embedders:
        logger.warning("the features at %s were made by other embedders than the model's training features", data_uri)


def eval_device(choice: str) -> Any:
    """``eval.device``: "auto" follows :func:`raypipe.device.pick_device`; "cuda" without a GPU is a clear error."""
    import torch

    from raypipe.device import pick_device

    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config error: eval.device: cuda requested but no GPU is visible (use auto or cpu)")
    return pick_device()


def resolve_split(requested: str, meta: dict[str, Any]) -> str:
    """``eval.split=auto`` -> ``test`` when the model was trained with a test split, else ``val`` (logged)."""
    has_test = float(meta.get("test_fraction", 0.0) or 0.0) > 0 or bool(meta.get("has_split_column"))
    if requested == "test" and not has_test:
        raise DataError("eval.split=test: the model was trained without a test split (train.test_fraction=0); "
                        "use eval.split=val or all")
    if requested != "auto":
        return requested
    if not has_test:
        logger.warning("the model was trained without a test split: scoring its val split (epochs were chosen on "
                       "it, so the numbers are optimistic)")
    return "test" if has_test else "val"


def score_split(
    clf: Any,
    spec: DataSpec,
    split: str,
    storage: Any,
    *,
    batch_size: int = 64,
    corrupt: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """``(scores, corrupted_scores or None, targets, video_ids)`` of the rows of ``split`` in ``spec``'s shards.

    A streaming pyarrow scan on the driver, one batch in memory at a time; rows without a known label skipped.
    """
    target_key = TARGET_COLUMNS[clf.task]
    clean_scores, bad_scores, targets, ids = [], [], [], []
    for uri in spec.files:
        fs, path = rfs.resolve(uri, storage)
        with fs.open(path, "rb") as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=spec.columns):
                arrays = prepare_batch(
                    pa.Table.from_batches([record_batch]), info=spec.info, classes=clf.classes, task=clf.task,
                    split=split, val_fraction=spec.val_fraction, test_fraction=spec.test_fraction,  # type: ignore[arg-type]
                )
                if not len(arrays["video_id"]):
                    continue
                batch = to_torch(arrays, clf.device)
                clean_scores.append(clf.scores_from_logits(clf.logits(batch)))
                if corrupt is not None:
                    bad_scores.append(clf.scores_from_logits(clf.logits(corrupt(batch))))
                targets.append(arrays[target_key])
                ids.append(arrays["video_id"])
    if not targets:
        raise DataError(f"no labelled rows of split {split!r} with the model's classes in {spec.uri!r}")
    bad = np.concatenate(bad_scores) if corrupt is not None else None
    return np.concatenate(clean_scores), bad, np.concatenate(targets), np.concatenate(ids)


def evaluate(cfg: RaypipeConfig) -> dict[str, Any]:
    """Score ``eval.model_uri`` on ``eval.data`` (default ``train.data``) -> report dict with ``metrics``
    (clean, keyed ``eval/...``) and, under a corruption, ``corrupted_metrics`` and ``delta``."""
    from raypipe.classifier import load_classifier
    from raypipe.config.paths import absolute_tracking_uri
    from raypipe.corruptions import apply_corruption, corruption_generator
    from raypipe.metrics import compute_metrics

    ec = cfg.eval
    tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri)
    clf = load_classifier(ec.model_uri, cfg.storage, tracking_uri=tracking_uri).to_device(eval_device(ec.device))
    data_uri = ec.data or cfg.train.data
    val_fraction = float(clf.meta.get("val_fraction", cfg.train.val_fraction))
    test_fraction = float(clf.meta.get("test_fraction", 0.0) or 0.0)
    split = resolve_split(ec.split, clf.meta)
    spec = prepare_data(data_uri, task=clf.task, val_fraction=val_fraction, test_fraction=test_fraction,
                        classes=clf.classes, storage=cfg.storage)
    check_compatible(clf.shard_info, spec.shard_info, data_uri)

    corruption = ec.corruption
    params = corruption.params()
    if corruption.kind == "zero_modality" and corruption.modality == "text":
        params["pad_token_id"] = int((clf.shard_info.tokenizer or {}).get("pad_token_id") or 0)
    generator = corruption_generator(corruption)
    corrupted = corruption.kind != "none"
    t0 = time.perf_counter()
    clean, noisy_scores, y, _ = score_split(
        clf, spec, split, cfg.storage, batch_size=ec.batch_size,
        corrupt=(lambda b: apply_corruption(b, corruption.kind, generator=generator, **params)) if corrupted else None,
    )
    report: dict[str, Any] = {
        "model_uri": ec.model_uri,
        "model_name": clf.model_name,
        "model_version": clf.model_version,
        "model_arch": clf.arch,
        "data": data_uri,
        "split": split,
        "num_rows": int(len(y)),
        "corruption": {"kind": corruption.kind, **corruption.params(), "seed": corruption.seed},
        "metrics": compute_metrics(clean, y, task=clf.task, classes=clf.classes, prefix="eval/"),
        "seconds": time.perf_counter() - t0,
    }
    scores_for_artifacts = clean
    if corrupted:
        report["corrupted_metrics"] = compute_metrics(
            noisy_scores, y, task=clf.task, classes=clf.classes, prefix=f"eval_{corruption.kind}/"
        )
        report["delta"] = {
            k.split("/", 1)[1]: report["corrupted_metrics"][f"eval_{corruption.kind}/{k.split('/', 1)[1]}"] - v
            for k, v in report["metrics"].items()
            if not k.endswith("/n")
        }
        scores_for_artifacts = noisy_scores
    logger.info("eval %s on %s (%s, %d rows): %s", ec.model_uri, data_uri, split, len(y), _summary(report))
    if ec.output:
        fs, path = rfs.resolve(ec.output, cfg.storage)
        rfs.atomic_write_bytes(fs, path, json.dumps(report, indent=1).encode())
    if ec.log_mlflow and cfg.tracking.enabled:
        report["mlflow_run_id"] = _log_eval_run(cfg, report, scores_for_artifacts, y, clf)
    return report


def _summary(report: dict[str, Any]) -> str:
    parts = [f"{k}={v:.4f}" for k, v in report["metrics"].items() if not k.endswith("/n")]
    if "delta" in report:
        parts.append(f"under {report['corruption']['kind']}: " + ", ".join(f"{k} {v:+.4f}" for k, v in report["delta"].items()))
    return "; ".join(parts)


def _log_eval_run(cfg: RaypipeConfig, report: dict[str, Any], scores: np.ndarray, y: np.ndarray, clf: Any) -> str:
    """One MLflow run per evaluation: params (model, data, corruption), metrics, report JSON, tables."""
    from raypipe.reports import evaluation_artifacts
    from raypipe.tracking import flatten_config, start_stage_run

    name = f"eval-{clf.model_name}-v{clf.model_version}-{report['corruption']['kind']}"
    run_logger = start_stage_run(
        cfg.tracking, stage="eval", run_name=name, tags={"raypipe.model_uri": report["model_uri"]},
        params=flatten_config({"model_uri": report["model_uri"], "model_version": report["model_version"],
                               "data": report["data"], "split": report["split"], "corruption": report["corruption"]}),
    )
    run_logger.log_metrics({**report["metrics"], **report.get("corrupted_metrics", {})}, step=0)
    run_logger.log_text(json.dumps(report, indent=1), "eval_report.json")
    with tempfile.TemporaryDirectory(prefix="raypipe-eval-") as tmp:
        for p in evaluation_artifacts(tmp, scores=scores, targets=y, classes=clf.classes, task=clf.task,
                                      title=f"{name} ({report['split']})"):
            run_logger.log_file(Path(p))
    run_logger.finish("FINISHED")
    return run_logger.run_id


def run(cfg: RaypipeConfig) -> int:
    """``raypipe eval``: 0 on success, 2 when the model or data cannot be used as configured."""
    evaluate(cfg)  # a ConfigError / DataError becomes exit code 2 in raypipe.cli.run_stage
    return 0
