"""Config of the embedding stage (owned by raypipe.embed / raypipe.io)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raypipe.config.base import StrictModel


class SourceConfig(StrictModel):
    """Where the videos are: a folder, glob, s3:// prefix, manifest file or class folders."""

    uri: str = "demo_out/corpus/videos"
    kind: Literal["auto", "folder", "glob", "s3", "manifest", "class_folders"] = "auto"
    annotations: str | None = "demo_out/corpus/annotations.json"
    extensions: list[str] = Field(default_factory=lambda: [".mp4", ".mkv", ".webm", ".mov", ".avi"])


class DecodeConfig(StrictModel):
    fps: float = Field(default=1.0, gt=0)
    max_frames: int = Field(default=32, ge=1, le=32)
    sampling: Literal["head", "uniform"] = "head"
    audio_sample_rate: int = Field(default=16000, ge=8000)
    max_duration_s: float = Field(default=4 * 3600, gt=0)
    max_file_mb: float = Field(default=4096, gt=0)


class EmbedConfig(StrictModel):
    source: SourceConfig = Field(default_factory=SourceConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    output: str = "demo_out/features"
    num_shards: int = Field(default=4, ge=1)
