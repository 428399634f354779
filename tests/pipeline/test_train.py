"""Ray Train on the session's real feature shards (generated corpus -> embed): fusion beats one modality, the
MLflow run and registry round trip, crash + resume reproduces the uninterrupted curve, ``raypipe eval`` agrees
with training, and every registered model trains through the same path.

The expensive runs are module-scoped fixtures shared by the tests that inspect them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from raypipe.config import RaypipeConfig
from raypipe.corruptions import apply_corruption
from raypipe.data import _prepare_batch, find_shard_files, to_torch
from raypipe.metrics import compute_metrics
from raypipe.models import list_models
from raypipe.tracking import example_from_shaped, load_classifier
from raypipe.train import FAULT_ENV, FAULT_MARKER, TrainResult, fit

# Tiny model sizes: every run here is a few seconds of compute per epoch on 2 CPUs.
TINY: dict[str, dict[str, Any]] = {
    "dmafnet": dict(frame_layers=1, frame_heads=2, fusion_layers=1, fusion_heads=2, text_hidden=32, text_layers=1,
                    text_heads=2, proj_dim=16),
    "mfb": dict(k=2, o=16, clusters=2, dbof_size=16, nextvlad_out=16),
    "bilstm_attn": dict(lstm_hidden=8, text_categories=3),
    "cavnet": dict(dim=16, heads=2, gate_hidden=8, proj_dim=8),
    "wbdc_baseline": dict(clusters=4, groups=2, nextvlad_out=16, text_hidden=16, text_layers=1, text_heads=2),
    "frames_only": dict(aggregation="avgpool", hidden=32),
    "audio_only": dict(aggregation="avgpool", hidden=32),
    "text_only": dict(hidden=32),
}

# The comparison runs: same data, epochs, optimiser and workers; only the model differs. Batches of 2 per worker
# give enough optimiser steps on ~45 training rows; MLM is off only for speed (its (B, L, vocab) logits dominate a
# tiny model's step; the every-model test trains DMAFNet with the preset's full objective).
COMMON = ["train.num_workers=2", "train.epochs=16", "train.batch_size=2", "train.val_fraction=0.3",
          "train.optim.lr=3e-3", "train.optim.text_lr=3e-3", "train.optim.warmup_steps=2", "train.metric=val/f_sco",
          "train.loss.mlm=0"]


def _params(name: str) -> str:
    return f"model.params={json.dumps(TINY[name])}"


@pytest.fixture(scope="module")
def shards(ray_session, tmp_path_factory, test_config_factory) -> str:
    """Feature shards of a corpus made for the fusion comparison: 2 level-1 x 2 level-2 classes, so that ~45
    training rows hold ~11 per class. Frames show level 1 only, text (and audio) the level-2 index only, each
    modality wrong 10% of the time (raypipe.corpus): no single modality can get both levels right."""
    from raypipe.config import CorpusConfig
    from raypipe.corpus import generate_corpus
    from raypipe.embed.pipeline import embed_videos

    info = generate_corpus(CorpusConfig(
        out=str(tmp_path_factory.mktemp("fusion_corpus")), videos=64, seed=3, max_duration_s=6.0, long_fraction=0.0,
        num_level1=2, num_level2_per_level1=2, noise_rate=0.1,
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


@pytest.fixture(scope="module")
def fusion_run(ray_session, make_cfg) -> tuple[RaypipeConfig, TrainResult]:
    cfg = make_cfg("model.name=dmafnet", _params("dmafnet"), "train.run_name=fusion", name="fusion")
    return cfg, fit(cfg)


@pytest.fixture(scope="module")
def text_run(ray_session, make_cfg) -> tuple[RaypipeConfig, TrainResult]:
    cfg = make_cfg("model.name=text_only", _params("text_only"), "tracking.enabled=false", name="text")
    return cfg, fit(cfg)


def test_fusion_beats_a_single_modality(fusion_run, text_run) -> None:
    # Text alone can tell the level-2 index but not level 1 (which only the frames show): a text-only model is
    # right on about half the level-2 classes at best; DMAFNet fuses frames and text and can get both.
    fused, text = fusion_run[1], text_run[1]
    print(f"\nval/f_sco: dmafnet (frames+text) {fused.best_value:.4f} vs text_only {text.best_value:.4f}")
    for res in (fused, text):
        assert len(res.history) == fusion_run[0].train.epochs and all(math.isfinite(h["train/loss"]) for h in res.history)
        assert res.history[-1]["train/loss_classification"] < res.history[0]["train/loss_classification"]
    assert fused.best_value >= text.best_value + 0.1


def _val_arrays(cfg: RaypipeConfig, classes: list[str], val_fraction: float) -> dict[str, np.ndarray]:
    """The val rows of the shards, shaped as the trainer saw them (same split, same encoding)."""
    fs, files = find_shard_files(cfg.train.data)
    parts = []
    for f in files:
        with fs.open(f, "rb") as fh:
            table = pq.read_table(fh)
        info = json.loads(table.schema.metadata[b"raypipe"])
        parts.append(_prepare_batch(table, info=info, classes=classes, task="single_label", split="val",
                                    val_fraction=val_fraction))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_mlflow_run_has_params_metrics_artifacts_and_a_loadable_registered_model(fusion_run) -> None:
    cfg, res = fusion_run
    uri = cfg.tracking.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "dmafnet" and params["train.optim.lr"] == "0.003"
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
    arrays = _val_arrays(cfg, clf.classes, clf.meta["val_fraction"])
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


def test_eval_reproduces_training_metrics_and_measures_corruptions(fusion_run, tmp_path: Path) -> None:
    from raypipe.evaluate import evaluate

    cfg, res = fusion_run
    name, alias = cfg.tracking.registered_model_name, cfg.tracking.alias
    base = cfg.model_copy(deep=True)
    base.eval.model_uri = f"models:/{name}@{alias}"
    base.eval.output = str(tmp_path / "eval.json")
    report = evaluate(base)
    assert report["metrics"]["eval/f_sco"] == pytest.approx(res.best_metrics["val/f_sco"], abs=1e-9)
    assert json.loads((tmp_path / "eval.json").read_text())["num_rows"] == report["num_rows"]
    assert MlflowClient(cfg.tracking.tracking_uri).get_run(report["mlflow_run_id"]).data.metrics["eval/f_sco"] == (
        pytest.approx(report["metrics"]["eval/f_sco"]))

    noisy = cfg.model_copy(deep=True)
    noisy.eval.model_uri = base.eval.model_uri
    noisy.eval.log_mlflow = False
    noisy.eval.corruption = noisy.eval.corruption.model_validate({"kind": "zero_modality", "modality": "text"})
    no_text = evaluate(noisy)
    assert no_text["metrics"] == report["metrics"]
    # The reference: the val rows with the text removed by hand, scored by the same registered model.
    clf = load_classifier(base.eval.model_uri, tracking_uri=cfg.tracking.tracking_uri)
    arrays = _val_arrays(cfg, clf.classes, clf.meta["val_fraction"])
    batch = to_torch({k: v for k, v in arrays.items() if k != "video_id"})
    pad = int(clf.shard_info.tokenizer["pad_token_id"])
    clean_scores = clf.scores_from_logits(clf.logits(batch))
    text_free = clf.scores_from_logits(clf.logits(apply_corruption(batch, "zero_modality", modality="text",
                                                                   pad_token_id=pad)))
    assert not np.allclose(text_free, clean_scores, atol=1e-4)  # the fusion model does read the text
    expected = compute_metrics(text_free, arrays["label"], task="single_label", classes=clf.classes,
                               prefix="eval_zero_modality/")
    assert no_text["corrupted_metrics"] == pytest.approx(expected, abs=1e-9)
    assert no_text["delta"]["f_sco"] == pytest.approx(
        expected["eval_zero_modality/f_sco"] - report["metrics"]["eval/f_sco"], abs=1e-9)
    noisy.eval.corruption = noisy.eval.corruption.model_validate({"kind": "drop_features", "p": 0.3})
    dropped = evaluate(noisy)
    assert set(dropped["corrupted_metrics"]) == {k.replace("eval/", "eval_drop_features/") for k in report["metrics"]}
    assert evaluate(noisy)["corrupted_metrics"] == dropped["corrupted_metrics"]  # seeded: the same frames dropped
    # dropping nothing is the clean evaluation, value for value
    noisy.eval.corruption = noisy.eval.corruption.model_validate({"kind": "drop_features", "p": 0.0})
    assert {k.replace("eval_drop_features/", "eval/"): v for k, v in evaluate(noisy)["corrupted_metrics"].items()} == (
        pytest.approx(report["metrics"], abs=1e-12))


def test_injected_crash_resumes_from_checkpoint_with_the_same_curve(fusion_run, make_cfg, monkeypatch) -> None:
    """torchtune's resume check: the fusion run's recipe again, but a worker crashes after epoch 1 and Ray restarts
    the group from the epoch-1 checkpoint; the 15 epochs after the restart reproduce the uninterrupted fusion run's
    curve (the seeds, the data order, the LR schedule and the optimizer state all carry over)."""
    _, reference = fusion_run
    monkeypatch.setenv(FAULT_ENV, "1")
    res = fit(make_cfg("model.name=dmafnet", _params("dmafnet"), "train.run_name=crashy", "tracking.enabled=false",
                       name="resume"))
    assert (Path(res.run_dir) / FAULT_MARKER).is_file()  # the first attempt crashed after epoch 1 ...
    assert res.resumed_from_epoch == 1  # ... and the restarted attempt continued from its checkpoint
    assert [h["epoch"] for h in res.history] == [h["epoch"] for h in reference.history] == list(range(1, 17))
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
