"""Reading feature shards for training, evaluation and labelling.

Three jobs, each done once here so train, eval and label agree on them:

* **What is in the data** (:func:`prepare_data`, driver side, no Ray): the shard files, their
  :class:`~raypipe.schema.ShardInfo` (checked identical across files: a model only fits one set of embedder
  dims), the class vocabulary (sorted level-2 codes, or the taxonomy file's codes when given) and the size of
  the train / val split.
* **Which rows are train, val and test** (:func:`split_of`): a hash of ``video_id``, not a random draw, so the
  split is the same on every worker, after a restart, in every Tune trial and in ``raypipe eval`` without storing
  it, and a video never moves between splits when more videos are embedded. Hash in ``[0, val)`` is val,
  ``[val, val + test)`` test, the rest train: with ``test_fraction=0`` the val rows are exactly those of a model
  trained before test splits existed, and turning a test split on never moves a val row. A shard with a
  ``split`` column (``train`` / ``val`` / ``test``, e.g. a corpus's official split) overrides the hash.
  Epochs are chosen on val; test is read once, after training (:mod:`raypipe.train`).
* **Turning flat Parquet list columns into the model batch** (:func:`shape_columns` then :func:`to_torch`):
  the shard stores ``[T, D]`` tensors flat (any Parquet reader can load them); the model contract in
  :mod:`raypipe.models` wants ``(B, T, D)`` float tensors, boolean masks and int64 ids/targets.

The Ray Data pipeline (:func:`ray_datasets`) reads only the columns a model needs and does the reshaping and
label encoding inside its read tasks (or once on the driver, for a cached small set), so train workers receive
ready fixed-shape numpy arrays (Ray's tensor columns) and only convert them to torch.
"""

# Long module: the three jobs above share the shard layout and the split rule; keeping them together is what
# makes train, eval and label read the data the same way.

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.config import StorageConfig
from raypipe.io import fs as rfs
from raypipe.schema import METADATA_KEY, SHARD_DIMS, ShardInfo

if TYPE_CHECKING:
    import fsspec
    import ray.data
    import torch

logger = logging.getLogger(__name__)

Task = Literal["single_label", "multi_label"]
Split = Literal["all", "train", "val", "test"]
SPLITS = ("train", "val", "test")
SPLIT_COLUMN = "split"  # optional shard column that fixes a row's split

# Shard columns a model batch is made from (plus the targets).
FEATURE_COLUMNS = (
    "video_id",
    "frame_emb",
    "frame_mask",
    "audio_emb",
    "audio_mask",
    "input_ids",
    "attention_mask",
    "text_emb",
)
TARGET_COLUMNS = {"single_label": "label", "multi_label": "labels"}
# Keys of the model batch (see raypipe.models) that are tensors of features.
BATCH_FEATURE_KEYS = (
    "frame_feats",
    "frame_mask",
    "audio_feats",
    "audio_mask",
    "input_ids",
    "attention_mask",
    "text_emb",
)


class DataError(ValueError):
    """The feature data cannot be used as asked (no shards, mixed embedders, unknown labels ...)."""

    exit_code = 2  # the CLI's code for "cannot run as configured" (see raypipe.cli.run_stage)


# ------------------------------------------------------------------------------------------------ split


def split_hash(video_id: str) -> float:
    """A stable number in [0, 1) per video id (blake2b, so it does not depend on PYTHONHASHSEED)."""
    digest = hashlib.blake2b(str(video_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_val_id(video_id: str, val_fraction: float) -> bool:
    return split_hash(video_id) < val_fraction


def split_of(video_id: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """``train`` / ``val`` / ``test`` of one video id by its hash (see the module docstring for the layout)."""
    h = split_hash(video_id)
    if h < val_fraction:
        return "val"
    return "test" if h < val_fraction + test_fraction else "train"


def split_mask(
    video_ids: Sequence[str] | np.ndarray,
    split: Split,
    val_fraction: float,
    test_fraction: float = 0.0,
    split_column: Sequence[Any] | None = None,
) -> np.ndarray:
    """Boolean mask of the rows in ``split`` (``all`` keeps every row).

    ``split_column`` (a shard's ``split`` values) wins over the hash for rows where it is set to one of
    ``train``/``val``/``test``; other rows fall back to the hash.
    """
    if split == "all":
        return np.ones(len(video_ids), dtype=bool)
    given = list(split_column) if split_column is not None else [None] * len(video_ids)
    names = [
        str(s).lower() if s is not None and str(s).lower() in SPLITS else split_of(v, val_fraction, test_fraction)
        for v, s in zip(video_ids, given, strict=True)
    ]
    return np.fromiter((n == split for n in names), dtype=bool, count=len(names))


# -------------------------------------------------------------------------------------------- shard files


def find_shard_files(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """All feature-shard Parquet files under ``uri`` (or ``uri`` itself), sorted.

    Files in hidden or underscore folders/names (temporary files of an uncommitted write) and Parquet files
    without raypipe metadata or without ``frame_emb`` (e.g. the errors table beside the shards) are skipped.
    """
    fs, path = rfs.resolve(uri, storage)
    if not fs.exists(path):
        raise DataError(f"feature data {uri!r} does not exist (run `raypipe embed` first or fix train.data)")
    if fs.isfile(path):
        candidates = [path]
    else:
        candidates = sorted(
            p
            for p in fs.find(path)
            if p.endswith(".parquet")
            and not any(part.startswith((".", "_")) for part in posixpath.relpath(p, path).split("/"))
        )
    files = []
    for p in candidates:
        schema = _read_schema(fs, p)
        if schema.metadata and METADATA_KEY in schema.metadata and "frame_emb" in schema.names:
            files.append(p)
    if not files:
        raise DataError(f"no raypipe feature shards (Parquet with raypipe metadata) under {uri!r}")
    return fs, files


def _read_schema(fs: fsspec.AbstractFileSystem, path: str) -> pa.Schema:
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)




def read_shard_info(fs: fsspec.AbstractFileSystem, files: Sequence[str]) -> ShardInfo:
    """The common :class:`ShardInfo` of ``files``; mixed embedder dims are an error naming both files."""
    first: ShardInfo | None = None
    for p in files:
        info = ShardInfo.from_metadata(_read_schema(fs, p).metadata)
        if first is None:
            first, first_path = info, p
            continue
        for name in SHARD_DIMS:
            if getattr(info, name) != getattr(first, name):
                raise DataError(
                    f"feature shards disagree on {name}: {getattr(first, name)} in {first_path} vs "
                    f"{getattr(info, name)} in {p} (embedded with different settings; re-embed into a fresh folder)"
                )
    assert first is not None
    return first


# ------------------------------------------------------------------------------------------- vocabulary


def read_taxonomy(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Class codes of a taxonomy file, sorted: JSON ``{"level2": {code: name}}`` (the corpus's taxonomy.json),
    a JSON list or ``{code: name}`` mapping, or text with one ``code[<TAB>name]`` per line."""
    fs, path = rfs.resolve(uri, storage)
    if not fs.exists(path):
        raise DataError(f"taxonomy file {uri!r} does not exist (train.taxonomy)")
    with fs.open(path, "rb") as f:
        raw = f.read().decode("utf-8")
    codes: list[str]
    if path.endswith(".json"):
        data = json.loads(raw)
        if isinstance(data, dict) and "level2" in data:
            data = data["level2"]
        if isinstance(data, dict):
            codes = [str(k) for k in data]
        elif isinstance(data, list):
            codes = [str(c) for c in data]
        else:
            raise DataError(f"taxonomy {uri!r}: expected a list of codes or a {{code: name}} mapping")
    else:
        codes = [line.split("\t", 1)[0].strip() for line in raw.splitlines() if line.strip()]
    if not codes or len(set(codes)) != len(codes):
        raise DataError(f"taxonomy {uri!r} must list each class code once (found {len(codes)} codes)")
    return sorted(codes)


def scan_labels(
    fs: fsspec.AbstractFileSystem, files: Sequence[str], task: Task
) -> tuple[np.ndarray, list[Any], list[Any] | None]:
    """``(video_ids, targets, split_column)`` of every row; targets are label strings (None when unlabelled) or
    label lists; ``split_column`` is None unless the shards have a ``split`` column.

    Reads only small columns, so the driver knows the vocabulary and split sizes before Ray starts.
    """
    column = TARGET_COLUMNS[task]
    ids: list[str] = []
    targets: list[Any] = []
    splits: list[Any] = []
    has_split = False
    for p in files:
        names = _read_schema(fs, p).names
        cols = ["video_id", column] + ([SPLIT_COLUMN] if SPLIT_COLUMN in names else [])
        with fs.open(p, "rb") as f:
            table = pq.read_table(f, columns=cols)
        ids.extend(table.column("video_id").to_pylist())
        targets.extend(table.column(column).to_pylist())
        if SPLIT_COLUMN in names:
            has_split = True
            splits.extend(table.column(SPLIT_COLUMN).to_pylist())
        else:
            splits.extend([None] * table.num_rows)
    return np.asarray(ids, dtype=object), targets, (splits if has_split else None)


def _has_target(target: Any, task: Task) -> bool:
    return bool(target) if task == "multi_label" else target is not None


def _in_classes(targets: Sequence[Any], classes: set[str], task: Task) -> np.ndarray:
    """Rows with a label in ``classes`` (multi label: any of its labels)."""
    if not classes:
        return np.zeros(len(targets), dtype=bool)
    return np.fromiter(
        (bool(t) and any(str(c) in classes for c in (t if task == "multi_label" else [t])) for t in targets),
        dtype=bool, count=len(targets),
    )


# ---------------------------------------------------------------------------------------------- the spec


@dataclass
class DataSpec:
    """What training / evaluation needs to know about a feature dataset; JSON-able for the workers."""

    uri: str
    files: list[str]
    info: dict[str, Any]
    classes: list[str]
    task: Task
    val_fraction: float
    num_train: int
    num_val: int
    num_unlabelled: int = 0
    num_unknown: int = 0
    test_fraction: float = 0.0
    num_test: int = 0
    has_split_column: bool = False
    storage: dict[str, Any] = field(default_factory=dict)
    # train.holdout_classes: their rows are kept out of train and val (see :func:`prepare_batch`).
    holdout_classes: list[str] = field(default_factory=list)
    # train.pretrain: every row of a split is read, labelled or not (targets of the others: -1 / all-zero);
    # num_train / num_val / num_test then count all rows.
    keep_unlabelled: bool = False

    @property
    def columns(self) -> list[str]:
        """The shard columns a model batch and its target (and split) are made from."""
        return list(FEATURE_COLUMNS) + [TARGET_COLUMNS[self.task]] + ([SPLIT_COLUMN] if self.has_split_column else [])

    @property
    def shard_info(self) -> ShardInfo:
        return ShardInfo(**self.info)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSpec:
        return cls(**dict(data))


def prepare_data(
    uri: str,
    *,
    task: Task,
    val_fraction: float,
    test_fraction: float = 0.0,
    taxonomy: str | None = None,
    classes: Sequence[str] | None = None,
    storage: StorageConfig | None = None,
    holdout: Sequence[str] = (),
    keep_unlabelled: bool = False,
) -> DataSpec:
    """Inspect the shards under ``uri`` on the driver: files, dims, vocabulary, train / val / test sizes.

    ``classes`` (e.g. a trained model's) wins over ``taxonomy``, which wins over the labels found. Rows without
    a label are skipped (counted); rows whose label is outside a given vocabulary are skipped too (counted and
    logged), since a classifier cannot be scored on a class it has no output for. Rows of a ``holdout`` class
    (``train.holdout_classes``; :func:`raypipe.train.check_holdout` checks them against the vocabulary) are
    not counted as train or val rows. ``keep_unlabelled`` (pretraining, which scores no labels) keeps the
    unlabelled and unknown-class rows and accepts fewer than 2 classes.
    """
    fs, files = find_shard_files(uri, storage)
    info = read_shard_info(fs, files)
    ids, targets, split_col = scan_labels(fs, files, task)
    labelled = np.fromiter((_has_target(t, task) for t in targets), dtype=bool, count=len(targets))
    found = sorted({str(c) for t in targets if t for c in (t if task == "multi_label" else [t])})
    if classes is not None:
        vocab = [str(c) for c in classes]
    elif taxonomy is not None:
        vocab = read_taxonomy(taxonomy, storage)
    else:
        vocab = found
    if not labelled.any() and not keep_unlabelled:
        raise DataError(
            f"none of the {len(targets)} rows at {uri!r} has a label: embed the videos with their labels (embed."
            "source.annotations, embed.source.kind=class_folders for one folder per class, a manifest's labels column)"
        )
    known = set(vocab)
    in_vocab = np.fromiter(
        (
            _has_target(t, task) and all(str(c) in known for c in (t if task == "multi_label" else [t]))
            for t in targets
        ),
        dtype=bool,
        count=len(targets),
    )
    num_unknown = int((labelled & ~in_vocab).sum())
    if num_unknown:
        unknown = sorted(set(found) - known)
        logger.warning("%d labelled rows have classes outside the vocabulary, skipped: %s", num_unknown, unknown[:10])
    if len(vocab) < 2 and not keep_unlabelled:
        raise DataError(f"need at least 2 classes to train a classifier; the data at {uri!r} has {vocab}")
    vocab = vocab or ["unlabelled"]  # pretraining on unlabelled rows: a 1-class head that is never trained
    usable = np.ones(len(targets), dtype=bool) if keep_unlabelled else labelled & in_vocab
    seen = usable & ~_in_classes(targets, set(holdout), task)
    val = split_mask(ids, "val", val_fraction, test_fraction, split_col)
    test = split_mask(ids, "test", val_fraction, test_fraction, split_col)
    spec = DataSpec(
        uri=uri,
        files=[rfs.to_uri(fs, p) for p in files],
        info=asdict(info),
        classes=vocab,
        task=task,
        val_fraction=val_fraction,
        num_train=int((seen & ~val & ~test).sum()),
        num_val=int((seen & val).sum()),
        num_test=int((usable & test).sum()),
        test_fraction=test_fraction,
        has_split_column=split_col is not None,
        num_unlabelled=int((~labelled).sum()),
        num_unknown=num_unknown,
        storage=(storage or StorageConfig()).model_dump(),
        holdout_classes=[str(c) for c in holdout],
        keep_unlabelled=keep_unlabelled,
    )
    logger.info(
        "feature data %s: %d files, %d classes, %d train / %d val / %d test rows (%d unlabelled, %d unknown class)",
        uri, len(files), len(vocab), spec.num_train, spec.num_val, spec.num_test, spec.num_unlabelled, num_unknown,
    )
    return spec


# ------------------------------------------------------------------------------------------ reshaping


def _fixed_matrix(col: Any, width: int, name: str) -> np.ndarray:
    """``(N, width)`` numpy array from an Arrow list column, an object array of arrays or a 2-d array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.Array):
        if col.null_count:
            raise DataError(f"column {name!r} has {col.null_count} null rows; a feature shard must fill every row")
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != width).any():
            bad = int(np.flatnonzero(lengths != width)[0])
            raise DataError(f"column {name!r}: row {bad} has {lengths[bad]} values, expected {width} (ShardInfo)")
        values = col.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(col), width)
    arr = np.asarray(col)
    if arr.dtype == object:
        arr = np.stack([np.asarray(x) for x in arr]) if len(arr) else np.zeros((0, width))
    arr = arr.reshape(arr.shape[0], -1)
    if arr.shape[1] != width:
        raise DataError(f"column {name!r} has rows of {arr.shape[1]} values, expected {width} (ShardInfo)")
    return arr


def shape_columns(cols: Mapping[str, Any], info: ShardInfo) -> dict[str, np.ndarray]:
    """Flat shard columns -> the model's feature arrays (numpy, storage dtypes kept to save transfer).

    Accepts a pyarrow Table/RecordBatch-like mapping or a numpy batch (``iter_batches(batch_format="numpy")``).
    A batch that is already shaped (has ``frame_feats``) is passed through.
    """
    if "frame_feats" in cols:
        return {k: np.asarray(cols[k]) for k in BATCH_FEATURE_KEYS if k in cols}
    t, dv, da, dt, ln = info.max_frames, info.frame_dim, info.audio_dim, info.text_dim, info.text_len
    missing = [c for c in FEATURE_COLUMNS[1:] if c not in cols]
    if missing:
        raise DataError(f"batch lacks feature columns {missing}; is this a raypipe feature shard?")
    n = len(cols["frame_emb"])
    return {
        "frame_feats": _fixed_matrix(cols["frame_emb"], t * dv, "frame_emb").reshape(n, t, dv),  # (B, T, Dv)
        "frame_mask": _fixed_matrix(cols["frame_mask"], t, "frame_mask").astype(bool),  # (B, T)
        "audio_feats": _fixed_matrix(cols["audio_emb"], t * da, "audio_emb").reshape(n, t, da),  # (B, T, Da)
        "audio_mask": _fixed_matrix(cols["audio_mask"], t, "audio_mask").astype(bool),  # (B, T)
        "input_ids": _fixed_matrix(cols["input_ids"], ln, "input_ids").astype(np.int32),  # (B, L)
        "attention_mask": _fixed_matrix(cols["attention_mask"], ln, "attention_mask").astype(np.int32),  # (B, L)
        "text_emb": _fixed_matrix(cols["text_emb"], dt, "text_emb"),  # (B, Dt)
    }


def encode_targets(
    targets: Sequence[Any], classes: Sequence[str], task: Task, *, unknown_ok: bool = False
) -> np.ndarray:
    """Class indices ``(N,)`` int64 (single label) or multi-hot ``(N, C)`` uint8 (multi label). ``unknown_ok``
    (pretraining rows): a missing or unknown label becomes -1 / no class instead of an error."""
    index = {c: i for i, c in enumerate(classes)}
    try:
        if task == "single_label":
            if unknown_ok:
                return np.asarray([index.get(str(t), -1) if t is not None else -1 for t in targets], dtype=np.int64)
            return np.asarray([index[str(t)] for t in targets], dtype=np.int64)
        out = np.zeros((len(targets), len(classes)), dtype=np.uint8)
        for row, labels in enumerate(targets):
            for c in labels or []:
                if unknown_ok and str(c) not in index:
                    continue
                out[row, index[str(c)]] = 1
        return out
    except KeyError as exc:
        raise DataError(f"label {exc.args[0]!r} is not one of the {len(classes)} model classes") from None


def trim_text_padding(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the token columns that are padding in every row (dynamic padding).

    Shards store ``text_len`` tokens (the embed max length) but most texts are much shorter; attention masks
    padded keys out, so the encoders give the same result on the trimmed batch at a fraction of the cost
    (attention and the MLM vocabulary logits scale with L).
    """
    if "attention_mask" not in batch or "input_ids" not in batch:
        return dict(batch)
    mask = np.asarray(batch["attention_mask"])  # (B, L)
    real = np.flatnonzero(mask.any(axis=0))
    keep = int(real[-1]) + 1 if len(real) else 1
    if keep == mask.shape[1]:
        return dict(batch)
    out = dict(batch)
    out["input_ids"] = np.asarray(batch["input_ids"])[:, :keep]
    out["attention_mask"] = mask[:, :keep]
    return out


def to_torch(
    batch: Mapping[str, np.ndarray], device: torch.device | str | None = None, *, trim_text: bool = True
) -> dict[str, torch.Tensor]:
    """Numpy model arrays -> the model batch contract (float32 features, bool masks, int64 ids/labels)."""
    import torch

    if trim_text:
        batch = trim_text_padding(batch)

    dtypes = {
        "frame_feats": torch.float32,
        "audio_feats": torch.float32,
        "text_emb": torch.float32,
        "frame_mask": torch.bool,
        "audio_mask": torch.bool,
        "input_ids": torch.int64,
        "attention_mask": torch.int64,
        "label": torch.int64,
        "labels": torch.float32,
    }
    out = {}
    for key, dtype in dtypes.items():
        if key in batch:
            arr = np.asarray(batch[key])
            if arr.dtype == np.float16 or arr.dtype == bool or not arr.flags.writeable:
                out[key] = torch.tensor(arr, dtype=dtype, device=device)  # converts (copies) in one step
            else:
                out[key] = torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=dtype)
    return out


def collate(
    np_batch: Mapping[str, Any],
    info: ShardInfo,
    *,
    classes: Sequence[str] | None = None,
    task: Task = "single_label",
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Any batch of shard columns (flat or already shaped) -> the model batch; targets when ``classes`` given
    and the batch has them (string labels are encoded, encoded ``label``/``labels`` arrays pass through)."""
    arrays = shape_columns(np_batch, info)
    target_key = TARGET_COLUMNS[task]
    if classes is not None and target_key in np_batch:
        raw = np_batch[target_key]
        arr = np.asarray(raw) if not isinstance(raw, pa.ChunkedArray | pa.Array) else None
        encoded = arr is not None and arr.dtype != object and arr.dtype.kind in "iub"
        arrays[target_key] = arr if encoded else encode_targets(_pylist(raw), classes, task)
    return to_torch(arrays, device)


def _pylist(col: Any) -> list[Any]:
    if isinstance(col, pa.ChunkedArray | pa.Array):
        return col.to_pylist()
    return [list(x) if isinstance(x, np.ndarray) else x for x in col]


# ------------------------------------------------------------------------------------------- Ray Data


def prepare_batch(
    table: pa.Table,
    *,
    info: dict[str, Any],
    classes: list[str],
    task: Task,
    split: Split,
    val_fraction: float,
    test_fraction: float = 0.0,
    holdout: Sequence[str] = (),
    keep_unlabelled: bool = False,
) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: keep the rows of one split that carry a known label, shape the features
    and encode the targets, so workers receive fixed-shape arrays. Rows of a ``holdout`` class never enter the
    train or val split (zero-shot protocol); the test split keeps them. ``keep_unlabelled`` (pretraining) keeps
    every row of the split, labelled or not."""
    target_key = TARGET_COLUMNS[task]
    known = set(classes)
    ids = table.column("video_id").to_pylist()
    targets = table.column(target_key).to_pylist()
    split_col = table.column(SPLIT_COLUMN).to_pylist() if SPLIT_COLUMN in table.column_names else None
    keep = split_mask(ids, split, val_fraction, test_fraction, split_col)
    if not keep_unlabelled:
        keep &= np.fromiter(
            (
                _has_target(t, task) and all(str(c) in known for c in (t if task == "multi_label" else [t]))
                for t in targets
            ),
            dtype=bool,
            count=len(targets),
        )
    if holdout and split in ("train", "val"):
        keep &= ~_in_classes(targets, {str(c) for c in holdout}, task)
    table = table.filter(pa.array(keep))
    out: dict[str, np.ndarray] = {"video_id": np.asarray(table.column("video_id").to_pylist(), dtype=object)}
    out.update(shape_columns({c: table.column(c) for c in FEATURE_COLUMNS[1:]}, ShardInfo(**info)))
    out[target_key] = encode_targets(table.column(target_key).to_pylist(), classes, task, unknown_ok=keep_unlabelled)
    return out


def read_split(spec: DataSpec, split: Split) -> ray.data.Dataset:
    """A Ray Dataset of one split, already shaped and label-encoded (see :func:`prepare_batch`)."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = rfs.resolve(spec.files[0], StorageConfig(**spec.storage))
    paths = [rfs.resolve(u, StorageConfig(**spec.storage))[1] for u in spec.files]
    columns = spec.columns
    ds = ray.data.read_parquet(paths, filesystem=PyFileSystem(FSSpecHandler(fs)), columns=columns)
    ds = ds.map_batches(
        prepare_batch,
        fn_kwargs={
            "info": spec.info,
            "classes": spec.classes,
            "task": spec.task,
            "split": split,
            "val_fraction": spec.val_fraction,
            "test_fraction": spec.test_fraction,
            "holdout": spec.holdout_classes,
            "keep_unlabelled": spec.keep_unlabelled,
        },
        batch_format="pyarrow",
        zero_copy_batch=True,
    )
    # Re-executed every epoch on the workers: progress bars there would only flood the worker logs.
    ds.context.enable_progress_bars = False
    return ds


# ------------------------------------------------------------------------------------------- evaluation set

# The held-out rows a promotion compares models on: the test split, on which no model selected its best epoch.
# A model trained without a test split (train.test_fraction=0, no split column) falls back to "val": see
# :func:`held_out_split`.
EVALUATION_SPLIT: Split = "test"


def held_out_split(test_fraction: float, has_split_column: bool) -> Split:
    """The split that a model's evaluation uses: "test" when its data had one, else "val" (with less guarantee)."""
    return EVALUATION_SPLIT if test_fraction > 0 or has_split_column else "val"


@dataclass
class EvaluationSet:
    """Rows of one split, shaped like a model batch and sorted by ``video_id``, with a content fingerprint.

    ``fingerprint`` is a SHA-256 over the feature dims and embedders (ShardInfo), and every row's video id,
    label and feature bytes: two scorings with the same fingerprint saw exactly the same inputs.
    """

    uri: str
    split: str
    info: ShardInfo
    classes: list[str]
    task: Task
    arrays: dict[str, np.ndarray]  # shape_columns() keys + video_id + the encoded target column
    fingerprint: str

    @property
    def video_ids(self) -> list[str]:
        return [str(v) for v in self.arrays["video_id"]]

    @property
    def targets(self) -> np.ndarray:
        return self.arrays[TARGET_COLUMNS[self.task]]


def fingerprint_rows(arrays: Mapping[str, np.ndarray], info: ShardInfo) -> str:
    """SHA-256 of the ShardInfo dims/embedders and every array (row order included), keys in sorted order."""
    h = hashlib.sha256()
    meta = {k: getattr(info, k) for k in SHARD_DIMS} | {"embedders": info.embedders}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for key in sorted(arrays):
        arr = np.asarray(arrays[key])
        h.update(key.encode())
        if arr.dtype == object:
            h.update("\x1f".join(str(v) for v in arr).encode())
        else:
            h.update(str(arr.dtype).encode() + str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def evaluation_rows(
    uri: str,
    *,
    task: Task,
    classes: Sequence[str],
    val_fraction: float,
    test_fraction: float = 0.0,
    split: Split = EVALUATION_SPLIT,
    storage: StorageConfig | None = None,
) -> EvaluationSet:
    """The labelled rows of ``split`` under ``uri`` whose labels are in ``classes`` (what models are compared on).

    The split is the same video-id hash (or split column) the model was trained with, so ``val_fraction`` and
    ``test_fraction`` must be the ones the rows' model used (its checkpoint meta records them). Read on the driver with pyarrow: evaluation sets are
    small, and a promotion must not need a cluster.
    """
    fs, files = find_shard_files(uri, storage)
    info = read_shard_info(fs, files)
    columns = list(FEATURE_COLUMNS) + [TARGET_COLUMNS[task]]
    parts = []
    for p in files:
        with fs.open(p, "rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
            table = pq.read_table(f, columns=columns + [SPLIT_COLUMN] * (SPLIT_COLUMN in names))
        part = prepare_batch(table, info=asdict(info), classes=list(classes), task=task, split=split,
                              val_fraction=val_fraction, test_fraction=test_fraction)
        if len(part["video_id"]):
            parts.append(part)
    if not parts:
        raise DataError(f"no labelled rows of split {split!r} with the model's classes in {uri!r}")
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(arrays["video_id"].astype(str), kind="stable")
    arrays = {k: v[order] for k, v in arrays.items()}
    return EvaluationSet(uri=uri, split=split, info=info, classes=list(classes), task=task, arrays=arrays,
                         fingerprint=fingerprint_rows(arrays, info))


def ray_datasets(spec: DataSpec, *, materialize: bool = False) -> dict[str, ray.data.Dataset]:
    """Both splits: streamed by Ray Data read tasks every epoch, or with ``materialize`` (``train.cache_data``)
    read once and held in the object store."""
    if materialize:
        return _cached_datasets(spec)
    return {"train": read_split(spec, "train"), "val": read_split(spec, "val")}


def _cached_datasets(spec: DataSpec) -> dict[str, ray.data.Dataset]:
    """``train.cache_data``: each shard read once on the driver, both splits prepared from it, and the blocks put
    in the object store (``from_arrow``), in shard order like the streamed read.

    For feature sets that fit in the driver's memory. A Ray Data read + ``materialize()`` of the same rows runs two
    dataset executions with their own read tasks: about 15 s on 2 CPUs for a few dozen rows, paid by every
    training run and every Tune trial, against well under a second here.
    """
    import ray.data
    from ray.data.block import BlockAccessor

    storage = StorageConfig(**spec.storage)
    columns = spec.columns
    blocks: dict[str, list[pa.Table]] = {"train": [], "val": []}
    for uri in spec.files:
        fs, path = rfs.resolve(uri, storage)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=columns)
        for split, out in blocks.items():
            batch = prepare_batch(table, info=spec.info, classes=spec.classes, task=spec.task, split=split,  # type: ignore[arg-type]
                                   val_fraction=spec.val_fraction, test_fraction=spec.test_fraction,
                                   holdout=spec.holdout_classes, keep_unlabelled=spec.keep_unlabelled)
            if len(batch["video_id"]):
                out.append(BlockAccessor.batch_to_block(batch))
    empty = [name for name, b in blocks.items() if not b]
    if empty:
        raise DataError(f"no {' / '.join(empty)} rows in {spec.uri!r}")
    return {split: ray.data.from_arrow(b) for split, b in blocks.items()}
