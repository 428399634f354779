"""Typed config sections, one class per stage.

Each stage owns its class here; fields carry defaults that run the embedded demo on one laptop. Cross-field
rules that only concern one section live in that section's validator; rules that span sections live in
:class:`raypipe.config.RaypipeConfig`.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from raypipe.config.base import StrictModel
from raypipe.config.paths import PathStr, TrackingUri


class RayConfig(StrictModel):
    """Where Ray runs. ``address=None`` starts (or joins, inside ``ray job submit``) a local instance."""

    address: str | None = None
    # Logical CPUs of a local instance that raypipe starts itself; ignored (with a note) when joining a cluster,
    # where Ray refuses it.
    num_cpus: int | None = Field(default=None, ge=1)
    # GPUs of such a local instance (a number > 0 on a machine without GPUs fakes them: planning tests).
    num_gpus: int | None = Field(default=None, ge=0)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    # An autoscaling cluster's launcher config: stages plan from what its node types can provide (a cold cluster
    # shows 0 GPUs in ray.cluster_resources()). None: plan from the nodes alive at start.
    cluster_yaml: PathStr | None = None
    # Custom resource of the CPU worker group (cluster.yaml): decode tasks ask for it when some node defines it,
    # which keeps them off the head and the GPU nodes.
    decode_resource: str = "raypipe_cpu_worker"
    # A running stage that makes no progress (no video through the pipeline) for this long ends with a
    # diagnostic of what waits for what (exit code 4); committed work stays, a rerun resumes. 0: no watchdog.
    stall_timeout_s: float = Field(default=900.0, ge=0)


class StorageConfig(StrictModel):
    """How to reach s3:// URIs. ``None`` fields fall back to the usual AWS variables (AWS_ENDPOINT_URL, ...).

    Kept in the config (not only the environment) so that Ray workers on other nodes get the same settings.
    """

    endpoint_url: str | None = None
    region: str | None = None
    anon: bool = False


class CorpusConfig(StrictModel):
    """The synthetic demo/test corpus (see :mod:`raypipe.corpus`)."""

    out: PathStr | None = None  # required by corpus (--out)
    videos: int = Field(default=60, ge=1)
    seed: int = 0
    bad_inputs: bool = False
    min_duration_s: float = Field(default=2.0, gt=0.2)
    max_duration_s: float = Field(default=40.0, gt=0.2)
    long_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    noise_rate: float = Field(default=0.15, ge=0.0, le=1.0)
    num_level1: int = Field(default=4, ge=2, le=23)
    num_level2_per_level1: int = Field(default=3, ge=2, le=10)
    # Video ids are f"{id_prefix}{i:05d}"; a second corpus with another prefix can be generated into the same
    # folder (annotations.json and corpus.json are merged), e.g. the "new videos" of an incremental labelling run.
    id_prefix: str = Field(default="vid", min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")
    # Upper bound for the videos that are not "long" (long ones are > 32 s); None = min(max_duration_s, 32).
    # Lets tests keep every clip short but one.
    short_max_duration_s: float | None = Field(default=None, gt=0.2)
    # Processes that encode videos in parallel (output is identical for any value).
    workers: int = Field(default=1, ge=1, le=64)
    # "webdataset": also write the batch as video2dataset-style tar shards under <out>/shards
    # (see raypipe.corpus_webdataset); the loose files stay.
    format: Literal["files", "webdataset"] = "files"
    samples_per_shard: int = Field(default=16, ge=1)
    # Evidence layout (raypipe.corpus.LAYOUTS): which modality carries which part of the label, per-modality noise,
    # missing audio. "split" is the original scheme (frames: level 1; audio and text: the level-2 index).
    layout: Literal["split", "text_rich", "weak_text", "no_audio"] = "split"
    # Frame sizes drawn per video: "small" 160x120 to 640x360 (fast to generate, the tests' corpora), "hd" 480p to
    # 1080p (raypipe.corpus.HD_RESOLUTIONS), where decoding costs what it costs on real uploads.
    resolutions: Literal["small", "hd"] = "small"
    # Containers and codecs: "classic" h264/aac in mp4 and mkv, vp8/opus in webm (the tests' corpora); "wide" draws
    # each video from raypipe.corpus.WIDE_CODECS (hevc 8/10-bit, vp9, mpeg4, prores, mp3/flac/pcm audio; mov too).
    codecs: Literal["classic", "wide"] = "classic"

    @model_validator(mode="after")
    def _durations(self) -> CorpusConfig:
        if self.min_duration_s > self.max_duration_s:
            raise ValueError(
                f"min_duration_s ({self.min_duration_s}) must not exceed max_duration_s ({self.max_duration_s})"
            )
        if self.short_max_duration_s is not None and not (
            self.min_duration_s <= self.short_max_duration_s <= self.max_duration_s
        ):
            raise ValueError(
                f"short_max_duration_s ({self.short_max_duration_s}) must lie between min_duration_s "
                f"({self.min_duration_s}) and max_duration_s ({self.max_duration_s})"
            )
        return self


class TrackingConfig(StrictModel):
    """MLflow: a SQLite file by default, any tracking URI (a server) in production."""

    # A SQLite file in a neutral folder of the working directory (the demo preset uses demo_out/mlflow.db), or
    # MLFLOW_TRACKING_URI when set: a job submitted with `--runtime-env-json '{"env_vars": {...}}'` reaches the
    # shared server without a --set (a preset's or --set value still wins).
    tracking_uri: TrackingUri = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///raypipe_runs/mlflow.db")
    artifact_location: PathStr | None = None
    experiment: str = "raypipe"
    registered_model_name: str = "raypipe-classifier"
    # Training and sweeps point this alias at every version they register; they never touch champion_alias,
    # which only `raypipe promote` moves (or the first version ever registered, which becomes the champion).
    alias: str = "challenger"
    champion_alias: str = "champion"  # what the nightly label job labels with
    enabled: bool = True
    # Set by a sweep: every trial logs a nested child run under this parent run.
    parent_run_id: str | None = None

    @model_validator(mode="after")
    def _aliases(self) -> TrackingConfig:
        if self.alias == self.champion_alias:
            raise ValueError(
                f"tracking.alias ({self.alias!r}) must differ from tracking.champion_alias: training registers "
                "challengers, only `raypipe promote` moves the champion"
            )
        return self


class DemoConfig(StrictModel):
    """``raypipe demo``: a second, unseen corpus to label with the model trained on ``corpus``."""

    label_corpus_out: PathStr | None = None  # the demo preset sets these two
    label_videos: int = Field(default=30, ge=1)
    label_seed: int = 1
    label_id_prefix: str = Field(default="new", pattern=r"^[A-Za-z0-9_-]+$")
    report: PathStr | None = None
