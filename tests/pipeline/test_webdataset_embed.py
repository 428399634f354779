"""WebDataset tar shards as the embed source, from a local folder and from S3 (moto): the rows equal those of the
loose files of the same corpus (the session's three-pool shards), and a corrupt member, a truncated tar, a failed
download and a key repeated across shards each end as one row or error row; a shard added later is picked up."""

from __future__ import annotations

import posixpath
import tarfile
from pathlib import Path

from raypipe.corpus_webdataset import corpus_samples, failed_download_key
from raypipe.io.fs import resolve
from raypipe.io.shards import read_errors, read_shards
from raypipe.io.webdataset import write_shard


def _rows(cfg) -> dict[str, dict]:
    table, _ = read_shards(cfg.embed.output, cfg.storage)
    return {r["video_id"]: r for r in table.to_pylist()}


def _build_shards(corpus, fs, folder: str) -> dict[str, list[str]]:
    """Three shards: 00000 = 2 good + random bytes (a corrupt member) + a failed download; 00001 = 1 good + a
    zero-byte member + the first video again (its key repeats); 00002 = 1 good + 1 whose video member the tar cuts
    in half. Returns the expected ids: ok, and failed by reason. ``00003`` (2 more good) is returned for later."""
    samples = {s["__key__"]: s for s in corpus_samples(corpus, corpus.videos[0].batch)}
    g = [v.video_id for v in corpus.videos[:7]]
    bad = {b.kind: b.video_id for b in corpus.bad}
    fail = failed_download_key(corpus.videos[0].batch)
    write_shard(fs, folder, "00000", [samples[g[0]], samples[g[1]], samples[bad["random_bytes"]], samples[fail]])
    write_shard(fs, folder, "00001", [samples[g[2]], samples[bad["zero_byte"]], samples[g[0]]])
    write_shard(fs, folder, "00002", [samples[g[3]], samples[g[4]]])
    with fs.open(posixpath.join(folder, "00002.tar"), "rb") as f, tarfile.open(fileobj=f) as tar:
        m = tar.getmember(f"{g[4]}.{corpus.videos[4].container}")
    cut = fs.cat_file(posixpath.join(folder, "00002.tar"))[: m.offset_data + m.size // 2]
    fs.pipe_file(posixpath.join(folder, "00002.tar"), cut)
    return {
        "ok": [g[0], g[1], g[2], f"00001/{g[0]}", g[3]],
        "corrupt": [bad["random_bytes"]], "empty_file": [bad["zero_byte"]],
        "failed_to_download": [fail], "truncated": [g[4]],
        "later": [g[5], g[6]],
    }


def _check(cfg, ref_cfg, expected: dict[str, list[str]], ok_ids: list[str]) -> None:
    rows, reference = _rows(cfg), _rows(ref_cfg)
    assert sorted(rows) == sorted(ok_ids)
    for vid, row in rows.items():
        want = reference[posixpath.basename(vid)]
        assert row["source_uri"].endswith(f".tar#{posixpath.basename(vid)}.{Path(want['source_uri']).suffix[1:]}")
        # bit-identical to the loose-file rows of the session (three pools there, the fused pool here)
        assert {k: v for k, v in row.items() if k not in ("video_id", "source_uri")} == \
            {k: v for k, v in want.items() if k not in ("video_id", "source_uri")}, vid
    errors = {e["video_id"]: e for e in read_errors(cfg.embed.output, cfg.storage).to_pylist()}
    want_errors = {v: reason for reason, ids in expected.items() if reason not in ("ok", "later") for v in ids}
    assert {v: e["reason"] for v, e in errors.items()} == want_errors
    assert errors[expected["failed_to_download"][0]]["stage"] == "source"


def test_local_tar_shards_give_the_loose_file_rows(feature_shards, corpus, test_config_factory, tmp_path) -> None:
    from raypipe.embed.pipeline import embed_videos

    ref_cfg, _ = feature_shards
    fs, folder = resolve(str(tmp_path / "shards"))
    fs.makedirs(folder)
    expected = _build_shards(corpus, fs, folder)
    cfg = test_config_factory(f"embed.source.uri={folder}", "embed.source.kind=webdataset",
                              "embed.source.annotations=null", name="wds")
    summary = embed_videos(cfg)
    assert summary["videos_listed"] == 9 and summary["videos_ok"] == 5 and summary["videos_failed"] == 4
    _check(cfg, ref_cfg, expected, expected["ok"])
    # a new shard in the folder: only its two videos are embedded; then nothing is left to do
    samples = {s["__key__"]: s for s in corpus_samples(corpus, corpus.videos[0].batch)}
    write_shard(fs, folder, "00003", [samples[v] for v in expected["later"]])
    again = embed_videos(cfg)
    assert again["videos_processed"] == 2 and again["videos_skipped"] == 9 and again["videos_ok"] == 2
    _check(cfg, ref_cfg, expected, expected["ok"] + expected["later"])
    assert embed_videos(cfg)["videos_processed"] == 0


def test_s3_tar_shards_by_brace_pattern(feature_shards, corpus, moto_s3, test_config_factory) -> None:
    from raypipe.embed.pipeline import embed_videos

    ref_cfg, _ = feature_shards
    fs, _ = resolve(f"s3://{moto_s3.bucket}", moto_s3.storage)
    folder = f"{moto_s3.bucket}/wds"
    expected = _build_shards(corpus, fs, folder)
    cfg = test_config_factory(
        f"embed.source.uri=s3://{folder}/{{00000..00002}}.tar", "embed.source.annotations=null",
        f"storage.endpoint_url={moto_s3.endpoint_url}", f"embed.output=s3://{moto_s3.bucket}/wds_features", name="wds_s3",
    )
    summary = embed_videos(cfg)
    assert summary["videos_ok"] == 5 and summary["failed_by_reason"] == {
        "corrupt": 1, "empty_file": 1, "failed_to_download": 1, "truncated": 1}
    _check(cfg, ref_cfg, expected, expected["ok"])
    assert all(r["source_uri"].startswith(f"s3://{folder}/0000") for r in _rows(cfg).values())
    assert embed_videos(cfg)["videos_processed"] == 0
