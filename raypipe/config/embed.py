"""Config of the embedding stage (owned by raypipe.embed / raypipe.io).

Split in the order the data flows: where videos come from (``source``), how they are decoded (``decode``), the
three encoders (``frames``, ``audio``, ``text``) and how the job is laid out on Ray (pool sizes, shards).
Fields that change the features go into the config hash recorded in every shard (:func:`feature_hash_fields`);
fields that only change speed or placement do not, so a rerun with more actors still resumes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from raypipe.config.base import StrictModel
from raypipe.config.paths import NameOrPath, PathStr


class WebDatasetOptions(StrictModel):
    """``kind=webdataset``: how the samples of tar shards become videos (see :mod:`raypipe.io.webdataset`).

    ``ids``: ``key`` = the sample key is the video id, except that a key already used by an earlier shard (shards
    in sorted order) becomes ``<shard>/<key>``; ``shard_key`` = always ``<shard>/<key>``. Text and label fields
    are the first non-empty of their JSON member keys (dotted paths into nested objects; ``txt`` = the .txt
    member, video2dataset's caption).
    """

    ids: Literal["key", "shard_key"] = "key"
    title_keys: list[str] = Field(default_factory=lambda: ["title", "txt", "caption", "yt_meta_dict.info.title"])
    asr_keys: list[str] = Field(default_factory=lambda: ["asr"])
    ocr_keys: list[str] = Field(default_factory=lambda: ["ocr"])
    label_keys: list[str] = Field(default_factory=lambda: ["category_id", "label", "labels"])


class SourceConfig(StrictModel):
    """Where the videos are: a folder, glob, s3:// prefix, manifest file, class folders or WebDataset tar shards
    (``*.tar``, a brace pattern ``s3://b/{00000..00099}.tar`` or a folder / prefix of tars with ``kind=webdataset``).

    ``wbdc_features`` and ``yt8m`` are pre-extracted feature corpora: ``uri`` is the WBDC zip of ``{id}.npy`` (with
    ``annotations`` the JSON) or the YouTube-8M frame-level TFRecord path/glob; they are imported, not decoded.
    """

    # No default: a stage that reads videos names the flag to pass (--source) instead of reading the demo's.
    uri: PathStr | None = None
    kind: Literal[
        "auto", "folder", "glob", "s3", "manifest", "class_folders", "webdataset", "wbdc_features", "yt8m"
    ] = "auto"
    annotations: PathStr | None = None
    # Unset ``annotations``: join the ``annotations.json`` found in a folder source or its parent (logged).
    annotations_auto: bool = True
    extensions: list[str] = Field(default_factory=lambda: [".mp4", ".mkv", ".webm", ".mov", ".avi"])
    # Manifest column names (CSV / JSONL / Parquet); only ``uri`` is required in the file.
    manifest_uri_column: str = "uri"
    manifest_id_column: str = "id"
    manifest_text_column: str = "text"
    manifest_labels_column: str = "labels"
    limit: int | None = Field(default=None, ge=1)
    webdataset: WebDatasetOptions = Field(default_factory=WebDatasetOptions)


class DecodeConfig(StrictModel):
    """Which frames (and frame-aligned audio windows) of a video are decoded; see :mod:`raypipe.io.decode`.

    ``max_frames`` (1..300): 32 is the WBDC/DMAFNet setting, 300 the YouTube-8M / MFB one (every second of a
    5-minute video). Memory grows linearly with it. Per video at 300 frames:

    * decode (one decode task holds ``embed.videos_per_block`` such videos): frames ``300 x image_size^2 x 3``
      bytes uint8 (11.3 MB at 112 px, 45 MB at 224 px) + audio ``300 x window x 4`` bytes float32 (19.2 MB for
      1 s windows at 16 kHz); the resource planner raises the decode task's memory ask above
      ``embed.decode_memory_mb`` when a block needs more (:func:`raypipe.resources.decode_bytes_per_video`);
    * feature shards: ``300 x (frame_dim + audio_dim) x 2`` bytes float16, padded to max_frames for every video
      (307 KB for resnet10t's 512 + 0; 691 KB for YouTube-8M's 1024 + 128); training and eval batches hold them
      as float32 (``x 4`` bytes: 1.4 MB per YouTube-8M video).

    The models' positional embeddings are sized from the shards' ``max_frames`` (ShardInfo), so a model trained
    on 300-frame shards only reads 300-frame shards.
    """

    fps: float = Field(default=1.0, gt=0)
    max_frames: int = Field(default=32, ge=1, le=300)
    sampling: Literal["head", "uniform"] = "head"
    audio_sample_rate: int = Field(default=16000, ge=8000)
    # Audio window per sampled frame, centred on the frame time; None = 1 / fps.
    audio_window_s: float | None = Field(default=None, gt=0)
    max_duration_s: float = Field(default=4 * 3600, gt=0)
    max_file_mb: float = Field(default=4096, gt=0)
    max_decode_s: float = Field(default=300.0, gt=0)
    # Seek (instead of decoding through) when consecutive sampled frames are further apart than this.
    seek_gap_s: float = Field(default=8.0, gt=0)
    # Beyond this duration a seek takes the keyframe it lands on (no decoding forward to the exact time).
    keyframe_only_after_s: float = Field(default=1800.0, gt=0)

    @property
    def window_s(self) -> float:
        return self.audio_window_s if self.audio_window_s is not None else 1.0 / self.fps


class FrameEncoderConfig(StrictModel):
    """A timm image model applied per sampled frame, globally average-pooled."""

    model: str = "resnet10t"
    image_size: int = Field(default=112, ge=16, le=1024)
    # Local folder / file or s3:// path with a state dict (model.safetensors, *.pt, *.pth, *.bin); None = random
    # init from ``seed`` (identical in every actor).
    weights: PathStr | None = None
    seed: int = 0
    batch_size: int = Field(default=8, ge=1)


class AudioEncoderConfig(StrictModel):
    """Log-mel front end + small CNN over each frame-aligned window."""

    n_mels: int = Field(default=64, ge=8)
    n_fft: int = Field(default=400, ge=64)
    hop_length: int = Field(default=160, ge=16)
    fmin: float = Field(default=60.0, ge=0)
    fmax: float = Field(default=7800.0, gt=0)
    channels: int = Field(default=16, ge=1)
    dim: int = Field(default=128, ge=8)
    weights: PathStr | None = None
    seed: int = 1
    batch_size: int = Field(default=8, ge=1)


class TextEncoderConfig(StrictModel):
    """Sentence embedding + tokenisation. ``model``: ``minilm`` (the packaged all-MiniLM-L6-v2), ``tiny-random``
    (a 2-layer random BERT with the MiniLM tokenizer, for speed) or a local / s3:// folder in HF format."""

    model: NameOrPath = "minilm"
    max_len: int = Field(default=256, ge=8, le=512)
    seed: int = 2
    batch_size: int = Field(default=16, ge=1)


class OcrConfig(StrictModel):
    """``embed.ocr``: read on-screen text from a subset of the sampled frames (off by default).

    Frames: every ``every``-th sampled frame, at most ``max_frames``, re-decoded at ``width`` x ``height``
    (letterboxed; the encoders' 112 px frames are too small to read), and a frame that barely differs from the
    last kept one (mean absolute difference of 32x32 grey thumbnails below ``dedup_threshold``, 0..255) is
    skipped: a caption held for ten seconds is read once. Lines scored under ``min_score`` are dropped.
    ``merge``: how the text read here and a shipped ``ocr`` field combine (``annotations`` = the shipped field wins
    when it is non-empty, as the WBDC importer keeps it; ``extracted`` = this stage wins; ``both`` = shipped then
    read).
    """

    enabled: bool = False
    engine: Literal["rapidocr"] = "rapidocr"
    every: int = Field(default=4, ge=1)
    max_frames: int = Field(default=8, ge=1, le=32)
    width: int = Field(default=640, ge=64, le=1920)
    height: int = Field(default=360, ge=64, le=1080)
    dedup_threshold: float = Field(default=2.0, ge=0)
    min_score: float = Field(default=0.5, ge=0, le=1)
    merge: Literal["annotations", "extracted", "both"] = "annotations"
    batch_size: int = Field(default=4, ge=1)


class AsrConfig(StrictModel):
    """``embed.asr``: speech to text on the decoded 16 kHz audio of the sampled span (off by default).

    ``engine``: ``pocketsphinx`` (US-English model inside the wheel, CPU) or ``whisper`` (faster-whisper or
    openai-whisper weights at ``model_path``, a local folder/file or s3://; nothing is downloaded).
    ``vocabulary``: restrict pocketsphinx to these words (a JSGF word loop) instead of its general language model;
    a domain word list makes it far more accurate on narrow speech. Audio whose RMS is under ``min_rms`` is
    silence: empty text, no decoder call. ``merge``: as :class:`OcrConfig`, for the shipped ``asr`` field.
    """

    enabled: bool = False
    engine: Literal["pocketsphinx", "whisper"] = "pocketsphinx"
    model_path: PathStr | None = None
    vocabulary: list[str] = Field(default_factory=list)
    min_rms: float = Field(default=1e-3, ge=0)
    merge: Literal["annotations", "extracted", "both"] = "annotations"
    batch_size: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _engine(self) -> AsrConfig:
        if self.engine == "whisper" and not self.model_path:
            raise ValueError("engine 'whisper' needs model_path (local or s3:// weights; nothing is downloaded)")
        return self


class PoolConfig(StrictModel):
    """One encoder actor pool. ``auto`` values are planned from the cluster at start (raypipe.resources)."""

    min_size: int = Field(default=1, ge=1)
    max_size: int | Literal["auto"] = "auto"
    num_cpus: float | Literal["auto"] = "auto"
    # GPUs per actor; "auto" = a share of one GPU (1 / GPU pools) when the cluster has or can add GPUs, else 0.
    num_gpus: float | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _sizes(self) -> PoolConfig:
        for name in ("num_cpus", "num_gpus"):
            v = getattr(self, name)
            if v != "auto" and v < 0:
                raise ValueError(f"{name} must be >= 0 or auto (got {v})")
        if self.max_size != "auto" and self.max_size < 1:
            raise ValueError(f"max_size must be >= 1 or auto (got {self.max_size})")
        if self.max_size != "auto" and self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        return self


class EmbedConfig(StrictModel):
    source: SourceConfig = Field(default_factory=SourceConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    frames: FrameEncoderConfig = Field(default_factory=FrameEncoderConfig)
    audio: AudioEncoderConfig = Field(default_factory=AudioEncoderConfig)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    frame_pool: PoolConfig = Field(default_factory=PoolConfig)
    audio_pool: PoolConfig = Field(default_factory=PoolConfig)
    text_pool: PoolConfig = Field(default_factory=PoolConfig)
    # Text from the video itself (raypipe.embed.ocr / raypipe.embed.asr): Ray Data stages between decode and the
    # encoders, each with its own CPU actor pool; their text is merged into ``text`` before tokenisation.
    ocr: OcrConfig = Field(default_factory=OcrConfig)
    asr: AsrConfig = Field(default_factory=AsrConfig)
    ocr_pool: PoolConfig = Field(default_factory=PoolConfig)
    asr_pool: PoolConfig = Field(default_factory=PoolConfig)
    # One actor pool (sized and resourced by frame_pool) runs the frame, audio and text encoders in turn on each
    # batch (the smallest of the three batch sizes): one process and one GPU per actor instead of three pools,
    # for small machines or a GPU that holds all three encoders. The rows are identical either way.
    # "auto": fused on a small CPU-only cluster (fewer than 6 CPUs), three pools otherwise (raypipe.resources).
    fuse_encoders: bool | Literal["auto"] = "auto"
    # torch intra-op threads in each fused encoder actor; "auto": what Ray gives the actor (its num_cpus, at least
    # 1). Not part of the feature hash. 2 threads for a 0.5-CPU actor on 2 CPUs measured no reliable gain
    # (docs/PERFORMANCE.md), so auto stays Ray's default.
    encoder_threads: int | Literal["auto"] = "auto"
    # Decode, encode and write in one actor pool (raypipe.embed.pipeline.InlineEmbedder, sized by frame_pool)
    # instead of decode tasks feeding encoder actors: no decoded video crosses the object store. Embed only (the
    # label job keeps its stages), no OCR / ASR stages. "auto": on a small CPU-only cluster (raypipe.resources),
    # where it measured x1.18-1.39 the staged pipeline on 2 CPUs (docs/PERFORMANCE.md).
    inline_decode: bool | Literal["auto"] = "auto"
    # Batches one InlineEmbedder actor works on at once, each in its own thread with one torch thread. "auto":
    # the actor's whole CPUs (at least 1), so an actor given 2 CPUs (frame_pool.num_cpus=2) decodes two batches
    # at once instead of one on a single thread (PyAV and torch release the GIL). The default stays one 1-CPU
    # actor per CPU: on 2 CPUs that measured ~7 % faster than one 2-CPU actor of 2 calls, which holds one copy
    # of the models instead of two (peak RSS -20 %; docs/PERFORMANCE.md).
    inline_calls: int | Literal["auto"] = "auto"
    output: PathStr | None = None  # required by embed (--output)
    num_shards: int = Field(default=4, ge=1)
    # CPUs per decode task; "auto": 0.5 on a small cluster, else 1.
    decode_num_cpus: float | Literal["auto"] = "auto"
    # Memory reserved per decode task (decoded video is ~10x the file): bounds how many decode at once per node.
    # Also keeps Ray from fusing decode into the frame actor (different remote args), so decode stays a task pool.
    decode_memory_mb: int = Field(default=256, ge=1)
    # Videos per Ray block out of the list stage (one decode task each); small keeps decoded memory bounded.
    videos_per_block: int = Field(default=2, ge=1)
    # Rows per part file (the unit of resume).
    write_batch_size: int = Field(default=8, ge=1)
    # Rerun previously failed videos instead of keeping their error rows.
    retry_failed: bool = False
    # Replace an output folder made with a different feature config instead of refusing to mix them.
    overwrite: bool = False
    progress_bars: bool = True

    @model_validator(mode="after")
    def _inline(self) -> EmbedConfig:
        if self.inline_decode is True and (self.ocr.enabled or self.asr.enabled or self.fuse_encoders is False):
            raise ValueError("inline_decode runs the fused encoders without OCR / ASR stages: "
                             "turn off ocr.enabled / asr.enabled and leave fuse_encoders auto or true")
        if self.inline_calls != "auto" and self.inline_calls < 1:
            raise ValueError(f"inline_calls must be 'auto' or at least 1, got {self.inline_calls}")
        return self


def feature_hash_fields(cfg: EmbedConfig, compute: dict | None = None) -> dict:
    """The part of the config that changes feature values (hashed into ShardInfo.config_hash).

    ``compute`` is the planned device class and precision ({"device": "gpu", "precision": "fp16"}): encoders
    autocast to fp16 on a GPU and stay fp32 on CPU, so the two must never share one output folder.
    """
    return {
        **({"compute": compute} if compute else {}),
        "decode": cfg.decode.model_dump(exclude={"max_decode_s"}),
        "frames": cfg.frames.model_dump(exclude={"batch_size"}),
        "audio": cfg.audio.model_dump(exclude={"batch_size"}),
        "text": cfg.text.model_dump(exclude={"batch_size"}),
        # Only when on: configs without OCR/ASR keep the fingerprint they had before these stages existed.
        **({"ocr": cfg.ocr.model_dump(exclude={"batch_size"})} if cfg.ocr.enabled else {}),
        **({"asr": cfg.asr.model_dump(exclude={"batch_size"})} if cfg.asr.enabled else {}),
    }


def compute_fields(e: EmbedConfig) -> dict[str, str] | None:
    """Planned device class and precision per encoder (GPU actors autocast to fp16, CPU ones stay fp32); None
    while the pools are still ``auto`` (not planned)."""
    pools = {"frames": e.frame_pool, "audio": e.frame_pool if e.fuse_encoders is True else e.audio_pool,
             "text": e.frame_pool if e.fuse_encoders is True else e.text_pool}
    if any(p.num_gpus == "auto" for p in pools.values()):
        return None
    return {k: "gpu-fp16" if float(p.num_gpus) > 0 else "cpu-fp32" for k, p in pools.items()}


def config_hash(e: EmbedConfig) -> str:
    """Short fingerprint of :func:`feature_hash_fields` (with the planned compute): two runs may share an output
    folder only when theirs are equal (:meth:`raypipe.io.shards.ShardStore.check_config`)."""
    blob = json.dumps(feature_hash_fields(e, compute_fields(e)), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]
