"""Planned resources on a real Ray: defaults that run on this 2-CPU machine, fake GPUs, impossible requests that
fail at once, and the stall watchdog (issue #11, issue #21 items 4 and 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict[str, str]:
    # RAY_ADDRESS=local: the subprocess starts its own Ray (this machine's 2 CPUs), never the session's instance.
    return {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local", "RAYPIPE_LOG_DIR": str(tmp_path / "logs")}


def test_impossible_pool_fails_within_seconds_with_one_line(ray_session, corpus, tmp_path, monkeypatch, capfd):
    from raypipe.cli import main

    monkeypatch.setenv("RAYPIPE_LOG_DIR", str(tmp_path / "logs"))
    t0 = time.monotonic()
    rc = main(["embed", "-c", "test", "--source", str(corpus.videos_dir), "--annotations", str(corpus.annotations_path),
               "--output", str(tmp_path / "features"), "--set", "embed.frame_pool.num_gpus=2"])
    took = time.monotonic() - t0
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    err = [line for line in lines if " ERROR " in line]
    assert rc == 2 and took < 30, (rc, took)
    assert len(err) == 1 and len(lines) <= 3, lines  # the listing line, the one error line
    assert "resource error: embed:" in err[0] and "embed.frame_pool.num_gpus" in err[0] and "GPU: 2" in err[0], err
    assert "GPU 0" in err[0]  # what the cluster has
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").rglob("*.parquet"))


def test_watchdog_ends_a_stalled_embed_and_a_rerun_resumes(ray_session, corpus, test_config_factory, monkeypatch):
    """The encoder actor hangs after 2 batches: the watchdog ends the run with a diagnostic naming the operator
    that holds the stream, keeps what came through, and the rerun (no fault) only does the rest."""
    from raypipe.cli import run_stage
    from raypipe.embed import pipeline
    from raypipe.embed.common import STALL_ENV
    from raypipe.io.shards import ShardStore

    cfg = test_config_factory(
        f"embed.source.uri={corpus.videos_dir}", f"embed.source.annotations={corpus.annotations_path}",
        "embed.source.limit=12", "embed.frames.batch_size=2", "embed.audio.batch_size=2", "embed.text.batch_size=2",
        "embed.write_batch_size=2", "embed.videos_per_block=1", "ray.stall_timeout_s=30", name="stall",
    )
    # 30 s, not less: the clock runs from the stream's start, and on a fresh clone (cold page cache, 2 busy CPUs)
    # the encoder actor's start-up alone (imports, MiniLM weights) took over 12 s, so the watchdog fired before
    # the 2 batches the fault lets through were committed (CI, 2026-12-01).
    monkeypatch.setenv(STALL_ENV, "2")
    with pytest.raises(pipeline.StallError) as err:
        pipeline.embed_videos(cfg)
    msg = str(err.value)
    assert "embed: stalled, no progress for" in msg and "ray.stall_timeout_s=30" in msg, msg
    # the actor that hangs: the inline pool on this small session (embed.inline_decode auto), else the fused one
    assert ("InlineEmbedder" in msg or "FusedEncoder" in msg) and "rerun to resume" in msg, msg
    # read-only use: done_keys reads the manifest, the schema is only for writing
    done = ShardStore(cfg.embed.output, cfg.storage, num_shards=cfg.embed.num_shards, schema=pa.schema([])).done_keys()
    assert 0 < len(done) < 12, done
    assert run_stage("embed", lambda c: pipeline.embed_videos(c) and 0, cfg) == 4  # exit code of a stall
    monkeypatch.delenv(STALL_ENV)
    # The resume must finish, not stall: a generous clock, since a fresh actor's start-up alone can pass 30 s on
    # two loaded cores (CI, 2026-12-02: the healthy rerun was ended before its actor had loaded its weights).
    cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"stall_timeout_s": 300.0})})
    summary = pipeline.embed_videos(cfg)
    assert summary["videos_skipped"] >= len(done) and summary["videos_processed"] < 12
    assert summary["rows_total"] + summary["errors_total"] == summary["videos_listed"] == 12


@pytest.mark.own_cluster
def test_default_config_embed_completes_on_this_machine(corpus, tmp_path):
    """Issue #11: `raypipe embed --source --annotations --output` with no preset listed the videos and waited forever
    on 2 CPUs (three pools asked for 3). Now it plans for the machine and finishes."""
    out = tmp_path / "features"
    cmd = [sys.executable, "-m", "raypipe.cli", "embed", "--source", str(corpus.videos_dir),
           "--annotations", str(corpus.annotations_path), "--output", str(out), "--set", "embed.source.limit=6"]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_total"] + summary["errors_total"] == summary["videos_listed"] == 6
    lines = [s for s in proc.stderr.splitlines() if s.strip()]
    assert len(lines) <= 8 and all(" raypipe." in s for s in lines), lines  # quiet: raypipe's own lines only
    log_files = list((tmp_path / "logs").glob("embed-*.log"))
    assert log_files and "resource plan" in log_files[0].read_text()


FAKE_GPU = textwrap.dedent("""
    import json, sys
    import ray
    from raypipe.config import load_config
    from raypipe.embed.pipeline import embed_videos
    from raypipe.label import label_videos

    ray.init(num_cpus=2, num_gpus=1, configure_logging=False, log_to_driver=False)  # a fake GPU on a CPU machine
    base, out = sys.argv[1], sys.argv[2]
    auto = ["embed.fuse_encoders=auto", "embed.decode_num_cpus=auto", "embed.source.limit=6"] + [
        f"embed.{p}={{min_size: 1}}" for p in ("frame_pool", "audio_pool", "text_pool")]
    embed = embed_videos(load_config(base, auto + [f"embed.output={out}/features"]))
    label = label_videos(load_config(base, auto + [f"label.output={out}/labels"]))
    print(json.dumps({"embed": embed, "label": {k: label[k] for k in ("labelled", "failed", "to_label")}}))
""")


@pytest.mark.own_cluster
def test_fake_gpu_default_embed_and_label_finish(registered_model, tmp_path):
    """Issue #21 item 4: with one (fake) GPU the three encoder pools and the classifier share it instead of each
    waiting for a whole GPU."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(registered_model.model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-c", FAKE_GPU, str(cfg_path), str(tmp_path)], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["embed"]["rows_total"] + got["embed"]["errors_total"] == got["embed"]["videos_listed"] == 6
    assert got["label"]["labelled"] + got["label"]["failed"] == got["label"]["to_label"] == 6
    # the planned GPU use is in the shards' fingerprint (issue #21 item 5), so CPU features would not mix in
    import pyarrow.parquet as pq

    from raypipe.schema import ShardInfo

    shard = next(p for p in sorted((tmp_path / "features").glob("*.parquet")) if not p.name.startswith("errors"))
    info = ShardInfo.from_metadata(pq.read_schema(shard).metadata)
    assert info.embedders["compute"] == {"frames": "gpu-fp16", "audio": "gpu-fp16", "text": "gpu-fp16"}


def test_doctor_reports_everything_without_running_a_stage(ray_session, test_config_factory, tmp_path):
    from raypipe.doctor import diagnose

    cfg = test_config_factory(f"embed.source.uri={tmp_path}", name="doctor")
    rows = {name: (ok, detail) for name, ok, detail in diagnose(cfg)}
    for name in ("ray", "resources", "gpus", "mlflow", "codecs", "plan embed", "plan label", "plan train", "plan tune"):
        assert name in rows, (name, rows)
    assert rows["resources"][0] and "CPU 4" in rows["resources"][1]
    assert rows["mlflow"][0] and "reachable" in rows["mlflow"][1]
    assert rows["codecs"][0] and "h264" in rows["codecs"][1] and "aac" in rows["codecs"][1]
    assert all(rows[f"plan {s}"][0] for s in ("embed", "label", "train", "tune")), rows
    assert "embed.fuse_encoders=True" in rows["plan embed"][1]  # the test preset fuses
    bad = test_config_factory("tracking.tracking_uri=http://127.0.0.1:9", "embed.frame_pool.num_cpus=64", name="doctor")
    rows = {name: (ok, detail) for name, ok, detail in diagnose(bad)}
    assert not rows["mlflow"][0] and not rows["plan embed"][0] and "PROBLEM" in rows["plan embed"][1]
