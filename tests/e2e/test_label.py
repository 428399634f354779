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
    _commit,
    _write_parts,
    format_table,
    plot_distribution,
    prediction_schema,
    prediction_store,
    read_class_names,
    read_predictions,
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
    _write_parts(v1, ok[:3], [])
    # an interrupted run leaves parts: they already count as done, but readers see nothing uncommitted
    assert v1.done_keys() == {"v0", "v1", "v2"}
    assert read_predictions(out).num_rows == 0
    _write_parts(v1, ok[3:], failed)
    _commit(v1, _common("1"))
    table = read_predictions(out)
    assert sorted(table.column("video_id").to_pylist()) == ["bad", *[f"v{i}" for i in range(6)]]
    bad = table.filter(pa.compute.equal(table.column("video_id"), "bad")).to_pylist()[0]
    assert bad["status"] == "failed" and bad["reason"] == "corrupt" and bad["top_labels"] == []
    assert bad["model_version"] == "1"

    # version 2 relabels two videos (later): the dedup'ed view shows each video once, v2 where it exists
    v2 = prediction_store(out, None, model_name="m", model_version="2", num_shards=3)
    _write_parts(v2, [_row("v0", "2", t0 + timedelta(days=1), "0202"), _row("v1", "2", t0 + timedelta(days=1))], [])
    _commit(v2, _common("2"))
    latest = {r["video_id"]: r for r in read_predictions(out).to_pylist()}
    assert len(latest) == 7
    assert latest["v0"]["model_version"] == "2" and latest["v0"]["label"] == "0202"
    assert latest["v2"]["model_version"] == "1"
    assert read_predictions(out, latest_only=False).num_rows == 9
    # re-committing is idempotent (no duplicate rows per version)
    _commit(v2, _common("2"))
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
    json.dumps(summary)
