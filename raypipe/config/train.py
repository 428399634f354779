"""Config of training (owned by raypipe.train) and evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raypipe.config.base import StrictModel


class LossConfig(StrictModel):
    """Weights of the combined objective; paper default L = cls + con + 0.25 mlm + 0.25 vtm."""

    classification: float = Field(default=1.0, ge=0)
    contrastive: float = Field(default=1.0, ge=0)
    mlm: float = Field(default=0.25, ge=0)
    vtm: float = Field(default=0.25, ge=0)


class OptimConfig(StrictModel):
    lr: float = Field(default=1e-3, gt=0)
    text_lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    grad_accum: int = Field(default=1, ge=1)


class TrainConfig(StrictModel):
    data: str = "demo_out/features"
    task: Literal["single_label", "multi_label"] = "single_label"
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=16, ge=1)
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    amp: Literal["none", "bf16", "fp16"] = "none"
    seed: int = 0
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    metric: str = "val/f_sco"
    mode: Literal["max", "min"] = "max"
    keep_best: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=0)
    run_name: str = "raypipe-train"
    storage_path: str = "demo_out/ray_results"
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
