"""Import pre-extracted feature corpora into the same shard schema: WBDC 2022 and YouTube-8M frame-level.

A part of the embed stage, not of :mod:`raypipe.io`: it runs the text encoder (stages own models, io owns bytes;
the split NeMo Curator makes), so io never imports a stage.

Neither has decodable videos, so they skip decode and the frame/audio encoders; text (WBDC title/ASR/OCR) is
tokenised and embedded with the configured text encoder so the rows are complete. Rows go through the same
:class:`~raypipe.io.shards.ShardStore` (parts -> atomic shards -> manifest), so reruns skip imported ids.

* WBDC: ``embed.source.uri`` = zip of ``{id}.npy`` float16 ``[n <= 32, 768]``, ``embed.source.annotations`` =
  the JSON. No audio: ``audio_dim = 0`` and all-false ``audio_mask``. Ids without features -> errors
  (reason ``missing_features``); unreadable arrays -> ``corrupt``.
* YouTube-8M: ``embed.source.uri`` = TFRecord path or glob; ``rgb`` (1024) and ``audio`` (128) uint8 per second,
  dequantised like the starter code (``x * 4/255 + (4/512 - 2)``), ``labels`` = class indices as strings. Up to
  ``embed.decode.max_frames`` seconds are kept (300 = every second of a YouTube-8M record, as the MFB paper
  trains); a longer record is subsampled uniformly over its whole length (:func:`uniform_indices`), never cut to
  its first seconds: the video-level labels describe the whole video. ``frame_times`` are the kept seconds.
"""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

import raypipe
from raypipe.config import RaypipeConfig
from raypipe.config.embed import config_hash
from raypipe.io.fs import atomic_write_bytes, join, resolve
from raypipe.io.shards import ShardStore, read_errors
from raypipe.io.sources import detect_kind, load_annotations, ref_from_annotation
from raypipe.io.text import build_text
from raypipe.schema import ShardInfo, error_schema, feature_schema, to_feature_tables

log = logging.getLogger(__name__)


def dequantize(x: np.ndarray, max_q: float = 2.0, min_q: float = -2.0) -> np.ndarray:
    """YouTube-8M starter-code dequantisation of uint8 features."""
    scalar = (max_q - min_q) / 255.0
    bias = (max_q - min_q) / 512.0 + min_q
    return x.astype(np.float32) * scalar + bias


def uniform_indices(n: int, t: int) -> np.ndarray:
    """Which of ``n`` per-second feature rows to keep for at most ``t`` frames: all of them when ``n <= t``, else
    ``t`` evenly spaced over the whole video (``floor(k * n / t)``, the decoder's ``sampling=uniform`` rule)."""
    if n <= t:
        return np.arange(n)
    return (np.arange(t) * n) // t


def _wbdc_items(cfg: RaypipeConfig) -> Iterator[dict[str, Any]]:
    src = cfg.embed.source
    if not src.annotations:
        raise ValueError("embed.source.annotations: the WBDC importer needs the annotations JSON")
    anns = load_annotations(src.annotations, cfg.storage)
    fs, path = resolve(src.uri, cfg.storage)
    with fs.open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        names = {n.rsplit("/", 1)[-1][: -len(".npy")]: n for n in zf.namelist() if n.endswith(".npy")}
        for vid in sorted(anns):
            ref = ref_from_annotation(vid, f"{src.uri}#{vid}.npy", anns[vid])
            item = {"ref": ref, "frames": None, "audio": None, "reason": "", "error": ""}
            if vid not in names:
                item.update(reason="missing_features", error=f"{vid}.npy not in {src.uri}")
            else:
                try:
                    arr = np.load(io.BytesIO(zf.read(names[vid])), allow_pickle=False)
                    if arr.ndim != 2 or arr.shape[0] == 0:
                        raise ValueError(f"expected [n, dim] frame features, got shape {arr.shape}")
                    item["frames"] = arr[: cfg.embed.decode.max_frames].astype(np.float16)
                except Exception as exc:  # noqa: BLE001 - a bad array is an error row, not a crash
                    item.update(reason="corrupt", error=f"{type(exc).__name__}: {exc}")
            yield item


def _yt8m_items(cfg: RaypipeConfig) -> Iterator[dict[str, Any]]:
    from raypipe.io.sources import VideoRef
    from raypipe.io.tfrecord import decode_sequence_example, read_records

    fs, pattern = resolve(cfg.embed.source.uri, cfg.storage)
    paths = sorted(fs.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    t = cfg.embed.decode.max_frames
    for p in paths:
        with fs.open(p, "rb") as f:
            for k, rec in enumerate(read_records(f)):
                ctx, lists = decode_sequence_example(rec)
                vid = (ctx.get("id") or [f"{p}:{k}".encode()])[0].decode()
                ref = VideoRef(video_id=vid, source_uri=f"{cfg.embed.source.uri}#{vid}",
                               labels=[str(x) for x in ctx.get("labels", [])])
                rgb_all, aud_all = lists.get("rgb", []), lists.get("audio", [])
                keep = uniform_indices(len(rgb_all), t)
                rgb = [np.frombuffer(rgb_all[i][0], np.uint8) for i in keep]
                aud = [np.frombuffer(aud_all[i][0], np.uint8) for i in keep if i < len(aud_all)]
                item = {"ref": ref, "frames": None, "audio": None, "reason": "", "error": "",
                        "times": keep.astype(np.float32), "duration": float(len(rgb_all))}
                if not rgb:
                    item.update(reason="no_video_stream", error="record has no rgb frames")
                else:
                    item["frames"] = dequantize(np.stack(rgb)).astype(np.float16)
                    item["audio"] = dequantize(np.stack(aud)).astype(np.float16) if aud else None
                yield item


def import_features(cfg: RaypipeConfig) -> dict[str, Any]:
    """Import the configured WBDC / YouTube-8M corpus into ``embed.output``; returns the run summary."""
    from raypipe.embed.text import TextEncoder, text_encoder_info  # torch: only when a corpus is imported

    t0 = time.monotonic()
    e = cfg.embed
    kind = detect_kind(e.source)
    items = _wbdc_items(cfg) if kind == "wbdc_features" else _yt8m_items(cfg)
    frame_dim, audio_dim = (768, 0) if kind == "wbdc_features" else (1024, 128)
    text_info, tok = text_encoder_info(e.text, cfg.storage)
    info = ShardInfo(
        frame_dim=frame_dim, audio_dim=audio_dim, text_dim=text_info["dim"], text_len=e.text.max_len,
        max_frames=e.decode.max_frames, tokenizer=tok,
        embedders={"frames": {"name": f"{kind}/precomputed", "dim": frame_dim},
                   "audio": {"name": f"{kind}/precomputed" if audio_dim else "none", "dim": audio_dim},
                   "text": text_info},
        config_hash=f"{kind}-{config_hash(e)}", raypipe_version=raypipe.__version__,
    )
    store = ShardStore(e.output, cfg.storage, num_shards=e.num_shards, schema=feature_schema(info))
    store.check_config(info.config_hash, overwrite=e.overwrite)
    done = store.done_keys(include_errors=not e.retry_failed)
    encoder = TextEncoder(e.text, cfg.storage)
    t = e.decode.max_frames
    listed = processed = ok = 0
    reasons: dict[str, int] = {}
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        if not chunk:
            return
        b = len(chunk)
        batch: dict[str, Any] = {k: [] for k in ("video_id", "source_uri", "title", "asr", "ocr", "text", "label",
                                                   "label_l1", "labels", "status", "stage", "reason", "error")}
        frame_emb = np.zeros((b, t, frame_dim), np.float16)
        audio_emb = np.zeros((b, t, audio_dim), np.float16)
        num = np.zeros(b, np.int32)
        amask = np.zeros((b, t), bool)
        times = np.tile(np.arange(t, dtype=np.float32), (b, 1))  # WBDC: one feature row per second
        duration = np.zeros(b, np.float64)
        for i, it in enumerate(chunk):
            r = it["ref"]
            for k in ("video_id", "source_uri", "title", "asr", "ocr"):
                batch[k].append(getattr(r, k))
            batch["text"].append(build_text(r.title, r.asr, r.ocr))
            batch["label"].append(r.label or "")
            batch["label_l1"].append(r.label_l1 or "")
            batch["labels"].append(json.dumps(r.labels))
            batch["status"].append("failed" if it["reason"] else "ok")
            batch["stage"].append("import")
            batch["reason"].append(it["reason"])
            batch["error"].append(it["error"])
            if it["frames"] is not None:
                n = len(it["frames"])
                num[i] = n
                duration[i] = it.get("duration", n)
                if it.get("times") is not None:
                    times[i, :n] = it["times"][:n]
                frame_emb[i, :n] = it["frames"][:, :frame_dim]
                if it["audio"] is not None and audio_dim:
                    na = min(n, len(it["audio"]))
                    audio_emb[i, :na] = it["audio"][:na, :audio_dim]
                    amask[i, :na] = True
        arrays = {k: np.array(v, dtype=object if k not in ("status",) else str) for k, v in batch.items()}
        arrays["status"] = np.array(batch["status"])
        arrays = encoder(arrays)
        arrays.update(
            num_frames=num, duration_s=duration, frame_times=times,
            frame_emb=frame_emb, frame_mask=np.arange(t)[None] < num[:, None], audio_emb=audio_emb, audio_mask=amask,
        )
        table, errors = to_feature_tables(arrays, info)
        if table.num_rows:
            store.write_rows(table)
        store.write_errors(errors.cast(error_schema()))
        chunk.clear()

    for it in items:
        listed += 1
        if it["ref"].video_id in done:
            continue
        processed += 1
        if it["reason"]:
            reasons[it["reason"]] = reasons.get(it["reason"], 0) + 1
        else:
            ok += 1
        chunk.append(it)
        if len(chunk) >= 64:
            flush()
    flush()
    manifest = store.commit({"config_hash": info.config_hash, "schema_version": info.schema_version})
    n_errors = manifest["errors"]["rows"]
    seconds = time.monotonic() - t0
    summary = {
        "output": e.output, "source_kind": kind, "videos_listed": listed, "videos_skipped": listed - processed,
        "videos_processed": processed, "videos_ok": ok, "videos_failed": sum(reasons.values()),
        "failed_by_reason": dict(sorted(reasons.items())), "seconds": round(seconds, 3),
        "videos_per_s": round(processed / seconds, 3) if processed and seconds > 0 else 0.0,
        "rows_total": manifest["rows"], "errors_total": n_errors,
        "errors_by_reason_total": dict(sorted(
            {r: read_errors(e.output, cfg.storage).column("reason").to_pylist().count(r)
             for r in set(read_errors(e.output, cfg.storage).column("reason").to_pylist())}.items())),
        "config_hash": info.config_hash,
    }
    fs, root = resolve(e.output, cfg.storage)
    atomic_write_bytes(fs, join(root, "summary.json"), json.dumps(summary, indent=2).encode())
    log.info("import %s: %d ok, %d failed %s into %s", kind, ok, summary["videos_failed"], reasons, e.output)
    return summary
