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

A grid (``raypipe eval``, :func:`evaluate_grid`): every model of ``eval.models`` under every corruption of
``eval.corruptions``, the split's rows read once into memory (:func:`raypipe.data.evaluation_rows`) and each model
loaded once, one report row per (model, corruption); a model that fails is a status row, not the end of the run.
With ``eval.zero_shot`` a CAV-Net is also scored against its class names (``zs/top1``, ``zs/top5``), embedded the
way ``raypipe label``'s zero_shot mode embeds them. :func:`evaluate` is the single-model form with the clean and
corrupted scores of each batch side by side (``corrupted_metrics``, ``delta``).

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
from raypipe.config.corruption import CorruptionConfig
from raypipe.data import TARGET_COLUMNS, DataError, DataSpec, prepare_batch, to_torch
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


def corruption_params(corruption: CorruptionConfig, clf: Any) -> dict[str, Any]:
    """``corruption.params()`` plus what follows from the model's tokenizer: the pad id that dropped or removed
    text becomes, and the special ids (``[CLS]``, ``[SEP]``, ...) that ``drop_tokens`` keeps."""
    params = corruption.params()
    tok = clf.shard_info.tokenizer or {}
    if corruption.kind == "drop_tokens" or (corruption.kind == "zero_modality" and corruption.modality == "text"):
        params["pad_token_id"] = int(tok.get("pad_token_id") or 0)
    if corruption.kind == "drop_tokens" and tok.get("special_ids"):
        params["special_token_ids"] = [int(i) for i in tok["special_ids"]]
    return params


def holdout_rows(targets: np.ndarray, classes: list[str], holdout: list[str], task: str) -> np.ndarray:
    """Rows whose class (multi label: any class) is one of the model's ``train.holdout_classes``."""
    idx = [i for i, c in enumerate(classes) if c in set(holdout)]
    if not idx:
        return np.zeros(len(targets), dtype=bool)
    if task == "multi_label":
        return np.asarray(targets)[:, idx].any(axis=1)
    return np.isin(np.asarray(targets), idx)


# ------------------------------------------------------------------------------------------------ the grid


def corruption_record(c: CorruptionConfig) -> dict[str, Any]:
    """The ``corruption`` dict of a report row: the kind, its options and the seed."""
    return {"kind": c.kind, **c.params(), "seed": c.seed}


def evaluate_grid(
    cfg: RaypipeConfig,
    model_uris: list[str] | None = None,
    corruptions: list[CorruptionConfig] | None = None,
    *,
    keep_scores: bool = False,
) -> list[dict[str, Any]]:
    """Score every model under every corruption -> one dict per (model, corruption), models in the outer loop.

    ``model_uris`` default ``eval.models`` (or ``[eval.model_uri]``), ``corruptions`` ``eval.corruptions`` (or
    ``[eval.corruption]``). Each model is loaded once; the split's rows are read once into memory
    (:func:`raypipe.data.evaluation_rows`) and shared by every model trained with the same split and classes.
    Each corruption starts from its own seeded generator over the same batches, so every model sees the same
    dropped frames/tokens and the same noise. Each row: ``model_uri``, ``corruption``, ``status`` ("ok" or
    "error"), ``metrics`` (``{split}/f_sco``, ``{split}/hit@1``, ... and with ``eval.zero_shot`` ``zs/top1``,
    ``zs/top5``), ``rows`` (rows scored), and the model, split, data and ``error`` where known.

    A model that cannot be loaded or scored gives error rows (one log line naming it) and the others are still
    scored; when no model can be scored, the first model's error is raised (nothing to report).
    ``keep_scores`` adds ``_arrays`` (scores, targets, classes, task) to each scored row, for the confusion
    matrix and per-class report that ``raypipe eval`` logs; callers pop it before writing the row anywhere.
    """
    from raypipe.config.paths import absolute

    ec = cfg.eval
    uris = list(model_uris or ec.models or [ec.model_uri])
    corrs = list(corruptions or ec.corruptions or [ec.corruption])
    device = eval_device(ec.device)
    cache: dict[tuple[Any, ...], Any] = {}
    out: list[dict[str, Any]] = []
    errors: list[tuple[str, Exception, str]] = []
    for uri in uris:
        try:
            out.extend(_score_model(cfg, absolute(uri, "model_uri") or uri, corrs, device, cache, label=uri,
                                     keep_scores=keep_scores))
        except Exception as exc:  # any failure of one model (registry, checkpoint, data fit) must not stop the rest
            logger.debug("eval of %s failed", uri, exc_info=True)
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            errors.append((uri, exc, msg))
            out.extend({"model_uri": uri, "corruption": corruption_record(c), "status": "error", "error": msg,
                        "metrics": {}, "rows": 0} for c in corrs)
    if errors and len(errors) == len(uris):
        raise errors[0][1]  # nothing scored: the stage fails with the first model's error, as for a single model
    for uri, _, msg in errors:
        logger.error("eval: model %s cannot be scored (%s); the other models were scored", uri, msg)
    return out


def _eval_rows(cfg: RaypipeConfig, clf: Any, cache: dict[tuple[Any, ...], Any]) -> Any:
    """The split's rows for this model, read once per (split, fractions, classes) and shared by the grid."""
    from raypipe.data import evaluation_rows

    data_uri = cfg.eval.data or cfg.train.data
    split = resolve_split(cfg.eval.split, clf.meta)
    val_fraction = float(clf.meta.get("val_fraction", cfg.train.val_fraction))
    test_fraction = float(clf.meta.get("test_fraction", 0.0) or 0.0)
    key = (data_uri, split, val_fraction, test_fraction, tuple(clf.classes), clf.task)
    if key not in cache:
        cache[key] = evaluation_rows(data_uri, task=clf.task, classes=clf.classes, val_fraction=val_fraction,
                                     test_fraction=test_fraction, split=split, storage=cfg.storage)  # type: ignore[arg-type]
    data = cache[key]
    check_compatible(clf.shard_info, data.info, data_uri)
    return data


def _score_model(cfg: RaypipeConfig, uri: str, corrs: list[CorruptionConfig], device: Any,
                 cache: dict[tuple[Any, ...], Any], *, label: str, keep_scores: bool = False) -> list[dict[str, Any]]:
    from raypipe.classifier import load_classifier
    from raypipe.config.paths import absolute_tracking_uri

    clf = load_classifier(uri, cfg.storage, tracking_uri=absolute_tracking_uri(cfg.tracking.tracking_uri))
    clf.to_device(device)
    data = _eval_rows(cfg, clf, cache)
    class_emb = zero_shot_embeddings(cfg, clf) if cfg.eval.zero_shot else None
    y = data.targets
    holdout = [str(c) for c in clf.meta.get("holdout_classes") or []]
    rows = []
    for c in corrs:
        t0 = time.perf_counter()
        metrics, scores = score_rows(clf, data.arrays, y, c, holdout=holdout, class_emb=class_emb,
                                     batch_size=cfg.eval.batch_size, prefix=f"{data.split}/")
        rows.append({
            "model_uri": label, "corruption": corruption_record(c), "status": "ok", "metrics": metrics,
            "rows": int(len(y)), "model_name": clf.model_name, "model_version": clf.model_version,
            "model_arch": clf.arch, "split": data.split, "data": data.uri, "holdout_classes": holdout,
            "seconds": time.perf_counter() - t0,
        })
        if keep_scores:
            rows[-1]["_arrays"] = {"scores": scores, "targets": y, "classes": clf.classes, "task": clf.task}
    return rows


def score_rows(clf: Any, arrays: dict[str, np.ndarray], y: np.ndarray, c: CorruptionConfig, *, holdout: list[str],
               class_emb: np.ndarray | None, batch_size: int, prefix: str) -> tuple[dict[str, float], np.ndarray]:
    """``(metrics, class scores)`` of ``clf`` on in-memory rows under corruption ``c``: the supervised metrics
    (``prefix`` + name) on the rows of the classes it trained on, and with ``class_emb`` (see
    :func:`zero_shot_embeddings`) ``zs/top1``, ``zs/top5`` on the rows of its ``holdout`` classes (every row when
    none were held out). The one scoring path of ``raypipe eval``'s grid and of the experiment trials."""
    scores, zs = _scores(clf, arrays, batch_size, c, class_emb)
    held = holdout_rows(y, clf.classes, holdout, clf.task)
    metrics = split_metrics(scores, y, held, clf, prefix=prefix)
    if zs is not None:
        metrics.update(zero_shot_metrics(zs, y, held if holdout else np.ones(len(y), bool)))
    return metrics, scores


def split_metrics(scores: np.ndarray, y: np.ndarray, held: np.ndarray, clf: Any, *, prefix: str) -> dict[str, float]:
    """The supervised metrics on the rows of classes the model trained on (held-out rows are zero-shot's)."""
    from raypipe.metrics import compute_metrics

    seen = ~held
    if not seen.any():
        return {}
    return compute_metrics(scores[seen], y[seen], task=clf.task, classes=clf.classes, prefix=prefix)  # type: ignore[arg-type]


def zero_shot_metrics(zs: np.ndarray, y: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """``zs/top1``, ``zs/top5`` (and ``zs/n``) of the zero-shot scores on ``rows`` (a boolean mask)."""
    from raypipe.metrics import topk_accuracy

    if not rows.any():
        return {"zs/n": 0.0}
    acc = topk_accuracy(zs[rows], y[rows], (1, 5))
    return {"zs/top1": acc[1], "zs/top5": acc[5], "zs/n": float(rows.sum())}


def _scores(clf: Any, arrays: dict[str, np.ndarray], batch_size: int, c: CorruptionConfig,
            class_emb: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Class scores (and zero-shot scores) of every row under corruption ``c``, in batches of ``batch_size``."""
    from raypipe.corruptions import apply_corruption, corruption_generator
    from raypipe.data import to_torch

    generator, params = corruption_generator(c), corruption_params(c, clf)
    feats = {k: v for k, v in arrays.items() if k not in ("video_id", "label", "labels")}
    n = len(arrays["video_id"])
    scores, zs = [], []
    for lo in range(0, n, batch_size):
        batch = to_torch({k: v[lo : lo + batch_size] for k, v in feats.items()}, clf.device)
        if c.kind != "none":
            batch = apply_corruption(batch, c.kind, generator=generator, **params)
        scores.append(clf.scores_from_logits(clf.logits(batch)))
        if class_emb is not None:
            zs.append(clf.zero_shot_scores(batch, class_emb))
    return np.concatenate(scores), (np.concatenate(zs) if class_emb is not None else None)


def zero_shot_embeddings(cfg: RaypipeConfig, clf: Any) -> np.ndarray:
    """``(C, Dt)`` text embeddings of the model's class names, made as ``raypipe label``'s zero_shot mode makes
    them (:func:`raypipe.label.embed_class_names`: the cleaned name through ``embed.text``'s sentence encoder),
    after checking that ``embed.text`` is the encoder the model's ``text_emb`` features came from."""
    from raypipe.embed.text import text_encoder_info
    from raypipe.label import embed_class_names, read_class_names

    if clf.task != "single_label" or not hasattr(clf, "zero_shot_proba"):
        raise ConfigError(f"config error: eval.zero_shot: model {clf.arch!r} ({clf.task}) has no single-label "
                          "zero-shot head (needs CAV-Net with train.loss.contrastive > 0)")
    live, _ = text_encoder_info(cfg.embed.text, cfg.storage)
    trained = clf.shard_info.embedders.get("text") or {}
    bad = [f"{k}: model {trained.get(k)!r}, embed.text {live.get(k)!r}" for k in sorted(set(trained) | set(live))
           if k != "version" and trained.get(k) != live.get(k)]
    if bad:
        raise ConfigError("config error: eval.zero_shot: class names must be embedded by the model's text encoder; "
                          "embed.text differs (" + "; ".join(bad) + ")")
    source = cfg.eval.class_names or cfg.label.class_names
    names = read_class_names(source, cfg.storage)  # type: ignore[arg-type]
    missing = [c for c in clf.classes if c not in names]
    if missing:
        raise ConfigError(f"config error: eval.class_names: {source} names no class {missing[:5]} of the model")
    return embed_class_names(cfg, {c: names[c] for c in clf.classes})


# ------------------------------------------------------------------------------------------ raypipe eval


def grid_table(rows: list[dict[str, Any]]) -> str:
    """One line per (model, corruption): status, rows scored and every metric (``n`` counts left out)."""
    order = ("f_sco", "hit@1", "hit@2", "top1", "top5", "gap@20", "map")  # the papers' columns first
    names = sorted({k for r in rows for k in r["metrics"] if not k.endswith("/n")},
                   key=lambda k: (k.startswith("zs/"), order.index(k.split("/")[-1]) if k.split("/")[-1] in order else 99, k))
    label = {id(r): " ".join(f"{k}={v}" for k, v in r["corruption"].items() if k != "seed") for r in rows}
    w_model = max([len("model")] + [len(r["model_uri"]) for r in rows])
    w_corr = max([len("corruption")] + [len(v) for v in label.values()])
    lines = [f"{'model':<{w_model}}  {'corruption':<{w_corr}}  status  {'rows':>5}  " + "  ".join(names)]
    for r in rows:
        cells = "  ".join(f"{r['metrics'][k]:>{len(k)}.4f}" if k in r["metrics"] else f"{'-':>{len(k)}}" for k in names)
        lines.append(f"{r['model_uri']:<{w_model}}  {label[id(r)]:<{w_corr}}  {r['status']:<6}  {r['rows']:>5}  {cells}")
    return "\n".join(lines)


def run(cfg: RaypipeConfig) -> int:
    """``raypipe eval``: the grid of ``eval.models`` x ``eval.corruptions`` (by default the one model under
    ``eval.corruption``, with the clean row first when that is a corruption, so the drop shows directly).

    Prints the table, writes every row to ``eval.output`` (JSON ``{"rows": [...]}``) and, with tracking on, one
    parent MLflow run (the whole report) with a child run per scored row. Exit 0; 1 when a model of the list could
    not be scored (its rows say why); a config / data error of the only model is exit 2 (raypipe.cli.run_stage).
    """
    ec = cfg.eval
    corrs = list(ec.corruptions) or ([CorruptionConfig()] if ec.corruption.kind != "none" else []) + [ec.corruption]
    log = ec.log_mlflow and cfg.tracking.enabled
    rows = evaluate_grid(cfg, corruptions=corrs, keep_scores=log)
    arrays = [r.pop("_arrays", None) for r in rows]
    report: dict[str, Any] = {"data": ec.data or cfg.train.data, "zero_shot": ec.zero_shot, "rows": rows}
    logger.info("eval: %d model(s) x %d corruption(s)\n%s", len(rows) // max(1, len(corrs)), len(corrs),
                grid_table(rows))
    if log:
        report["mlflow_run_id"] = _log_grid_runs(cfg, report, arrays)
    if ec.output:
        fs, path = rfs.resolve(ec.output, cfg.storage)
        rfs.atomic_write_bytes(fs, path, json.dumps(report, indent=1, default=str).encode())
    return 1 if any(r["status"] != "ok" for r in rows) else 0


def _log_grid_runs(cfg: RaypipeConfig, report: dict[str, Any], arrays: list[dict[str, Any] | None]) -> str:
    """A parent run ``eval-grid`` (nested under ``tracking.parent_run_id`` when set) with the report as JSON, and
    one child run per scored row (params: model, corruption; metrics: the row's; its confusion matrix and
    per-class report from ``arrays``, the row's scores)."""
    from raypipe.tracking import flatten_config, start_stage_run

    rows = report["rows"]
    tags = {"mlflow.parentRunId": cfg.tracking.parent_run_id} if cfg.tracking.parent_run_id else {}
    parent = start_stage_run(cfg.tracking, stage="eval", run_name="eval-grid", tags=tags, params={
        "data": str(report["data"]), "models": ",".join(dict.fromkeys(r["model_uri"] for r in rows))[:500],
        "num_rows": str(len(rows)), "zero_shot": str(report["zero_shot"])})
    parent.log_text(json.dumps(report, indent=1, default=str), "eval_grid.json")
    for r, arr in zip(rows, arrays, strict=True):
        if r["status"] != "ok":
            continue
        kind = r["corruption"]["kind"]
        child = start_stage_run(
            cfg.tracking, stage="eval", run_name=f"eval-{r['model_name']}-v{r['model_version']}-{kind}",
            tags={"mlflow.parentRunId": parent.run_id, "raypipe.model_uri": r["model_uri"]},
            params=flatten_config({"model_uri": r["model_uri"], "model_version": r["model_version"],
                                   "split": r["split"], "corruption": r["corruption"]}),
        )
        child.log_metrics(r["metrics"], step=0)
        if arr is not None:
            _log_score_artifacts(child, arr, title=f"{r['model_name']} v{r['model_version']} {kind} ({r['split']})")
        child.finish("FINISHED")
    parent.finish("FINISHED" if all(r["status"] == "ok" for r in rows) else "FAILED")
    return parent.run_id


def _log_score_artifacts(run_logger: Any, arr: dict[str, Any], *, title: str) -> None:
    """Confusion matrix PNG and per-class report of one scored row (raypipe.reports)."""
    from raypipe.reports import evaluation_artifacts

    with tempfile.TemporaryDirectory(prefix="raypipe-eval-") as tmp:
        for p in evaluation_artifacts(tmp, scores=arr["scores"], targets=arr["targets"], classes=arr["classes"],
                                      task=arr["task"], title=title):
            run_logger.log_file(Path(p))
