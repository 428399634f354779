"""Decoding real mp4 files made here with PyAV: sampling rule, frame content, aligned audio, every failure reason."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from raypipe.config import DecodeConfig
from raypipe.io.decode import decode_video, sample_times
from raypipe.io.sources import VideoRef


def make_video(
    path: Path, *, duration: float, fps: int = 10, size: int = 48, tone_hz: float | None = 440.0,
    color_fn=None, gop: int | None = None,
) -> Path:
    """An H.264 (+ AAC) mp4 whose frame i shows colour ``color_fn(t)`` and whose audio is a pure tone."""
    color_fn = color_fn or (lambda t: (int(t * 20) % 256, 64, 128))
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        if gop:
            vs.codec_context.gop_size = gop
        as_ = None
        if tone_hz is not None:
            as_ = out.add_stream("aac", rate=16000)
            as_.layout = "mono"
        n = int(round(duration * fps))
        for i in range(n):
            img = np.zeros((size, size, 3), np.uint8)
            img[:] = color_fn(i / fps)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for p in vs.encode(frame):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
        if as_ is not None:
            sr, chunk = 16000, 1024
            total = int(duration * sr)
            for s in range(0, total, chunk):
                t = (np.arange(s, min(s + chunk, total)) / sr).astype(np.float32)
                samples = (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)[None, :]
                af = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
                af.sample_rate = sr
                af.pts = s
                for p in as_.encode(af):
                    out.mux(p)
            for p in as_.encode():
                out.mux(p)
    return path


def ref(path: Path, vid: str = "v") -> VideoRef:
    return VideoRef(video_id=vid, source_uri=str(path), title="t", asr="a", ocr="o")


CFG = DecodeConfig()


@pytest.mark.parametrize("duration,expected", [(0.5, 1), (3.0, 3), (5.5, 6), (31.9, 32), (40.0, 32)])
def test_sample_times_head_rule(duration: float, expected: int) -> None:
    times = sample_times(duration, CFG)
    assert len(times) == expected == min(32, math.ceil(duration))
    assert times[:2] == [0.0, 1.0][: len(times)]


def test_uniform_spreads_over_long_video() -> None:
    times = sample_times(320.0, DecodeConfig(sampling="uniform"))
    assert len(times) == 32 and times[1] == pytest.approx(10.0) and times[-1] == pytest.approx(310.0)
    assert sample_times(5.5, DecodeConfig(sampling="uniform")) == sample_times(5.5, CFG)


def test_decode_head_frames_colours_and_audio(tmp_path: Path) -> None:
    path = make_video(tmp_path / "a.mp4", duration=5.5, color_fn=lambda t: (int(t) * 40, 255 - int(t) * 40, 0))
    row = decode_video(ref(path), CFG, image_size=32)
    assert row["status"] == "ok", row["error"]
    assert row["num_frames"] == 6 and row["duration_s"] == pytest.approx(5.5, abs=0.05)
    assert row["frames"].shape == (32, 32, 32, 3) and row["frames"].dtype == np.uint8
    np.testing.assert_allclose(row["frame_times"][:6], np.arange(6), atol=1e-3)
    for k in range(6):  # frame k shows the colour of second k
        assert abs(int(row["frames"][k, 16, 16, 0]) - 40 * k) <= 6
    assert not row["frames"][6:].any()
    assert row["audio"].shape == (32, 16000)
    assert row["audio_mask"][:6].all() and not row["audio_mask"][6:].any()
    # Window k is centred on t_k: the first half of window 0 lies before the stream start (zero padded).
    assert np.abs(row["audio"][0, :7000]).max() < 1e-3 and np.abs(row["audio"][2]).max() > 0.1
    spectrum = np.abs(np.fft.rfft(row["audio"][2]))
    assert abs(int(np.argmax(spectrum)) - 440) <= 2  # 1 s window -> 1 Hz bins
    assert row["text"] == "t a o"


def test_no_audio_stream_gives_empty_mask(tmp_path: Path) -> None:
    row = decode_video(ref(make_video(tmp_path / "s.mp4", duration=2.2, tone_hz=None)), CFG, image_size=16)
    assert row["status"] == "ok" and row["num_frames"] == 3 and not row["audio_mask"].any()


def test_uniform_seeks_long_video(tmp_path: Path) -> None:
    path = make_video(tmp_path / "long.mp4", duration=80, fps=5, size=32, gop=10, tone_hz=None,
                      color_fn=lambda t: (int(t) * 3, 0, 0))
    cfg = DecodeConfig(sampling="uniform", max_frames=8, seek_gap_s=4.0)
    row = decode_video(ref(path), cfg, image_size=16)
    assert row["status"] == "ok" and row["num_frames"] == 8
    np.testing.assert_allclose(row["frame_times"][:8], np.arange(8) * 10.0, atol=0.25)
    for k in range(8):
        assert abs(int(row["frames"][k, 8, 8, 0]) - 30 * k) <= 6
    kf = decode_video(ref(path), cfg.model_copy(update={"keyframe_only_after_s": 10.0}), image_size=16)
    assert kf["status"] == "ok" and kf["num_frames"] == 8  # keyframe-only seeks land on a keyframe <= target
    assert all(kf["frame_times"][k] <= k * 10.0 + 1e-3 for k in range(8))


def test_failure_reasons(tmp_path: Path) -> None:
    good = make_video(tmp_path / "g.mp4", duration=3.0)
    data = good.read_bytes()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(b"this is not a video at all" * 50)
    (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 2])
    audio_only = tmp_path / "audio.m4a"
    with av.open(str(audio_only), "w", format="mp4") as out:
        s = out.add_stream("aac", rate=16000)
        s.layout = "mono"
        af = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="flt", layout="mono")
        af.sample_rate, af.pts = 16000, 0
        for p in [*s.encode(af), *s.encode()]:
            out.mux(p)
    cases = {
        "empty.mp4": ("empty_file", CFG),
        "garbage.mp4": ("corrupt", CFG),
        "trunc.mp4": ("truncated", CFG),
        "audio.m4a": ("no_video_stream", CFG),
        "missing.mp4": ("unreadable", CFG),
        "g.mp4": ("too_long", DecodeConfig(max_duration_s=2.0)),
    }
    for name, (reason, cfg) in cases.items():
        row = decode_video(ref(tmp_path / name, name), cfg, image_size=16)
        assert (row["status"], row["reason"]) == ("failed", reason), (name, row["error"])
        assert row["error"] and row["num_frames"] == 0
    big = decode_video(ref(good), DecodeConfig(max_file_mb=1e-4), image_size=16)
    assert big["reason"] == "too_large"
