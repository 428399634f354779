"""Config of training and evaluation (owned by raypipe.train / raypipe.evaluate)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raypipe.config.base import StrictModel
from raypipe.config.corruption import CorruptionConfig
from raypipe.config.paths import ModelUri, PathStr

# Metric names (without the ``val/`` prefix) that :func:`raypipe.metrics.compute_metrics` produces per task,
# plus the losses the trainer reports itself. ``f_sco`` additionally needs WBDC 4-digit codes as classes; that
# is checked against the data before training starts (:func:`raypipe.train.check_metric_for_classes`).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "single_label": ("f_sco", "hit@1", "hit@2", "top1", "top5", "f1_micro", "f1_macro", "loss"),
    "multi_label": ("gap@20", "map", "loss"),
}


class LossConfig(StrictModel):
    """Weights of the combined objective; paper default L = cls + con + 0.25 mlm + 0.25 vtm.

    A weight of 0 also switches the matching auxiliary branch off when the model is built (its builder gets
    ``contrastive=False`` etc. where it has such a switch), so no compute is spent on an unused head.
    """

    classification: float = Field(default=1.0, ge=0)
    contrastive: float = Field(default=1.0, ge=0)
    mlm: float = Field(default=0.25, ge=0)
    vtm: float = Field(default=0.25, ge=0)


class OptimConfig(StrictModel):
    """AdamW with its own learning rate for the text encoder (fine-tuned BERT wants ~5e-5, fresh heads ~1e-3);
    linear warm-up over ``warmup_steps`` optimizer steps, then cosine decay to 0 at the last step."""

    lr: float = Field(default=3e-4, gt=0)
    text_lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    grad_accum: int = Field(default=1, ge=1)


class TrainConfig(StrictModel):
    # Feature shards (a folder of Parquet files or one file, local or s3://) written by ``raypipe embed``.
    data: PathStr | None = None  # required by train and tune (--data)
    # Class vocabulary: a taxonomy JSON ({"level2": {code: name}} as the corpus writes it, or a list of codes),
    # or a text file with one code per line (tab-separated names allowed). None: the sorted labels of the data.
    taxonomy: PathStr | None = None
    task: Literal["single_label", "multi_label"] = "single_label"
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=16, ge=1)  # per worker
    # "auto": planned from the cluster at start (raypipe.resources): one worker per GPU when it has GPUs, else
    # 2 (8 at most on big CPU nodes), with the CPUs left after data reading split over the workers.
    num_workers: int | Literal["auto"] = "auto"
    cpus_per_worker: float | Literal["auto"] = "auto"
    use_gpu: bool | Literal["auto"] = "auto"
    # GPUs per worker when use_gpu; below 1 packs several workers (or Tune trials) of a small model on one GPU.
    gpus_per_worker: float = Field(default=1.0, gt=0, le=1)
    amp: Literal["none", "bf16", "fp16"] = "none"
    # DDP's search for parameters without a gradient costs a graph traversal per step. The model registry builds an
    # auxiliary branch only when its loss weight is > 0, so every parameter gets a gradient (tests/unit/test_models);
    # turn this on only for a custom model with conditionally used parameters.
    find_unused_parameters: bool = False
    seed: int = 0
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    # Held-out test split (by the same video_id hash, or the shards' ``split`` column): never read while training;
    # the best epoch (chosen on val) is scored on it once at the end -> ``test/*`` in MLflow and on the registered
    # version. 0 = no test split (the run then claims no test metrics).
    test_fraction: float = Field(default=0.2, ge=0, lt=1)
    # Stop when train.metric has not improved for this many epochs (on val; None = run every epoch).
    early_stopping_patience: int | None = Field(default=None, ge=1)
    # Rows held in the per-worker shuffle buffer (seeded per epoch); 0 streams in shard order.
    shuffle_buffer: int = Field(default=256, ge=0)
    # Read and prepare the feature shards once (on the driver) into Ray's object store instead of streaming them
    # again every epoch. Worth it when the features fit in the driver's memory and epochs are short (small sets,
    # sweeps): the streamed read is then most of an epoch's time.
    cache_data: bool = False
    metric: str = "val/f_sco"
    mode: Literal["max", "min"] = "max"
    keep_best: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=0)
    run_name: str = "raypipe-train"
    # Ray Train run folders (checkpoints, results); a neutral folder in the working directory by default.
    storage_path: PathStr = "raypipe_runs/ray_results"
    # Register the best checkpoint in MLflow (tracking.registered_model_name @ tracking.alias, the challenger).
    register_model: bool = True
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)

    @model_validator(mode="after")
    def _metric(self) -> TrainConfig:
        if self.num_workers != "auto" and self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 or auto (got {self.num_workers})")
        if self.cpus_per_worker != "auto" and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0 or auto (got {self.cpus_per_worker})")
        prefix, _, name = self.metric.partition("/")
        allowed = TASK_METRICS[self.task]
        if prefix not in ("val", "train") or name not in allowed or (prefix == "train" and name != "loss"):
            choices = ", ".join([f"val/{m}" for m in allowed] + ["train/loss"])
            raise ValueError(f"metric {self.metric!r} is not produced for task={self.task!r}; choose one of {choices}")
        if name == "loss" and self.mode != "min":
            raise ValueError(f"metric {self.metric!r} is a loss: set train.mode=min")
        if name != "loss" and self.mode != "max":
            raise ValueError(f"metric {self.metric!r} is a score (higher is better): set train.mode=max")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves under 10% of the "
                "rows for training; lower one of them"
            )
        if self.loss.classification == 0:
            raise ValueError("loss.classification=0 trains no classifier head; keep it > 0")
        return self


class EvalConfig(StrictModel):
    """``raypipe eval``: score a trained model on feature shards, optionally under a corruption."""

    # models:/<name>@<alias>, models:/<name>/<version>, or a checkpoint folder (local or s3://).
    model_uri: ModelUri = "models:/raypipe-classifier@champion"
    data: PathStr | None = None  # None: train.data
    # The hash split the model was trained with (its val_fraction / test_fraction). "auto": the test split when
    # the model was trained with one (epochs were chosen on val, so val scores are optimistic), else val.
    split: Literal["auto", "all", "train", "val", "test"] = "auto"
    batch_size: int = Field(default=64, ge=1)
    # "auto": a GPU when one is visible (raypipe eval runs in the driver, outside Ray's GPU assignment), else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    corruption: CorruptionConfig = Field(default_factory=CorruptionConfig)
    # JSON report with the metrics (optional); the metrics are also logged and returned.
    output: PathStr | None = None
    # Log an MLflow run (metrics + report) into tracking.experiment when tracking.enabled.
    log_mlflow: bool = True
