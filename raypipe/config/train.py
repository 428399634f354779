"""Config of training and evaluation (owned by raypipe.train / raypipe.evaluate)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from raypipe.config.base import StrictModel
from raypipe.config.corruption import CorruptionConfig
from raypipe.config.paths import ModelUri, PathStr

# Metric names (without the ``val/`` prefix) that :func:`raypipe.metrics.compute_metrics` produces per task,
# plus the losses the trainer reports itself. ``f_sco`` additionally needs WBDC 4-digit codes as classes; that
# is checked against the data before training starts (:func:`raypipe.train.check_metric_for_classes`).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "single_label": ("f_sco", "hit@1", "hit@2", "top1", "top5", "f1_micro", "f1_macro", "gap@20", "map", "loss"),
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
    # Not in the papers: the classification loss of one head per input stream (DMAFNet: the frame stream's
    # [VCLS], the text's [CLS]), averaged over streams. Deep supervision against one stream carrying the fused
    # head while another stops learning (docs/GENERALIZATION.md measures it); 0 builds no such heads.
    unimodal: float = Field(default=0.0, ge=0)


# Which options each LR schedule reads; setting one of another schedule is rejected (a typo'd experiment row
# fails up front instead of silently training with the default curve).
SCHEDULE_PARAMS: dict[str, tuple[str, ...]] = {
    "cosine": (),
    "step": ("step_epochs", "gamma", "max_decays"),
    "constant": (),
}


# ``train.epochs`` / ``batch_size`` / ``early_stopping_patience: auto`` (the defaults): a run sized from its training
# split once the workers are planned (:func:`auto_schedule`). A corpus of a few dozen rows gets small batches and
# more epochs, so it takes as many optimizer steps as the generalisation benchmark trains with (batch 2, ~16
# steps per epoch); a large corpus keeps batch 16 and 5 epochs. docs/GENERALIZATION.md measures the choice.
AUTO_STEPS_PER_EPOCH = 16  # the batch shrinks (to 2 at least) until each worker takes this many steps per epoch
AUTO_MAX_BATCH = 16  # ... and is never larger than this (the fixed default before auto)
AUTO_TARGET_STEPS = 480  # the epochs grow until the run has this many optimizer steps ...
AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS = 5, 30  # ... within these bounds
AUTO_PATIENCE = 6  # early stopping (on val) that comes with an auto epoch budget
SCHEDULE_KEYS = ("batch_size", "epochs", "early_stopping_patience")  # the train keys auto_schedule sizes


def optimizer_steps(rows: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps per epoch of one worker that reads ``rows`` training rows."""
    return max(1, math.ceil(math.ceil(rows / batch_size) / grad_accum))


class OptimConfig(StrictModel):
    """AdamW with its own learning rate for the text encoder (fine-tuned BERT wants ~5e-5, fresh heads ~1e-3).

    ``lr: auto`` (default) is the model's own rate from the registry (``raypipe.models.default_lr``: DMAFNet 1e-4;
    the single-modality baselines, MFB and BiLSTM 3e-3; the others 3e-4; each measured in docs/GENERALIZATION.md); it is resolved
    when training starts, so MLflow and the checkpoint record the number. A number here wins for every model.

    Every schedule starts with a linear warm-up over ``warmup_steps`` optimizer steps, then (step = optimizer
    step, ``steps_per_epoch`` = train rows per worker / batch_size / grad_accum, rounded up):

    * ``cosine`` (default): cosine decay to 0 at the last step (``epochs x steps_per_epoch``);
    * ``step``: the LR is multiplied by ``gamma`` every ``step_epochs`` epochs (at the optimizer step
      ``k x step_epochs x steps_per_epoch``), at most ``max_decays`` times (None = no limit). BiLSTM's paper
      (Sec. 3.1): lr 7e-4, 30 epochs, decay by 0.2 at epochs 5, 10, 15 and 20 -> ``step_epochs=5, gamma=0.2,
      max_decays=4`` (preset ``bilstm``);
    * ``constant``: the LR after warm-up stays ``lr`` / ``text_lr``.
    """

    lr: float | Literal["auto"] = "auto"
    text_lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    grad_accum: int = Field(default=1, ge=1)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_epochs: int = Field(default=5, ge=1)
    gamma: float = Field(default=0.1, gt=0, le=1)
    max_decays: int | None = Field(default=None, ge=1)

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_number_or_auto(cls, value: object) -> object:
        """One message for both members of the union (pydantic would report one per member)."""
        if value == "auto":
            return value
        try:
            lr = float(value) if not isinstance(value, bool) else math.nan  # type: ignore[arg-type]
        except (TypeError, ValueError):
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError("must be a number > 0 or 'auto' (the model's own default)")
        return lr

    @model_validator(mode="after")
    def _only_options_of_the_schedule(self) -> OptimConfig:
        used = set(SCHEDULE_PARAMS[self.schedule])
        own = {n for params in SCHEDULE_PARAMS.values() for n in params}
        # Options left at their default are not stray: a full ``model_dump()`` must validate again.
        stray = sorted(
            n for n in (self.model_fields_set & own) - used if getattr(self, n) != type(self).model_fields[n].default
        )
        if stray:
            raise ValueError(
                f"option(s) {stray} are not used by schedule={self.schedule!r}; it reads "
                f"{list(SCHEDULE_PARAMS[self.schedule]) or 'none'}"
            )
        return self


class TrainConfig(StrictModel):
    # Feature shards (a folder of Parquet files or one file, local or s3://) written by ``raypipe embed``.
    data: PathStr | None = None  # required by train and tune (--data)
    # Class vocabulary: a taxonomy JSON ({"level2": {code: name}} as the corpus writes it, or a list of codes),
    # or a text file with one code per line (tab-separated names allowed). None: the sorted labels of the data.
    taxonomy: PathStr | None = None
    task: Literal["single_label", "multi_label"] = "single_label"
    # "auto": sized from the training rows per worker at start (:func:`auto_schedule`; the resolved numbers are what
    # MLflow, the checkpoint and the log show). A number is taken as it is.
    epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"  # per worker
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
    # Stop when train.metric has not improved for this many epochs (on val; None = run every epoch). "auto":
    # AUTO_PATIENCE when train.epochs is auto (a budget chosen for you comes with early stopping), else None.
    early_stopping_patience: int | None | Literal["auto"] = "auto"
    # Rows held in the per-worker shuffle buffer (seeded per epoch); 0 streams in shard order.
    shuffle_buffer: int = Field(default=256, ge=0)
    # Read and prepare the feature shards once (on the driver) into Ray's object store instead of streaming them
    # again every epoch. Worth it when the features fit in the driver's memory and epochs are short (small sets,
    # sweeps): the streamed read is then most of an epoch's time.
    cache_data: bool = False
    # What picks the best epoch and stops early. Left at its default, a run on classes that are not 4-digit WBDC codes
    # (class folders, manifest labels) uses val/f1_macro instead (raypipe.train.resolve_metric); set, it is used as is.
    metric: str = "val/f_sco"
    mode: Literal["max", "min"] = "max"
    keep_best: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=0)
    run_name: str = "raypipe-train"
    # Ray Train run folders (checkpoints, results); a neutral folder in the working directory by default.
    storage_path: PathStr = "raypipe_runs/ray_results"
    # Register the best checkpoint in MLflow (tracking.registered_model_name @ tracking.alias, the challenger).
    # A pretraining run (train.pretrain) registers only when this is set explicitly.
    register_model: bool = True
    # Zero-shot protocol (CAV-Net): rows of these classes are left out of train and val (they stay in the test
    # split and in the model's class list), so ``eval.zero_shot`` can score them against their class names. Each
    # must be a class of the taxonomy / data (checked before Ray starts); at least 2 classes must remain.
    holdout_classes: list[str] = Field(default_factory=list)
    # Self-supervised pretraining (DMAFNet's "+pretrain" row of Table 2): the objective is train.loss's contrastive
    # + mlm + vtm terms (train.loss.classification is ignored: no labels are scored; the classifier head is frozen),
    # unlabelled rows are kept, train.metric must be val/loss (that objective on the val rows, mode min), the
    # test split is left unread and no test metrics are claimed. The model needs one of those heads: DMAFNet
    # pretrains with all three, CAV-Net with its language-guided contrastive term alone (video vs the sentence
    # embedding of its own title/text: titles as weak labels). Finetune from its checkpoint with train.init_from.
    pretrain: bool = False
    # Start from the weights of a checkpoint: a checkpoint folder (local or s3://) or models:/<name>@<alias> /
    # models:/<name>/<version>. Every tensor whose name and shape match is loaded; the classifier head
    # (head.* / classifier.*) is always fresh. It must be a checkpoint of the same model.name. Ignored when the
    # run resumes from its own checkpoint (that one wins).
    init_from: ModelUri | None = None
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)

    @field_validator("epochs", "batch_size", "early_stopping_patience", mode="before")
    @classmethod
    def _count_or_auto(cls, value: object, info: ValidationInfo) -> object:
        """One message for every member of the union (pydantic would report one per member)."""
        if value == "auto" or (value is None and info.field_name == "early_stopping_patience"):
            return value
        count = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str) and value.strip().isdigit():
            count = int(value)
        if count is not None and count >= 1:
            return count
        none = ", null" if info.field_name == "early_stopping_patience" else ""
        raise ValueError(f"must be a whole number >= 1{none} or 'auto'")

    @model_validator(mode="after")
    def _pretrain(self) -> TrainConfig:
        if not self.pretrain:
            if self.loss.classification == 0:
                raise ValueError("loss.classification=0 trains no classifier head; keep it > 0 (or set pretrain=true)")
            return self
        if (self.metric, self.mode) != ("val/loss", "min"):
            raise ValueError(
                f"pretrain=true scores no labels: set metric=val/loss and mode=min (got {self.metric}, {self.mode})"
            )
        if not any(w > 0 for w in (self.loss.contrastive, self.loss.mlm, self.loss.vtm)):
            raise ValueError("pretrain=true needs a loss.contrastive / loss.mlm / loss.vtm weight > 0")
        if self.loss.unimodal > 0:
            raise ValueError("pretrain=true scores no labels: set loss.unimodal=0 (its stream heads are classifiers)")
        return self

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
        dup = sorted({c for c in self.holdout_classes if self.holdout_classes.count(c) > 1})
        if dup:
            raise ValueError(f"holdout_classes lists {dup} more than once")
        return self


def auto_schedule(t: TrainConfig, num_train: int | None, workers: int) -> dict[str, int | None]:
    """``{"batch_size", "epochs", "early_stopping_patience"}`` with every ``auto`` of ``t`` resolved for
    ``num_train`` training rows read by ``workers`` workers (``num_train`` may be None when only the patience is
    auto). Why these numbers: the constants above; a run that sets all three gets them back unchanged."""
    if num_train is None and "auto" in (t.epochs, t.batch_size):
        raise ValueError("auto epochs / batch_size need the number of training rows")
    rows = max(1, (num_train or 0) // max(1, workers))  # the equal streaming split truncates the remainder
    batch = t.batch_size if t.batch_size != "auto" else min(AUTO_MAX_BATCH, max(2, rows // AUTO_STEPS_PER_EPOCH))
    steps = optimizer_steps(rows, batch, t.optim.grad_accum)
    epochs = t.epochs if t.epochs != "auto" else min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, math.ceil(AUTO_TARGET_STEPS / steps)))
    patience = t.early_stopping_patience
    if patience == "auto":
        patience = AUTO_PATIENCE if t.epochs == "auto" else None
    return {"batch_size": batch, "epochs": epochs, "early_stopping_patience": patience}


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
    # A grid in one call (raypipe.evaluate.evaluate_grid): every model x every corruption, the data read once and
    # each model loaded once. Empty lists mean [model_uri] and [corruption]. "none" in corruptions is the clean row.
    models: list[ModelUri] = Field(default_factory=list)
    corruptions: list[CorruptionConfig] = Field(default_factory=list)
    # Also score zero-shot (models with a zero_shot_logits head, CAV-Net): each row against the text embeddings of
    # the class names (embedded like raypipe label's zero_shot mode) -> zs/top1, zs/top5. The rows scored are the
    # split's rows of the model's train.holdout_classes, or every row of the split when it held none out.
    zero_shot: bool = False
    # "code<TAB>name" lines (the corpus's class_names.txt); None: label.class_names. Needed by zero_shot.
    class_names: PathStr | None = None
    # JSON report with the metrics (optional); the metrics are also logged and returned.
    output: PathStr | None = None
    # Log an MLflow run (metrics + report) into tracking.experiment when tracking.enabled; a grid of several rows
    # logs a parent run (the whole report) with one child run per (model, corruption).
    log_mlflow: bool = True

    @model_validator(mode="after")
    def _grid(self) -> EvalConfig:
        dup = sorted({m for m in self.models if self.models.count(m) > 1})
        if dup:
            raise ValueError(f"models lists {dup} more than once")
        return self
