"""``raypipe eval`` over a grid (models x corruptions), held-out classes and the zero-shot metrics, without Ray.

The models are real (tiny DMAFNets built from the test preset on synthetic shards, saved in the checkpoint layout
training writes); the pipeline test with the session's registered CAV-Net and zero-shot scoring is in
tests/pipeline/test_eval_pipeline.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import write_shards

from raypipe.config import ConfigError, load_config
from raypipe.config.corruption import CorruptionConfig
from raypipe.schema import ShardInfo

TOKENIZER = {"vocab_size": 2100, "mask_token_id": 103, "pad_token_id": 0, "special_ids": [0, 100, 101, 102, 103]}
INFO = ShardInfo(frame_dim=6, audio_dim=4, text_dim=5, text_len=7, max_frames=8, tokenizer=TOKENIZER)


@pytest.fixture
def overrides(tmp_path: Path) -> list[str]:
    root = write_shards(tmp_path / "features", 60, info=INFO)
    return [f"train.data={root}", f"train.storage_path={tmp_path / 'ray'}", "tracking.enabled=false",
            "train.test_fraction=0.3", "eval.split=test"]


def _checkpoint(overrides: list[str], folder: Path, *extra: str) -> Path:
    """A tiny DMAFNet (reads frames and text tokens) as training would save it, untrained but seeded."""
    from raypipe.classifier import META_FILE, MODEL_FILE
    from raypipe.models import create_model
    from raypipe.train import prepare

    cfg, spec, kwargs = prepare(load_config("test", overrides + ["model.name=dmafnet", *extra]))
    torch.manual_seed(0)
    model = create_model("dmafnet", **kwargs)
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / MODEL_FILE)
    meta = {"model_name": "dmafnet", "model_kwargs": kwargs, "classes": spec.classes, "task": "single_label",
            "shard_info": asdict(INFO), "val_fraction": spec.val_fraction, "test_fraction": spec.test_fraction,
            "holdout_classes": spec.holdout_classes, "epoch": 0, "metrics": {}}
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def test_grid_reads_the_data_once_scores_every_pair_and_reports_a_bad_model(overrides, tmp_path, monkeypatch) -> None:
    import raypipe.data
    from raypipe.classifier import load_classifier
    from raypipe.data import evaluation_rows
    from raypipe.evaluate import evaluate_grid
    from raypipe.metrics import compute_metrics

    a = _checkpoint(overrides, tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)  # a second model on the same split and classes: the rows are read once for both
    reads = []
    monkeypatch.setattr(raypipe.data, "evaluation_rows", lambda *args, **kw: reads.append(1) or evaluation_rows(*args, **kw))
    cfg = load_config("test", overrides)
    corrs = [CorruptionConfig(), CorruptionConfig(kind="drop_tokens", p=0.5, seed=3)]
    rows = evaluate_grid(cfg, [str(a), str(tmp_path / "missing"), str(b)], corrs)
    assert len(reads) == 1
    assert [(Path(r["model_uri"]).name, r["corruption"]["kind"], r["status"]) for r in rows] == [
        ("a", "none", "ok"), ("a", "drop_tokens", "ok"), ("missing", "none", "error"),
        ("missing", "drop_tokens", "error"), ("b", "none", "ok"), ("b", "drop_tokens", "ok")]
    assert rows[1]["corruption"] == {"kind": "drop_tokens", "p": 0.5, "seed": 3}
    assert "missing" in rows[2]["error"] and rows[2]["metrics"] == {} and rows[2]["rows"] == 0
    # The clean row is the model's scores on the test rows, by hand.
    data = evaluation_rows(cfg.train.data, task="single_label", classes=load_classifier(str(a)).classes,
                           val_fraction=cfg.train.val_fraction, test_fraction=0.3, split="test")
    scores = load_classifier(str(a)).predict_proba({k: v for k, v in data.arrays.items() if k not in ("video_id", "label")})
    expected = compute_metrics(scores, data.targets, task="single_label", classes=data.classes, prefix="test/")
    assert rows[0]["metrics"] == pytest.approx(expected, abs=1e-9) and rows[0]["rows"] == len(data.targets)
    assert {"test/f_sco", "test/hit@1", "test/hit@2", "test/top1", "test/top5", "test/gap@20", "test/map"} <= set(rows[0]["metrics"])
    # Dropping words changes what DMAFNet reads; each model sees the same drops (seeded), so a and b agree.
    clean_scores = rows[0]["metrics"]
    assert rows[1]["metrics"] != clean_scores and rows[5]["metrics"] == rows[1]["metrics"]
    # p=0 is the clean row; a grid of only bad models raises the first one's error (nothing to report).
    zero = evaluate_grid(cfg, [str(a)], [CorruptionConfig(kind="drop_tokens", p=0.0)])
    assert zero[0]["metrics"] == pytest.approx(rows[0]["metrics"], abs=1e-12)
    with pytest.raises(FileNotFoundError, match="missing"):
        evaluate_grid(cfg, [str(tmp_path / "missing")], corrs)


def test_cli_grid_prints_one_row_per_pair_writes_json_and_exits_1_on_a_bad_model(overrides, tmp_path, capfd) -> None:
    from raypipe.cli import main

    a = _checkpoint(overrides, tmp_path / "a")
    out = tmp_path / "grid.json"
    rc = main(["eval", *[x for o in overrides for x in ("--set", o)], "--set", f"eval.models=[{a}, {tmp_path / 'nope'}]",
               "--set", "eval.corruptions=[{kind: none}, {kind: drop_features, p: 0.3}]", "--output", str(out)])
    err = capfd.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if str(tmp_path / "nope") in ln]
    assert any("cannot be scored" in ln and "FileNotFoundError" in ln for ln in lines), err
    table = [ln for ln in err.splitlines() if ln.startswith((str(a), str(tmp_path / "nope")))]
    assert len(table) == 4 and sum(" ok " in ln for ln in table) == 2 and sum(" error " in ln for ln in table) == 2
    report = json.loads(out.read_text())
    assert [(r["corruption"]["kind"], r["status"]) for r in report["rows"]] == [
        ("none", "ok"), ("drop_features", "ok"), ("none", "error"), ("drop_features", "error")]


def test_holdout_classes_leave_train_and_val_and_are_checked_before_ray(overrides) -> None:
    from raypipe.data import prepare_batch
    from raypipe.train import prepare

    _, full, _ = prepare(load_config("test", overrides))
    _, spec, _ = prepare(load_config("test", overrides + ["train.holdout_classes=['0101']"]))
    assert spec.holdout_classes == ["0101"] and spec.classes == full.classes  # still a class of the model
    assert spec.num_train < full.num_train and spec.num_val <= full.num_val and spec.num_test == full.num_test
    import pyarrow.parquet as pq

    table = pq.read_table(Path(spec.files[0]))
    for split in ("train", "val", "test"):
        kw = {"info": spec.info, "classes": spec.classes, "task": "single_label", "split": split,
              "val_fraction": spec.val_fraction, "test_fraction": spec.test_fraction}
        with_all, without = prepare_batch(table, **kw), prepare_batch(table, **kw, holdout=["0101"])
        held = spec.classes.index("0101")
        assert not (without["label"] == held).any() if split != "test" else len(without["label"]) == len(with_all["label"])
    with pytest.raises(ConfigError, match=r"config error: train.holdout_classes: \['9999'\] are not classes"):
        prepare(load_config("test", overrides + ["train.holdout_classes=['9999']"]))
    with pytest.raises(ConfigError, match="leaves fewer than 2 to train on"):
        prepare(load_config("test", overrides + [f"train.holdout_classes={full.classes[1:]}"]))


def test_supervised_metrics_skip_held_out_rows_and_zero_shot_scores_them() -> None:
    from raypipe.evaluate import grid_table, holdout_rows, zero_shot_metrics

    y = np.array([0, 1, 2, 2, 1])
    held = holdout_rows(y, ["a", "b", "c"], ["c"], "single_label")
    assert held.tolist() == [False, False, True, True, False]
    assert holdout_rows(np.array([[1, 0], [0, 1]]), ["a", "b"], ["b"], "multi_label").tolist() == [False, True]
    # zero-shot scores: row 2 (class 2) ranks it first, row 3 (class 2) second of three -> top1 1/2, top5 1
    zs = np.array([[0.6, 0.3, 0.1]] * 2 + [[0.1, 0.2, 0.7], [0.5, 0.1, 0.4]] + [[0.3, 0.4, 0.3]])
    m = zero_shot_metrics(zs, y, held)
    assert m == {"zs/top1": 0.5, "zs/top5": 1.0, "zs/n": 2.0}
    assert zero_shot_metrics(zs, y, np.zeros(5, bool)) == {"zs/n": 0.0}
    rows = [{"model_uri": "m1", "corruption": {"kind": "none", "seed": 0}, "status": "ok", "rows": 5,
             "metrics": {"test/top1": 0.5, **m}},
            {"model_uri": "bad", "corruption": {"kind": "drop_tokens", "p": 0.3, "seed": 0}, "status": "error",
             "rows": 0, "metrics": {}}]
    lines = grid_table(rows).splitlines()
    assert lines[0].split()[-3:] == ["test/top1", "zs/top1", "zs/top5"] and len(lines) == 3
    assert lines[1].split()[-3:] == ["0.5000", "0.5000", "1.0000"] and "kind=drop_tokens p=0.3" in lines[2]


def test_eval_config_grid_and_zero_shot_keys_are_validated_up_front() -> None:
    cfg = load_config("test", ["eval.models=[models:/a@champion, /ckpt]",
                               "eval.corruptions=[{kind: none}, {kind: drop_tokens, p: 0.5, seed: 2}]",
                               "eval.zero_shot=true", "eval.class_names=names.txt", "train.holdout_classes=['0101']"])
    assert cfg.eval.models == ["models:/a@champion", "/ckpt"] and cfg.eval.corruptions[1].p == 0.5
    for bad, message in [(["eval.zero_shot=true"], "eval.zero_shot needs class names"),
                         (["eval.models=[a, a]"], "models lists ['a'] more than once"),
                         (["eval.corruptions=[{kind: drop_tokens, std: 1}]"], "not used by kind='drop_tokens'"),
                         (["train.holdout_classes=[x, x]"], "holdout_classes lists ['x'] more than once")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config("test", bad)


def test_held_out_rows_are_left_out_of_the_supervised_scores(overrides, tmp_path) -> None:
    """A model trained with train.holdout_classes: its test/* (after training) and eval's supervised metrics score
    only the classes it trained on; eval's grid leaves the held-out rows to zero-shot."""
    from raypipe.classifier import load_classifier
    from raypipe.data import evaluation_rows
    from raypipe.evaluate import evaluate_grid
    from raypipe.metrics import compute_metrics
    from raypipe.train import prepare, score_test_split

    held = ["0101"]
    ckpt = _checkpoint(overrides, tmp_path / "h", f"train.holdout_classes={held}")
    cfg, spec, _ = prepare(load_config("test", overrides + [f"train.holdout_classes={held}"]))
    clf = load_classifier(str(ckpt))
    data = evaluation_rows(cfg.train.data, task="single_label", classes=clf.classes, val_fraction=spec.val_fraction,
                           test_fraction=spec.test_fraction, split="test")
    seen = data.targets != clf.classes.index("0101")
    assert 0 < seen.sum() < len(seen)
    feats = {k: v for k, v in data.arrays.items() if k not in ("video_id", "label")}
    expected = compute_metrics(clf.predict_proba(feats)[seen], data.targets[seen], task="single_label",
                               classes=clf.classes, prefix="test/")
    report = score_test_split(cfg, spec, str(ckpt))
    assert report["metrics"] == pytest.approx(expected, abs=1e-9) and report["num_rows"] == int(seen.sum())
    row = evaluate_grid(cfg, [str(ckpt)], [CorruptionConfig()])[0]
    assert row["holdout_classes"] == held and row["metrics"] == pytest.approx(expected, abs=1e-9)
