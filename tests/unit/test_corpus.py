"""The synthetic corpus: real files that PyAV decodes as specified, bad inputs that fail as promised, consistent
annotations, determinism, batch merging, the CLI path, and class evidence that a trivial per-modality signal
recovers (so the downstream fusion test has something real to learn)."""

from __future__ import annotations

import colorsys
import hashlib
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from raypipe.config import CorpusConfig
from raypipe.corpus import (
    BAD_KINDS,
    LEVEL1_NAMES,
    LONG_THRESHOLD_S,
    WIDE_CODECS,
    CorpusInfo,
    VideoSpec,
    generate_corpus,
    keyword_index,
    level1_hue,
    tone_frequencies,
)

SMALL = dict(videos=12, seed=5, bad_inputs=True, min_duration_s=1.0, short_max_duration_s=2.0, max_duration_s=34.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    """12 short videos (one > 32 s) plus every bad input."""
    return generate_corpus(CorpusConfig(out=str(tmp_path_factory.mktemp("small")), **SMALL))


@pytest.fixture(scope="module")
def signal(tmp_path_factory: pytest.TempPathFactory) -> tuple[CorpusInfo, CorpusConfig]:
    """48 very short videos, for measuring how well each modality's evidence survives encoding."""
    cfg = CorpusConfig(
        out=str(tmp_path_factory.mktemp("signal")), videos=48, seed=11, noise_rate=0.2,
        min_duration_s=0.6, max_duration_s=1.0, long_fraction=0.0,
    )  # fmt: skip
    return generate_corpus(cfg), cfg


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _audio_samples(container: av.container.InputContainer) -> tuple[np.ndarray, int]:
    stream = container.streams.audio[0]
    chunks = [frame.to_ndarray().reshape(-1) for frame in container.decode(stream)]
    return np.concatenate(chunks).astype(np.float64), stream.rate


# ------------------------------------------------------------------------------------------------------------------
# Good files are what the specs say
# ------------------------------------------------------------------------------------------------------------------


def test_good_videos_decode_as_specified(small: CorpusInfo) -> None:
    assert len(small.videos) == 12
    for spec in small.videos:
        _check_decodes_as_specified(spec)


def _check_decodes_as_specified(spec: VideoSpec) -> None:
    """Container, codec, size, duration, frame rate and count, audio rate and level are what ``spec`` says."""
    assert spec.path.is_file() and spec.path.suffix == f".{spec.container}"
    with av.open(str(spec.path)) as c:
        assert len(c.streams.video) == 1, spec.video_id
        v = c.streams.video[0]
        assert (v.width, v.height) == (spec.width, spec.height), spec.video_id
        assert v.codec_context.name == spec.video_codec.removesuffix("10"), spec.video_id
        assert c.duration is not None
        assert abs(c.duration / 1e6 - spec.duration_s) <= 0.15, (spec.video_id, c.duration, spec.duration_s)
        if spec.vfr:
            assert spec.fps is None
        else:
            assert float(v.average_rate) == pytest.approx(spec.fps, abs=0.01), spec.video_id
        assert bool(c.streams.audio) == spec.has_audio, spec.video_id
        times = [float(f.time) for f in c.decode(v)]
        expected_frames = len(times) if spec.vfr else round(spec.duration_s * spec.fps)
        assert len(times) == expected_frames, spec.video_id
        if spec.vfr:  # really variable: several distinct frame intervals
            assert len({round(b - a, 3) for a, b in zip(times, times[1:], strict=False)}) >= 3
    if spec.has_audio:
        with av.open(str(spec.path)) as c:
            assert c.streams.audio[0].rate == spec.sample_rate
            samples, _ = _audio_samples(c)
        rms = float(np.sqrt(np.mean(samples**2)))
        if spec.silent_audio:
            assert rms < 1e-3, spec.video_id
        else:
            assert rms > 0.05, spec.video_id


def test_wide_codecs_write_every_codec_decodable_and_reproducible(tmp_path: Path) -> None:
    """``corpus.codecs: wide``: hevc 8/10-bit, vp9, mpeg4, prores/mov, mp3/flac/pcm audio, each file what its spec
    says, raypipe's decoder reads 1 fps frames from each, and a second run writes the same bytes."""
    from raypipe.config import DecodeConfig
    from raypipe.io.decode import decode_video
    from raypipe.io.sources import VideoRef

    cfg = dict(videos=10, seed=2, codecs="wide", min_duration_s=0.6, max_duration_s=1.5, long_fraction=0.0)
    wide = generate_corpus(CorpusConfig(out=str(tmp_path / "a"), **cfg))
    drawn = {(s.container, s.video_codec) for s in wide.videos}
    assert drawn == {(c, v) for c, v, _ in WIDE_CODECS}, drawn  # seed 2 draws all six kinds
    audio = {s.audio_codec for s in wide.videos if s.has_audio}
    assert audio == {a for _, _, a in WIDE_CODECS}, audio
    for spec in wide.videos:
        _check_decodes_as_specified(spec)
        row = decode_video(VideoRef(video_id=spec.video_id, source_uri=str(spec.path)), DecodeConfig(), image_size=16)
        assert row["status"] == "ok" and row["num_frames"] >= 1, (spec.video_id, row["reason"], row["error"])
        assert row["audio_mask"].any() == (spec.has_audio and not spec.silent_audio) or spec.silent_audio, spec
    again = generate_corpus(CorpusConfig(out=str(tmp_path / "b"), **cfg))
    assert {s.path.name: _md5(s.path) for s in wide.videos} == {s.path.name: _md5(s.path) for s in again.videos}


def test_h264_keyframe_interval_is_the_gop(small: CorpusInfo) -> None:
    checked = 0
    for spec in small.videos:
        if spec.video_codec != "h264" or spec.vfr:
            continue
        with av.open(str(spec.path)) as c:
            flags = [p.is_keyframe for p in c.demux(c.streams.video[0]) if p.size]
        keys = [i for i, k in enumerate(flags) if k]
        assert keys[0] == 0
        assert all(k % spec.keyframe_interval == 0 for k in keys), (spec.video_id, keys, spec.keyframe_interval)
        assert len(keys) == -(-len(flags) // spec.keyframe_interval), spec.video_id
        checked += 1
    assert checked >= 5


def test_corpus_has_the_promised_variety(small: CorpusInfo) -> None:
    vids = small.videos
    assert {v.container for v in vids} == {"mp4", "mkv", "webm"}
    assert sum(v.vfr for v in vids) == 1
    assert any(not v.has_audio for v in vids)
    assert any(v.silent_audio for v in vids)
    long = [v for v in vids if v.duration_s > LONG_THRESHOLD_S]
    assert len(long) == 1 and long[0].duration_s <= SMALL["max_duration_s"] + 0.1
    assert all(SMALL["min_duration_s"] - 0.1 <= v.duration_s <= SMALL["short_max_duration_s"] + 0.2 for v in vids
               if v not in long)  # fmt: skip
    assert len({v.fps for v in vids if not v.vfr}) >= 2
    assert len({v.keyframe_interval for v in vids}) >= 2
    assert len({(v.width, v.height) for v in vids}) >= 3
    assert all(160 <= v.width <= 640 and 120 <= v.height <= 360 for v in vids)
    assert len({v.label for v in vids}) == 12  # 12 classes, 12 videos: balanced


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------------------


def _decode_one_video_frame(path: Path) -> None:
    """Raises when PyAV cannot open the file or find and decode a video frame in it."""
    with av.open(str(path)) as c:
        if not c.streams.video:
            raise ValueError("no video stream")
        next(iter(c.decode(video=0)))


def test_bad_inputs_fail_or_decode_as_declared(small: CorpusInfo) -> None:
    assert {b.kind for b in small.bad} == set(BAD_KINDS)
    for bad in small.bad:
        assert bad.path.exists(), bad.kind
        assert bad.path.stem == bad.video_id
        if bad.expect_ok:
            _decode_one_video_frame(bad.path)
        else:
            with pytest.raises((av.error.FFmpegError, ValueError, StopIteration)):
                _decode_one_video_frame(bad.path)
    by_kind = {b.kind: b for b in small.bad}
    assert by_kind["zero_byte"].path.stat().st_size == 0
    with av.open(str(by_kind["audio_only"].path)) as c:
        assert len(c.streams.audio) == 1 and not c.streams.video
    with av.open(str(by_kind["tiny_clip"].path)) as c:
        assert c.duration / 1e6 == pytest.approx(0.2, abs=0.05)
    annotations = {a["id"]: a for a in json.loads(small.annotations_path.read_text())}
    assert by_kind["missing_annotation"].video_id not in annotations
    emoji = annotations[by_kind["emoji_text"].video_id]
    text = " ".join([emoji["title"], emoji["asr"], *(o["text"] for o in emoji["ocr"])])
    assert text.strip() and not re.search(r"\w", text)
    for kind in ("zero_byte", "truncated", "random_bytes", "no_video_stream", "audio_only", "tiny_clip"):
        assert annotations[by_kind[kind].video_id]["category_id"] == by_kind[kind].label


# ------------------------------------------------------------------------------------------------------------------
# Annotations and taxonomy
# ------------------------------------------------------------------------------------------------------------------


def test_annotations_and_taxonomy_are_consistent(small: CorpusInfo) -> None:
    tax = json.loads(small.taxonomy_path.read_text())
    assert len(tax["level1"]) == 4 and len(tax["level2"]) == 12
    assert all(re.fullmatch(r"\d{2}", c) for c in tax["level1"])
    assert all(re.fullmatch(r"\d{4}", c) and c[:2] in tax["level1"] for c in tax["level2"])
    assert len(set(tax["level2"].values())) == 12  # human-readable and distinct
    lines = small.class_names_path.read_text().splitlines()
    assert [tuple(line.split("\t")) for line in lines] == list(tax["level2"].items())

    annotations = json.loads(small.annotations_path.read_text())
    ids = [a["id"] for a in annotations]
    assert len(ids) == len(set(ids))
    by_id = {a["id"]: a for a in annotations}
    level1_words = set(LEVEL1_NAMES)
    for spec in small.videos:
        a = by_id[spec.video_id]
        assert set(a) == {"id", "title", "asr", "ocr", "category_id"}
        assert a["category_id"] == spec.label and spec.label[:2] == spec.label_l1 and spec.label in tax["level2"]
        assert all(set(o) == {"time", "text"} and 0 <= o["time"] <= spec.duration_s for o in a["ocr"])
        words = set(re.findall(r"[a-z]+", " ".join([a["title"], a["asr"], *(o["text"] for o in a["ocr"])]).lower()))
        assert not words & level1_words, (spec.video_id, words & level1_words)  # text never names level-1


def test_corpus_json_round_trips(small: CorpusInfo) -> None:
    loaded = CorpusInfo.load(small.root)
    assert loaded == small
    raw = json.loads(small.corpus_path.read_text())
    assert not Path(raw["videos"][0]["path"]).is_absolute()  # the folder can be moved or uploaded


# ------------------------------------------------------------------------------------------------------------------
# Determinism and merging
# ------------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(small: CorpusInfo, tmp_path: Path) -> None:
    again = generate_corpus(CorpusConfig(out=str(tmp_path / "again"), **SMALL))
    assert again.annotations_path.read_text() == small.annotations_path.read_text()
    assert json.loads(again.corpus_path.read_text()) == json.loads(small.corpus_path.read_text())
    # Every file, bad ones included: x264 and libvpx must not depend on threads or wall-clock time.
    files = sorted(small.videos_dir.iterdir())
    assert len(files) == len(small.videos) + len(small.bad)
    assert {f.name: _md5(f) for f in files} == {f.name: _md5(f) for f in again.videos_dir.iterdir()}
    other = generate_corpus(CorpusConfig(out=str(tmp_path / "other"), **{**SMALL, "seed": 6, "bad_inputs": False}))
    assert other.annotations_path.read_text() != small.annotations_path.read_text()
    assert _md5(other.videos[0].path) != _md5(small.videos[0].path)


def test_second_prefix_merges_into_the_same_folder(tmp_path: Path) -> None:
    base = dict(out=str(tmp_path), seed=2, min_duration_s=0.5, max_duration_s=1.0)
    first = generate_corpus(CorpusConfig(videos=6, bad_inputs=True, **base))
    first_hashes = {v.video_id: _md5(v.path) for v in first.videos}
    merged = generate_corpus(CorpusConfig(videos=4, id_prefix="new", **base))

    ids = [v.video_id for v in merged.videos]
    assert ids == [f"vid{i:05d}" for i in range(6)] + [f"new{i:05d}" for i in range(4)]
    assert [b.video_id for b in merged.bad] == [b.video_id for b in first.bad]
    assert {v.video_id: _md5(v.path) for v in merged.videos[:6]} == first_hashes  # old batch untouched
    assert CorpusInfo.load(tmp_path) == merged
    ann_ids = {a["id"] for a in json.loads(merged.annotations_path.read_text())}
    assert {f"new{i:05d}" for i in range(4)} | {f"vid{i:05d}" for i in range(6)} <= ann_ids
    assert "vid_bad_emoji_text" in ann_ids

    # Same prefix again: that batch is replaced (stale files removed), the other kept.
    redone = generate_corpus(CorpusConfig(videos=2, id_prefix="new", **base))
    assert [v.video_id for v in redone.videos] == ids[:6] + ["new00000", "new00001"]
    assert not (tmp_path / "videos" / "new00003.mp4").exists()
    ann_ids = {a["id"] for a in json.loads(redone.annotations_path.read_text())}
    assert "new00003" not in ann_ids and "vid00005" in ann_ids

    with pytest.raises(ValueError, match="num_level1"):
        generate_corpus(CorpusConfig(videos=2, id_prefix="x", num_level1=3, **base))


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------


def test_cli_writes_a_decodable_corpus(tmp_path: Path) -> None:
    from raypipe.cli import main

    out = tmp_path / "cli"
    rc = main([
        "corpus", "--out", str(out), "--videos", "50", "--seed", "3", "--bad-inputs",
        "--set", "corpus.min_duration_s=0.5", "--set", "corpus.max_duration_s=1.0",
    ])  # fmt: skip
    assert rc == 0
    info = CorpusInfo.load(out)
    assert len(info.videos) == 50 and len(info.bad) == len(BAD_KINDS)
    for spec in info.videos:
        _decode_one_video_frame(spec.path)
    assert main(["corpus", "--out", str(out), "--set", "corpus.short_max_duration_s=99"]) == 2


# ------------------------------------------------------------------------------------------------------------------
# The class evidence is really in the files
# ------------------------------------------------------------------------------------------------------------------


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def test_each_modality_carries_its_evidence(signal: tuple[CorpusInfo, CorpusConfig]) -> None:
    info, cfg = signal
    n1, n2 = cfg.num_level1, cfg.num_level2_per_level1
    tones = np.log(tone_frequencies(n2))
    annotations = {a["id"]: a for a in json.loads(info.annotations_path.read_text())}

    frame_hits, frame_shown, audio_hits, audio_shown, text_hits, text_shown = [], [], [], [], [], []
    for spec in info.videos:
        true_l1, true_idx = int(spec.label[:2]) - 1, int(spec.label[2:]) - 1
        with av.open(str(spec.path)) as c:
            mean_rgb = np.mean([f.to_ndarray(format="rgb24").reshape(-1, 3).mean(0) for f in c.decode(video=0)], 0)
        hue = colorsys.rgb_to_hsv(*(mean_rgb / 255.0))[0]
        l1 = int(np.argmin([_hue_distance(hue, level1_hue(k, n1)) for k in range(n1)]))
        frame_hits.append(l1 == true_l1)
        frame_shown.append(l1 == int(spec.frame_l1) - 1)

        if spec.audio_index is not None:
            with av.open(str(spec.path)) as c:
                samples, rate = _audio_samples(c)
            spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
            freqs = np.fft.rfftfreq(len(samples), 1.0 / rate)
            band = freqs > 150
            peak = freqs[band][np.argmax(spectrum[band])]
            idx = int(np.argmin(np.abs(tones - np.log(peak))))
            audio_hits.append(idx == true_idx)
            audio_shown.append(idx == spec.audio_index)

        a = annotations[spec.video_id]
        idx_t = keyword_index(" ".join([a["title"], a["asr"], *(o["text"] for o in a["ocr"])]), n2)
        text_hits.append(idx_t == true_idx)
        text_shown.append(idx_t == spec.text_index)

    # What the generator says each modality shows is exactly what a trivial decoder reads back...
    assert all(frame_shown) and all(audio_shown) and all(text_shown)
    assert len(audio_hits) >= 30
    # ...and it agrees with the label at about 1 - noise_rate (corruption is independent per modality).
    for name, hits in (("frames/level-1", frame_hits), ("audio/index", audio_hits), ("text/index", text_hits)):
        acc = float(np.mean(hits))
        assert abs(acc - (1 - cfg.noise_rate)) <= 0.15, (name, acc)
        assert acc < 1.0, (name, "noise_rate > 0 must corrupt some videos")


def test_evidence_layouts_change_what_each_modality_shows(tmp_path: Path) -> None:
    """Plans only (no encoding): each layout's per-modality evidence rates, and split unchanged by layouts."""
    from raypipe.config import CorpusConfig
    from raypipe.corpus import LAYOUTS, LEVEL1_NAMES, plan_video

    def plans(layout: str) -> list:
        cfg = CorpusConfig(out=str(tmp_path), videos=400, seed=11, layout=layout, num_level1=3, num_level2_per_level1=4)
        return [plan_video(cfg, index=i, video_id=f"v{i}", label_idx=i % 12, duration_s=3.0, videos_dir=tmp_path)
                for i in range(400)]

    def rate(ps: list, ok) -> float:
        return float(np.mean([ok(p.spec) for p in ps]))

    split, rich, weak, no_audio = (plans(k) for k in ("split", "text_rich", "weak_text", "no_audio"))
    assert set(LAYOUTS) == {"split", "text_rich", "weak_text", "no_audio"}
    text_right = lambda s: s.text_index == int(s.label[2:]) - 1  # noqa: E731
    assert rate(split, text_right) > 0.78 and rate(weak, text_right) < 0.6
    assert all(p.spec.text_l1 is None for p in split)
    assert 0.75 < rate(rich, lambda s: s.text_l1 == s.label_l1) < 0.95
    named = [p for p in rich if p.spec.text_l1 is not None]
    assert all(LEVEL1_NAMES[int(p.spec.text_l1) - 1] in p.annotation["asr"].split() for p in named)
    assert rate(no_audio, lambda s: s.has_audio) < 0.4 < rate(split, lambda s: s.has_audio)
    # The layout draws use their own stream: everything but the evidence is as in the split corpus.
    assert [p.spec.width for p in rich] == [p.spec.width for p in split]


def test_hd_resolutions_draw_480p_to_1080p_and_change_nothing_else(tmp_path: Path) -> None:
    """``corpus.resolutions: hd`` (the benchmarks' realistic decode load): only the frame size differs."""
    from raypipe.config import CorpusConfig
    from raypipe.corpus import HD_RESOLUTIONS, plan_video

    def plans(resolutions: str) -> list:
        cfg = CorpusConfig(out=str(tmp_path), videos=60, seed=3, resolutions=resolutions)
        return [plan_video(cfg, index=i, video_id=f"v{i}", label_idx=i % 12, duration_s=3.0, videos_dir=tmp_path)
                for i in range(60)]

    small, hd = plans("small"), plans("hd")
    assert {(p.spec.width, p.spec.height) for p in hd} == set(HD_RESOLUTIONS)
    assert all(p.spec.height >= 480 for p in hd) and all(p.spec.height <= 360 for p in small)
    same = lambda p: (p.spec.label, p.spec.fps, p.spec.keyframe_interval, p.spec.frame_l1, p.annotation)  # noqa: E731
    assert [same(p) for p in hd] == [same(p) for p in small]
