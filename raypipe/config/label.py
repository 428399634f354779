"""Config of the nightly labelling job (owned by raypipe.label)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raypipe.config.base import StrictModel
from raypipe.config.paths import ModelUri, PathStr


class LabelConfig(StrictModel):
    """What to label with, where predictions go, and when the job counts as failed.

    The videos come from ``embed.source`` and are decoded/embedded with ``embed.*`` exactly as the training
    shards were, so a model only ever sees features from the embedders it was trained on.
    """

    # models:/<name>@<alias>, models:/<name>/<version>, or a checkpoint path (local or s3://).
    model_uri: ModelUri = "models:/raypipe-classifier@champion"
    output: PathStr | None = None  # required by label (--output)
    # "classify": the model's own head. "zero_shot": open vocabulary by similarity to embedded class names
    # (CAV-Net style; the model must provide zero_shot_logits).
    mode: Literal["classify", "zero_shot"] = "classify"
    # "code<TAB>name" lines (the corpus's class_names.txt); required for zero_shot, optional names otherwise.
    class_names: PathStr | None = None
    top_k: int = Field(default=5, ge=1)
    batch_size: int = Field(default=16, ge=1)
    # Classifier actor pool; each actor holds one model copy (and a GPU share when use_gpu). "auto": planned from
    # the cluster (raypipe.resources): GPUs when it has them, one actor per GPU.
    min_actors: int = Field(default=1, ge=1)
    max_actors: int | Literal["auto"] = "auto"
    use_gpu: bool | Literal["auto"] = "auto"
    # Prediction shards per model version (rows hashed by video_id, as for feature shards).
    num_shards: int = Field(default=4, ge=1)
    # Rows per part file written while the stream runs (the unit of resume: a crash loses at most this many).
    write_batch_size: int = Field(default=64, ge=1)
    # Videos that failed under the same model version are retried only when asked (corrupt files stay corrupt).
    retry_failed: bool = False
    # Drop earlier predictions of this model version and label everything again.
    force: bool = False
    max_failure_rate: float = Field(default=0.2, ge=0, le=1)
    # Exit code when the failure rate is above max_failure_rate (0 and 2 are taken: success, config error).
    failure_exit_code: int = Field(default=3, ge=1, le=125)
    # Log the run (counts, report, plot) to MLflow when tracking.enabled.
    log_mlflow: bool = True

    @model_validator(mode="after")
    def _rules(self) -> LabelConfig:
        if self.mode == "zero_shot" and not self.class_names:
            raise ValueError("label.mode='zero_shot' needs label.class_names (a 'code<TAB>name' file)")
        if self.max_actors != "auto" and self.max_actors < 1:
            raise ValueError(f"label.max_actors must be >= 1 or auto (got {self.max_actors})")
        if self.max_actors != "auto" and self.min_actors > self.max_actors:
            raise ValueError(f"label.min_actors ({self.min_actors}) must not exceed label.max_actors ({self.max_actors})")
        if self.failure_exit_code == 2:
            raise ValueError("label.failure_exit_code=2 is reserved for config errors; pick another (default 3)")
        return self
