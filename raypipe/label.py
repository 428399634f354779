"""The nightly labelling job: new videos -> decode -> embed -> classify -> prediction shards, in one Ray Data stream.

Why one stream: decoded video is ~10x the file and embeddings are large, so nothing between listing and the
prediction rows is materialised; the driver only ever holds small prediction rows, which it commits to Parquet
shard by shard (atomically, like the feature shards), so an interrupted run loses at most one shard of work.

Incremental by construction: before listing new work the job reads the prediction shards already in
``label.output`` and skips every video that has a row from the same model name *and version* (a new model
version relabels everything). Readers take the latest row per video (:func:`read_predictions`), so a rerun after
an interruption, or a relabel by a new version, leaves every video labelled exactly once in the dedup'ed view.

Two modes: ``classify`` uses the model's own head; ``zero_shot`` (CAV-Net) embeds the class names of
``label.class_names`` with the same text embedder as the features and scores by similarity through the model's
``zero_shot_logits``, so classes unseen at training time can be labelled.
"""

# Long module: the labelling stream, its prediction store and its incremental rules are one contract; the
# reports are in raypipe.reports and the MLflow run in raypipe.tracking.

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from raypipe.config import RaypipeConfig, StorageConfig
from raypipe.io.fs import atomic_write_bytes, join, resolve
from raypipe.io.shards import MANIFEST, ShardStore, read_errors, read_manifest, read_shards
from raypipe.reports import label_summary_table as format_table
from raypipe.reports import plot_label_distribution as plot_distribution
from raypipe.schema import error_schema, level1_of

log = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"
REPORTS_DIR = "reports"
PREDICTION_SCHEMA_VERSION = 1


def prediction_schema() -> pa.Schema:
    """One row per (video, labelling run). ``top_labels``/``top_scores`` are the level-2 top-k, best first."""
    return pa.schema(
        [
            ("video_id", pa.string()),
            ("source_uri", pa.string()),
            ("status", pa.string()),  # "ok" | "failed"
            ("reason", pa.string()),  # failure class (decode_error, no_video_stream, ...); null when ok
            ("error", pa.string()),  # the message; null when ok
            ("label", pa.string()),  # top-1 level-2 class
            ("label_name", pa.string()),  # its human name when class names are known
            ("label_l1", pa.string()),  # level-1 = first two digits of a WBDC level-2 code
            ("score", pa.float32()),
            ("top_labels", pa.list_(pa.string())),
            ("top_scores", pa.list_(pa.float32())),
            ("mode", pa.string()),
            ("model_name", pa.string()),
            ("model_version", pa.string()),
            ("model_uri", pa.string()),
            ("embedders", pa.string()),  # JSON {frames: {...}, audio: {...}, text: {...}} names and versions
            ("run_id", pa.string()),
            ("labelled_at", pa.timestamp("us", tz="UTC")),
        ],
        metadata={b"raypipe_predictions": json.dumps({"schema_version": PREDICTION_SCHEMA_VERSION}).encode()},
    )


PREDICTION_COLUMNS = tuple(prediction_schema().names)


# ----------------------------------------------------------------------------------------------- class names


def read_class_names(uri: str, storage: StorageConfig | None = None) -> dict[str, str]:
    """``code<TAB>name`` lines (as the corpus writes class_names.txt) -> {code: name}, in file order.

    A line without a tab is a bare name used as its own code, so a plain list of names works for zero-shot.
    """
    fs, path = resolve(uri, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"label.class_names: {uri} does not exist")
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    names: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        code, _, name = line.partition("\t")
        code, name = code.strip(), (name.strip() or code.strip())
        if code in names:
            raise ValueError(f"label.class_names: {uri} line {lineno}: duplicate class {code!r}")
        names[code] = name
    if not names:
        raise ValueError(f"label.class_names: {uri} lists no classes")
    return names


# ----------------------------------------------------------------------------------------- prediction shards


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", part) or "_"


def version_root(output: str, model_name: str, model_version: str) -> str:
    """One :class:`ShardStore` folder per model version: ``<output>/predictions/<name>/<version>``."""
    return join(output.rstrip("/"), PREDICTIONS_DIR, _safe(model_name), _safe(model_version))


def prediction_store(output: str, storage: StorageConfig | None, *, model_name: str, model_version: str,
                     num_shards: int) -> ShardStore:
    """The store a run writes to: labelled rows in hashed shards, failed videos in its errors table.

    Keyed by video_id and committed like the feature shards (parts while running, atomic shard files and a
    manifest at the end), so a crashed run's parts are reused and each video appears once per version.
    """
    return ShardStore(
        version_root(output, model_name, model_version), storage, num_shards=num_shards, schema=prediction_schema()
    )


def _version_roots(output: str, storage: StorageConfig | None) -> list[str]:
    """Every committed version folder (one with a manifest) under ``<output>/predictions``."""
    fs, root = resolve(output, storage)
    pred_dir = join(root, PREDICTIONS_DIR)
    if not fs.exists(pred_dir):
        return []
    found = [posixpath.dirname(p) for p in fs.find(pred_dir) if posixpath.basename(p) == MANIFEST]
    base = output.rstrip("/")
    return sorted(f"{base}/{posixpath.relpath(d, root)}" for d in found)


def _failed_rows(errors: pa.Table, manifest: dict[str, Any]) -> pa.Table:
    """Error-table rows of one version folder as prediction rows (provenance from its manifest)."""
    n = errors.num_rows
    committed = datetime.fromisoformat(manifest["committed_at"])
    cols: dict[str, Any] = {name: pa.nulls(n, typ) for name, typ in zip(prediction_schema().names,
                                                                      prediction_schema().types, strict=True)}
    cols.update(
        video_id=errors.column("video_id"), source_uri=errors.column("source_uri"),
        status=pa.array(["failed"] * n), reason=errors.column("reason"), error=errors.column("error"),
        top_labels=pa.array([[]] * n, pa.list_(pa.string())), top_scores=pa.array([[]] * n, pa.list_(pa.float32())),
        mode=pa.array([manifest.get("mode")] * n, pa.string()),
        model_name=pa.array([manifest["model_name"]] * n), model_version=pa.array([manifest["model_version"]] * n),
        model_uri=pa.array([manifest.get("model_uri")] * n, pa.string()),
        embedders=pa.array([json.dumps(manifest.get("embedders", {}), sort_keys=True)] * n),
        run_id=pa.array([manifest.get("run_id")] * n, pa.string()),
        labelled_at=pa.array([committed] * n, pa.timestamp("us", tz="UTC")),
    )
    return pa.table(cols, schema=prediction_schema())


def read_predictions(output: str, storage: StorageConfig | None = None, *, latest_only: bool = True) -> pa.Table:
    """Committed predictions of every model version under ``output``: labelled rows plus failed videos.

    With ``latest_only`` (the view a consumer wants) each video appears once: its most recent row by
    ``labelled_at``, so a relabel by a new model version replaces the old labels. Parts of an unfinished run are
    invisible until the rerun commits them.
    """
    schema = prediction_schema()
    tables = []
    for root in _version_roots(output, storage):
        manifest = read_manifest(root, storage)
        rows, _ = read_shards(root, storage)
        if rows.num_rows:
            tables.append(rows.select(list(PREDICTION_COLUMNS)).cast(schema))
        errors = read_errors(root, storage)
        if errors.num_rows:
            tables.append(_failed_rows(errors, manifest))
    if not tables:
        return schema.empty_table()
    table = pa.concat_tables(tables)
    if not latest_only:
        return table
    ids = np.asarray(table.column("video_id").to_pylist(), dtype=object).astype(str)
    when = table.column("labelled_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
    order = np.lexsort((when, ids))  # by video_id, then time
    last = np.append(ids[order][1:] != ids[order][:-1], True)  # the last row of each video = latest
    return table.take(pa.array(np.sort(order[last])))


# ------------------------------------------------------------------------------------------------- summary


@dataclass
class LabelStats:
    """Counts of one run; what summary.json, the table and MLflow report."""

    listed: int = 0
    skipped: int = 0
    to_label: int = 0
    labelled: int = 0
    failed: int = 0
    failed_by_reason: Counter = field(default_factory=Counter)
    label_counts: Counter = field(default_factory=Counter)
    level1_counts: Counter = field(default_factory=Counter)

    def add(self, row: dict[str, Any]) -> None:
        if row["status"] == "ok":
            self.labelled += 1
            self.label_counts[row["label"]] += 1
            if row.get("label_l1"):
                self.level1_counts[row["label_l1"]] += 1
        else:
            self.failed += 1
            self.failed_by_reason[row.get("reason") or "unknown"] += 1

    @property
    def failure_rate(self) -> float:
        done = self.labelled + self.failed
        return self.failed / done if done else 0.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def _batches_to_rows(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        n = len(batch["video_id"])
        for i in range(n):
            yield {k: _py(v[i]) for k, v in batch.items()}


def _py(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


# --------------------------------------------------------------------------------------------- classify


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class _Classify:
    """Ray Data actor: feature rows -> prediction columns (the big embedding columns are dropped here).

    The model loads once per actor from a *resolved* URI (``models:/name/version``, never an alias), so every
    actor of one run uses the version the driver validated even if the alias moves mid-run.
    """

    def __init__(
        self, *, model_uri: str, storage: StorageConfig, tracking_uri: str | None, mode: str, top_k: int,
        class_codes: list[str] | None, class_names: dict[str, str], class_text_emb: np.ndarray | None,
    ) -> None:
        import torch

        from raypipe.classifier import load_classifier
        from raypipe.device import pick_device

        torch.set_num_threads(1)
        self.clf = load_classifier(model_uri, storage, tracking_uri=tracking_uri)
        device = pick_device()  # Ray's GPU assignment: a CPU-only actor on a GPU node stays on CPU
        if device.type == "cuda":
            self.clf.to_device(device)
        self.mode = mode
        self.codes = list(class_codes) if class_codes is not None else [str(c) for c in self.clf.classes]
        self.k = min(top_k, len(self.codes))
        self.names = class_names
        self.class_text_emb = class_text_emb  # (C, Dt) for zero_shot

    def _proba(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        if self.mode == "zero_shot":
            return self.clf.zero_shot_proba(batch, self.class_text_emb)  # (B, C)
        return self.clf.predict_proba(batch)  # (B, C)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["video_id"])
        status = np.asarray(batch["status"]).astype(str)
        ok = np.flatnonzero(status == "ok")
        k = self.k
        top_idx = np.zeros((n, k), np.int64)
        top_scores = np.full((n, k), np.nan, np.float32)
        if len(ok):
            sub = {key: val[ok] for key, val in batch.items()}
            proba = np.asarray(self._proba(sub), dtype=np.float32)  # (b, C)
            if proba.shape != (len(ok), len(self.codes)):
                raise ValueError(f"model returned scores of shape {proba.shape}, expected {(len(ok), len(self.codes))}")
            idx = np.argsort(-proba, axis=1, kind="stable")[:, :k]  # (b, k)
            top_idx[ok] = idx
            top_scores[ok] = np.take_along_axis(proba, idx, axis=1)
        codes = np.asarray(self.codes, dtype=object)
        top_labels = codes[top_idx].astype(str)  # (B, k)
        is_ok = status == "ok"
        top_labels[~is_ok] = ""
        label = np.where(is_ok, top_labels[:, 0], "")
        reason = np.asarray(batch.get("reason", np.full(n, "")), dtype=object)
        error = np.asarray(batch.get("error", np.full(n, "")), dtype=object)
        stage = np.asarray(batch.get("stage", np.full(n, "decode")), dtype=object)
        return {
            "video_id": np.asarray(batch["video_id"]).astype(str),
            "source_uri": np.asarray(batch["source_uri"]).astype(str),
            "status": np.where(is_ok, "ok", "failed"),
            "reason": np.asarray([("" if o else (r or "unknown")) for o, r in zip(is_ok, reason, strict=True)]),
            "error": np.asarray([("" if o else str(e or "")) for o, e in zip(is_ok, error, strict=True)]),
            "label": label,
            "label_name": np.asarray([self.names.get(c, "") if c else "" for c in label]),
            "label_l1": np.asarray([level1_of(c) or "" if c else "" for c in label]),
            "score": top_scores[:, 0],
            "top_labels": top_labels,
            "top_scores": top_scores,
            "stage": np.asarray([str(x or "decode") for x in stage]),
        }


def _finish_row(row: dict[str, Any], common: dict[str, Any], labelled_at: datetime) -> dict[str, Any]:
    """Driver side: numpy-batch row -> prediction row (nulls instead of fill values, run provenance added)."""
    ok = row["status"] == "ok"
    out = dict(row)
    for key in ("reason", "error") if ok else ("label", "label_name", "label_l1"):
        out[key] = None
    if not ok:
        out["score"], out["top_labels"], out["top_scores"] = None, [], []
    else:
        out["label_name"] = out["label_name"] or None
        out["label_l1"] = out["label_l1"] or None
    out.update(common, labelled_at=labelled_at)
    return out


# ------------------------------------------------------------------------------------------------------ run


def embed_class_names(cfg: RaypipeConfig, names: dict[str, str]) -> np.ndarray:
    """Class names through the same text encoder as the features' ``text_emb`` -> (C, Dt) float32."""
    from raypipe.embed.text import TextEncoder
    from raypipe.io.text import clean_text

    enc = TextEncoder(cfg.embed.text, cfg.storage)
    texts = np.asarray([clean_text(n) for n in names.values()], dtype=object)
    out = enc({"text": texts, "status": np.full(len(texts), "ok", dtype=object)})
    return np.asarray(out["text_emb"], dtype=np.float32)  # (C, Dt)


_FEATURE_EMBEDDERS = ("frames", "audio", "text", "ocr", "asr")


def _check_embedders(model_embedders: dict[str, Any], live_embedders: dict[str, Any]) -> None:
    """A model only understands features from the encoders it was trained on: refuse a mismatch up front.

    Everything that shapes the features counts (name, dim, weights, image size, ...); a library version bump
    only warns, since it rarely changes the numbers and blocking the nightly run on it would hurt more.
    """
    bad = []
    for key in _FEATURE_EMBEDDERS:  # ocr / asr: a model trained on text read from the video needs those stages on
        m, v = model_embedders.get(key, {}), live_embedders.get(key, {})
        if bool(m) != bool(v) and key in ("ocr", "asr"):  # one stage on one side only: say so once
            bad.append(f"the model was trained with embed.{key} {'on' if m else 'off'}, embed.{key}.enabled is "
                       f"{'false' if m else 'true'} here")
            continue
        for attr in sorted(set(m) | set(v)):
            if m.get(attr) == v.get(attr):
                continue
            msg = f"{key}.{attr}: model trained on {m.get(attr)!r}, embed.* gives {v.get(attr)!r}"
            if attr == "version":
                log.warning("label: %s", msg)
            else:
                bad.append(msg)
    if bad:
        raise ValueError("label: the model's embedders differ from embed.* (" + "; ".join(bad) + ")")


def label_videos(cfg: RaypipeConfig, *, run_id: str | None = None) -> dict[str, Any]:
    """Label every video of ``embed.source`` not yet labelled by this model version; returns the run summary.

    ``run_id`` (default: a new timestamped id) is stamped on every row; the nightly job passes one per night so
    that the rows of a night resumed after a crash all carry the same id and can be counted together.
    """
    import ray

    from raypipe.classifier import load_classifier
    from raypipe.config.paths import absolute_tracking_uri
    from raypipe.embed.pipeline import build_feature_dataset, feature_info
    from raypipe.io.sources import list_videos
    from raypipe.runtime import ensure_ray, planned

    t0 = time.monotonic()
    # Planned first: the encoders' device class is part of the feature fingerprint compared below.
    ensure_ray(cfg)
    cfg, plan = planned(cfg, "label")
    lc = cfg.label
    run_id = run_id or _new_run_id()
    tracking_uri = absolute_tracking_uri(cfg.tracking.tracking_uri) if cfg.tracking.enabled else None
    clf = load_classifier(lc.model_uri, cfg.storage, tracking_uri=tracking_uri)
    model_name, model_version = str(clf.model_name), str(clf.model_version)
    resolved_uri = f"models:/{model_name}/{model_version}" if lc.model_uri.startswith("models:/") else lc.model_uri
    info = feature_info(cfg)
    live = {k: v for k, v in info.embedders.items() if k in _FEATURE_EMBEDDERS}
    _check_embedders(clf.shard_info.embedders, live)
    if clf.shard_info.config_hash and clf.shard_info.config_hash != info.config_hash:
        log.warning("label: embed.* differs from the config the model's features were made with (hash %s != %s)",
                    clf.shard_info.config_hash, info.config_hash)

    names = read_class_names(lc.class_names, cfg.storage) if lc.class_names else {}
    class_codes: list[str] | None = None
    class_text_emb = None
    if lc.mode == "zero_shot":
        if not hasattr(clf, "zero_shot_proba"):
            raise ValueError(f"label.mode='zero_shot': model {model_name!r} has no zero-shot head (use CAV-Net)")
        class_codes = list(names)
        class_text_emb = embed_class_names(cfg, names)

    store = prediction_store(lc.output, cfg.storage, model_name=model_name, model_version=model_version,
                             num_shards=lc.num_shards)
    fs, vroot = store.fs_path
    if lc.force and fs.exists(vroot):
        log.warning("label.force: dropping the earlier predictions of %s v%s in %s", model_name, model_version, vroot)
        fs.rm(vroot, recursive=True)
    _forget_if_superseded(store, lc.output, cfg.storage, model_name=model_name, model_version=model_version)
    done = store.done_keys(include_errors=not lc.retry_failed)
    refs = list_videos(cfg.embed.source, cfg.storage)
    todo = [r for r in refs if r.video_id not in done]
    stats = LabelStats(listed=len(refs), skipped=len(refs) - len(todo), to_label=len(todo))
    log.info("label: %d videos listed, %d already labelled by %s v%s, %d to label",
             stats.listed, stats.skipped, model_name, model_version, stats.to_label)

    common = {
        "mode": lc.mode, "model_name": model_name, "model_version": model_version, "model_uri": resolved_uri,
        "embedders": json.dumps(live, sort_keys=True, default=_json_default), "run_id": run_id,
    }
    if todo:
        ds = build_feature_dataset(cfg, todo, plan=plan)
        preds = ds.map_batches(
            _Classify,
            fn_constructor_kwargs={
                "model_uri": resolved_uri, "storage": cfg.storage, "tracking_uri": tracking_uri, "mode": lc.mode,
                "top_k": lc.top_k, "class_codes": class_codes, "class_names": names, "class_text_emb": class_text_emb,
            },
            batch_size=lc.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=lc.min_actors, max_size=lc.max_actors),
            num_gpus=plan.settings["label.num_gpus"], num_cpus=plan.settings["label.num_cpus"],
        )
        from raypipe.runtime import decode_capacity_request

        with decode_capacity_request(cfg, plan, len(todo)):
            _consume(cfg, preds, store, common, stats)
    shard_paths = commit_predictions(store, common)

    status = "ok" if stats.failure_rate <= lc.max_failure_rate else "too_many_failures"
    summary: dict[str, Any] = {
        "run_id": run_id,
        "status": status,
        "mode": lc.mode,
        "model": {"name": model_name, "version": model_version, "uri": resolved_uri, "requested_uri": lc.model_uri},
        "embedders": live,
        "source": cfg.embed.source.uri,
        "output": lc.output,
        "videos_seen": stats.listed,
        "skipped": stats.skipped,
        "to_label": stats.to_label,
        "labelled": stats.labelled,
        "failed": stats.failed,
        "failure_rate": round(stats.failure_rate, 6),
        "max_failure_rate": lc.max_failure_rate,
        "failed_by_reason": dict(stats.failed_by_reason),
        "label_distribution": dict(stats.label_counts),
        "level1_distribution": dict(stats.level1_counts),
        "class_names": names,
        "predictions": store.root,
        "shards": shard_paths,
        "duration_s": round(time.monotonic() - t0, 3),
    }
    summary["reports"] = _write_reports(cfg, summary)
    if cfg.tracking.enabled and lc.log_mlflow:
        summary["mlflow_run_id"] = _log_to_mlflow(cfg, summary)
    log.info("label run %s done: %d labelled, %d skipped, %d failed; report %s", run_id, stats.labelled,
             stats.skipped, stats.failed, summary["reports"].get("summary.txt"))
    return summary


def _consume(cfg: RaypipeConfig, preds: Any, store: ShardStore, common: dict[str, Any], stats: LabelStats) -> None:
    """Drain the prediction stream into part files, with one progress line and the stall watchdog; on a stall
    the rows already received are written and committed before the error propagates (a rerun resumes)."""
    from raypipe.runtime import Progress, Watchdog

    lc = cfg.label
    ok_rows: list[dict[str, Any]] = []
    failed_rows: list[dict[str, Any]] = []
    progress = Progress("label", stats.to_label)
    with Watchdog("label", cfg.ray.stall_timeout_s) as dog:
        try:
            for row in _batches_to_rows(preds.iter_batches(batch_size=lc.batch_size, batch_format="numpy")):
                dog.tick()
                stage = str(row.pop("stage", "") or "decode")
                final = _finish_row(row, common, _utcnow())
                stats.add(final)
                progress.update(1, failed=int(final["status"] != "ok"))
                if final["status"] == "ok":
                    ok_rows.append(final)
                else:
                    failed_rows.append({k: final[k] for k in ("video_id", "source_uri", "reason", "error")}
                                       | {"stage": stage})
                if len(ok_rows) + len(failed_rows) >= lc.write_batch_size:
                    write_prediction_parts(store, ok_rows, failed_rows)
        except KeyboardInterrupt:
            write_prediction_parts(store, ok_rows, failed_rows)
            commit_predictions(store, common)
            dog.raise_if_fired()
            raise
        finally:
            progress.close()
    write_prediction_parts(store, ok_rows, failed_rows)


def _forget_if_superseded(store: ShardStore, output: str, storage: StorageConfig | None, *, model_name: str,
                          model_version: str) -> None:
    """Labelling with a version whose earlier labels were since replaced by another version's (the champion was
    rolled back to it): drop that version's old predictions so that it labels everything again.

    Without this the rows it committed before would count as done, and readers, who take each video's latest
    row, would keep showing the newer version's labels although the job now labels with this one.
    """
    fs, vroot = store.fs_path
    if not fs.exists(join(vroot, MANIFEST)):
        return
    latest = read_predictions(output, storage)
    ids = latest.column("video_id").to_pylist()
    names, versions = latest.column("model_name").to_pylist(), latest.column("model_version").to_pylist()
    newer = {v for v, n, ver in zip(ids, names, versions, strict=True) if n == model_name and ver != model_version}
    mine = store.done_keys(include_errors=True)
    if newer & mine:
        log.warning("label: %d videos labelled by %s v%s were relabelled by another version since (a rollback to "
                    "v%s): relabelling everything with v%s", len(newer & mine), model_name, model_version,
                    model_version, model_version)
        fs.rm(vroot, recursive=True)


def write_prediction_parts(store: ShardStore, ok_rows: list[dict[str, Any]], failed_rows: list[dict[str, Any]]) -> None:
    """Append the buffered rows as part files (the unit of resume) and empty the buffers."""
    if ok_rows:
        store.write_rows(pa.Table.from_pylist(ok_rows, schema=prediction_schema()))
    if failed_rows:
        store.write_errors(pa.Table.from_pylist(failed_rows, schema=error_schema()))
    ok_rows.clear()
    failed_rows.clear()


def commit_predictions(store: ShardStore, common: dict[str, Any]) -> list[str]:
    """Parts -> atomic shard files, errors without videos that have since been labelled, then the manifest."""
    # done_keys is read before the parts are committed: what the committed shards and the parts hold
    manifest = store.commit({
        **{k: common[k] for k in ("mode", "model_name", "model_version", "model_uri", "run_id")},
        "embedders": json.loads(common["embedders"]),
        "committed_at": _utcnow().isoformat(),
    }, drop_error_keys=store.done_keys(include_errors=False))
    return [join(store.root, s["path"]) for s in manifest["shards"]]


def _write_reports(cfg: RaypipeConfig, summary: dict[str, Any]) -> dict[str, str]:
    """summary.json, summary.txt and label_distribution.png under <output>/reports/<run_id>/ (and latest/)."""
    fs, root = resolve(cfg.label.output, cfg.storage)
    files = {
        "summary.json": json.dumps(summary, indent=2, sort_keys=True, default=_json_default).encode(),
        "summary.txt": (format_table(summary) + "\n").encode(),
        "label_distribution.png": plot_distribution(
            summary["label_distribution"], summary["class_names"],
            f"top-1 labels, {summary['model']['name']} version {summary['model']['version']} ({summary['labelled']} videos)",
        ),
    }
    paths = {}
    for folder in (summary["run_id"], "latest"):
        for name, data in files.items():
            path = join(root, REPORTS_DIR, folder, name)
            atomic_write_bytes(fs, path, data)
            if folder != "latest":
                paths[name] = path
    return paths


def _log_to_mlflow(cfg: RaypipeConfig, summary: dict[str, Any]) -> str | None:
    """One MLflow run per labelling run: counts as metrics, the reports as artifacts. Never fails the job."""
    import tempfile
    from pathlib import Path

    from raypipe.tracking import start_stage_run

    try:
        logger = start_stage_run(
            cfg.tracking, stage="label", run_name=f"label-{summary['run_id']}",
            tags={"raypipe.label_run": summary["run_id"]}, params={
                "model_name": summary["model"]["name"], "model_version": summary["model"]["version"],
                "model_uri": summary["model"]["uri"], "mode": summary["mode"], "source": summary["source"],
                "output": summary["output"],
            },
        )
        logger.log_metrics({k: float(summary[k]) for k in
                            ("videos_seen", "skipped", "labelled", "failed", "failure_rate", "duration_s")}, step=0)
        fs, _ = resolve(cfg.label.output, cfg.storage)
        with tempfile.TemporaryDirectory(prefix="raypipe-label-") as tmp:
            for name, path in summary["reports"].items():
                local = Path(tmp) / name
                local.write_bytes(fs.cat_file(path))
                logger.log_file(local, "label")
        logger.finish("FINISHED" if summary["status"] == "ok" else "FAILED")
        return logger.run_id
    except Exception:  # tracking is a side channel: the predictions are already committed
        log.exception("label: MLflow logging failed (predictions are committed; continuing)")
        return None


def run(cfg: RaypipeConfig) -> int:
    """CLI entry: 0 when the failure rate is within ``label.max_failure_rate``, else ``label.failure_exit_code``."""
    summary = label_videos(cfg)
    log.info("label summary\n%s", format_table(summary))
    if summary["status"] != "ok":
        log.error("label: failure rate %.1f%% is above label.max_failure_rate=%.1f%%",
                  100 * summary["failure_rate"], 100 * summary["max_failure_rate"])
        return cfg.label.failure_exit_code
    return 0


__all__ = [
    "LabelStats",
    "label_videos",
    "run",
    "PREDICTION_COLUMNS",
    "prediction_store",
    "version_root",
    "format_table",
    "level1_of",
    "plot_distribution",
    "prediction_schema",
    "read_class_names",
    "read_predictions",
]
