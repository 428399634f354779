"""The nightly labelling job, end to end: corpus -> embed -> train -> register -> label, incremental reruns.

The first tests check the prediction store on its own (no Ray); the rest share one trained, registered model
(module fixture) and label the session corpus with it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from raypipe.label import (
    commit_predictions,
    format_table,
    plot_distribution,
    prediction_schema,
    prediction_store,
    read_class_names,
    read_predictions,
    write_prediction_parts,
)


def _row(video_id: str, version: str, when: datetime, label: str = "0101") -> dict[str, Any]:
    return {
        "video_id": video_id, "source_uri": f"/v/{video_id}.mp4", "status": "ok", "reason": None, "error": None,
        "label": label, "label_name": None, "label_l1": label[:2], "score": 0.9, "top_labels": [label],
        "top_scores": [0.9], "mode": "classify", "model_name": "m", "model_version": version, "model_uri": "x",
        "embedders": "{}", "run_id": f"run-{version}", "labelled_at": when,
    }


def _common(version: str) -> dict[str, Any]:
    return {"mode": "classify", "model_name": "m", "model_version": version, "model_uri": f"models:/m/{version}",
            "run_id": f"run-{version}", "embedders": "{}"}


def test_class_names_file(tmp_path: Path) -> None:
    p = tmp_path / "class_names.txt"
    p.write_text("# comment\n0101\tbeach sports\n0102\tmountain sports\n\nplain name\n")
    assert read_class_names(str(p)) == {"0101": "beach sports", "0102": "mountain sports", "plain name": "plain name"}
    p.write_text("0101\ta\n0101\tb\n")
    with pytest.raises(ValueError, match="duplicate class '0101'"):
        read_class_names(str(p))
    with pytest.raises(FileNotFoundError, match="label.class_names"):
        read_class_names(str(tmp_path / "missing.txt"))


def test_prediction_store_latest_version_wins_and_failures_are_rows(tmp_path: Path) -> None:
    out = str(tmp_path / "labels")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    v1 = prediction_store(out, None, model_name="m", model_version="1", num_shards=3)
    ok = [_row(f"v{i}", "1", t0) for i in range(6)]
    failed = [{"video_id": "bad", "source_uri": "/v/bad.mp4", "stage": "decode", "reason": "corrupt",
               "error": "moov atom not found"}]
    write_prediction_parts(v1, ok[:3], [])
    # an interrupted run leaves parts: they already count as done, but readers see nothing uncommitted
    assert v1.done_keys() == {"v0", "v1", "v2"}
    assert read_predictions(out).num_rows == 0
    write_prediction_parts(v1, ok[3:], failed)
    commit_predictions(v1, _common("1"))
    table = read_predictions(out)
    assert sorted(table.column("video_id").to_pylist()) == ["bad", *[f"v{i}" for i in range(6)]]
    bad = table.filter(pa.compute.equal(table.column("video_id"), "bad")).to_pylist()[0]
    assert bad["status"] == "failed" and bad["reason"] == "corrupt" and bad["top_labels"] == []
    assert bad["model_version"] == "1"

    # version 2 relabels two videos (later): the dedup'ed view shows each video once, v2 where it exists
    v2 = prediction_store(out, None, model_name="m", model_version="2", num_shards=3)
    write_prediction_parts(v2, [_row("v0", "2", t0 + timedelta(days=1), "0202"), _row("v1", "2", t0 + timedelta(days=1))], [])
    commit_predictions(v2, _common("2"))
    latest = {r["video_id"]: r for r in read_predictions(out).to_pylist()}
    assert len(latest) == 7
    assert latest["v0"]["model_version"] == "2" and latest["v0"]["label"] == "0202"
    assert latest["v2"]["model_version"] == "1"
    assert read_predictions(out, latest_only=False).num_rows == 9
    # re-committing is idempotent (no duplicate rows per version)
    commit_predictions(v2, _common("2"))
    assert read_predictions(out, latest_only=False).num_rows == 9


def test_report_table_and_plot() -> None:
    summary = {
        "run_id": "r1", "model": {"name": "m", "version": "3"}, "mode": "classify", "videos_seen": 12,
        "skipped": 2, "labelled": 8, "failed": 2, "failure_rate": 0.2, "max_failure_rate": 0.25,
        "failed_by_reason": {"corrupt": 1, "no_video_stream": 1}, "label_distribution": {"0101": 5, "0202": 3},
        "class_names": {"0101": "beach sports"}, "status": "ok",
    }
    text = format_table(summary)
    assert "videos seen" in text and "12" in text and "corrupt" in text and "beach sports" in text
    png = plot_distribution(summary["label_distribution"], summary["class_names"], "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert prediction_schema().field("labelled_at").type == pa.timestamp("us", tz="UTC")
    import re

    for pattern in (r"^videos seen\s+12$", r"^skipped \(already done\)\s+2$", r"^labelled\s+8$",
                    r"^failed\s+2\s+\(20\.0%, threshold 25\.0%\)$", r"^\s+corrupt\s+1$", r"^\s+0101\s+beach sports\s+5$"):
        assert re.search(pattern, text, re.M), (pattern, text)  # every count on its own row, with its number


# ------------------------------------------------------------------------------------- end to end with Ray


def _with(cfg: Any, **sections: dict[str, Any]) -> Any:
    """A copy of ``cfg`` with some keys changed, validated like any config."""
    from raypipe.config import validate_config
    from raypipe.config.base import deep_merge

    return validate_config(deep_merge(cfg.model_dump(exclude_unset=True), sections))


def _summary(cfg: Any) -> dict[str, Any]:
    return json.loads((Path(cfg.label.output) / "reports" / "latest" / "summary.json").read_text())


@pytest.fixture(scope="module")
def first_run(ray_session, registered_model, corpus):
    """Label the session corpus with the registered model once (exit code, cfg)."""
    from raypipe.label import run

    return run(registered_model), registered_model


def test_labels_agree_with_the_classifier_and_failures_are_rows(first_run, corpus) -> None:
    import numpy as np

    from raypipe.classifier import load_classifier
    from raypipe.io.shards import read_shards
    from raypipe.tracking import make_client

    rc, cfg = first_run
    assert rc == 0
    bad_fail = {b.video_id for b in corpus.bad if not b.expect_ok}
    all_ids = {v.video_id for v in corpus.videos} | {b.video_id for b in corpus.bad}
    s = _summary(cfg)
    assert (s["videos_seen"], s["skipped"], s["failed"]) == (len(all_ids), 0, len(bad_fail))
    assert s["labelled"] == len(all_ids) - len(bad_fail)
    assert s["status"] == "ok" and 0 < s["failure_rate"] <= cfg.label.max_failure_rate
    assert sum(s["failed_by_reason"].values()) == len(bad_fail)
    assert sum(s["label_distribution"].values()) == s["labelled"]
    report_dir = Path(cfg.label.output) / "reports" / "latest"
    assert (report_dir / "label_distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert "videos seen" in (report_dir / "summary.txt").read_text()

    preds = {r["video_id"]: r for r in read_predictions(cfg.label.output).to_pylist()}
    assert set(preds) == all_ids
    failed = {v for v, r in preds.items() if r["status"] == "failed"}
    assert failed == bad_fail
    assert all(preds[v]["reason"] and preds[v]["error"] for v in failed)

    # The same model on the training shards (the embed job's features of the same videos) gives the same labels.
    clf = load_classifier(cfg.label.model_uri, tracking_uri=cfg.tracking.tracking_uri)
    table, _ = read_shards(cfg.train.data)
    proba = clf.predict_proba({c: table.column(c) for c in table.column_names})  # (N, C)
    ids = table.column("video_id").to_pylist()
    assert set(ids) == all_ids - bad_fail  # the training shards hold exactly the videos that decode
    k = cfg.label.top_k
    checked = 0
    for i, vid in enumerate(ids):
        row = preds[vid]
        assert row["status"] == "ok" and row["model_version"] == clf.model_version
        order = np.argsort(-proba[i], kind="stable")
        np.testing.assert_allclose(row["top_scores"], proba[i][order[:k]], atol=2e-3)
        if proba[i][order[0]] - proba[i][order[1]] > 5e-3:  # skip near-ties, where fp16 rounding may swap
            assert row["label"] == clf.classes[order[0]]
            assert row["label_l1"] == row["label"][:2]
            checked += 1
    assert checked >= len(ids) // 2

    # the run is in MLflow
    client = make_client(cfg.tracking)
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        filter_string=f"tags.`raypipe.label_run` = '{s['run_id']}'",
    )
    assert len(runs) == 1 and runs[0].data.metrics["failed"] == len(bad_fail)


def test_rerun_skips_everything(first_run) -> None:
    from raypipe.label import label_videos

    _, cfg = first_run
    s = label_videos(cfg)
    assert s["to_label"] == 0 and s["skipped"] == s["videos_seen"] and s["labelled"] == s["failed"] == 0
    assert len(read_predictions(cfg.label.output, latest_only=False)) == s["videos_seen"]


def test_retry_failed_reruns_only_the_failed_videos(first_run, corpus) -> None:
    """label.retry_failed=true: the videos that failed under this model version are tried again (and, corrupt
    still, fail again, recorded once); every labelled video is skipped."""
    from raypipe.label import label_videos

    _, cfg = first_run
    bad_fail = {b.video_id for b in corpus.bad if not b.expect_ok}
    before = read_predictions(cfg.label.output, latest_only=False).num_rows
    s = label_videos(_with(cfg, label={"retry_failed": True}))
    assert (s["to_label"], s["failed"], s["labelled"]) == (len(bad_fail), len(bad_fail), 0)
    assert s["skipped"] == s["videos_seen"] - len(bad_fail)
    table = read_predictions(cfg.label.output, latest_only=False)
    assert table.num_rows == before  # the failures are recorded once, not once per try
    failed = [r for r in table.to_pylist() if r["status"] == "failed"]
    assert {r["video_id"] for r in failed} == bad_fail and len(failed) == len(bad_fail)


def test_model_trained_on_other_embedders_is_refused(registered_model, tmp_path) -> None:
    """Features from other encoders than the model was trained on would be nonsense to it: refused up front,
    naming what differs, before anything is written."""
    from raypipe.label import label_videos

    other = _with(registered_model, embed={"frames": {"image_size": 40}}, label={"output": str(tmp_path / "o")})
    trained = registered_model.embed.frames.image_size
    with pytest.raises(ValueError, match=rf"frames\.image_size: model trained on {trained}, embed\.\* gives 40"):
        label_videos(other)
    assert not (tmp_path / "o").exists()


def test_zero_shot_mode_labels_by_similarity_to_the_class_names(registered_model, tmp_path) -> None:
    """Open vocabulary (CAV-Net): the labels are the class names most similar to each video's projection, the
    same as scoring the training shards directly against the embedded names."""
    import numpy as np

    from raypipe.classifier import load_classifier
    from raypipe.io.shards import read_shards
    from raypipe.label import embed_class_names, label_videos, read_class_names

    cfg = _with(registered_model, embed={"source": {"limit": 8}},
                label={"mode": "zero_shot", "output": str(tmp_path / "zs")})
    s = label_videos(cfg)
    assert s["labelled"] + s["failed"] == 8 and s["labelled"] > 0
    preds = [r for r in read_predictions(cfg.label.output).to_pylist() if r["status"] == "ok"]
    names = read_class_names(cfg.label.class_names, cfg.storage)
    assert all(r["mode"] == "zero_shot" and r["label"] in names for r in preds)

    clf = load_classifier(cfg.label.model_uri, tracking_uri=cfg.tracking.tracking_uri)
    table, _ = read_shards(cfg.train.data)
    ids = table.column("video_id").to_pylist()
    proba = clf.zero_shot_proba({c: table.column(c) for c in table.column_names},
                                embed_class_names(cfg, names))  # (N, C')
    codes = list(names)
    checked = 0
    assert preds and all(r["video_id"] in ids for r in preds)  # every labelled video is in the training shards
    for r in preds:
        p = proba[ids.index(r["video_id"])]
        order = np.argsort(-p, kind="stable")
        np.testing.assert_allclose(r["top_scores"], p[order[: cfg.label.top_k]], atol=2e-3)
        if p[order[0]] - p[order[1]] > 5e-3:
            assert r["label"] == codes[order[0]]
            checked += 1
    assert checked >= len(preds) // 2, (checked, len(preds))  # near-ties aside, every label is checked


def test_new_model_version_relabels_all_and_threshold_fails_the_job(first_run, corpus) -> None:
    from raypipe.label import run
    from raypipe.tracking import make_client

    _, cfg = first_run
    client = make_client(cfg.tracking)
    name, alias = cfg.tracking.registered_model_name, cfg.tracking.champion_alias  # what the label job uses
    old = client.get_model_version_by_alias(name, alias)
    new = client.create_model_version(name, source=old.source, run_id=old.run_id)
    client.set_registered_model_alias(name, alias, new.version)
    try:
        tiny = _with(cfg, label={"max_failure_rate": 0.01})
        assert run(tiny) == tiny.label.failure_exit_code == 3
    finally:
        client.set_registered_model_alias(name, alias, old.version)
    s = _summary(cfg)
    n = len(corpus.videos) + len(corpus.bad)
    assert s["model"]["version"] == str(new.version) and s["status"] == "too_many_failures"
    assert (s["skipped"], s["to_label"]) == (0, n)
    latest = read_predictions(cfg.label.output).to_pylist()
    assert len(latest) == n and {r["model_version"] for r in latest} == {str(new.version)}
    everything = read_predictions(cfg.label.output, latest_only=False)
    assert everything.num_rows == 2 * n
    # same weights under a new version: the same labels
    by_version: dict[str, dict[str, Any]] = {}
    for r in everything.to_pylist():
        by_version.setdefault(r["model_version"], {})[r["video_id"]] = r["label"]
    assert by_version[str(old.version)] == by_version[str(new.version)]


def test_interrupted_run_resumes_and_new_videos_are_labelled_once(
    ray_session, registered_model, tmp_path_factory, monkeypatch, assert_injected_actor_death
) -> None:
    from raypipe.config import CorpusConfig
    from raypipe.corpus import generate_corpus
    from raypipe.embed.common import FAULT_ENV
    from raypipe.label import label_videos

    root = tmp_path_factory.mktemp("incremental")
    gen = {"out": str(root), "bad_inputs": False, "min_duration_s": 2.0, "max_duration_s": 5.0, "long_fraction": 0.0}
    info = generate_corpus(CorpusConfig(videos=6, seed=11, id_prefix="old", **gen))
    cfg = _with(
        registered_model,
        embed={"source": {"uri": str(info.videos_dir), "annotations": str(info.annotations_path)},
               "text": {"batch_size": 2}},
        label={"output": str(root / "labels"), "batch_size": 1, "write_batch_size": 1},
    )
    # The text encoder (the last embed stage) dies on its third batch of 2 (of 3): the stream fails part-way; rows
    # it had already returned reach the prediction parts (write_batch_size=1). It lingers 20 s before dying so the
    # classifier actor (an MLflow model load) has started and its rows reached the driver; with a crash on the
    # second batch and the default 6 s, no prediction had been committed in two runs on a busy 2-CPU host.
    monkeypatch.setenv(FAULT_ENV, "2:20")
    with pytest.raises(Exception) as crash:  # noqa: B017 - checked below: it must be the injected actor death
        label_videos(cfg)
    assert_injected_actor_death(crash.value)
    monkeypatch.delenv(FAULT_ENV)
    from raypipe.label import prediction_store

    store = prediction_store(cfg.label.output, cfg.storage, model_name=registered_model.tracking.registered_model_name,
                             model_version=_summary_version(registered_model), num_shards=cfg.label.num_shards)
    done_before = store.done_keys()
    # The run stopped early, after committing some predictions to parts (the injector lingers so that the rows
    # the text encoder returned reach them): a resume that relabelled everything would fail the skip count below.
    assert 1 <= len(done_before) < 6, done_before
    assert read_predictions(cfg.label.output).num_rows == 0, "readers see the crashed run's rows"
    s = label_videos(cfg)
    assert s["skipped"] == len(done_before) and s["labelled"] + s["skipped"] == 6 and s["failed"] == 0, (
        f"resume did not reuse the {len(done_before)} predictions written before the crash: {s}")
    rows = read_predictions(cfg.label.output, latest_only=False).column("video_id").to_pylist()
    assert sorted(rows) == sorted(v.video_id for v in info.videos)  # each exactly once

    new = generate_corpus(CorpusConfig(videos=10, seed=12, id_prefix="new", **gen))
    new_ids = {v.video_id for v in new.videos if v.batch == "new"}
    assert len(new_ids) == 10
    s = label_videos(cfg)
    assert (s["videos_seen"], s["skipped"], s["to_label"], s["labelled"]) == (16, 6, 10, 10)
    latest = read_predictions(cfg.label.output, latest_only=False).to_pylist()
    assert len(latest) == 16 and len({r["video_id"] for r in latest}) == 16
    assert {r["video_id"] for r in latest if r["run_id"] == s["run_id"]} == new_ids


def _summary_version(cfg: Any) -> str:
    from raypipe.tracking import make_client

    client = make_client(cfg.tracking)
    return str(client.get_model_version_by_alias(cfg.tracking.registered_model_name,
                                             cfg.tracking.champion_alias).version)


def test_force_drops_this_versions_predictions_and_labels_again(first_run) -> None:
    """label.force=true: the version's earlier predictions are dropped and everything listed is labelled again
    (runs last: it rewrites the first run's output)."""
    from raypipe.label import label_videos

    _, cfg = first_run
    version = _summary_version(cfg)
    forced = _with(cfg, embed={"source": {"limit": 4}}, label={"force": True})
    s = label_videos(forced)
    assert (s["videos_seen"], s["skipped"], s["to_label"]) == (4, 0, 4)
    rows = [r for r in read_predictions(cfg.label.output, latest_only=False).to_pylist() if r["model_version"] == version]
    assert len(rows) == 4 and {r["run_id"] for r in rows} == {s["run_id"]}  # only this run's rows are left
