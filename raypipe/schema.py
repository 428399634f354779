"""The feature-shard contract between embed, train and label (pure Python + numpy + pyarrow, no Ray, no torch).

One Parquet row per video. Tensors are stored flat (row-major) in list columns so that any Parquet reader can
load them; their shapes are fixed per dataset and recorded in the file metadata under ``raypipe``:

=================  ==================  ==========================================================
column             arrow type          meaning
=================  ==================  ==========================================================
video_id           string              stable id (file stem, manifest id or annotation id)
source_uri         string              where the video was read from
duration_s         float64             container duration
num_frames         int32               sampled frames, <= T
frame_times        list<float32>       timestamps (s) of the sampled frames
frame_emb          list<float16>       [T, frame_dim] flat, zero-padded
frame_mask         list<bool>          [T]
audio_emb          list<float16>       [T, audio_dim] flat, aligned to frame_times
audio_mask         list<bool>          [T], all false when the video has no audio
title, asr, ocr    string              raw sidecar text (ocr/asr flattened to text)
text               string              cleaned "title asr ocr"
input_ids          list<int32>         [text_len] token ids of ``text``
attention_mask     list<int32>         [text_len]
text_emb           list<float16>       [text_dim] sentence embedding of ``text``
label              string (nullable)   level-2 code or class name; null when unlabelled
label_l1           string (nullable)   level-1 code (first two digits of a WBDC level-2 code)
labels             list<string>        multi-label corpora (YouTube-8M); empty otherwise
ocr_timed          string (JSON)       only with ``embed.ocr``: the text read, ``[{time, text}]`` like WBDC
asr_timed          string (JSON)       only with ``embed.asr``: ``{"text", "words": [{word, start, end}]}``
=================  ==================  ==========================================================

T is ``ShardInfo.max_frames`` (``embed.decode.max_frames``: 32 by default, up to 300; :data:`MAX_FRAMES` is only
the default of shards written before the field existed). A row costs ``T x (frame_dim + audio_dim) x 2`` bytes of
features (691 KB at T = 300 for YouTube-8M's 1024 + 128).

Failed videos never appear here: they go to the errors table (:data:`ERROR_COLUMNS`). :func:`to_feature_tables`
turns a batch of fixed-shape arrays (the embed job's and the importers' rows) into both tables, so the columns
above are written in this one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
MAX_FRAMES = 32
METADATA_KEY = b"raypipe"

# The ShardInfo fields a model is built for: two feature sets are interchangeable only when all of them match.
SHARD_DIMS = ("frame_dim", "audio_dim", "text_dim", "text_len", "max_frames")
ERROR_COLUMNS = ("video_id", "source_uri", "stage", "reason", "error")


@dataclass(frozen=True)
class ShardInfo:
    """What a reader needs to reshape the flat columns, plus provenance. Stored as JSON in the metadata."""

    frame_dim: int
    audio_dim: int
    text_dim: int
    text_len: int
    max_frames: int = MAX_FRAMES
    # vocab_size and special token ids (pad, cls, sep, mask, unk) of the tokenizer that made input_ids;
    # models size their embeddings from it and MLM never masks the special ids.
    tokenizer: dict[str, Any] = field(default_factory=dict)
    embedders: dict[str, dict[str, Any]] = field(default_factory=dict)
    config_hash: str = ""
    raypipe_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_metadata(self) -> dict[bytes, bytes]:
        return {METADATA_KEY: json.dumps(asdict(self), sort_keys=True).encode()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> ShardInfo:
        if not metadata or METADATA_KEY not in metadata:
            raise ValueError("Parquet file has no raypipe metadata: not a raypipe feature shard")
        return cls(**json.loads(metadata[METADATA_KEY]))


def feature_schema(info: ShardInfo) -> pa.Schema:
    """The Arrow schema of a feature shard, with ``info`` in its metadata."""
    return pa.schema(
        [
            ("video_id", pa.string()),
            ("source_uri", pa.string()),
            ("duration_s", pa.float64()),
            ("num_frames", pa.int32()),
            ("frame_times", pa.list_(pa.float32())),
            ("frame_emb", pa.list_(pa.float16())),
            ("frame_mask", pa.list_(pa.bool_())),
            ("audio_emb", pa.list_(pa.float16())),
            ("audio_mask", pa.list_(pa.bool_())),
            ("title", pa.string()),
            ("asr", pa.string()),
            ("ocr", pa.string()),
            ("text", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("attention_mask", pa.list_(pa.int32())),
            ("text_emb", pa.list_(pa.float16())),
            ("label", pa.string()),
            ("label_l1", pa.string()),
            ("labels", pa.list_(pa.string())),
            *((c, pa.string()) for c in timed_columns(info)),
        ],
        metadata=info.to_metadata(),
    )


def timed_columns(info: ShardInfo) -> list[str]:
    """The extra JSON columns of the text-from-video stages that made ``info`` (none without them, so shards
    made before these stages existed keep their schema)."""
    return [f"{k}_timed" for k in ("ocr", "asr") if k in info.embedders]


def error_schema() -> pa.Schema:
    return pa.schema([(name, pa.string()) for name in ERROR_COLUMNS])


def level1_of(label: str | None) -> str | None:
    """WBDC rule: the level-1 class is the first two digits of the 4-digit level-2 code."""
    if label is None:
        return None
    return label[:2] if len(label) == 4 and label.isdigit() else None


def _list_col(arr: np.ndarray, typ: pa.DataType) -> pa.Array:
    """(B, ...) fixed-shape array -> list<typ> of the flattened rows."""
    b = arr.shape[0]
    n = int(np.prod(arr.shape[1:]))
    flat = np.ascontiguousarray(arr).reshape(b, n)  # n, not -1: a batch may hold no ok row at all (b = 0)
    offsets = pa.array(np.arange(b + 1, dtype=np.int32) * n)  # n may be 0 (no audio features at all)
    return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1), type=typ))


def _opt(values: Any) -> list[str | None]:
    return [str(v) if v not in (None, "") else None for v in values]


def to_feature_tables(batch: dict[str, np.ndarray], info: ShardInfo) -> tuple[pa.Table, pa.Table]:
    """Split a pipeline batch into (feature rows of the ok videos, error rows of the failed ones)."""
    status = np.asarray(batch["status"]).astype(str)
    ok = np.flatnonzero(status == "ok")
    bad = np.flatnonzero(status != "ok")
    errors = pa.table(
        {c: pa.array([str(np.asarray(batch[c])[i]) for i in bad], pa.string()) for c in ERROR_COLUMNS},
        schema=error_schema(),
    )

    def col(name: str) -> np.ndarray:
        return np.asarray(batch[name])[ok]

    table = pa.table(
        {
            "video_id": pa.array(col("video_id").astype(str).tolist(), pa.string()),
            "source_uri": pa.array(col("source_uri").astype(str).tolist(), pa.string()),
            "duration_s": pa.array(col("duration_s").astype(np.float64)),
            "num_frames": pa.array(col("num_frames").astype(np.int32)),
            "frame_times": _list_col(col("frame_times").astype(np.float32), pa.float32()),
            "frame_emb": _list_col(col("frame_emb").astype(np.float16), pa.float16()),
            "frame_mask": _list_col(col("frame_mask").astype(bool), pa.bool_()),
            "audio_emb": _list_col(col("audio_emb").astype(np.float16), pa.float16()),
            "audio_mask": _list_col(col("audio_mask").astype(bool), pa.bool_()),
            "title": pa.array(col("title").astype(str).tolist(), pa.string()),
            "asr": pa.array(col("asr").astype(str).tolist(), pa.string()),
            "ocr": pa.array(col("ocr").astype(str).tolist(), pa.string()),
            "text": pa.array(col("text").astype(str).tolist(), pa.string()),
            "input_ids": _list_col(col("input_ids").astype(np.int32), pa.int32()),
            "attention_mask": _list_col(col("attention_mask").astype(np.int32), pa.int32()),
            "text_emb": _list_col(col("text_emb").astype(np.float16), pa.float16()),
            "label": pa.array(_opt(col("label")), pa.string()),
            "label_l1": pa.array(_opt(col("label_l1")), pa.string()),
            "labels": pa.array([json.loads(s) if s else [] for s in col("labels")], pa.list_(pa.string())),
            **{c: pa.array(col(c).astype(str).tolist(), pa.string()) for c in timed_columns(info)},
        },
        schema=feature_schema(info),
    )
    return table, errors
