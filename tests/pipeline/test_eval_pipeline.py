"""``raypipe eval`` over a grid on the session's registered CAV-Net: two corruptions, a bad model URI in the list,
zero-shot scores against the label stage's class-name embeddings, one MLflow parent run with a child per row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raypipe.config.corruption import CorruptionConfig


def test_eval_grid_on_the_registered_cavnet_with_zero_shot(registered_model, tmp_path: Path) -> None:
    from raypipe.classifier import load_classifier
    from raypipe.data import evaluation_rows
    from raypipe.evaluate import run
    from raypipe.label import embed_class_names, read_class_names
    from raypipe.metrics import compute_metrics, topk_accuracy

    cfg = registered_model.model_copy(deep=True)
    good, bad = cfg.label.model_uri, "models:/no-such-model@champion"
    cfg.eval.models = [good, bad]
    cfg.eval.corruptions = [CorruptionConfig(), CorruptionConfig(kind="drop_features", p=0.5, seed=1)]
    cfg.eval.zero_shot = True
    cfg.eval.output = str(tmp_path / "grid.json")
    assert run(cfg) == 1  # the bad URI: its rows say why, the registered model is still scored

    rows = json.loads((tmp_path / "grid.json").read_text())["rows"]
    assert [(r["model_uri"], r["corruption"]["kind"], r["status"]) for r in rows] == [
        (good, "none", "ok"), (good, "drop_features", "ok"), (bad, "none", "error"), (bad, "drop_features", "error")]
    assert "no-such-model" in rows[2]["error"]
    clean, dropped = rows[0], rows[1]
    assert clean["split"] == "val"  # the test preset trains without a test split
    # Reference: the val rows scored by hand, with the class names embedded as `raypipe label` embeds them.
    tracking = cfg.tracking.tracking_uri
    clf = load_classifier(good, cfg.storage, tracking_uri=tracking)
    data = evaluation_rows(cfg.train.data, task="single_label", classes=clf.classes,
                           val_fraction=clf.meta["val_fraction"], split="val", storage=cfg.storage)
    feats = {k: v for k, v in data.arrays.items() if k not in ("video_id", "label")}
    expected = compute_metrics(clf.predict_proba(feats), data.targets, task="single_label", classes=clf.classes,
                               prefix="val/")
    names = read_class_names(cfg.label.class_names)
    zs = clf.zero_shot_proba(feats, embed_class_names(cfg, {c: names[c] for c in clf.classes}))
    acc = topk_accuracy(zs, data.targets, (1, 5))
    expected |= {"zs/top1": acc[1], "zs/top5": acc[5], "zs/n": float(len(data.targets))}
    assert clean["metrics"] == pytest.approx(expected, abs=1e-6) and clean["rows"] == len(data.targets)
    assert {"val/f_sco", "val/hit@1", "val/hit@2", "val/top1", "val/top5", "val/gap@20", "val/map"} <= set(clean["metrics"])
    assert dropped["metrics"]["val/map"] != clean["metrics"]["val/map"]  # half the frames and audio gone
    assert np.isfinite(dropped["metrics"]["zs/top1"])

    client = MlflowClient(tracking)
    parent = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                filter_string="tags.`raypipe.stage` = 'eval' and attributes.run_name = 'eval-grid'")[0]
    assert parent.info.status == "FAILED"  # one model of the grid could not be scored
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.params["corruption.kind"] for c in children) == ["drop_features", "none"]
    by_kind = {c.data.params["corruption.kind"]: c for c in children}
    assert by_kind["none"].data.metrics["zs/top1"] == pytest.approx(clean["metrics"]["zs/top1"])
