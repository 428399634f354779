"""The embedding job on Ray Data: list -> decode (CPU tasks) -> frame / audio / text actor pools -> shards.

::

    refs (driver, metadata only)
      -> from_items, ``videos_per_block`` videos per block
      -> map(decode_video)                      tasks, ``decode_num_cpus`` each; one fixed-shape row per video
                                                (+ the frames to read text from, with ``embed.ocr``)
      -> map_batches(OcrStage)                  only with ``embed.ocr``: ActorPoolStrategy(ocr_pool)
      -> map_batches(AsrStage)                  only with ``embed.asr``: ActorPoolStrategy(asr_pool)
      -> map_batches(FrameEncoder)              ActorPoolStrategy(frame_pool), GPUs when present
      -> map_batches(AudioEncoder)              ActorPoolStrategy(audio_pool)
      -> map_batches(TextEncoder)               ActorPoolStrategy(text_pool)
         (or, with ``embed.fuse_encoders``, one map_batches(FusedEncoder) pool running all three in turn)
      -> map_batches(write parts)               tasks: rows to _parts/shard-k, failures to _parts/errors
      -> driver: commit shard k once all its videos are in, then errors.parquet, then the manifest

    or, with ``embed.inline_decode`` (auto on a small CPU-only cluster; embed only, no OCR / ASR):
      refs -> from_items -> map_batches(InlineEmbedder)   ActorPoolStrategy(frame_pool): decode, the fused
                                                           encoders and write parts in one actor per CPU
           -> driver: the same commits

Nothing is materialised: the driver only sees one small status row per video. Rows of
:func:`build_feature_dataset` (reused by the labelling job, which appends its classify stage) carry the feature
columns as fixed-shape tensors plus ``status`` / ``stage`` / ``reason`` / ``error``; failed rows keep zero
tensors. In that dataset ``labels`` is a JSON-encoded list and missing ``label`` / ``label_l1`` are ``""`` (so
every block has the same Arrow types); :func:`raypipe.schema.to_feature_tables` turns them back into the shard schema.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

import raypipe
from raypipe.config import RaypipeConfig, StorageConfig
from raypipe.config.embed import DecodeConfig, EmbedConfig, OcrConfig, PoolConfig, compute_fields, config_hash
from raypipe.io.decode import decode_video
from raypipe.io.fs import atomic_write_bytes, join, resolve
from raypipe.io.shards import ShardStore, shard_of
from raypipe.io.sources import VideoRef, detect_kind, list_videos
from raypipe.resources import StagePlan
from raypipe.runtime import Progress, StallError, Watchdog, decode_capacity_request, ensure_ray, planned
from raypipe.schema import ShardInfo, feature_schema, to_feature_tables

log = logging.getLogger(__name__)


def feature_info(cfg: RaypipeConfig) -> ShardInfo:
    """ShardInfo of the configured encoders, computed on the driver without loading weights.

    ``cfg`` should be planned (:func:`raypipe.runtime.planned`): the device class of each encoder is part of the
    config hash, so CPU (fp32) and GPU (fp16) features never mix in one output folder.
    """
    from raypipe.embed.audio import audio_encoder_info
    from raypipe.embed.extracted import check_engines
    from raypipe.embed.frames import frame_encoder_info
    from raypipe.embed.text import text_encoder_info

    e = cfg.embed
    check_engines(e)  # a missing optional package is a config error here, before any Ray work
    frames = frame_encoder_info(e.frames)
    audio = audio_encoder_info(e.audio, e.decode.audio_sample_rate)
    text, tok = text_encoder_info(e.text, cfg.storage)
    return ShardInfo(
        frame_dim=frames["dim"], audio_dim=audio["dim"], text_dim=text["dim"], text_len=e.text.max_len,
        max_frames=e.decode.max_frames, tokenizer=tok,
        embedders={"frames": frames, "audio": audio, "text": text, "decode": e.decode.model_dump(),
                   "compute": compute_fields(e) or {}, **_extracted_info(e)},
        config_hash=config_hash(e), raypipe_version=raypipe.__version__,
    )


def _extracted_info(e: EmbedConfig) -> dict[str, dict[str, Any]]:
    """ShardInfo.embedders entries of the OCR / ASR stages that are on (their presence adds the timed columns)."""
    out: dict[str, dict[str, Any]] = {}
    if e.ocr.enabled:
        from raypipe.embed.ocr import ocr_info

        out["ocr"] = ocr_info(e.ocr)
    if e.asr.enabled:
        from raypipe.embed.asr import asr_info

        out["asr"] = asr_info(e.asr)
    return out


def _ref_item(ref: VideoRef) -> dict[str, Any]:
    d = ref.to_dict()
    d.update(label=ref.label or "", label_l1=ref.label_l1 or "", labels=json.dumps(list(ref.labels)))
    return d


def _decode_row(
    row: dict[str, Any], *, decode_cfg: DecodeConfig, image_size: int, storage: StorageConfig | None,
    ocr_cfg: OcrConfig | None = None,
) -> dict[str, Any]:
    labels = json.loads(row["labels"]) if row.get("labels") else []
    out = decode_video({**row, "labels": labels}, decode_cfg, image_size=image_size, storage=storage)
    out.update(labels=json.dumps(labels), label=out["label"] or "", label_l1=out["label_l1"] or "")
    if ocr_cfg is not None:  # the OCR stage's frames, at a readable size; their read time counts as OCR time
        from raypipe.io.ocr_frames import read_ocr_frames

        t0 = time.monotonic()
        out.update(read_ocr_frames(row, out, ocr_cfg, decode_cfg=decode_cfg, storage=storage))
        out["ocr_s"] = time.monotonic() - t0
    return out


def _quiet_data_context(e: EmbedConfig) -> None:
    """Ray Data's own bars and log lines (one per operator) give way to the stage's single progress line unless -v."""
    import ray

    from raypipe.logs import quiet_ray_data, verbose

    quiet_ray_data()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = e.progress_bars and verbose()
    ctx.print_on_execution_start = verbose()


def build_feature_dataset(cfg: RaypipeConfig, refs: list[VideoRef], *, crash_after: int | None = None,
                          plan: StagePlan | None = None):
    """Lazy Ray Dataset of one row per video (see module docstring). ``crash_after`` defaults to the env var.

    ``cfg`` is planned here for the embed stage unless the caller passes its own ``plan`` (label: one more GPU
    pool) with the config it resolved.
    """
    import ray

    from raypipe.embed.common import fault_from_env, stall_from_env

    if plan is None:
        cfg, plan = planned(cfg, "embed")
    e = cfg.embed
    if crash_after is None:
        crash_after = fault_from_env()
    stall_after = stall_from_env()
    _quiet_data_context(e)
    items = [_ref_item(r) for r in refs]
    blocks = max(1, min(len(items), math.ceil(len(items) / e.videos_per_block)))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map(
        _decode_row,
        fn_kwargs={"decode_cfg": e.decode, "image_size": e.frames.image_size, "storage": cfg.storage,
                   "ocr_cfg": e.ocr if e.ocr.enabled else None},
        num_cpus=e.decode_num_cpus,
        memory=plan.settings.get("embed.decode_memory", e.decode_memory_mb * 1024 * 1024) or None,
        **({"resources": plan.settings["embed.decode_resources"]} if plan.settings.get("embed.decode_resources") else {}),
    )

    def pool(p: PoolConfig, *, armed: bool = False) -> dict[str, Any]:
        remote: dict[str, Any] = {
            "compute": ray.data.ActorPoolStrategy(min_size=p.min_size, max_size=p.max_size),
            "num_cpus": p.num_cpus, "num_gpus": p.num_gpus, "batch_format": "numpy",
        }
        if armed and (crash_after is not None or stall_after is not None):
            # Let the injected crash fail the job (instead of Ray restarting the actor) so resume is exercised.
            remote["max_restarts"] = 0
        return remote

    ds = _text_from_video(ds, cfg, pool)
    from raypipe.embed.audio import AudioEncoder
    from raypipe.embed.frames import FrameEncoder
    from raypipe.embed.text import TextEncoder

    if e.fuse_encoders:
        return ds.map_batches(
            FusedEncoder, batch_size=min(e.frames.batch_size, e.audio.batch_size, e.text.batch_size),
            **pool(e.frame_pool, armed=True),
            fn_constructor_kwargs={"cfg": e, "storage": cfg.storage, "crash_after": crash_after,
                                   "stall_after": stall_after,
                                   "threads": e.encoder_threads if e.encoder_threads != "auto" else None},
        )
    ds = ds.map_batches(
        FrameEncoder, batch_size=e.frames.batch_size, **pool(e.frame_pool),
        fn_constructor_kwargs={"cfg": e.frames, "storage": cfg.storage},
    )
    ds = ds.map_batches(
        AudioEncoder, batch_size=e.audio.batch_size, **pool(e.audio_pool),
        fn_constructor_kwargs={"cfg": e.audio, "sample_rate": e.decode.audio_sample_rate, "storage": cfg.storage},
    )
    ds = ds.map_batches(
        TextEncoder, batch_size=e.text.batch_size, **pool(e.text_pool, armed=True),
        fn_constructor_kwargs={"cfg": e.text, "storage": cfg.storage, "crash_after": crash_after},
    )
    return ds


def _text_from_video(ds: Any, cfg: RaypipeConfig, pool: Any) -> Any:
    """The OCR and ASR stages (each its own actor pool, planned like the encoders) when they are on; before the
    encoders, since the text encoder tokenises what they read and the audio encoder consumes ``audio``."""
    e = cfg.embed
    if e.ocr.enabled:
        from raypipe.embed.ocr import OcrStage

        ds = ds.map_batches(OcrStage, batch_size=e.ocr.batch_size, **pool(e.ocr_pool),
                            fn_constructor_kwargs={"cfg": e.ocr})
    if e.asr.enabled:
        from raypipe.embed.asr import AsrStage

        ds = ds.map_batches(AsrStage, batch_size=e.asr.batch_size, **pool(e.asr_pool),
                            fn_constructor_kwargs={"cfg": e.asr, "storage": cfg.storage})
    return ds


class FusedEncoder:
    """``embed.fuse_encoders``: the frame, audio and text encoders in one actor, applied in turn to each batch.

    Each encoder embeds video by video, so the rows are bit-identical to those of the three pools; what changes is
    one worker process (and one set of imports, one GPU reservation) per actor instead of three.
    """

    def __init__(self, cfg: EmbedConfig, storage: StorageConfig | None = None, crash_after: int | None = None,
                 stall_after: int | None = None, threads: int | None = None):
        if threads:  # embed.encoder_threads (see raypipe.resources): Ray pins a 0.5-CPU actor to one thread
            import torch

            torch.set_num_threads(threads)
        from raypipe.embed.audio import AudioEncoder
        from raypipe.embed.common import FaultInjector
        from raypipe.embed.frames import FrameEncoder
        from raypipe.embed.text import TextEncoder

        self.stall = FaultInjector(None, stall_after=stall_after)
        self.text_lock = threading.Lock()  # a fast tokenizer is not safe to call from two threads at once
        self.stages = (
            FrameEncoder(cfg.frames, storage),
            AudioEncoder(cfg.audio, cfg.decode.audio_sample_rate, storage),
            TextEncoder(cfg.text, storage, crash_after=crash_after),
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.stall.tick()
        t0 = time.perf_counter()
        frames, audio, text = self.stages
        batch = audio(frames(batch))
        with self.text_lock:
            batch = text(batch)
        n = len(batch["video_id"])
        batch["encode_s"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))  # the summary's per-stage time
        return batch


class InlineEmbedder:
    """``embed.inline_decode``: decode, encode and write each batch of videos inside one actor.

    Why: on a small CPU-only node the staged pipeline moves every decoded video (frames + audio windows, ~10x
    the file) through the object store into the encoder process and back out to a write task; measured on 2
    CPUs that serialisation and the extra processes cost more than the overlap gains (docs/PERFORMANCE.md). Here
    each actor is a plain loop over its share of the videos, and the pool runs one per CPU. The rows are those
    of the staged pipeline (same decode, same encoders); a video that fails to decode is an error row as there.
    An actor given N CPUs runs N calls at once in threads (``embed.inline_calls``); nothing here is shared
    between calls but the encoders, whose text stage takes a lock.
    """

    def __init__(self, cfg: EmbedConfig, image_size: int, store: ShardStore, info: ShardInfo,
                 storage: StorageConfig | None = None, **encoder_kwargs: Any):
        self.cfg, self.image_size, self.store, self.info, self.storage = cfg, image_size, store, info, storage
        self.encoder = FusedEncoder(cfg, storage, **encoder_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [{k: _item(v[i]) for k, v in batch.items()} for i in range(len(batch["video_id"]))]
        rows = [_decode_row(it, decode_cfg=self.cfg.decode, image_size=self.image_size, storage=self.storage)
                for it in items]
        return _write_parts(self.encoder(_stack(rows)), store=self.store, info=self.info)


def _item(value: Any) -> Any:
    """A numpy batch cell back as the Python value ``_ref_item`` put in (str / int / float)."""
    return value.item() if isinstance(value, np.generic) else value


def _stack(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows of ``_decode_row`` as the numpy batch Ray Data would hand the encoders (arrays stacked on axis 0)."""
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], np.ndarray):
            out[key] = np.stack(values)
        else:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[key] = arr if isinstance(values[0], str | list | dict) else np.asarray(values)
    return out


def _write_parts(batch: dict[str, np.ndarray], *, store: ShardStore, info: ShardInfo) -> dict[str, np.ndarray]:
    table, errors = to_feature_tables(batch, info)
    if table.num_rows:
        store.write_rows(table)
    store.write_errors(errors)
    ids = np.asarray(batch["video_id"]).astype(str)
    return {
        "video_id": ids,
        "shard": np.array([shard_of(v, store.num_shards) for v in ids], np.int32),
        "status": np.asarray(batch["status"]).astype(str),
        "reason": np.asarray(batch["reason"]).astype(str),
        "num_frames": np.asarray(batch["num_frames"]).astype(np.int32),
        "decode_s": np.asarray(batch["decode_s"]).astype(np.float64),
        **{f"{k}_s": np.asarray(batch.get(f"{k}_s", np.zeros(len(ids)))).astype(np.float64) for k in _TIMED_STAGES},
    }


_TIMED_STAGES = ("ocr", "asr", "encode")  # encode: set by the fused encoder only


class _Tally:
    """What the driver counts while the stream runs (one small status row per video)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first_row_s: float | None = None  # stream start -> first video through: workers' start-up + 1 batch
        self.statuses: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.ok_ids: list[str] = []
        self.frames = 0
        self.decode_s = 0.0
        self.stage_s: Counter[str] = Counter()

    def add(self, row: dict[str, Any]) -> None:
        if self.first_row_s is None:
            self.first_row_s = time.monotonic() - self.started
        self.statuses[str(row["status"])] += 1
        if row["status"] == "ok":
            self.ok_ids.append(str(row["video_id"]))
            self.frames += int(row["num_frames"])
        else:
            self.reasons[str(row["reason"])] += 1
        self.decode_s += float(row["decode_s"])
        self.stage_s["decode"] += float(row["decode_s"])
        for k in _TIMED_STAGES:
            self.stage_s[k] += float(row.get(f"{k}_s", 0.0))


def _stream(cfg: RaypipeConfig, plan: StagePlan, pending: list[VideoRef], store: ShardStore, info: ShardInfo,
            tally: _Tally) -> None:
    """Run the Ray Data stream, committing each shard as soon as all its pending videos are through.

    The watchdog ends the wait when no row comes out for ``ray.stall_timeout_s`` (:class:`StallError`).
    """
    e = cfg.embed
    expected = Counter(shard_of(r.video_id, e.num_shards) for r in pending)
    got: Counter[int] = Counter()
    if e.inline_decode is True:  # planned: "auto" is resolved by now
        ds = _inline_dataset(cfg, pending, store, info)
    else:
        ds = build_feature_dataset(cfg, pending, plan=plan).map_batches(
            _write_parts, batch_size=e.write_batch_size, batch_format="numpy", num_cpus=0.25,
            fn_kwargs={"store": store, "info": info},
        )
    progress = Progress("embed", len(pending))
    with decode_capacity_request(cfg, plan, len(pending)), Watchdog("embed", cfg.ray.stall_timeout_s) as dog:
        try:
            for row in ds.iter_rows():
                dog.tick()
                tally.add(row)
                progress.update(1, failed=int(row["status"] != "ok"))
                s = int(row["shard"])
                got[s] += 1
                if got[s] == expected[s]:
                    store.commit_shard(s)  # every pending video of shard s is in: commit it now
        except KeyboardInterrupt:
            dog.raise_if_fired()
            raise
        finally:
            progress.close()


def _inline_dataset(cfg: RaypipeConfig, pending: list[VideoRef], store: ShardStore, info: ShardInfo) -> Any:
    """The ``embed.inline_decode`` stream: the listing straight into one :class:`InlineEmbedder` pool (sized and
    resourced by ``embed.frame_pool``), whose output is the status rows :func:`_write_parts` returns."""
    import ray

    from raypipe.embed.common import fault_from_env, stall_from_env

    e = cfg.embed
    _quiet_data_context(e)
    batch = min(e.frames.batch_size, e.audio.batch_size, e.text.batch_size)
    items = [_ref_item(r) for r in pending]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch)))
    p = e.frame_pool
    crash_after, stall_after = fault_from_env(), stall_from_env()
    return ds.map_batches(
        InlineEmbedder, batch_size=batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=p.min_size, max_size=p.max_size,
                                           max_concurrent_calls_per_actor=e.inline_calls,
                                           enable_true_multi_threading=e.inline_calls > 1),
        num_cpus=p.num_cpus, num_gpus=p.num_gpus,
        # An injected crash fails the job (instead of Ray restarting the actor) so resume is exercised.
        **({"max_restarts": 0} if crash_after is not None or stall_after is not None else {}),
        fn_constructor_kwargs={"cfg": e, "image_size": e.frames.image_size, "store": store, "info": info,
                               "storage": cfg.storage, "crash_after": crash_after, "stall_after": stall_after,
                               "threads": e.encoder_threads if e.encoder_threads != "auto" else None},
    )


def embed_videos(cfg: RaypipeConfig) -> dict[str, Any]:
    """Embed the configured source into committed shards (resuming earlier work); returns the run summary."""
    e = cfg.embed
    kind = detect_kind(e.source)
    if kind in ("wbdc_features", "yt8m"):
        from raypipe.embed.importers import import_features

        return import_features(cfg)
    t0 = time.monotonic()
    refs = list_videos(e.source, cfg.storage)
    # Plan before hashing: the planned device class (GPU fp16 / CPU fp32) is part of the feature fingerprint.
    ensure_ray(cfg)
    cfg, plan = planned(cfg, "embed")
    e = cfg.embed
    info = feature_info(cfg)
    store = ShardStore(e.output, cfg.storage, num_shards=e.num_shards, schema=feature_schema(info))
    store.check_config(info.config_hash, overwrite=e.overwrite)
    done = store.done_keys(include_errors=not e.retry_failed)
    pending = [r for r in refs if r.video_id not in done]
    log.info("embed: %d videos listed, %d already done, %d to process", len(refs), len(refs) - len(pending), len(pending))
    tally = _Tally()
    if pending:
        try:
            _stream(cfg, plan, pending, store, info, tally)
        except StallError:
            store.commit()  # keep what came through (no manifest); the rerun skips it
            raise
    statuses, reasons, ok_ids, frames, decode_s = tally.statuses, tally.reasons, tally.ok_ids, tally.frames, tally.decode_s
    # also commits parts left by an interrupted earlier run
    manifest = store.commit({"config_hash": info.config_hash, "schema_version": info.schema_version},
                            drop_error_keys=ok_ids if e.retry_failed else ())
    n_errors = manifest["errors"]["rows"]
    seconds = time.monotonic() - t0
    from raypipe.io.shards import read_errors

    all_reasons = Counter(read_errors(e.output, cfg.storage).column("reason").to_pylist())
    summary = {
        "output": e.output,
        "videos_listed": len(refs),
        "videos_skipped": len(refs) - len(pending),
        "videos_processed": len(pending),
        "videos_ok": statuses.get("ok", 0),
        "videos_failed": sum(reasons.values()),
        "failed_by_reason": dict(sorted(reasons.items())),
        "frames": frames,
        "decode_seconds": round(decode_s, 3),
        # Seconds of work per stage, summed over videos (across parallel tasks/actors: can exceed "seconds").
        "stage_seconds": _stage_seconds(tally, e),
        # Busy share of the wall time per stage (summed over workers; encode: the fused pool only): on N CPUs a
        # stage whose share approaches N is the bottleneck. raypipe plan reads stage_seconds as per-stage costs.
        "stage_busy_share": {k: round(v / seconds, 3) if seconds else 0.0 for k, v in _stage_seconds(tally, e).items()},
        "seconds": round(seconds, 3),
        # Start-up inside "seconds": from the stream's start to the first video out (worker processes, imports,
        # model weights, one batch). What is left over the rest of the videos is the steady throughput.
        "first_row_s": round(tally.first_row_s, 3) if tally.first_row_s is not None else None,
        "videos_per_s": round(len(pending) / seconds, 3) if pending and seconds > 0 else 0.0,
        "rows_total": manifest["rows"],
        "errors_total": n_errors,
        "errors_by_reason_total": dict(sorted(all_reasons.items())),
        "shards": [s["path"] for s in manifest["shards"]],
        "config_hash": info.config_hash,
    }
    fs, root = resolve(e.output, cfg.storage)
    atomic_write_bytes(fs, join(root, "summary.json"), json.dumps(summary, indent=2).encode())
    log.info(
        "embed summary: %d ok, %d failed %s, %d frames, %.1fs, %.2f videos/s; %d rows and %d errors in %s; "
        "stage seconds %s",
        summary["videos_ok"], summary["videos_failed"], summary["failed_by_reason"], frames, seconds,
        summary["videos_per_s"], summary["rows_total"], n_errors, e.output, summary["stage_seconds"],
    )
    return summary


def _stage_seconds(tally: _Tally, e: EmbedConfig) -> dict[str, float]:
    on = {"decode": True, "encode": bool(e.fuse_encoders), "ocr": e.ocr.enabled, "asr": e.asr.enabled}
    return {k: round(float(tally.stage_s.get(k, 0.0)), 3) for k, enabled in on.items() if enabled}


def run(cfg: RaypipeConfig) -> int:
    """``raypipe embed``: 0 when every listed video ended up as a row or an error row, 2 on a config or resource
    error, 4 when the stall watchdog ended the run (rerun to resume)."""
    from raypipe.config import ConfigError

    try:
        summary = embed_videos(cfg)
    except ConfigError:
        raise  # the CLI prints it as one line (exit 2)
    except (FileNotFoundError, ValueError) as exc:
        log.error("embed: %s", exc)
        return 2
    return 0 if summary["rows_total"] + summary["errors_total"] >= summary["videos_listed"] else 1
