"""raypipe.data without Ray: shard discovery, ShardInfo checks, vocabulary, hash split, reshaping, collate."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raypipe.config import config_to_dict
from raypipe.data import (
    DataError,
    collate,
    encode_targets,
    find_shard_files,
    prepare_data,
    read_taxonomy,
    shape_columns,
    split_hash,
    split_mask,
    split_of,
)
from raypipe.schema import ShardInfo, error_schema, feature_schema

INFO = ShardInfo(frame_dim=6, audio_dim=4, text_dim=5, text_len=7, max_frames=8, tokenizer={"vocab_size": 50})


def synthetic_rows(n: int, *, seed: int = 0, info: ShardInfo = INFO, prefix: str = "vid") -> dict[str, list]:
    """Rows of a feature shard with a known layout: frame t of video i holds ``i + t / 100`` in every dim."""
    rng = np.random.default_rng(seed)
    t, dv, da, dt, ln = info.max_frames, info.frame_dim, info.audio_dim, info.text_dim, info.text_len
    rows: dict[str, list] = {name: [] for name in feature_schema(info).names}
    for i in range(n):
        nf = int(rng.integers(1, t + 1))
        frames = np.zeros((t, dv), dtype=np.float16)
        frames[:nf] = (i + np.arange(nf) / 100.0)[:, None]
        audio = rng.normal(size=(t, da)).astype(np.float16)
        audio[nf:] = 0
        has_audio = i % 5 != 0
        code = f"{1 + i % 2:02d}{1 + i % 3:02d}"
        rows["video_id"].append(f"{prefix}{i:05d}")
        rows["source_uri"].append(f"/videos/{prefix}{i:05d}.mp4")
        rows["duration_s"].append(float(nf))
        rows["num_frames"].append(nf)
        rows["frame_times"].append([float(k) for k in range(nf)])
        rows["frame_emb"].append(frames.reshape(-1).tolist())
        rows["frame_mask"].append([k < nf for k in range(t)])
        rows["audio_emb"].append((audio if has_audio else np.zeros_like(audio)).reshape(-1).tolist())
        rows["audio_mask"].append([has_audio and k < nf for k in range(t)])
        rows["title"].append(f"title {i}")
        rows["asr"].append("")
        rows["ocr"].append("")
        rows["text"].append(f"title {i}")
        ids = [101] + [int(x) for x in rng.integers(1000, 2000, size=ln - 2)] + [102]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * ln)
        rows["text_emb"].append(rng.normal(size=dt).astype(np.float16).tolist())
        rows["label"].append(None if i % 11 == 10 else code)
        rows["label_l1"].append(None if i % 11 == 10 else code[:2])
        rows["labels"].append([] if i % 11 == 10 else [code, f"{code[:2]}99"])
    return rows


def write_shards(root: Path, n: int, *, num_files: int = 2, info: ShardInfo = INFO, prefix: str = "vid") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = synthetic_rows(n, info=info, prefix=prefix)
    schema = feature_schema(info)
    bounds = np.linspace(0, n, num_files + 1).astype(int)
    for k in range(num_files):
        part = {c: v[bounds[k] : bounds[k + 1]] for c, v in rows.items()}
        pq.write_table(pa.Table.from_pydict(part, schema=schema), root / f"part-{k:05d}.parquet")
    return root


def test_find_shard_files_skips_errors_table_and_temporary_files(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "features", 12)
    pq.write_table(pa.Table.from_pylist([], schema=error_schema()), root / "errors.parquet")
    write_shards(root / "_tmp", 3)
    (root / ".part-x.parquet").write_bytes(b"partial")
    _, files = find_shard_files(str(root))
    assert [Path(f).name for f in files] == ["part-00000.parquet", "part-00001.parquet"]


def test_missing_or_empty_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        find_shard_files(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no raypipe feature shards"):
        find_shard_files(str(tmp_path / "empty"))


def test_shards_without_any_label_name_the_embed_option_not_a_split_fraction(tmp_path: Path) -> None:
    """Videos embedded without their annotations: the error says so (it once blamed train.val_fraction)."""
    rows = synthetic_rows(6)
    rows["label"], rows["label_l1"], rows["labels"] = [None] * 6, [None] * 6, [[]] * 6
    (tmp_path / "f").mkdir()
    pq.write_table(pa.Table.from_pydict(rows, schema=feature_schema(INFO)), tmp_path / "f" / "part-00000.parquet")
    with pytest.raises(DataError, match="none of the 6 rows .* has a label: .*embed.source.annotations"):
        prepare_data(str(tmp_path / "f"), task="single_label", val_fraction=0.2)
    assert prepare_data(str(tmp_path / "f"), task="single_label", val_fraction=0.2, keep_unlabelled=True).num_train


def test_mixed_embedder_dims_are_rejected(tmp_path: Path) -> None:
    write_shards(tmp_path / "f" / "a", 4, num_files=1)
    other = ShardInfo(frame_dim=9, audio_dim=4, text_dim=5, text_len=7, max_frames=8)
    write_shards(tmp_path / "f" / "b", 4, num_files=1, info=other, prefix="w")
    with pytest.raises(DataError, match="disagree on frame_dim: 6 .* vs 9"):
        prepare_data(str(tmp_path / "f"), task="single_label", val_fraction=0.2)


def test_prepare_data_vocabulary_and_split_counts(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "features", 44)
    spec = prepare_data(str(root), task="single_label", val_fraction=0.25)
    assert spec.classes == ["0101", "0102", "0103", "0201", "0202", "0203"]
    assert spec.num_unlabelled == 4
    assert spec.num_train + spec.num_val == 40
    assert spec.shard_info == INFO
    rows = synthetic_rows(44)
    labelled = [v for v, lab in zip(rows["video_id"], rows["label"], strict=True) if lab is not None]
    assert spec.num_val == int(split_mask(labelled, "val", 0.25).sum())


def test_taxonomy_fixes_the_vocabulary_and_skips_unknown_labels(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "features", 30)
    tax = tmp_path / "taxonomy.json"
    tax.write_text(json.dumps({"level1": {"01": "a"}, "level2": {"0103": "x", "0101": "y", "0102": "z", "0104": "w"}}))
    spec = prepare_data(str(root), task="single_label", val_fraction=0.2, taxonomy=str(tax))
    assert spec.classes == ["0101", "0102", "0103", "0104"]
    assert spec.num_unknown > 0  # the 02xx rows
    txt = tmp_path / "names.txt"
    txt.write_text("0102\tb\n0101\ta\n")
    assert read_taxonomy(str(txt)) == ["0101", "0102"]
    txt.write_text("0101\n0101\n")
    with pytest.raises(DataError, match="each class code once"):
        read_taxonomy(str(txt))


def test_multi_label_vocabulary(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "features", 12)
    spec = prepare_data(str(root), task="multi_label", val_fraction=0.2)
    assert "0199" in spec.classes and "0299" in spec.classes
    y = encode_targets([["0101", "0199"], []], spec.classes, "multi_label")
    assert y.shape == (2, len(spec.classes)) and y.sum() == 2


def test_split_is_a_stable_hash_of_the_id() -> None:
    ids = [f"v{i}" for i in range(2000)]
    val = split_mask(ids, "val", 0.2)
    assert 0.17 < val.mean() < 0.23
    assert (split_mask(ids, "train", 0.2) == ~val).all()
    # Known values, pinned: they must never change, or models trained before would be scored on their training rows.
    assert split_hash("vid00000") == 0.6522776028126898 and split_hash("vid00001") == 0.4141943642162923
    assert split_hash("new00007") == 0.8928863543837842
    assert split_mask(ids[:100], "val", 0.2).tolist() == split_mask(list(reversed(ids[:100])), "val", 0.2)[::-1].tolist()


def test_three_way_split_is_disjoint_stable_and_pinned() -> None:
    ids = [f"v{i}" for i in range(3000)]
    masks = {s: split_mask(ids, s, 0.2, 0.15) for s in ("train", "val", "test")}
    assert (masks["train"].astype(int) + masks["val"] + masks["test"] == 1).all()  # disjoint and complete
    assert 0.17 < masks["val"].mean() < 0.23 and 0.12 < masks["test"].mean() < 0.18
    # A test split never moves a val row: val is the same hash range with or without one.
    assert (masks["val"] == split_mask(ids, "val", 0.2)).all()
    # Pinned values: if these change, every trained model would be scored on rows it trained on.
    assert split_hash("vid_0001") == pytest.approx(0.009668661775740701, abs=1e-15)
    assert split_hash("vid_0007") == pytest.approx(0.29434315132165867, abs=1e-15)
    assert split_hash("vid_0000") == pytest.approx(0.7387908371979142, abs=1e-15)
    assert [split_of(f"vid_{i:04d}", 0.2, 0.2) for i in range(8)] == [
        "train", "val", "train", "train", "train", "train", "train", "test"]


def test_split_column_overrides_the_hash(tmp_path: Path) -> None:
    ids = ["vid_0000", "vid_0001", "vid_0007", "vid_0005"]
    given = ["test", None, "train", "bogus"]  # None / unknown values fall back to the hash
    assert split_mask(ids, "test", 0.2, 0.2, given).tolist() == [True, False, False, False]
    assert split_mask(ids, "val", 0.2, 0.2, given).tolist() == [False, True, False, False]
    assert split_mask(ids, "train", 0.2, 0.2, given).tolist() == [False, False, True, True]
    root = write_shards(tmp_path / "f", 20, num_files=1)
    table = pq.read_table(root / "part-00000.parquet")
    column = ["test" if i < 5 else "train" for i in range(20)]
    pq.write_table(table.append_column("split", pa.array(column)), root / "part-00000.parquet")
    spec = prepare_data(str(root), task="single_label", val_fraction=0.2, test_fraction=0.0)
    labelled_first5 = sum(1 for i in range(5) if i % 11 != 10)
    assert spec.has_split_column and spec.num_test == labelled_first5 and spec.num_val == 0


def test_prepare_counts_train_val_test(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "f", 60)
    spec = prepare_data(str(root), task="single_label", val_fraction=0.2, test_fraction=0.2)
    labelled = [f"vid{i:05d}" for i in range(60) if i % 11 != 10]
    assert spec.num_test == int(split_mask(labelled, "test", 0.2, 0.2).sum()) > 0
    assert spec.num_train + spec.num_val + spec.num_test == len(labelled)
    none = prepare_data(str(root), task="single_label", val_fraction=0.2)
    assert none.num_test == 0 and none.num_val == spec.num_val


def test_early_stopping_reads_only_the_history_of_the_selection_metric() -> None:
    from raypipe.train_worker import best_epoch, selection_key, should_stop_early

    hist = [{"epoch": e, "val/f_sco": v} for e, v in enumerate([0.2, 0.5, 0.5, 0.4, 0.45], start=1)]
    assert best_epoch(hist, "val/f_sco", "max") == 2  # the first of equal scores
    assert not should_stop_early(hist[:4], "val/f_sco", "max", 3)
    assert should_stop_early(hist, "val/f_sco", "max", 3)
    assert not should_stop_early(hist, "val/f_sco", "max", None)
    assert best_epoch([{"epoch": 1, "val/loss": 2.0}, {"epoch": 2, "val/loss": 1.0}], "val/loss", "min") == 2
    # The checkpoint choice (driver and rank 0) uses the same key: the first of equal values, in both modes.
    tied = [{"epoch": 3, "val/loss": 1.0}, {"epoch": 2, "val/loss": 1.0}, {"epoch": 1, "val/loss": 1.5}]
    assert max(tied, key=lambda h: selection_key(h, "val/loss", "min"))["epoch"] == 2
    assert max(hist, key=lambda h: selection_key(h, "val/f_sco", "max"))["epoch"] == best_epoch(hist, "val/f_sco", "max")


@pytest.mark.parametrize("metric,mode", [("val/f_sco", "max"), ("val/loss", "min")])
def test_keeping_the_best_checkpoints_never_drops_the_epoch_called_best(metric: str, mode: str) -> None:
    """Ray's own ordering of ``CheckpointConfig`` (ties: the later report ranks higher) over the reported
    ``checkpoint_rank``, keep_best=2: on plateaus of equal val scores, as small val splits give, the epoch that
    best_epoch / early stopping chose is always among the kept checkpoints, and is their best."""
    from ray.train import Checkpoint
    from ray.train._internal.checkpoint_manager import _insert_into_sorted_list

    from raypipe.train_worker import RANK_KEY, best_epoch, checkpoint_rank

    rng = np.random.default_rng(0)
    for trial in range(200):
        values = rng.choice([0.5, 0.6, 0.7, 1.0 / 3.0], size=int(rng.integers(3, 12)))
        hist = [{"epoch": e, metric: float(v)} for e, v in enumerate(values, start=1)]
        kept: list = []
        index: dict = {}
        for i, h in enumerate(hist):
            item = SimpleNamespace(checkpoint=Checkpoint(f"/ckpt/{trial}/{i}"), metrics={**h, RANK_KEY: checkpoint_rank(h, metric, mode)})
            index[item.checkpoint] = i
            _insert_into_sorted_list(kept, item, key=lambda r: r.metrics[RANK_KEY], checkpoint_to_report_index=index)
            kept = kept[-2:]  # the worst are deleted first
        assert kept[-1].metrics["epoch"] == best_epoch(hist, metric, mode), (values, mode)


def test_shape_and_collate_from_arrow_and_numpy_agree(tmp_path: Path) -> None:
    root = write_shards(tmp_path / "features", 6, num_files=1)
    table = pq.read_table(root / "part-00000.parquet")
    from_arrow = shape_columns({c: table.column(c) for c in table.column_names}, INFO)
    # What Ray Data's numpy batches hold for list columns: an object array of per-row arrays.
    numpy_batch = {}
    for c in table.column_names:
        values = table.column(c).to_pylist()
        col = np.empty(len(values), dtype=object)
        col[:] = [np.asarray(v) if isinstance(v, list) else v for v in values]
        numpy_batch[c] = col
    from_numpy = shape_columns(numpy_batch, INFO)
    for key, arr in from_arrow.items():
        np.testing.assert_array_equal(arr, from_numpy[key], err_msg=key)
    frames = from_arrow["frame_feats"]
    assert frames.shape == (6, 8, 6)
    n2 = table.column("num_frames")[2].as_py()
    assert frames[2, n2 - 1, 0] == np.float16(2 + (n2 - 1) / 100.0)
    assert (frames[2, n2:] == 0).all() and from_arrow["frame_mask"][2].sum() == n2

    batch = collate(numpy_batch, INFO, classes=["0101", "0102", "0103", "0201", "0202", "0203"])
    assert batch["frame_feats"].dtype == torch.float32 and batch["frame_feats"].shape == (6, 8, 6)
    assert batch["frame_mask"].dtype == torch.bool and batch["audio_mask"][0].sum() == 0  # video 0 has no audio
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (6, 7)
    assert batch["text_emb"].shape == (6, 5)
    assert batch["label"].tolist() == [0, 4, 2, 3, 1, 5]
    # Without classes there are no targets (prediction path).
    assert "label" not in collate(numpy_batch, INFO)


def test_wrong_width_names_the_column() -> None:
    bad = {"frame_emb": pa.array([[0.0] * 5], type=pa.list_(pa.float16()))}
    with pytest.raises(DataError, match="'frame_emb'.* expected 48"):
        shape_columns({**{c: None for c in ("frame_mask", "audio_emb", "audio_mask", "input_ids",
                                              "attention_mask", "text_emb")}, **bad}, INFO)


# ------------------------------------------------------------------ up-front checks of raypipe.train (no Ray)

TOKENIZER = {"vocab_size": 2100, "mask_token_id": 103, "pad_token_id": 0, "special_ids": [0, 100, 101, 102, 103]}


@pytest.fixture
def train_overrides(tmp_path: Path) -> list[str]:
    info = ShardInfo(frame_dim=6, audio_dim=4, text_dim=5, text_len=7, max_frames=8, tokenizer=TOKENIZER)
    root = write_shards(tmp_path / "features", 40, info=info)
    return [f"train.data={root}", f"train.storage_path={tmp_path / 'ray'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]


def _prepare(overrides: list[str]):
    from raypipe.config import load_config
    from raypipe.train import prepare

    return prepare(load_config("test", overrides))


def test_prepare_passes_data_dims_and_loss_switches(train_overrides: list[str]) -> None:
    cfg, spec, kwargs = _prepare(train_overrides + ["model.name=dmafnet", "train.loss.mlm=0"])
    assert Path(cfg.train.data).is_absolute() and cfg.tracking.tracking_uri.startswith("sqlite:////")
    assert kwargs["num_classes"] == 6 and kwargs["frame_dim"] == 6 and kwargs["vocab_size"] == 2100
    assert kwargs["contrastive"] is True and kwargs["mlm"] is False and kwargs["vtm"] is True
    assert kwargs["unimodal"] is False  # train.loss.unimodal defaults to 0: no per-stream heads
    assert kwargs["mask_token_id"] == 103 and "text_dim" in kwargs
    _, _, kw = _prepare(train_overrides + ["model.name=dmafnet", "train.loss.unimodal=0.5"])
    assert kw["unimodal"] is True
    # lr auto: the run's config (what the workers, MLflow's params and the checkpoint get) names the model's rate.
    auto, _, _ = _prepare(train_overrides + ["model.name=dmafnet", "train.optim.lr=auto"])
    assert auto.train.optim.lr == 1e-4 and config_to_dict(auto)["train"]["optim"]["lr"] == 1e-4
    # A builder without aux switches gets none, and its aux weights are ignored.
    _, _, kw = _prepare(train_overrides + ["model.name=frames_only", "model.params={aggregation: avgpool}",
                                           "train.loss.unimodal=0.5"])
    assert not {"contrastive", "mlm", "vtm", "unimodal"} & set(kw)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=nope"], "config error: model.name: unknown model 'nope' (registered: "),
        (["model.name=frames_only", "model.params={layers: 3}"], "config error: model.params.layers: not an option of model 'frames_only'"),
        (["model.name=frames_only", "model.params={frame_dim: 3}"], "config error: model.params.frame_dim: set from the feature shards"),
        (["model.name=dmafnet", "model.params={mlm: false}"], "config error: model.params.mlm: set by train.loss.mlm"),
        (["model.name=frames_only", "model.params={aggregation: bogus}"], "config error: model.params: model 'frames_only' rejects"),
        (["train.num_workers=64"], "config error: train.num_workers: "),
        (["train.val_fraction=0.0001"], "config error: train.val_fraction: no validation rows"),
    ],
)
def test_impossible_combinations_fail_before_ray(train_overrides: list[str], overrides: list[str], message: str) -> None:
    from raypipe.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _prepare(train_overrides + overrides)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_default_metric_follows_the_classes_and_a_set_f_sco_needs_wbdc_codes(tmp_path: Path, train_overrides: list[str]) -> None:
    from raypipe.config import ConfigError, config_to_dict

    root = Path(train_overrides[0].partition("=")[2])
    rest = train_overrides[1:]
    named = tmp_path / "named"  # the same rows labelled by name, as class folders or a manifest label them
    named.mkdir()
    for part in sorted(root.glob("part-*.parquet")):
        rows = pq.read_table(part).to_pylist()
        for r in rows:
            r["label"] = r["label"] and f"class_{r['label']}"
            r["label_l1"], r["labels"] = None, [f"class_{c}" for c in r["labels"]]
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(part)), named / part.name)
    # class names such as folders give: the default metric becomes macro-F1, set in the run's config (what the
    # workers, MLflow and the checkpoint read) ...
    cfg, spec, _ = _prepare([f"train.data={named}", *rest])
    assert spec.classes[0] == "class_0101" and spec.num_train > 0
    assert cfg.train.metric == "val/f1_macro" and config_to_dict(cfg)["train"]["metric"] == "val/f1_macro"
    # ... while f_sco asked for by name is refused in one line, and another metric is kept as it is
    with pytest.raises(ConfigError, match="val/f_sco needs 4-digit WBDC level-2 codes"):
        _prepare([f"train.data={named}", *rest, "train.metric=val/f_sco"])
    cfg, _, _ = _prepare([f"train.data={named}", *rest, "train.metric=val/hit@1"])
    assert cfg.train.metric == "val/hit@1"
    # WBDC codes keep the default, left unset
    cfg, _, _ = _prepare(train_overrides)
    assert cfg.train.metric == "val/f_sco" and "metric" not in config_to_dict(cfg)["train"]


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    from raypipe.train_worker import lr_factor

    f = [lr_factor(s, warmup=4, total=20) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False)) and f[20] == pytest.approx(0.0)


def test_text_encoder_gets_its_own_lr_and_no_decay_on_norms() -> None:
    from raypipe.config import load_config
    from raypipe.models import create_model
    from raypipe.train_worker import param_groups

    cfg = load_config("test", ["train.optim.lr=1e-3", "train.optim.text_lr=5e-5"])
    model = create_model("dmafnet", num_classes=3, frame_dim=6, vocab_size=50, text_encoder_path=None, frame_layers=1, frame_heads=2,
                         fusion_layers=1, fusion_heads=2, text_hidden=8, text_layers=1, text_heads=2)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["text"]["lr"] == 5e-5 and groups["main"]["lr"] == 1e-3
    assert groups["main_no_decay"]["weight_decay"] == 0.0 and groups["main"]["weight_decay"] == 0.01
    n_text = sum(p.numel() for g in groups.values() if g["name"].startswith("text") for p in g["params"])
    assert n_text == sum(p.numel() for p in model.text_encoder.parameters())


@pytest.mark.parametrize("name", ["dmafnet", "text_only", "frames_only", "audio_only", "mfb", "bilstm_attn", "cavnet"])
def test_lr_auto_is_the_models_own_default_and_an_explicit_lr_wins(name: str) -> None:
    """``train.optim.lr: auto`` (the default) trains each model at its registry rate (the benchmark's val choices:
    DMAFNet 1e-4; the single-modality baselines, MFB and BiLSTM 3e-3; the rest 3e-4); resolving it writes the number into the
    config that MLflow's params and the checkpoint record; a number given by the user is never replaced."""
    from raypipe.config import load_config
    from raypipe.models import create_model, default_lr
    from raypipe.train import resolve_lr
    from raypipe.train_worker import base_lr, param_groups

    expected = {"dmafnet": 1e-4, "text_only": 3e-3, "frames_only": 3e-3, "audio_only": 3e-3, "mfb": 3e-3,
                "bilstm_attn": 3e-3}.get(name, 3e-4)
    cfg = load_config("demo", [f"model.name={name}"])
    assert cfg.train.optim.lr == "auto" and default_lr(name) == expected and base_lr(cfg) == expected
    resolved = resolve_lr(cfg)
    assert resolved.train.optim.lr == expected and config_to_dict(resolved)["train"]["optim"]["lr"] == expected
    assert cfg.train.optim.lr == "auto"  # a copy: the caller's config is not changed
    explicit = load_config("demo", [f"model.name={name}", "train.optim.lr=2e-3"])
    assert resolve_lr(explicit).train.optim.lr == 2e-3 and base_lr(explicit) == 2e-3
    model = create_model("frames_only", num_classes=3, frame_dim=16)
    assert {g["lr"] for g in param_groups(model, cfg)} == {expected}


@pytest.mark.parametrize(
    ("rows", "workers", "expected"),
    [
        # 96 training rows over 2 workers (a 160-video corpus): batch 3, 16 steps per epoch, 30 epochs, patience 6
        (96, 2, {"batch_size": 3, "epochs": 30, "early_stopping_patience": 6}),
        (20, 1, {"batch_size": 2, "epochs": 30, "early_stopping_patience": 6}),  # 10 steps: the epoch bound
        (2_000, 2, {"batch_size": 16, "epochs": 8, "early_stopping_patience": 6}),  # 63 steps -> 480 / 63
        (1_000_000, 8, {"batch_size": 16, "epochs": 5, "early_stopping_patience": 6}),  # the fixed defaults of old
    ],
)
def test_auto_schedule_sizes_a_run_from_its_training_rows(rows: int, workers: int, expected: dict) -> None:
    """``train.epochs`` / ``batch_size`` / ``early_stopping_patience: auto`` (the defaults): small corpora get small
    batches and more epochs (>= 16 steps per epoch, ~480 steps per run, early stopping on val), large ones batch
    16 and 5 epochs; resolved into the config the workers, MLflow and the checkpoint get."""
    from raypipe.config import load_config
    from raypipe.config.train import auto_schedule
    from raypipe.train import resolve_schedule

    cfg = load_config(None)
    assert auto_schedule(cfg.train, rows, workers) == expected
    resolved = resolve_schedule(cfg, rows, workers)
    assert {k: getattr(resolved.train, k) for k in expected} == expected
    assert config_to_dict(resolved)["train"]["epochs"] == expected["epochs"] and cfg.train.epochs == "auto"


def test_auto_schedule_keeps_what_the_user_set() -> None:
    from raypipe.config import load_config
    from raypipe.config.train import auto_schedule

    t = load_config(None, ["train.epochs=7"]).train  # a budget set by hand: no early stopping unless asked for
    assert auto_schedule(t, 96, 2) == {"batch_size": 3, "epochs": 7, "early_stopping_patience": None}
    t = load_config(None, ["train.batch_size=32", "train.early_stopping_patience=null", "train.optim.grad_accum=2"]).train
    assert auto_schedule(t, 96, 2) == {"batch_size": 32, "epochs": 30, "early_stopping_patience": None}  # 1 step
    t = load_config("test").train  # epochs and batch set, patience auto: nothing to read from the data
    assert auto_schedule(t, None, 2) == {"batch_size": t.batch_size, "epochs": t.epochs, "early_stopping_patience": None}
    with pytest.raises(ValueError, match="need the number of training rows"):
        auto_schedule(load_config(None).train, None, 2)


def test_trailing_text_padding_is_trimmed_per_batch() -> None:
    from raypipe.data import to_torch

    ids = np.array([[101, 5, 102, 0, 0], [101, 102, 0, 0, 0]])
    batch = to_torch({"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)})
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    full = to_torch({"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)}, trim_text=False)
    assert full["input_ids"].shape == (2, 5)
