"""Ray Train on real feature shards (generated corpus -> embed): on a held-out test split DMAFNet (packaged MiniLM
text tower, default optimiser) matches the text-only baseline and beats the frames-only one, the best epoch is
chosen on val only (poisoned test labels change nothing before the end), the MLflow run and registry round trip
carry the test metrics, crash + resume reproduces the uninterrupted curve, ``raypipe eval`` scores the test split
by default, and every registered model trains through the same path.

The expensive runs are module-scoped fixtures shared by the tests that inspect them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from raypipe.classifier import example_from_shaped, load_classifier
from raypipe.config import RaypipeConfig
from raypipe.config.train import OptimConfig
from raypipe.corruptions import apply_corruption
from raypipe.data import find_shard_files, prepare_batch, to_torch
from raypipe.metrics import compute_metrics
from raypipe.models import list_models
from raypipe.train import FAULT_ENV, FAULT_MARKER, TrainResult, fit
from raypipe.train_worker import base_lr

# Tiny model sizes: every run here is a few seconds of compute per epoch on 2 CPUs.
TINY: dict[str, dict[str, Any]] = {
    "dmafnet": dict(frame_layers=1, frame_heads=2, fusion_layers=1, fusion_heads=2, text_encoder_path=None,
                    text_hidden=32, text_layers=1, text_heads=2, proj_dim=16),
    "mfb": dict(k=2, o=16, clusters=2, dbof_size=16, nextvlad_out=16),
    "bilstm_attn": dict(lstm_hidden=8, text_categories=3),
    "cavnet": dict(dim=16, heads=2, gate_hidden=8, proj_dim=8),
    "wbdc_baseline": dict(clusters=4, groups=2, nextvlad_out=16, text_encoder_path=None, text_hidden=16,
                          text_layers=1, text_heads=2),
    "frames_only": dict(aggregation="avgpool", hidden=32),
    "audio_only": dict(aggregation="avgpool", hidden=32),
    "text_only": dict(hidden=32),
    "videobert": dict(text_encoder_path=None, text_hidden=16, text_layers=1, text_heads=2),
}

# The comparison runs: same data, split, epochs, optimiser defaults (train.optim: lr, text_lr, warm-up) and workers;
# only the model differs, with its own default lr (``lr: auto``: DMAFNet 1e-4, the baselines 3e-3). DMAFNet uses
# its default text tower (the packaged MiniLM) and its default MIL-NCE (K=3); MLM is off only for speed (its
# (B, L, vocab) logits dominate a step on 2 CPUs; the every-model test trains DMAFNet with MLM on). Batches of 2
# per worker give enough optimiser steps on ~80 training rows.
_OPT = OptimConfig()  # the shipped defaults, not test.yaml's
DEFAULT_OPTIM = f"train.optim={{lr: {_OPT.lr}, text_lr: {_OPT.text_lr:g}, warmup_steps: {_OPT.warmup_steps}}}"
COMMON = ["train.num_workers=2", "train.epochs=10", "train.batch_size=2", "train.val_fraction=0.25",
          "train.test_fraction=0.25", "train.metric=val/f_sco", "train.loss.mlm=0", DEFAULT_OPTIM]
FUSION_DMAFNET = {k: v for k, v in TINY["dmafnet"].items() if not k.startswith("text_")}  # MiniLM text tower


def _params(name: str) -> str:
    return f"model.params={json.dumps(TINY[name])}"


@pytest.fixture(scope="module")
def shards(ray_session, tmp_path_factory, test_config_factory) -> str:
    """Feature shards of a corpus no other test uses (layout ``no_audio``, seed 23): 2 level-1 x 2 level-2
    classes, ~80 train / ~40 val / ~40 test rows. Frames show level 1 only (wrong 10% of the time), the text the
    level-2 index only (wrong 30%), and three quarters of the videos have no audio: no single modality can get
    both levels right. 160 videos, the generalisation benchmark's larger size: at 80 (~20 test rows, one row
    ~0.05 of F_sco) the comparison at each model's own default lr was decided by a row or two (docs/GENERALIZATION.md)."""
    from raypipe.config import CorpusConfig
    from raypipe.corpus import generate_corpus
    from raypipe.embed.pipeline import embed_videos

    info = generate_corpus(CorpusConfig(
        out=str(tmp_path_factory.mktemp("fusion_corpus")), videos=160, seed=23, max_duration_s=4.0, long_fraction=0.0,
        num_level1=2, num_level2_per_level1=2, noise_rate=0.1, layout="no_audio",
    ))
    cfg = test_config_factory(f"embed.source.uri={info.videos_dir}", f"embed.source.annotations={info.annotations_path}",
                              name="fusion_shards")
    summary = embed_videos(cfg)
    assert summary["videos_failed"] == 0
    return cfg.embed.output


@pytest.fixture(scope="module")
def make_cfg(test_config_factory, shards):
    def make(*overrides: str, name: str) -> RaypipeConfig:
        return test_config_factory(f"train.data={shards}", *COMMON, *overrides, name=name)

    return make


FUSION_PARAMS = f"model.params={json.dumps(FUSION_DMAFNET)}"


@pytest.fixture(scope="module")
def fusion_run(ray_session, make_cfg) -> tuple[RaypipeConfig, TrainResult]:
    cfg = make_cfg("model.name=dmafnet", FUSION_PARAMS, "train.run_name=fusion", name="fusion")
    return cfg, fit(cfg)


@pytest.fixture(scope="module")
def tiny_text_run(ray_session, make_cfg) -> tuple[RaypipeConfig, TrainResult]:
    """DMAFNet with a random 1-layer text tower: the resume test's reference. (With MiniLM's ~100 MB checkpoint the
    injected crash right after epoch 1 raced the checkpoint's registration and the group restarted from scratch.)"""
    cfg = make_cfg("model.name=dmafnet", _params("dmafnet"), "train.run_name=tiny", "tracking.enabled=false",
                   name="tiny")
    return cfg, fit(cfg)


@pytest.fixture(scope="module")
def text_run(ray_session, make_cfg) -> tuple[RaypipeConfig, TrainResult]:
    cfg = make_cfg("model.name=text_only", _params("text_only"), "tracking.enabled=false", name="text")
    return cfg, fit(cfg)


@pytest.fixture(scope="module")
def frames_run(ray_session, make_cfg) -> tuple[RaypipeConfig, TrainResult]:
    cfg = make_cfg("model.name=frames_only", _params("frames_only"), "tracking.enabled=false", name="frames")
    return cfg, fit(cfg)


def test_every_run_reports_held_out_test_metrics_once(fusion_run, text_run, frames_run) -> None:
    for res in (fusion_run[1], text_run[1], frames_run[1]):
        assert res.num_test >= 12 and res.test_metrics["test/n"] == res.num_test
        assert res.best_epoch is not None and all(math.isfinite(h["train/loss"]) for h in res.history)
        assert not any(k.startswith("test/") for h in res.history for k in h)  # never during training


def test_fusion_matches_text_and_beats_frames_on_the_test_split(fusion_run, text_run, frames_run) -> None:
    # Text tells the level-2 index (70% right) but not level 1; frames tell level 1 only. On held-out test rows
    # (never read before the end of training) DMAFNet must not lose to its best input and must beat frames.
    fused, text, frames = fusion_run[1], text_run[1], frames_run[1]
    test = {name: r.test_metrics["test/f_sco"] for name, r in
            (("dmafnet", fused), ("text_only", text), ("frames_only", frames))}
    print(f"\ntest/f_sco ({fused.num_test} rows): {test}; val/f_sco dmafnet {fused.best_value:.4f}")
    assert test["dmafnet"] >= test["text_only"] - 0.02
    assert test["dmafnet"] > test["frames_only"]


def test_best_epoch_never_reads_the_test_rows(frames_run, make_cfg, shards, tmp_path: Path) -> None:
    """The frames-only run again on a copy of its shards whose test rows carry wrong labels: every epoch's train
    and val numbers and the chosen epoch are unchanged; only the final test metrics move."""
    from raypipe.data import split_mask

    cfg, reference = frames_run
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    _, files = find_shard_files(shards)
    tables = [pq.read_table(f) for f in files]
    classes = sorted({x for t in tables for x in t.column("label").to_pylist() if x})
    flipped = 0
    for f, table in zip(files, tables, strict=True):
        ids = table.column("video_id").to_pylist()
        test = split_mask(ids, "test", cfg.train.val_fraction, cfg.train.test_fraction)
        labels = table.column("label").to_pylist()
        new = [classes[(classes.index(x) + 1) % len(classes)] if t and x else x
               for x, t in zip(labels, test, strict=True)]
        flipped += sum(a != b for a, b in zip(labels, new, strict=True))
        table = table.set_column(table.column_names.index("label"), "label", pa.array(new, pa.string()))
        pq.write_table(table, poisoned / Path(f).name)
    assert flipped == reference.num_test
    res = fit(make_cfg("model.name=frames_only", _params("frames_only"), "tracking.enabled=false",
                       f"train.data={poisoned}", name="poisoned"))
    assert res.best_epoch == reference.best_epoch
    for ref, got in zip(reference.history, res.history, strict=True):
        for key in ("train/loss", "val/loss", "val/f_sco"):
            assert got[key] == ref[key], (ref["epoch"], key)
    assert res.test_metrics["test/f_sco"] != reference.test_metrics["test/f_sco"]


def _split_arrays(cfg: RaypipeConfig, classes: list[str], meta: dict[str, Any], split: str = "val") -> dict[str, np.ndarray]:
    """The rows of one split of the shards, shaped as the trainer saw them (same split, same encoding)."""
    fs, files = find_shard_files(cfg.train.data)
    parts = []
    for f in files:
        with fs.open(f, "rb") as fh:
            table = pq.read_table(fh)
        info = json.loads(table.schema.metadata[b"raypipe"])
        parts.append(prepare_batch(table, info=info, classes=classes, task="single_label", split=split,
                                    val_fraction=meta["val_fraction"], test_fraction=meta["test_fraction"]))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_mlflow_run_has_params_metrics_artifacts_and_a_loadable_registered_model(fusion_run) -> None:
    cfg, res = fusion_run
    uri = cfg.tracking.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    # lr auto is logged as the rate the run trained at (DMAFNet's registry default), never as "auto"
    assert cfg.train.optim.lr == "auto" and params["train.optim.lr"] == str(base_lr(cfg)) == "0.0001"
    assert params["model.name"] == "dmafnet"
    assert int(params["data.num_test"]) == res.num_test > 0
    assert params["model.params.fusion_layers"] == "1" and int(params["data.num_classes"]) >= 2
    for key in ("train/loss", "train/loss_contrastive", "train/loss_vtm", "val/f_sco", "val/hit_at_1",
                "train/samples_per_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, cfg.train.epochs + 1)), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "training_curves.png", "history.json", "best"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "best")} == {
        "best/confusion_matrix.png", "best/per_class_report.csv"}

    name, alias = cfg.tracking.registered_model_name, cfg.tracking.alias
    assert res.registered_model_name == name and res.registered_model_version is not None
    assert str(client.get_model_version_by_alias(name, alias).version) == res.registered_model_version
    # the first version of a model is also its champion (later ones are only challengers until promoted)
    assert str(client.get_model_version_by_alias(name, cfg.tracking.champion_alias).version) == res.registered_model_version

    clf = load_classifier(f"models:/{name}@{alias}", tracking_uri=uri)
    assert clf.model_name == name and clf.model_version == res.registered_model_version
    assert clf.arch == "dmafnet" and clf.task == "single_label"
    # Same predictions as the trained model: the val scores rank 0 computed during training at the best epoch.
    trained = np.load(Path(res.best_checkpoint) / "val_predictions.npz")
    arrays = _split_arrays(cfg, clf.classes, clf.meta)
    order = {v: i for i, v in enumerate(arrays["video_id"])}
    idx = np.array([order[v] for v in trained["video_id"]])
    scores = clf.predict_proba({k: v for k, v in arrays.items() if k != "video_id"})
    np.testing.assert_allclose(scores[idx], trained["scores"], atol=1e-5)
    # the classes are the corpus's 2 x 2 level-2 codes, in the order of the score columns
    assert clf.classes == sorted(clf.classes) and len(clf.classes) == scores.shape[1] == 4
    assert all(len(c) == 4 and c.isdigit() for c in clf.classes)
    # The MLflow pyfunc flavour of the same version gives the same scores from the flat shard layout.
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
    flat = example_from_shaped(arrays)
    np.testing.assert_allclose(pyfunc.predict(flat), scores, atol=1e-5)
    # And the checkpoint folder loads to the same model.
    np.testing.assert_allclose(load_classifier(res.best_checkpoint).predict_proba(flat), scores, atol=1e-5)
    # The held-out test metrics travel with the run and the registered version (read once, after training).
    run = client.get_run(res.mlflow_run_id)
    assert run.data.metrics["test/f_sco"] == pytest.approx(res.test_metrics["test/f_sco"])
    assert "test_metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    mv = client.get_model_version(name, res.registered_model_version)
    assert float(mv.tags["test/f_sco"]) == pytest.approx(res.test_metrics["test/f_sco"], abs=1e-5)
    assert json.loads(mv.tags["raypipe.test_metrics"])["num_rows"] == res.num_test


def test_eval_reproduces_training_metrics_and_measures_corruptions(fusion_run, tmp_path: Path) -> None:
    from raypipe.config.corruption import CorruptionConfig
    from raypipe.evaluate import evaluate_grid
    from raypipe.evaluate import run as eval_run

    cfg, res = fusion_run
    name, alias = cfg.tracking.registered_model_name, cfg.tracking.alias
    base = cfg.model_copy(deep=True)
    base.eval.model_uri = f"models:/{name}@{alias}"
    base.eval.output = str(tmp_path / "eval.json")
    assert eval_run(base) == 0  # eval.split=auto: the model has a test split, so that is what is scored
    report = json.loads((tmp_path / "eval.json").read_text())
    (clean,) = report["rows"]
    assert clean["split"] == "test" and clean["rows"] == res.num_test
    assert clean["metrics"]["test/f_sco"] == pytest.approx(res.test_metrics["test/f_sco"], abs=1e-9)
    client = MlflowClient(cfg.tracking.tracking_uri)
    (child,) = client.search_runs([client.get_run(report["mlflow_run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{report['mlflow_run_id']}'")
    assert child.data.metrics["test/f_sco"] == pytest.approx(clean["metrics"]["test/f_sco"])
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(child.info.run_id)}
    quiet = base.model_copy(deep=True)
    quiet.eval.log_mlflow, quiet.eval.output = False, None
    on_val = quiet.model_copy(deep=True)
    on_val.eval.split = "val"
    assert evaluate_grid(on_val)[0]["metrics"]["val/f_sco"] == pytest.approx(res.best_metrics["val/f_sco"], abs=1e-9)

    no_text = CorruptionConfig(kind="zero_modality", modality="text")
    drop, drop_none = CorruptionConfig(kind="drop_features", p=0.3), CorruptionConfig(kind="drop_features", p=0.0)
    rows = evaluate_grid(quiet, corruptions=[CorruptionConfig(), no_text, drop, drop, drop_none])
    again, text_free_m, dropped, dropped_again, dropped_none = [r["metrics"] for r in rows]
    assert again == pytest.approx(clean["metrics"], abs=1e-12)
    # The reference: the test rows with the text removed by hand, scored by the same registered model.
    clf = load_classifier(base.eval.model_uri, tracking_uri=cfg.tracking.tracking_uri)
    arrays = _split_arrays(cfg, clf.classes, clf.meta, "test")
    batch = to_torch({k: v for k, v in arrays.items() if k != "video_id"})
    pad = int(clf.shard_info.tokenizer["pad_token_id"])
    clean_scores = clf.scores_from_logits(clf.logits(batch))
    text_free = clf.scores_from_logits(clf.logits(apply_corruption(batch, "zero_modality", modality="text",
                                                                   pad_token_id=pad)))
    assert not np.allclose(text_free, clean_scores, atol=1e-4)  # the fusion model does read the text
    expected = compute_metrics(text_free, arrays["label"], task="single_label", classes=clf.classes, prefix="test/")
    assert text_free_m == pytest.approx(expected, abs=1e-9)
    assert set(dropped) == set(again) and dropped == dropped_again  # seeded: the same frames dropped each time
    assert dropped_none == pytest.approx(again, abs=1e-12)  # dropping nothing is the clean evaluation


def test_injected_crash_resumes_from_checkpoint_with_the_same_curve(tiny_text_run, make_cfg, monkeypatch) -> None:
    """torchtune's resume check: the tiny DMAFNet recipe again, but a worker crashes after epoch 1 and Ray restarts
    the group from the epoch-1 checkpoint; the epochs after the restart reproduce the uninterrupted fusion run's
    curve (the seeds, the data order, the LR schedule and the optimizer state all carry over)."""
    _, reference = tiny_text_run
    monkeypatch.setenv(FAULT_ENV, "1")
    res = fit(make_cfg("model.name=dmafnet", _params("dmafnet"), "train.run_name=crashy", "tracking.enabled=false",
                       name="resume"))
    assert (Path(res.run_dir) / FAULT_MARKER).is_file()  # the first attempt crashed after epoch 1 ...
    assert res.resumed_from_epoch == 1  # ... and the restarted attempt continued from its checkpoint
    # the run's timeline reaches the restarted attempt's first step (its start-up phases are in the log line)
    assert {"ray_init", "worker_start", "model_built", "first_step"} <= set(res.phases) and res.phases["startup"] > 0
    epochs = list(range(1, len(reference.history) + 1))
    assert [h["epoch"] for h in res.history] == [h["epoch"] for h in reference.history] == epochs
    for ref, got in zip(reference.history, res.history, strict=True):
        for key in ("train/loss", "train/loss_classification", "train/loss_contrastive", "train/loss_vtm",
                    "val/loss", "val/f_sco"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (ref["epoch"], key)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_trains_one_epoch(ray_session, make_cfg, name: str) -> None:
    cfg = make_cfg(f"model.name={name}", _params(name), "train.epochs=1", "train.num_workers=1", "train.loss.mlm=0.25",
                   "tracking.enabled=false", "train.metric=val/hit@1", name=f"m_{name}")
    res = fit(cfg)
    (epoch,) = res.history
    assert math.isfinite(epoch["train/loss"]) and epoch["train/samples_per_s"] > 0
    assert res.best_checkpoint and Path(res.best_checkpoint, "model.pt").is_file()
    # the reported metric is the one of the validation scores the checkpoint saved (recomputed independently)
    saved = np.load(Path(res.best_checkpoint) / "val_predictions.npz")
    assert len(saved["targets"]) == epoch["val/n"] > 0
    hit1 = float(np.mean(saved["scores"].argmax(1) == saved["targets"]))
    assert epoch["val/hit@1"] == pytest.approx(hit1, abs=1e-6)
