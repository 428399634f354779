"""GOP-aware decoding (seek to the keyframe before each sampled time) and leaving non-reference frames undecoded
pick exactly the frames of decoding through.

Why: seeking changes which frames the decoder produces, never which frame is on screen at a sampled time; this
pins that on H.264 files with short and long GOPs, B-frames, and on the generated corpus (mp4, mkv, webm/VP8,
variable frame rate), and checks the seeking decodes fewer frames where GOPs are short and the skipping fewer
where B-frames are not referenced.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from test_decode import make_video  # noqa: E402 - the helper that writes real H.264 files

from raypipe.config import DecodeConfig
from raypipe.io.decode import decode_video, sample_file
from raypipe.io.sources import VideoRef


def _same(a, b) -> bool:
    return a.count == b.count and np.array_equal(a.frames, b.frames) and np.array_equal(a.times, b.times)


@pytest.mark.parametrize("gop,fps", [(5, 10), (12, 30), (250, 25)])
def test_gop_seek_same_frames_fewer_decoded(tmp_path, gop, fps):
    path = make_video(tmp_path / "v.mp4", duration=9.5, fps=fps, size=32, tone_hz=None, gop=gop,
                      color_fn=lambda t: (int(t * 37) % 256, int(t * 11) % 256, 90))
    cfg = DecodeConfig()
    through = sample_file(str(path), cfg, image_size=32, gop_seek=False)
    seek = sample_file(str(path), cfg, image_size=32, gop_seek=True)
    assert through.count == seek.count == 10
    assert _same(through, seek)
    if gop * 2 <= fps:  # several GOPs per second: most of them hold no sampled frame and are skipped
        assert seek.decoded < 0.6 * through.decoded and seek.seeks >= 5
    assert seek.count <= seek.decoded <= through.decoded  # never more than decoding through, never under the floor


def test_gop_seek_rows_equal_on_corpus(corpus):
    cfg = DecodeConfig()
    videos = sorted(p for p in corpus.videos_dir.iterdir() if p.suffix in (".mp4", ".mkv", ".webm"))
    ok = 0
    for p in videos:
        ref = VideoRef(video_id=p.stem, source_uri=str(p))
        a = decode_video(ref, cfg, image_size=32, gop_seek=False, skip_nonref=False)  # every frame decoded
        b = decode_video(ref, cfg, image_size=32)
        assert (a["status"], a["reason"]) == (b["status"], b["reason"]), p.name
        for k in ("frames", "frame_times", "audio", "audio_mask"):
            assert np.array_equal(a[k], b[k]), (p.name, k)
        assert a["num_frames"] == b["num_frames"] and a["duration_s"] == b["duration_s"]
        ok += a["status"] == "ok"
    assert ok >= 30



def _bframe_video(path, times_s: list[float], *, keyint: int = 250, size: int = 32):
    """H.264 with a fixed B-frame pattern (3 B-frames, pyramid: about half the frames are non-reference), a
    moving gradient, and a frame at each of ``times_s`` (millisecond timestamps: variable rate allowed)."""
    import av

    params = f"keyint={keyint}:scenecut=0:bframes=3:b-adapt=0:b-pyramid=normal"
    yy, xx = np.mgrid[0:size, 0:size]
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=30, options={"x264-params": params})
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        vs.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times_s):
            img = np.zeros((size, size, 3), np.uint8)
            img[..., 0], img[..., 1], img[..., 2] = (xx * 8 + i * 3) % 256, (yy * 8 + i * 5) % 256, 90
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = int(round(t * 1000)), Fraction(1, 1000)
            for p in vs.encode(frame):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
    return path


@pytest.mark.parametrize("keyint", [12, 250])
def test_nonref_frames_are_not_decoded_and_change_no_sampled_frame(tmp_path, keyint):
    """Non-reference B-frames that no sampled time shows are left undecoded; every sampled frame is the one of a
    full decode."""
    path = _bframe_video(tmp_path / "v.mp4", [i / 30 for i in range(285)], keyint=keyint)
    cfg = DecodeConfig()
    full = sample_file(str(path), cfg, image_size=32, skip_nonref=False)
    skip = sample_file(str(path), cfg, image_size=32)
    assert _same(full, skip) and full.count == 10
    assert full.skippable == 0 and not skip.resampled and skip.count <= skip.decoded <= full.decoded
    if keyint == 250:  # decoding runs through whole seconds: about half their frames are non-reference
        assert skip.skippable > 0 and skip.decoded < 0.7 * full.decoded


def test_a_gap_before_a_sampled_time_falls_back_to_decoding_every_frame(tmp_path):
    """Variable frame rate: when the frame on screen at a sampled time is older than the guard, a skipped B-frame
    might have been it; the sampler then decodes the video again without skipping, and the rows stay exact."""
    cfg = DecodeConfig()
    resampled = 0
    for last in range(40, 44):  # the frame before the gap is non-reference for some of these, not for others
        times = [i / 30 for i in range(last)] + [3.6 + i / 30 for i in range(60)]
        path = _bframe_video(tmp_path / f"gap{last}.mp4", times)
        full = sample_file(str(path), cfg, image_size=32, skip_nonref=False)
        skip = sample_file(str(path), cfg, image_size=32)
        assert _same(full, skip), last
        resampled += skip.resampled
    assert 1 <= resampled < 4
