"""WebDataset tar shards without Ray: shard patterns, video2dataset's layout as the corpus writes it, listing with
ids / text / labels / statuses, truncated and broken tars, repeated keys, and decoding a member from a tar."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raypipe.config import CorpusConfig, DecodeConfig, SourceConfig
from raypipe.corpus import CorpusInfo, generate_corpus
from raypipe.corpus_webdataset import corpus_samples, failed_download_key, write_corpus_shards
from raypipe.io.decode import decode_video
from raypipe.io.fs import resolve
from raypipe.io.sources import detect_kind, list_videos
from raypipe.io.webdataset import copy_member, expand_braces, index_shards, write_shard


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    """5 one-second videos plus every bad input."""
    cfg = CorpusConfig(out=str(tmp_path_factory.mktemp("wds")), videos=5, seed=3, bad_inputs=True,
                       min_duration_s=0.6, max_duration_s=1.2, long_fraction=0.0)
    return generate_corpus(cfg)


def _source(uri: str, **kw) -> SourceConfig:
    return SourceConfig(uri=uri, annotations=None, **kw)


def test_shard_patterns_are_expanded_and_detected() -> None:
    assert expand_braces("s3://b/{00000..00002}.tar") == ["s3://b/00000.tar", "s3://b/00001.tar", "s3://b/00002.tar"]
    assert expand_braces("d/{a,b}-{9..10}.tar") == ["d/a-9.tar", "d/a-10.tar", "d/b-9.tar", "d/b-10.tar"]
    for uri in ("s3://b/{00000..00099}.tar", "/data/00000.tar", "/data/*.tar", "s3://b/x/{a,b}.tar"):
        assert detect_kind(_source(uri)) == "webdataset", uri
    assert detect_kind(_source("/data/videos")) == "folder"
    assert detect_kind(_source("/data/*.mp4")) == "glob"


def test_corpus_shards_have_video2dataset_layout(tiny: CorpusInfo, tmp_path: Path) -> None:
    paths = write_corpus_shards(tiny, "vid", samples_per_shard=4, out=str(tmp_path / "a"))
    samples = corpus_samples(tiny, "vid")
    assert len(samples) == len(tiny.videos) + len(tiny.bad) + 1 and len(paths) == -(-len(samples) // 4)
    names = []
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                assert m.uname == m.gname == "bigdata" and m.mode == 0o444 and m.isfile()
                names.append(m.name)
        stats = json.loads(Path(p[:-4] + "_stats.json").read_text())
        assert set(stats) == {"count", "successes", "failed_to_download", "failed_to_resize", "duration",
                              "bytes_downloaded", "start_time", "end_time", "status_dict"}
        assert pq.read_table(p[:-4] + ".parquet").column_names == ["key", "status", "error_message", "caption"]
    v = tiny.videos[0]
    i = names.index(f"{v.video_id}.json")
    assert names[i : i + 3] == [f"{v.video_id}.json", f"{v.video_id}.{v.container}", f"{v.video_id}.txt"]
    key = failed_download_key("vid")
    assert f"{key}.json" in names and not any(n.startswith(key + ".mp4") for n in names)
    again = write_corpus_shards(tiny, "vid", samples_per_shard=4, out=str(tmp_path / "b"))
    digest = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
    assert digest == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in again]  # deterministic bytes


def test_listing_matches_loose_files_and_members_point_at_the_bytes(tiny: CorpusInfo, tmp_path: Path) -> None:
    write_corpus_shards(tiny, "vid", samples_per_shard=5, out=str(tmp_path / "shards"))
    loose = {r.video_id: r for r in list_videos(SourceConfig(uri=str(tiny.videos_dir), annotations=str(tiny.annotations_path)))}
    refs = {r.video_id: r for r in list_videos(_source(str(tmp_path / "shards"), kind="webdataset"))}
    assert set(refs) == set(loose) | {failed_download_key("vid")}
    for vid, lr in loose.items():
        r = refs[vid]
        assert (r.title, r.asr, r.ocr, r.label, r.label_l1, r.labels) == (lr.title, lr.asr, lr.ocr, lr.label, lr.label_l1, lr.labels)
        fs, path = resolve(r.source_uri.rpartition("#")[0])
        buf = io.BytesIO()
        assert copy_member(fs, path, r.tar_offset, r.tar_size, buf) == r.tar_size == os.path.getsize(lr.source_uri)
        assert buf.getvalue() == Path(lr.source_uri).read_bytes()
        assert not r.fail_reason
    failed = refs[failed_download_key("vid")]
    assert failed.fail_reason == "failed_to_download" and "404" in failed.fail_error and failed.tar_offset == -1
    brace = list_videos(_source(str(tmp_path / "shards") + "/vid-{00000..00009}.tar"))  # missing shards skipped
    assert [r.video_id for r in brace] == sorted(refs)


def _cut_inside(path: Path, member_name: str) -> None:
    with tarfile.open(path) as tar:
        m = tar.getmember(member_name)
    with open(path, "r+b") as f:
        f.truncate(m.offset_data + m.size // 2)


def test_truncated_and_broken_tars_lose_only_what_is_gone(tiny: CorpusInfo, tmp_path: Path) -> None:
    fs, root = resolve(str(tmp_path))
    good = [s for s in corpus_samples(tiny, "vid") if s["__key__"] in {v.video_id for v in tiny.videos}]
    a, b, c = good[0], good[1], good[2]
    write_shard(fs, root, "00000", [a, b])
    _cut_inside(tmp_path / "00000.tar", f"{b['__key__']}.mp4")  # cut in the middle of b's video
    write_shard(fs, root, "00001", [c])
    (tmp_path / "00002.tar").write_bytes(b"this is not a tar" * 100)
    write_shard(fs, root, "00003", [a, b, c])
    raw = bytearray((tmp_path / "00003.tar").read_bytes())
    with tarfile.open(tmp_path / "00003.tar") as tar:
        second_header = tar.getmember(f"{b['__key__']}.json").offset
    raw[second_header : second_header + 100] = os.urandom(100)  # garbage header: b and c of 00003 are unreadable
    (tmp_path / "00003.tar").write_bytes(bytes(raw))
    indexes = {i.name: i for i in index_shards(str(tmp_path))}
    assert "truncated" in indexes["00000"].error and [s.key for s in indexes["00000"].samples] == [a["__key__"], b["__key__"]]
    assert indexes["00001"].error == "" and "unreadable" in indexes["00002"].error
    assert "invalid tar header" in indexes["00003"].error and [s.key for s in indexes["00003"].samples] == [a["__key__"]]
    refs = {r.video_id: r for r in list_videos(_source(str(tmp_path), kind="webdataset"))}
    assert refs[a["__key__"]].tar_offset >= 0 and not refs[a["__key__"]].fail_reason
    assert refs[b["__key__"]].fail_reason == "truncated" and refs[b["__key__"]].tar_offset == -1
    assert refs["00002.tar"].fail_reason == "unreadable_shard"
    assert refs[f"00003/{a['__key__']}"].tar_offset >= 0  # a repeats a key of 00000: prefixed


def test_repeated_keys_keep_their_ids_when_shards_are_added(tiny: CorpusInfo, tmp_path: Path) -> None:
    fs, root = resolve(str(tmp_path))
    a, b = corpus_samples(tiny, "vid")[:2]
    write_shard(fs, root, "00000", [a])
    write_shard(fs, root, "00001", [a, b])
    first = [r.video_id for r in list_videos(_source(str(tmp_path), kind="webdataset"))]
    assert first == sorted([a["__key__"], f"00001/{a['__key__']}", b["__key__"]])
    write_shard(fs, root, "00002", [b])
    second = [r.video_id for r in list_videos(_source(str(tmp_path), kind="webdataset"))]
    assert set(first) < set(second) and f"00002/{b['__key__']}" in second
    both = [r.video_id for r in list_videos(_source(str(tmp_path), kind="webdataset", webdataset={"ids": "shard_key"}))]
    assert f"00000/{a['__key__']}" in both and all("/" in v for v in both)


def test_a_member_decodes_exactly_like_the_loose_file(tiny: CorpusInfo, tmp_path: Path) -> None:
    write_corpus_shards(tiny, "vid", samples_per_shard=3, out=str(tmp_path))
    refs = {r.video_id: r for r in list_videos(_source(str(tmp_path), kind="webdataset"))}
    cfg = DecodeConfig(max_frames=8)
    before = set(os.listdir(tempfile.gettempdir()))
    statuses = []
    for spec in tiny.videos[:3] + [b for b in tiny.bad if b.kind in ("random_bytes", "zero_byte", "truncated")]:
        loose = decode_video({**refs[spec.video_id].to_dict(), "source_uri": str(spec.path), "tar_offset": -1}, cfg, image_size=32)
        member = decode_video(refs[spec.video_id], cfg, image_size=32)
        assert (member["status"], member["reason"], member["num_frames"]) == (loose["status"], loose["reason"], loose["num_frames"])
        for k in ("frames", "audio", "audio_mask", "frame_times"):
            assert np.array_equal(member[k], loose[k]), (spec.video_id, k)
        statuses.append(member["status"])
    assert statuses == ["ok"] * 3 + ["failed"] * 3
    failed = decode_video(refs[failed_download_key("vid")], cfg, image_size=32)
    assert (failed["status"], failed["stage"], failed["reason"]) == ("failed", "source", "failed_to_download")
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("raypipe-wds-")}


def test_cli_corpus_format_webdataset_writes_listable_shards(tmp_path: Path) -> None:
    from raypipe.cli import main

    out = tmp_path / "cli"
    assert main(["corpus", "--out", str(out), "--videos", "3", "--seed", "2", "--format", "webdataset",
                 "--set", "corpus.min_duration_s=0.5", "--set", "corpus.max_duration_s=0.8",
                 "--set", "corpus.samples_per_shard=2"]) == 0
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ["vid-00000.tar", "vid-00001.tar"]
    refs = list_videos(_source(str(out / "shards"), kind="webdataset"))
    assert [r.video_id for r in refs] == ["vid00000", "vid00001", "vid00002"] and all(r.tar_offset > 0 for r in refs)
    assert main(["corpus", "--out", str(out), "--format", "zip"]) == 2
