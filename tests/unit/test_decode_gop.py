"""GOP-aware decoding (seek to the keyframe before each sampled time) picks exactly the frames of decoding through.

Why: seeking changes which frames the decoder produces, never which frame is on screen at a sampled time; this
pins that on H.264 files with short and long GOPs, B-frames, and on the generated corpus (mp4, mkv, webm/VP8,
variable frame rate), and checks the seeking decodes fewer frames where GOPs are short.
"""

from __future__ import annotations

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
        a = decode_video(ref, cfg, image_size=32, gop_seek=False)
        b = decode_video(ref, cfg, image_size=32, gop_seek=True)
        assert (a["status"], a["reason"]) == (b["status"], b["reason"]), p.name
        for k in ("frames", "frame_times", "audio", "audio_mask"):
            assert np.array_equal(a[k], b[k]), (p.name, k)
        assert a["num_frames"] == b["num_frames"] and a["duration_s"] == b["duration_s"]
        ok += a["status"] == "ok"
    assert ok >= 30
