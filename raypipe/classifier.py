"""A trained classifier: the checkpoint format, loading it back, and the MLflow pyfunc wrapper (one module).

Like open_clip's factory (``load_checkpoint`` beside ``create_model``), everything that knows the checkpoint
folder's layout lives here, so the writer (the training worker), the loaders (``raypipe eval``, the label
actors, promotion, the pyfunc model) and the format cannot drift apart:

* layout: ``model.pt`` (state dict), ``meta.json`` (model name and builder kwargs, classes, task, ShardInfo,
  epoch, metrics, history), ``train_state.pt`` (optimizer, scheduler, scaler; only for resuming) and
  ``val_predictions.npz`` (the epoch's validation scores/targets) -- written by :func:`write_checkpoint`, read
  back for resuming by :func:`read_train_state`;
* :func:`load_classifier` accepts ``models:/name@alias``, ``models:/name/version`` or a checkpoint folder and
  always rebuilds the same torch model from ``model.pt`` + ``meta.json``; :func:`init_from_checkpoint` reads the
  same URIs to warm-start a training run (``train.init_from``: matching tensors, fresh classifier head);
* :func:`scores_from_logits` is the one place logits become class scores (softmax or sigmoid): inference
  (:class:`Classifier`) and the training loop's validation both call it;
* the pyfunc wrapper (``RaypipePyfunc``) wraps the same :class:`Classifier`, so ``mlflow.pyfunc.load_model``
  gives identical scores. Models registered before this module existed pickled the class as
  ``raypipe.tracking.RaypipePyfunc``; :mod:`raypipe.tracking` keeps that name resolving to this class.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.config import StorageConfig
from raypipe.config.paths import absolute_tracking_uri
from raypipe.io import fs as rfs
from raypipe.schema import ShardInfo

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"
VAL_PREDICTIONS_FILE = "val_predictions.npz"


# ------------------------------------------------------------------------------------------ checkpoint I/O


def write_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    meta: dict[str, Any],
    val_scores: np.ndarray,
    val_targets: np.ndarray,
    val_ids: np.ndarray,
) -> None:
    """Write one checkpoint folder (the layout in the module docstring)."""
    import torch

    d = Path(directory)
    torch.save(model.state_dict(), d / MODEL_FILE)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
        d / TRAIN_STATE_FILE,
    )
    (d / META_FILE).write_text(json.dumps(meta, indent=1, default=float))
    np.savez_compressed(
        d / VAL_PREDICTIONS_FILE, scores=val_scores.astype(np.float32), targets=val_targets, video_id=val_ids.astype(str)
    )


def read_train_state(
    directory: str | Path, model: torch.nn.Module
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint's weights into ``model`` for resuming -> ``(train state, meta)``."""
    import torch

    d = Path(directory)
    model.load_state_dict(torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True))
    train_state = torch.load(d / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    return train_state, json.loads((d / META_FILE).read_text())


def read_val_predictions(directory: str | Path) -> Any:
    """The validation scores / targets / ids saved with a checkpoint (an ``np.load`` archive)."""
    return np.load(Path(directory) / VAL_PREDICTIONS_FILE)


def inference_files() -> tuple[str, ...]:
    """What inference needs from a checkpoint (the optimizer state would double the model's size in a registry)."""
    return (MODEL_FILE, META_FILE)


def scores_from_logits(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Class scores from logits: softmax (single label) or sigmoid (multi label); stays on the logits' device."""
    import torch

    return torch.softmax(logits, dim=-1) if task == "single_label" else torch.sigmoid(logits)


# ------------------------------------------------------------------------------------------ classifier

class Classifier:
    """A trained model ready for inference on feature-shard batches (numpy in, numpy out).

    ``predict_proba`` accepts the flat shard columns (as Ray Data / pyarrow / the pyfunc input example give
    them) or already shaped model arrays; scores are softmax (single label) or sigmoid (multi label).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        meta: Mapping[str, Any],
        *,
        model_name: str,
        model_version: str,
        source: str,
        device: str = "cpu",
    ) -> None:
        self.model = model.eval().to(device)
        self.meta = dict(meta)
        self.classes: list[str] = list(meta["classes"])
        self.task: str = meta["task"]
        self.arch: str = meta["model_name"]
        self.model_name = model_name
        self.model_version = model_version
        self.source = source
        self.shard_info = ShardInfo(**meta["shard_info"])
        self.device = device

    def to_device(self, device: Any) -> Classifier:
        """Move the model; batches are collated straight onto the same device."""
        self.model.to(device)
        self.device = str(device)
        return self

    def _batch(self, np_batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        from raypipe.data import collate

        return collate(np_batch, self.shard_info, device=self.device)

    def logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Model logits ``(B, C)`` for a collated (possibly corrupted) torch batch."""
        import torch

        with torch.inference_mode():
            return self.model(batch)["logits"].float()

    def scores_from_logits(self, logits: torch.Tensor) -> np.ndarray:
        return scores_from_logits(logits, self.task).cpu().numpy().astype(np.float32)

    def predict_proba(self, np_batch: Mapping[str, Any], *, chunk: int = 256) -> np.ndarray:
        """``(B, C)`` class scores for a batch of shard rows."""
        n = len(next(iter(np_batch.values())))
        if n == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        outs = []
        for start in range(0, n, chunk):
            part = {k: v[start : start + chunk] for k, v in np_batch.items()}
            outs.append(self.scores_from_logits(self.logits(self._batch(part))))
        return np.concatenate(outs)

    @property
    def zero_shot_proba(self) -> Any:
        """Open-vocabulary scores ``(B, C')`` against class-name embeddings ``(C', Dt)``; only for models with a
        ``zero_shot_logits`` head (CAV-Net built with ``contrastive=True``), otherwise absent (AttributeError)."""
        if not hasattr(self.model, "zero_shot_logits") or not getattr(self.model, "contrastive", False):
            raise AttributeError(f"model {self.arch!r} has no zero-shot head (needs CAV-Net with contrastive=True)")
        return self._zero_shot_proba

    def _zero_shot_proba(self, np_batch: Mapping[str, Any], class_text_emb: np.ndarray) -> np.ndarray:
        return self.zero_shot_scores(self._batch(np_batch), class_text_emb)

    def zero_shot_scores(self, batch: Mapping[str, torch.Tensor], class_text_emb: np.ndarray) -> np.ndarray:
        """:attr:`zero_shot_proba` of a collated (possibly corrupted) torch batch, as ``raypipe eval`` scores it."""
        import torch

        with torch.inference_mode():
            sims = self.model.zero_shot_logits(batch, torch.as_tensor(np.asarray(class_text_emb), dtype=torch.float32, device=self.device))
            scale = self.model.logit_scale.exp() if hasattr(self.model, "logit_scale") else 1.0
            return torch.softmax(sims * scale, dim=-1).cpu().numpy().astype(np.float32)

    def input_example(self, np_batch: Mapping[str, Any], rows: int = 2) -> dict[str, np.ndarray]:
        """A small pyfunc input example in the flat shard layout (2-d arrays, float32 features)."""
        from raypipe.data import shape_columns

        shaped = shape_columns({k: v[:rows] for k, v in np_batch.items()}, self.shard_info)
        return example_from_shaped(shaped)


def example_from_shaped(shaped: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Shaped model arrays -> the flat shard layout a pyfunc caller sends (one 2-d array per column)."""
    n = len(shaped["frame_feats"])
    return {
        "frame_emb": np.asarray(shaped["frame_feats"], np.float32).reshape(n, -1),
        "frame_mask": np.asarray(shaped["frame_mask"], bool),
        "audio_emb": np.asarray(shaped["audio_feats"], np.float32).reshape(n, -1),
        "audio_mask": np.asarray(shaped["audio_mask"], bool),
        "input_ids": np.asarray(shaped["input_ids"], np.int32),
        "attention_mask": np.asarray(shaped["attention_mask"], np.int32),
        "text_emb": np.asarray(shaped["text_emb"], np.float32),
    }


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be rebuilt as recorded: the stage cannot run as configured (exit 2)."""

    exit_code = 2


def build_model_from_meta(meta: Mapping[str, Any]) -> torch.nn.Module:
    from raypipe.models import create_model

    return create_model(meta["model_name"], **meta["model_kwargs"])


def load_checkpoint_dir(path: str | Path, *, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a local checkpoint folder -> ``(model in eval mode, meta)``."""
    import torch

    p = Path(path)
    if not (p / META_FILE).is_file() or not (p / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a raypipe checkpoint (needs {MODEL_FILE} and {META_FILE})")
    meta = json.loads((p / META_FILE).read_text())
    model = build_model_from_meta(meta)
    state = torch.load(p / MODEL_FILE, map_location=device, weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        # Checkpoints written before their kwargs recorded the builder defaults rebuild with today's defaults.
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise CheckpointError(
            f"{path}: the weights do not fit model {meta['model_name']!r} as built from its recorded options (a "
            f"checkpoint from an older raypipe whose model defaults have since changed; retrain it): {first[0].strip()}"
        ) from None
    return model.eval(), meta



# ------------------------------------------------------------------------------------------ pyfunc


def _make_pyfunc_class() -> type:
    import mlflow.pyfunc

    class RaypipePyfunc(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper: ``predict`` takes the flat shard columns (dict of 2-d arrays) -> ``(B, C)`` scores."""

        def load_context(self, context: Any) -> None:
            self.clf = _classifier_from_dir(context.artifacts["checkpoint"], model_name="", model_version="", source="")

        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 (MLflow reads the hints)
            if hasattr(model_input, "to_dict") and not isinstance(model_input, dict):  # a pandas DataFrame
                model_input = {c: np.stack(model_input[c].to_numpy()) for c in model_input.columns}
            return self.clf.predict_proba(model_input)

    RaypipePyfunc.__module__ = __name__
    RaypipePyfunc.__qualname__ = "RaypipePyfunc"
    return RaypipePyfunc


def pyfunc_class() -> type:
    """The ``mlflow.pyfunc.PythonModel`` subclass, created on first use so that importing this module (label
    actors, eval) does not pay for importing mlflow.pyfunc; pickled by reference as
    ``raypipe.classifier.RaypipePyfunc`` (resolved by the module ``__getattr__``; models registered before
    the split name ``raypipe.tracking.RaypipePyfunc``, which resolves to the same class)."""
    cls = globals().get("RaypipePyfunc")
    if cls is None:
        cls = globals()["RaypipePyfunc"] = _make_pyfunc_class()
    return cls


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "numpy", "pyarrow", "mlflow", "transformers", "pydantic", "pyyaml", "fsspec"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs





def __getattr__(name: str) -> Any:
    if name == "RaypipePyfunc":
        return pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _classifier_from_dir(path: str, *, model_name: str, model_version: str, source: str) -> Classifier:
    model, meta = load_checkpoint_dir(path)
    return Classifier(
        model, meta, model_name=model_name or meta["model_name"], model_version=model_version, source=source
    )


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    rest = uri[len("models:/") :]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version, None
    raise ValueError(f"model URI {uri!r} must be models:/<name>@<alias> or models:/<name>/<version>")


@contextlib.contextmanager
def local_checkpoint(
    uri: str, storage: StorageConfig | None = None, *, tracking_uri: str | None = None
) -> Iterator[tuple[str, str, str]]:
    """A local folder holding the checkpoint of ``uri`` (registry URI, s3:// or local folder) for the ``with``
    block -> ``(folder, registered name or "", version)``; ``version`` is the registry version, or ``ckpt-<hash>``
    of the URI for a checkpoint path. Temporary copies are removed afterwards."""
    if uri.startswith("models:/"):
        import mlflow
        from mlflow import MlflowClient

        if tracking_uri:
            tracking_uri = absolute_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        name, version, alias = parse_models_uri(uri)
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        with tempfile.TemporaryDirectory(prefix="raypipe-load-") as tmp:
            if tracking_uri:
                mlflow.set_tracking_uri(tracking_uri)
                mlflow.set_registry_uri(tracking_uri)
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp)
            found = sorted((Path(local) / "artifacts").glob(f"*/{META_FILE}"))
            if not found:
                raise FileNotFoundError(f"{uri}: the registered model has no raypipe checkpoint artifact")
            yield str(found[0].parent), name, str(mv.version)
        return
    local, tmp = rfs.local_copy(uri, storage)
    try:
        yield local, "", f"ckpt-{hashlib.sha1(uri.rstrip('/').encode()).hexdigest()[:10]}"
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def load_classifier(uri: str, storage: StorageConfig | None = None, *, tracking_uri: str | None = None) -> Classifier:
    """A :class:`Classifier` from ``models:/name@alias``, ``models:/name/version`` or a checkpoint folder.

    Registry URIs resolve through the current MLflow tracking/registry URI (``mlflow.set_tracking_uri`` or
    ``MLFLOW_TRACKING_URI``) unless ``tracking_uri`` is given. ``model_version`` is the registry version, or
    ``ckpt-<hash>`` of the folder for a checkpoint path, so predictions of different models never mix.
    """
    with local_checkpoint(uri, storage, tracking_uri=tracking_uri) as (local, name, version):
        return _classifier_from_dir(local, model_name=name, model_version=version, source=uri)


# ------------------------------------------------------------------------------------------ warm start

# The parameters that map the fused representation to class logits, by name prefix in every registered model
# (dmafnet / baselines: ``head``, cavnet / mfb / bilstm_attn / nextvlad: ``classifier``; DMAFNet's per-stream
# heads: ``uni_heads``): a finetune always starts them fresh, since a pretraining checkpoint's head was never
# trained (or was trained for other classes).
HEAD_PREFIXES = ("head.", "classifier.", "uni_heads.")


def is_head_parameter(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


def read_checkpoint_meta(uri: str, storage: StorageConfig | None = None, *, tracking_uri: str | None = None) -> dict:
    """``meta.json`` of a checkpoint (what model it holds), without loading its weights."""
    with local_checkpoint(uri, storage, tracking_uri=tracking_uri) as (local, _, _):
        p = Path(local) / META_FILE
        if not p.is_file() or not (Path(local) / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{uri} is not a raypipe checkpoint (needs {MODEL_FILE} and {META_FILE})")
        return json.loads(p.read_text())


def init_from_checkpoint(
    model: torch.nn.Module, uri: str, storage: StorageConfig | None = None, *, model_name: str,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Copy into ``model`` every tensor of checkpoint ``uri`` whose name and shape match, except the classifier
    head (:data:`HEAD_PREFIXES`) -> counts ``loaded`` / ``skipped_head`` / ``skipped_shape`` / ``missing`` (the
    model's tensors the checkpoint lacks) / ``unused`` (checkpoint tensors the model lacks). A checkpoint of
    another model than ``model_name`` is a :class:`CheckpointError` (weights do not carry over across models)."""
    import torch

    with local_checkpoint(uri, storage, tracking_uri=tracking_uri) as (local, _, _):
        meta = json.loads((Path(local) / META_FILE).read_text())
        if meta.get("model_name") != model_name:
            raise CheckpointError(f"train.init_from: {uri} holds a {meta.get('model_name')!r} model, not "
                                  f"{model_name!r} (model.name); weights only carry over within one model")
        state = torch.load(Path(local) / MODEL_FILE, map_location="cpu", weights_only=True)
    return {"uri": uri, **load_matching(model, state)}


def load_matching(model: torch.nn.Module, state: Mapping[str, Any]) -> dict[str, int]:
    """Copy into ``model`` every tensor of ``state`` whose name and shape match, except the classifier head ->
    the counts of :func:`init_from_checkpoint` (also used in memory by the experiments' pretraining rows)."""
    own = model.state_dict()
    take = {k: v for k, v in state.items()
            if k in own and not is_head_parameter(k) and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(take, strict=False)
    return {
        "loaded": len(take), "skipped_head": sum(1 for k in state if k in own and is_head_parameter(k)),
        "skipped_shape": sum(1 for k in state if k in own and not is_head_parameter(k) and k not in take),
        "missing": sum(1 for k in own if k not in state), "unused": sum(1 for k in state if k not in own),
    }
