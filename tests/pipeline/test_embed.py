"""The embedding job on the session corpus: rows, errors, features that keep the label evidence, idempotence,
crash recovery with exact resume, and S3 in and out (moto)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from raypipe.embed.common import FAULT_ENV
from raypipe.io.shards import read_errors, read_manifest, read_shards

EXPECTED_REASON = {
    "zero_byte": "empty_file",
    "truncated": "truncated",
    "random_bytes": "corrupt",
    "no_video_stream": "no_video_stream",
    "audio_only": "no_video_stream",
}


def _rows(cfg) -> dict[str, dict]:
    table, _ = read_shards(cfg.embed.output, cfg.storage)
    return {r["video_id"]: r for r in table.to_pylist()}


def _file_digests(root: str) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).iterdir())
        if p.is_file() and p.name != "summary.json"
    }


def test_every_good_video_one_row_every_bad_one_error(feature_shards, corpus) -> None:
    cfg, summary = feature_shards
    rows = _rows(cfg)
    table, info = read_shards(cfg.embed.output)
    assert table.num_rows == len(rows)  # one row per video
    good = {v.video_id: v for v in corpus.videos} | {b.video_id: b for b in corpus.bad if b.expect_ok}
    assert set(rows) == set(good)
    t, dv, da, dt = info.max_frames, info.frame_dim, info.audio_dim, info.text_dim
    for spec in corpus.videos:
        r = rows[spec.video_id]
        expected = min(32, math.ceil(spec.duration_s - 1e-6))  # frames at 0, 1, 2, ... s before the end
        assert r["num_frames"] == expected, (spec.video_id, spec.duration_s, r["duration_s"])
        assert r["duration_s"] == pytest.approx(spec.duration_s, abs=0.1)
        mask = np.array(r["frame_mask"])
        assert mask.shape == (t,) and mask.sum() == expected and mask[:expected].all()
        emb = np.array(r["frame_emb"], np.float32).reshape(t, dv)
        assert np.abs(emb[:expected]).sum(1).min() > 0 and not emb[expected:].any()
        assert np.all(np.diff(np.array(r["frame_times"][:expected])) > 0.5)
        amask = np.array(r["audio_mask"])
        assert amask.any() == spec.has_audio and amask.sum() <= expected
        assert np.array(r["audio_emb"], np.float32).reshape(t, da)[~amask].sum() == 0
        assert len(r["input_ids"]) == info.text_len and len(r["text_emb"]) == dt
        assert r["label"] == spec.label and r["label_l1"] == spec.label_l1
        assert r["text"] and r["text"].split()[0] in r["title"] + " " + r["asr"]
    errors = {e["video_id"]: e for e in read_errors(cfg.embed.output).to_pylist()}
    assert set(errors) == {b.video_id for b in corpus.bad if not b.expect_ok}
    for b in corpus.bad:
        if not b.expect_ok:
            assert errors[b.video_id]["reason"] == EXPECTED_REASON[b.kind], errors[b.video_id]
            assert errors[b.video_id]["error"] and errors[b.video_id]["stage"] == "decode"
    assert summary["videos_ok"] == len(rows) and summary["videos_failed"] == len(errors)
    assert sum(summary["failed_by_reason"].values()) == len(errors)
    assert summary["frames"] == sum(r["num_frames"] for r in rows.values())
    assert info.tokenizer["vocab_size"] == 30522 and info.tokenizer["mask_token_id"] == 103
    assert info.embedders["frames"]["dim"] == dv and info.config_hash == read_manifest(cfg.embed.output)["config_hash"]
    assert (Path(cfg.embed.output) / "summary.json").is_file()


def test_random_encoders_keep_the_label_evidence(feature_shards, corpus) -> None:
    """Frames must still show level-1 (colour/shape) and audio the level-2 index (tone), else fusion cannot win."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg, _ = feature_shards
    rows = _rows(cfg)
    _, info = read_shards(cfg.embed.output)
    fx, fy, ax, ay = [], [], [], []
    for spec in corpus.videos:
        r = rows[spec.video_id]
        m = np.array(r["frame_mask"])
        fx.append(np.array(r["frame_emb"], np.float32).reshape(-1, info.frame_dim)[m].mean(0))
        fy.append(spec.frame_l1)
        am = np.array(r["audio_mask"])
        if spec.audio_index is not None and am.any():
            a = np.array(r["audio_emb"], np.float32).reshape(-1, info.audio_dim)[am]
            ax.append(np.concatenate([a.mean(0), a.max(0)]))
            ay.append(spec.audio_index)

    def probe(x, y) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        return float(cross_val_score(model, np.array(x), np.array(y), cv=3).mean())

    frame_acc, audio_acc = probe(fx, fy), probe(ax, ay)
    assert frame_acc >= 0.8, frame_acc  # chance: 1 / num_level1
    assert audio_acc >= 0.8, audio_acc  # chance: 1 / num_level2_per_level1


def test_rerun_does_no_work_and_output_is_identical(feature_shards) -> None:
    from raypipe.embed.pipeline import run

    cfg, _ = feature_shards
    before = _file_digests(cfg.embed.output)
    assert run(cfg) == 0
    import json

    summary = json.loads((Path(cfg.embed.output) / "summary.json").read_text())
    assert summary["videos_processed"] == 0 and summary["videos_skipped"] == summary["videos_listed"]
    assert _file_digests(cfg.embed.output) == before
    assert not (Path(cfg.embed.output) / "_parts").exists() or not list((Path(cfg.embed.output) / "_parts").rglob("*.parquet"))


def test_changed_feature_config_is_refused(feature_shards, test_config_factory) -> None:
    from raypipe.embed.pipeline import embed_videos

    cfg, _ = feature_shards
    other = cfg.model_copy(deep=True)
    other.embed.frames.image_size = 40
    with pytest.raises(ValueError, match="embed.overwrite"):
        embed_videos(other)


def test_crash_then_resume_gives_exactly_the_same_rows(
    feature_shards, corpus, test_config_factory, monkeypatch, assert_injected_actor_death
) -> None:
    from raypipe.embed.pipeline import embed_videos

    ref_cfg, _ = feature_shards
    cfg = test_config_factory(
        f"embed.source.uri={corpus.videos_dir}", f"embed.source.annotations={corpus.annotations_path}",
        "embed.source.limit=10", "embed.text.batch_size=2", "embed.write_batch_size=2", name="fault",
    )
    monkeypatch.setenv(FAULT_ENV, "3")  # the encoder actor (fused: batches of 2) dies on its fourth batch
    with pytest.raises(Exception) as crash:  # noqa: B017 - checked below: it must be the injected actor death
        embed_videos(cfg)
    assert_injected_actor_death(crash.value)
    kept = _part_ids(cfg.embed.output)
    assert not (Path(cfg.embed.output) / "_manifest.json").exists(), "the crashed run committed a manifest"
    # The injector lingers after its third batch so that the batches it returned reach the part writer: work was
    # committed before the crash, and the rerun must reuse all of it (a rerun that redid everything would fail).
    assert 2 <= len(kept) < 10, kept
    monkeypatch.delenv(FAULT_ENV)
    summary = embed_videos(cfg)
    assert summary["videos_skipped"] == len(kept) and summary["videos_processed"] == 10 - len(kept), (
        f"resume did not reuse the {len(kept)} videos committed before the crash: {summary}")
    rows = _rows(cfg)
    table, _ = read_shards(cfg.embed.output)
    assert table.num_rows == len(rows) == 10  # every video exactly once
    reference = _rows(ref_cfg)
    for vid, row in rows.items():
        # bit-identical to the uninterrupted session run, made by three encoder pools instead of one fused pool
        assert row == reference[vid], vid


def _part_ids(root: str) -> set[str]:
    """Video ids in the part files a crashed run left (its committed-but-unmerged work)."""
    import pyarrow.parquet as pq

    return {v for p in Path(root).rglob("_parts/shard-*/*.parquet") for v in pq.read_table(p, columns=["video_id"])
            .column(0).to_pylist()}


def test_s3_in_and_out(feature_shards, corpus, moto_s3, test_config_factory) -> None:
    from raypipe.embed.pipeline import embed_videos
    from raypipe.io.fs import resolve

    ref_cfg, _ = feature_shards
    fs, _ = resolve(f"s3://{moto_s3.bucket}", moto_s3.storage)
    picked = [v for v in corpus.videos[:4]] + [b for b in corpus.bad if b.kind in ("zero_byte", "random_bytes")]
    for spec in picked:
        fs.put(str(spec.path), f"{moto_s3.bucket}/videos/{spec.path.name}")
    fs.put(str(corpus.annotations_path), f"{moto_s3.bucket}/meta/annotations.json")
    out = f"s3://{moto_s3.bucket}/features"
    cfg = test_config_factory(
        f"embed.source.uri=s3://{moto_s3.bucket}/videos",
        f"embed.source.annotations=s3://{moto_s3.bucket}/meta/annotations.json",
        f"embed.output={out}", f"storage.endpoint_url={moto_s3.endpoint_url}",
        # inline actors of 2 CPUs, each decoding, encoding and writing two batches at once in threads
        # (embed.inline_calls auto): the same rows as the three-pool reference, S3 read and written from threads
        "embed.inline_decode=true", "embed.frame_pool.num_cpus=2", "embed.text.batch_size=2",
        name="s3",
    )
    summary = embed_videos(cfg)
    assert summary["videos_ok"] == 4 and summary["failed_by_reason"] == {"corrupt": 1, "empty_file": 1}
    assert fs.exists(f"{moto_s3.bucket}/features/_manifest.json")
    rows = _rows(cfg)
    reference = _rows(ref_cfg)
    for spec in picked[:4]:
        r = rows[spec.video_id]
        assert r["source_uri"] == f"s3://{moto_s3.bucket}/videos/{spec.path.name}"
        for col in ("num_frames", "frame_emb", "audio_emb", "text_emb", "input_ids", "label"):
            assert r[col] == reference[spec.video_id][col], col
    assert len(read_errors(out, cfg.storage)) == 2
    assert embed_videos(cfg)["videos_processed"] == 0


def test_growing_corpus_only_embeds_new_videos(feature_shards, corpus, test_config_factory) -> None:
    """Deterministic resume: a second run over more videos embeds only the new ones and re-commits shards."""
    from raypipe.embed.pipeline import embed_videos

    ref_cfg, _ = feature_shards
    cfg = test_config_factory(
        f"embed.source.uri={corpus.videos_dir}", f"embed.source.annotations={corpus.annotations_path}",
        "embed.source.limit=4", name="grow",
    )
    assert embed_videos(cfg)["videos_processed"] == 4
    cfg.embed.source.limit = 7
    summary = embed_videos(cfg)
    assert summary["videos_skipped"] == 4 and summary["videos_processed"] == 3
    rows = _rows(cfg)
    reference = _rows(ref_cfg)
    assert len(rows) == 7 and all(rows[v] == reference[v] for v in rows)
