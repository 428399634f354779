"""Decoding against its anchors, side by side on the same videos in one run (no Ray):

- ``raypipe``: :func:`raypipe.io.decode.decode_video` (frames + audio windows), GOP-aware seeking on (now) and off
  (before); ``frames`` = the same without audio (:func:`sample_file`);
- ``decode_all``: every frame of the video converted to RGB at full size (what a per-frame reader such as Ray
  Data's ``read_videos`` does);
- ``frames_rgb_before``: ``frames`` with every sampled frame converted by its own reformatter (raypipe before it
  shared one per video: ``frame.to_ndarray(width=...)`` builds a new swscale context per frame);
- ``frames_with_nonref``: ``frames`` with the non-reference frames decoded too (raypipe before it sent the packets
  no sampled time needs with ``skip_frame=NONREF``); ``long_gop_by_codec`` splits the long-GOP ratios per codec,
  since only streams with non-reference frames (B-frames: hevc here, h264 from most encoders but not x264's
  ultrafast, which the generated corpus uses) gain from it;
- ``raw_span``: every frame of the sampled span (the first 32 s) decoded, not converted: the cost of decoding
  through, the floor of any sampler that does not seek;
- the GOP-aware floor as counts: frames the decoder produced / frames needed (one per sampled time).

Ratios are sums over the videos, split into short-GOP (keyframe interval < 2 s) and long-GOP videos. Each video
runs every method back to back (interleaved), so load from other processes on a shared host hits all alike.
Also fits the per-video decode cost ``a + b * min(duration, 32)`` used by ``raypipe plan``.

    .venv/bin/python bench/bench_decode.py [--videos 40] [--codecs wide] [--resolutions hd] [--x264-preset medium]
        [--corpus-dir DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

REPEAT = 3


def _time(fn) -> tuple[float, object]:
    """Best of ``REPEAT`` runs: on a shared host the minimum is the figure least disturbed by other processes."""
    best, out = math.inf, None
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def decode_all(path: str) -> int:
    import av

    n = 0
    with av.open(path) as c:
        for f in c.decode(c.streams.video[0]):
            f.to_ndarray(format="rgb24")
            n += 1
    return n


def raw_span(path: str, span: float) -> int:
    import av

    n = 0
    with av.open(path) as c:
        vs = c.streams.video[0]
        start = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
        for f in c.decode(vs):
            n += 1
            if f.time is not None and f.time - start >= span:
                break
    return n


@contextlib.contextmanager
def per_frame_reformatter():
    """raypipe's decode as before its shared reformatter: each sampled frame converted by a reformatter of its own."""
    from raypipe.io import frame_sampler

    shared = frame_sampler._rgb_converter
    frame_sampler._rgb_converter = lambda size: (lambda frame: frame.to_ndarray(width=size, height=size, format="rgb24"))
    try:
        yield
    finally:
        frame_sampler._rgb_converter = shared


def _sample_per_frame_rgb(path: str, cfg, image_size: int):
    from raypipe.io.decode import sample_file

    with per_frame_reformatter():
        return sample_file(path, cfg, image_size=image_size)


def reencode_h264(videos: list[dict], root: Path, preset: str) -> list[dict]:
    """The corpus' constant-rate h264 videos encoded again by x264 at ``preset`` (video only, same keyframe
    interval, no scene cuts), under ``root/x264_<preset>/``. The generator's own h264 is x264's ``ultrafast``,
    which has no B-frames; the default ``medium`` gives the B-frames (some unreferenced) that most uploads have."""
    import av

    out_dir = root / f"x264_{preset}"
    out_dir.mkdir(exist_ok=True)
    out = []
    for v in videos:
        if v["video_codec"] != "h264" or v.get("vfr"):
            continue
        dst = out_dir / f"{v['video_id']}.mp4"
        if not dst.is_file():
            params = f"keyint={v['keyframe_interval']}:min-keyint={v['keyframe_interval']}:scenecut=0"
            with av.open(str(root / v["path"])) as src, av.open(str(dst), "w") as o:
                vs = src.streams.video[0]
                enc = o.add_stream("libx264", rate=vs.average_rate,
                                   options={"preset": preset, "crf": "26", "threads": "1", "x264-params": params})
                enc.width, enc.height, enc.pix_fmt = vs.width, vs.height, "yuv420p"
                for f in src.decode(vs):
                    f.pict_type = av.video.frame.PictureType.NONE  # let x264 choose the frame types
                    o.mux(enc.encode(f))
                o.mux(enc.encode())
        out.append({**v, "path": str(dst.relative_to(root)), "video_codec": f"h264-{preset}"})
    return out


def gop_seconds(path: str) -> float:
    """The mean keyframe interval of the file's video stream, from its packets (the spec's ``keyframe_interval``
    is what the encoder was asked for; all-intra codecs such as prores make every frame a keyframe)."""
    import av

    times = []
    with av.open(path) as c:
        vs = c.streams.video[0]
        for pkt in c.demux(vs):
            if pkt.is_keyframe and pkt.pts is not None:
                times.append(float(pkt.pts * vs.time_base))
    times.sort()
    return round((times[-1] - times[0]) / (len(times) - 1), 2) if len(times) > 1 else math.inf


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x`` (b >= 0)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx) if sxx else 0.0
    return max(0.0, my - b * mx), b


def measure(videos: list[dict], root: Path, image_size: int) -> list[dict]:
    from raypipe.config import DecodeConfig
    from raypipe.io.decode import decode_video, sample_file
    from raypipe.io.sources import VideoRef

    cfg = DecodeConfig()
    span = cfg.max_frames / cfg.fps
    rows = []
    for v in videos:
        path = str(root / v["path"])
        ref = VideoRef(video_id=v["video_id"], source_uri=path)
        r = {"video_id": v["video_id"], "duration_s": v["duration_s"], "gop_s": gop_seconds(path),
             "codec": v["video_codec"], "container": v["container"], "pixels": v["width"] * v["height"]}
        r["raypipe_s"], row = _time(lambda ref=ref: decode_video(ref, cfg, image_size=image_size))
        r["raypipe_before_s"], _ = _time(lambda ref=ref: decode_video(ref, cfg, image_size=image_size, gop_seek=False))
        r["frames_s"], s = _time(lambda p=path: sample_file(p, cfg, image_size=image_size))
        r["frames_before_s"], sb = _time(lambda p=path: sample_file(p, cfg, image_size=image_size, gop_seek=False))
        r["frames_rgb_before_s"], _ = _time(lambda p=path: _sample_per_frame_rgb(p, cfg, image_size))
        r["frames_with_nonref_s"], sn = _time(lambda p=path: sample_file(p, cfg, image_size=image_size, skip_nonref=False))
        r["raw_span_s"], r["raw_span_frames"] = _time(lambda p=path: raw_span(p, span))
        r["decode_all_s"], r["all_frames"] = _time(lambda p=path: decode_all(p))
        r.update(needed=s.count, decoded=s.decoded, decoded_before=sb.decoded, decoded_with_nonref=sn.decoded,
                 skippable=s.skippable, resampled=s.resampled, seeks=s.seeks, status=row["status"])
        rows.append(r)
    return rows


def ratios(rows: list[dict]) -> dict:
    def tot(k: str) -> float:
        return sum(r[k] for r in rows)

    if not rows:
        return {}
    return {
        "videos": len(rows),
        "raypipe_vs_before": round(tot("raypipe_s") / tot("raypipe_before_s"), 3),
        "frames_vs_raw_span": round(tot("frames_s") / tot("raw_span_s"), 3),
        "frames_before_vs_raw_span": round(tot("frames_before_s") / tot("raw_span_s"), 3),
        "frames_rgb_before_vs_raw_span": round(tot("frames_rgb_before_s") / tot("raw_span_s"), 3),
        "frames_vs_rgb_before": round(tot("frames_s") / tot("frames_rgb_before_s"), 3),
        "frames_with_nonref_vs_raw_span": round(tot("frames_with_nonref_s") / tot("raw_span_s"), 3),
        "frames_vs_with_nonref": round(tot("frames_s") / tot("frames_with_nonref_s"), 3),
        "raypipe_vs_raw_span": round(tot("raypipe_s") / tot("raw_span_s"), 3),
        "decode_all_vs_raypipe": round(tot("decode_all_s") / tot("raypipe_s"), 3),
        "decoded_per_needed": round(tot("decoded") / tot("needed"), 2),
        "decoded_per_needed_before": round(tot("decoded_before") / tot("needed"), 2),
        "decoded_per_needed_with_nonref": round(tot("decoded_with_nonref") / tot("needed"), 2),
        "resampled": sum(bool(r["resampled"]) for r in rows),
        "raw_span_frames_per_needed": round(tot("raw_span_frames") / tot("needed"), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings per method and video")
    ap.add_argument("--out", default="bench/results/bench_decode.json")
    ap.add_argument("--corpus-dir", default=None, help="generate the corpus here once and reuse it (default: a temp dir)")
    ap.add_argument("--codecs", choices=("classic", "wide"), default="classic", help="corpus.codecs when generating")
    ap.add_argument("--resolutions", choices=("small", "hd"), default="small", help="corpus.resolutions when generating")
    ap.add_argument("--x264-preset", default=None,
                    help="measure the corpus' h264 videos encoded again at this x264 preset (medium: with B-frames)")
    args = ap.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    from raypipe.config import CorpusConfig
    from raypipe.corpus import generate_corpus

    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        root = Path(args.corpus_dir or f"{tmp}/corpus")
        generated = not (root / "corpus.json").is_file()
        if generated:
            generate_corpus(CorpusConfig(out=str(root), videos=args.videos, seed=11, max_duration_s=75.0,
                                         long_fraction=0.25, workers=2, codecs=args.codecs,
                                         resolutions=args.resolutions))
        videos = json.loads((root / "corpus.json").read_text())["videos"][: args.videos]
        if args.x264_preset:
            videos = reencode_h264(videos, root, args.x264_preset)
        rows = measure(videos, root, args.image_size)
    ok = [r for r in rows if r["status"] == "ok"]
    short = [r for r in ok if r["gop_s"] < 2.0]
    long_ = [r for r in ok if r["gop_s"] >= 2.0]
    a, b = fit_line([min(r["duration_s"], 32.0) for r in ok], [r["raypipe_s"] for r in ok])
    result = {
        "benchmark": "bench_decode", **environment(),
        "corpus": {"generator": "raypipe.corpus seed=11 max_duration_s=75 long_fraction=0.25 "
                                f"codecs={args.codecs} resolutions={args.resolutions}"
                   if generated else
                   f"the corpus found in --corpus-dir {args.corpus_dir}", "videos": len(rows),
                   "h264_encoded_again_with_x264_preset": args.x264_preset,
                   "codecs": sorted({r["codec"] for r in rows}), "containers": sorted({r["container"] for r in rows}),
                   "total_duration_s": round(sum(r["duration_s"] for r in rows), 1),
                   "mean_pixels": round(sum(r["pixels"] for r in rows) / max(len(rows), 1))},
        "image_size": args.image_size, "timing": f"best of {REPEAT} per method and video, methods interleaved",
        "ratios": {"all": ratios(ok), "short_gop": ratios(short), "long_gop": ratios(long_)},
        "long_gop_by_codec": {c: ratios([r for r in long_ if r["codec"] == c]) for c in sorted({r["codec"] for r in long_})},
        "costs": {"decode_base_s": round(a, 5), "decode_per_sampled_s": round(b, 5)},
        "durations_s": [r["duration_s"] for r in ok],
        "videos": rows,
    }
    write_result(args.out, result)
    print(f"{'set':<14} {'n':>3} {'now/before':>10} {'frames/raw':>10} {'before/raw':>10} {'rgb_b/raw':>9} "
          f"{'nonref/raw':>10} {'all/raypipe':>11} {'dec/need':>8} {'before':>7} {'raw':>6}")
    sets = {**result["ratios"], **{f"long {c}": r for c, r in result["long_gop_by_codec"].items()}}
    for name, r in sets.items():
        if r:
            print(f"{name:<14} {r['videos']:>3} {r['raypipe_vs_before']:>10.2f} {r['frames_vs_raw_span']:>10.2f} "
                  f"{r['frames_before_vs_raw_span']:>10.2f} {r['frames_rgb_before_vs_raw_span']:>9.2f} "
                  f"{r['frames_with_nonref_vs_raw_span']:>10.2f} {r['decode_all_vs_raypipe']:>11.2f} "
                  f"{r['decoded_per_needed']:>8.2f} {r['decoded_per_needed_before']:>7.2f} {r['raw_span_frames_per_needed']:>6.2f}")
    print(f"decode cost fit: {a:.4f} s + {b:.4f} s per sampled second (raypipe decode_video, this host)")
    return 0 if ok and not math.isnan(a) else 1


if __name__ == "__main__":
    sys.exit(main())
