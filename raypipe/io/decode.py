"""Per-video decoding with PyAV on CPU: sampled frames at the encoder's input size + frame-aligned audio windows.

Why per video (not Ray Data's ``read_videos``): that reads every frame at full resolution as one row per frame;
here only the sampled frames are converted (straight to ``image_size``), long videos are sought instead of
decoded through, and each video stays one row with a stable id.

Sampling rule (``num_frames``): frames at ``t_k = k / fps`` for every ``t_k < duration`` up to ``max_frames``
(``sampling="head"``, the WBDC/DMAFNet rule), i.e. ``min(max_frames, ceil(duration * fps))`` frames, which is
``floor(duration) + 1`` at 1 fps for a non-integer duration. ``sampling="uniform"`` uses the same times when they
fit and otherwise ``max_frames`` times evenly spaced over the whole video. The frame for ``t_k`` is the one
on screen at ``t_k`` (the last frame with ``pts <= t_k``).

Audio: resampled to mono ``audio_sample_rate``; window ``k`` is ``[t_k - w/2, t_k + w/2)`` (``w`` =
``1 / fps`` by default), zero-padded where it leaves the stream, so audio features line up with frame features
(VGGish's fixed 0.96 s windows drift against 1 fps frames).

:func:`decode_video` never raises: failures come back as ``status="failed"`` with a ``reason`` from
:data:`REASONS` and the error text.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from raypipe.config import DecodeConfig, StorageConfig
from raypipe.io.fs import local_copy, remove_tree, resolve
from raypipe.io.sources import VideoRef
from raypipe.io.text import build_text
from raypipe.io.webdataset import copy_member

log = logging.getLogger(__name__)

REASONS = (
    "empty_file", "corrupt", "truncated", "no_video_stream", "too_long", "too_large", "unreadable", "decode_timeout",
)
# Decided by the listing (``VideoRef.fail_reason``), stage "source": video2dataset's per-sample status values
# ("failed_to_download", "failed_to_subsample"), "no_video_member", "unreadable_shard", or "truncated".
_EPS = 1e-4


class DecodeFailure(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class _Sampled:
    frames: np.ndarray  # (T, S, S, 3) uint8, zero-padded
    times: np.ndarray  # (T,) float32, NaN-free, zero-padded
    count: int
    end_s: float | None  # where the video stream really ended, when decoding reached its end early
    decoded: int = 0  # frames the decoder produced (the GOP-aware floor is ``count``: one per target)
    seeks: int = 0


def _keyframe_index(container: Any, vs: Any, until: float, start: float) -> list[tuple[float, int]]:
    """``(time, pts)`` of the video keyframes up to the first one after ``until``: a demux pass (packets only, no
    decoding), which costs a small fraction of decoding the same span. Empty when the stream gives no timestamps."""
    out: list[tuple[float, int]] = []
    for pkt in container.demux(vs):
        if pkt.pts is None or not pkt.is_keyframe:
            continue
        t = float(pkt.pts * vs.time_base) - start
        out.append((t, int(pkt.pts)))
        if t > until:
            break
    out.sort()
    return out


def _keyframe_before(index: list[tuple[float, int]], t: float) -> tuple[float, int] | None:
    """The last keyframe at or before ``t`` (binary search; the index is sorted by time)."""
    lo, hi = 0, len(index)
    while lo < hi:
        mid = (lo + hi) // 2
        if index[mid][0] <= t + _EPS:
            lo = mid + 1
        else:
            hi = mid
    return index[lo - 1] if lo else None


def sample_times(duration: float, cfg: DecodeConfig) -> list[float]:
    """The frame times (s) of the sampling rule in the module docstring."""
    if not duration or duration <= 0 or not math.isfinite(duration):
        return [0.0]
    available = max(1, math.ceil(duration * cfg.fps - 1e-6))
    if cfg.sampling == "head" or available <= cfg.max_frames:
        return [k / cfg.fps for k in range(min(cfg.max_frames, available))]
    step = duration / cfg.max_frames
    return [k * step for k in range(cfg.max_frames)]


def empty_result(ref: VideoRef | dict[str, Any], cfg: DecodeConfig, image_size: int) -> dict[str, Any]:
    """The row layout every decode produces (fixed shapes so Ray Data can batch ok and failed rows together)."""
    r = ref.to_dict() if isinstance(ref, VideoRef) else dict(ref)
    t = cfg.max_frames
    window = int(round(cfg.window_s * cfg.audio_sample_rate))
    return {
        "video_id": r["video_id"],
        "source_uri": r["source_uri"],
        "title": r.get("title") or "",
        "asr": r.get("asr") or "",
        "ocr": r.get("ocr") or "",
        "text": build_text(r.get("title"), r.get("asr"), r.get("ocr")),
        "label": r.get("label"),
        "label_l1": r.get("label_l1"),
        "labels": list(r.get("labels") or []),
        "status": "ok",
        "stage": "decode",
        "reason": "",
        "error": "",
        "duration_s": 0.0,
        "num_frames": 0,
        "frame_times": np.zeros(t, np.float32),
        "frames": np.zeros((t, image_size, image_size, 3), np.uint8),
        "audio": np.zeros((t, window), np.float32),
        "audio_mask": np.zeros(t, bool),
        "decode_s": 0.0,
    }


def _video_duration(container: Any, vs: Any) -> float | None:
    if vs.duration is not None and vs.time_base is not None:
        return float(vs.duration * vs.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _rgb_converter(size: int) -> Callable[[Any], np.ndarray]:
    """frame -> (S, S, 3) uint8 RGB, through one reformatter per video: ``frame.to_ndarray(width=...)`` gives every
    frame its own reformatter, i.e. a new swscale context (the downscale's filter set-up) per sampled frame: 2.8 ms
    a conversion at 720p against 0.7 ms reused, ~12 % of a long-GOP clip's sampling (docs/PERFORMANCE.md, Decode).
    The shared one is rebuilt only when the source size or format changes; the pixels are the same (same scaler,
    same bilinear default)."""
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    return lambda frame: reformatter.reformat(frame, width=size, height=size, format="rgb24").to_ndarray()


def _gop_index(container: Any, vs: Any, targets: list[float], cfg: DecodeConfig, start: float) -> list[tuple[float, int]]:
    """The keyframe index for GOP-aware sampling when the targets are dense (else empty), container rewound.

    With it, before each target, when the keyframe before it lies beyond the next frame the decoder would give,
    decoding seeks to that keyframe instead of decoding the frames in between (none of them is sampled). The frame
    chosen for a target is the same either way: decoding from a keyframe reproduces every later frame of its GOP
    exactly. Short GOPs then cost about half a GOP per target instead of a second of frames; long GOPs decode
    through as before.
    """
    import av

    if len(targets) < 2 or max(b - a for a, b in zip(targets, targets[1:], strict=False)) > cfg.seek_gap_s:
        return []
    try:
        index = _keyframe_index(container, vs, targets[-1], start)
    except (av.error.FFmpegError, ValueError, RuntimeError, OSError):
        index = []  # a damaged stream: decode through as without the index, and report what that finds
    try:  # back to the start: a target before the first indexed keyframe decodes from there
        container.seek(vs.start_time or 0, stream=vs, backward=True, any_frame=False)
    except (av.error.FFmpegError, ValueError, RuntimeError, OSError) as exc:
        raise DecodeFailure("corrupt", f"cannot seek back to the start after indexing keyframes: {exc}") from exc
    return index


def _sample_video(
    container: Any, vs: Any, targets: list[float], cfg: DecodeConfig, *, size: int, deadline: float,
    keyframe_only: bool, gop_seek: bool = True,
) -> _Sampled:
    """Decode only what the target times need: sequentially while they are close, seeking across large gaps, and
    GOP-aware (``gop_seek``, see :func:`_gop_index`) from one keyframe to the next while they are dense."""
    import av

    start = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
    n, to_rgb = len(targets), _rgb_converter(size)
    frames = np.zeros((cfg.max_frames, size, size, 3), np.uint8)
    times = np.zeros(cfg.max_frames, np.float32)
    gen = None
    prev = pending = None
    pos = -math.inf
    got = 0
    end_s = None
    frame_period = 1.0 / float(vs.average_rate) if vs.average_rate else 1.0 / cfg.fps
    decoded = seeks = 0
    index = _gop_index(container, vs, targets, cfg, start) if gop_seek and not keyframe_only else []
    try:
        for k, t in enumerate(targets):
            if time.monotonic() > deadline:
                raise DecodeFailure("decode_timeout", f"decoding took longer than {cfg.max_decode_s}s")
            seeked = False
            kf = _keyframe_before(index, t) if index else None
            if kf is not None:
                nxt = (float(pending.time) - start) if pending is not None and pending.time is not None else pos
                if gen is None or kf[0] > nxt + _EPS:
                    container.seek(kf[1], stream=vs, backward=True, any_frame=False)
                    gen = container.decode(vs)
                    prev = pending = None
                    seeks += 1
            elif gen is None or t - pos > cfg.seek_gap_s:
                if t > 0:
                    container.seek(int((t + start) / vs.time_base), stream=vs, backward=True, any_frame=False)
                    seeked = True
                    seeks += 1
                gen = container.decode(vs)
                prev = pending = None
            if seeked and keyframe_only:
                chosen = next(gen, None)
                pos = t
            else:
                cur = pending
                pending = None
                while True:
                    if cur is None:
                        cur = next(gen, None)
                        if cur is None:
                            break
                        decoded += 1
                    ts = float(cur.time) - start
                    if ts > t + _EPS:
                        pending = cur
                        break
                    prev, pos, cur = cur, ts, None
                    if time.monotonic() > deadline:
                        raise DecodeFailure("decode_timeout", f"decoding took longer than {cfg.max_decode_s}s")
                chosen = prev if prev is not None else pending
                if chosen is not None and pending is None and t >= pos + 0.9 * frame_period:  # timestamps are rounded (ms in webm)
                    # End of stream before this target: the last frame is no longer on screen at t (the header
                    # duration may count a longer audio track). Stop; the video really ends at pos + period.
                    end_s = pos + frame_period
                    break
            if chosen is None:
                break
            frames[k] = to_rgb(chosen)
            times[k] = max(0.0, float(chosen.time) - start) if chosen.time is not None else t
            got = k + 1
    except DecodeFailure:
        raise
    except (av.error.FFmpegError, ValueError, RuntimeError, OSError) as exc:
        if got == 0:
            raise DecodeFailure("corrupt", f"no frame could be decoded: {exc}") from exc
        raise DecodeFailure("truncated", f"decoding stopped after {got} of {n} frames: {exc}") from exc
    if got == 0:
        raise DecodeFailure("corrupt", "the video stream has no decodable frame")
    return _Sampled(frames=frames, times=times, count=got, end_s=end_s, decoded=decoded, seeks=seeks)


def _decode_audio(
    container: Any, targets: np.ndarray, count: int, cfg: DecodeConfig, *, seek: bool, deadline: float
) -> tuple[np.ndarray, np.ndarray]:
    """Mono windows ``(T, W)`` float32 centred on the frame times, and which windows hold real audio."""
    import av

    sr = cfg.audio_sample_rate
    w = int(round(cfg.window_s * sr))
    half = cfg.window_s / 2
    out = np.zeros((cfg.max_frames, w), np.float32)
    mask = np.zeros(cfg.max_frames, bool)
    if not container.streams.audio or count == 0:
        return out, mask
    stream = container.streams.audio[0]
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0

    def read_span(t0: float, t1: float) -> tuple[np.ndarray, float]:
        """Samples covering [t0, t1) and the time of the first returned sample."""
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
        if t0 > 0:
            container.seek(int((t0 + start) / stream.time_base), stream=stream, backward=True, any_frame=False)
        else:
            container.seek(0, stream=stream, backward=True, any_frame=False)
        chunks: list[np.ndarray] = []
        first_t: float | None = None
        for frame in container.decode(stream):
            ft = float(frame.time) - start if frame.time is not None else 0.0
            for rf in resampler.resample(frame):
                arr = rf.to_ndarray().reshape(-1)
                if first_t is None:
                    first_t = ft
                chunks.append(arr)
            if ft > t1 or time.monotonic() > deadline:
                break
        if not chunks:
            return np.zeros(0, np.float32), t0
        return np.concatenate(chunks).astype(np.float32), float(first_t or 0.0)

    def fill(k: int, samples: np.ndarray, first_t: float) -> None:
        lo = int(round((targets[k] - half - first_t) * sr))
        src_lo, src_hi = max(lo, 0), min(lo + w, len(samples))
        if src_hi > src_lo:
            out[k, src_lo - lo : src_hi - lo] = samples[src_lo:src_hi]
            mask[k] = True

    try:
        if seek:
            for k in range(count):
                samples, first_t = read_span(max(0.0, targets[k] - half), targets[k] + half)
                fill(k, samples, first_t)
        else:
            samples, first_t = read_span(0.0, float(targets[count - 1]) + half)
            for k in range(count):
                fill(k, samples, first_t)
    except (av.error.FFmpegError, ValueError, RuntimeError, OSError) as exc:
        # Broken audio must not lose the frames: keep what was read, the mask says which windows are real.
        log.warning("audio decode failed, continuing without the rest of the audio: %s", exc)
    return out, mask


def _looks_like_video_container(head: bytes) -> bool:
    return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or head[:4] == b"RIFF"


def _check_size(size: int, cfg: DecodeConfig) -> None:
    if not size:
        raise DecodeFailure("empty_file", "file is empty (0 bytes)")
    if size > cfg.max_file_mb * 1024 * 1024:
        raise DecodeFailure("too_large", f"file is {size / 2**20:.1f} MiB > max_file_mb={cfg.max_file_mb}")


def _video_file(uri: str, cfg: DecodeConfig, storage: StorageConfig | None) -> tuple[str, str | None, bytes]:
    """``(local path, temp dir to remove or None, first 16 bytes)`` of a video file (a copy when remote)."""
    try:
        fs, path = resolve(uri, storage)
        size = fs.size(path)
    except FileNotFoundError as exc:
        raise DecodeFailure("unreadable", f"file not found: {uri}") from exc
    except (OSError, PermissionError, ValueError) as exc:
        raise DecodeFailure("unreadable", f"cannot stat {uri}: {exc}") from exc
    _check_size(size, cfg)
    tmp_dir = None
    try:
        local, tmp_dir = local_copy(uri, storage)
        with open(local, "rb") as f:
            return local, tmp_dir, f.read(16)
    except OSError as exc:
        remove_tree(tmp_dir)
        raise DecodeFailure("unreadable", f"cannot read {uri}: {exc}") from exc


def _tar_member_file(
    uri: str, offset: int, size: int, cfg: DecodeConfig, storage: StorageConfig | None
) -> tuple[str, str | None, bytes]:
    """A WebDataset member (``<tar uri>#<member>``) copied into a temp file that the caller removes: a ranged read
    of that member only, and PyAV gets the same seekable file (and file name) it gets for a loose video."""
    _check_size(size, cfg)
    tar_uri, _, member = uri.rpartition("#")
    tmp_dir = tempfile.mkdtemp(prefix="raypipe-wds-")
    local = os.path.join(tmp_dir, posixpath.basename(member) or "video")
    try:
        fs, path = resolve(tar_uri, storage)
        with open(local, "wb") as f:
            copied = copy_member(fs, path, offset, size, f)
    except (OSError, ValueError) as exc:
        remove_tree(tmp_dir)
        raise DecodeFailure("unreadable", f"cannot read {member} from {tar_uri}: {exc}") from exc
    if copied < size:
        remove_tree(tmp_dir)
        raise DecodeFailure("truncated", f"the tar ends {size - copied} bytes into {member}")
    with open(local, "rb") as f:
        return local, tmp_dir, f.read(16)


def sample_file(path: str, cfg: DecodeConfig, *, image_size: int, gop_seek: bool = True) -> _Sampled:
    """The sampled frames of one local file with the decoder's own counts (frames decoded, seeks): what the decode
    benchmark and the GOP-equivalence test compare. Raises :class:`DecodeFailure`; no audio."""
    import av

    with av.open(path, mode="r", metadata_errors="ignore") as container:
        vs = container.streams.video[0]
        duration = _video_duration(container, vs)
        return _sample_video(container, vs, sample_times(duration or 0.0, cfg), cfg, size=image_size,
                             deadline=time.monotonic() + cfg.max_decode_s, keyframe_only=False, gop_seek=gop_seek)


def decode_video(
    ref: VideoRef | dict[str, Any], decode_cfg: DecodeConfig, *, image_size: int, storage: StorageConfig | None = None,
    gop_seek: bool = True,
) -> dict[str, Any]:
    """Decode one video into the fixed-shape row of :func:`empty_result`; never raises (see module docstring).

    ``gop_seek=False`` decodes through dense targets instead of seeking keyframe to keyframe (same rows; kept for
    the benchmark's before/after)."""
    import av

    t0 = time.monotonic()
    row = empty_result(ref, decode_cfg, image_size)
    r = ref.to_dict() if isinstance(ref, VideoRef) else ref
    uri = row["source_uri"]
    tmp_dir = None
    try:
        if r.get("fail_reason"):  # the listing knows already (e.g. a failed download): no decode try
            row["stage"] = "source"
            raise DecodeFailure(str(r["fail_reason"]), str(r.get("fail_error") or r["fail_reason"]))
        if int(r.get("tar_offset", -1)) >= 0:
            local, tmp_dir, head = _tar_member_file(uri, int(r["tar_offset"]), int(r["tar_size"]), decode_cfg, storage)
        else:
            local, tmp_dir, head = _video_file(uri, decode_cfg, storage)
        try:
            container = av.open(local, mode="r", metadata_errors="ignore")
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            reason = "truncated" if _looks_like_video_container(head) else "corrupt"
            raise DecodeFailure(reason, f"cannot open container: {exc}") from exc
        with container:
            if not container.streams.video:
                raise DecodeFailure("no_video_stream", "the file has no video stream")
            vs = container.streams.video[0]
            duration = _video_duration(container, vs)
            if duration is not None and duration > decode_cfg.max_duration_s:
                raise DecodeFailure(
                    "too_long", f"duration {duration:.1f}s > max_duration_s={decode_cfg.max_duration_s}"
                )
            targets = sample_times(duration or 0.0, decode_cfg)
            seek = len(targets) > 1 and (targets[1] - targets[0]) > decode_cfg.seek_gap_s
            keyframe_only = bool(duration and duration > decode_cfg.keyframe_only_after_s)
            deadline = t0 + decode_cfg.max_decode_s
            sampled = _sample_video(
                container, vs, targets, decode_cfg, size=image_size, deadline=deadline, keyframe_only=keyframe_only,
                gop_seek=gop_seek,
            )
            audio, audio_mask = _decode_audio(
                container, np.asarray(targets, np.float64), sampled.count, decode_cfg, seek=seek, deadline=deadline
            )
        if sampled.end_s is not None:
            duration = min(duration, sampled.end_s) if duration else sampled.end_s
        row.update(
            duration_s=float(duration if duration else sampled.times[sampled.count - 1] + 1.0 / decode_cfg.fps),
            num_frames=int(sampled.count),
            frame_times=sampled.times,
            frames=sampled.frames,
            audio=audio,
            audio_mask=audio_mask,
        )
    except DecodeFailure as exc:
        row.update(status="failed", reason=exc.reason, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad video must never kill the job
        row.update(status="failed", reason="corrupt", error=f"{type(exc).__name__}: {exc}")
    finally:
        remove_tree(tmp_dir)
    row["decode_s"] = time.monotonic() - t0
    if row["status"] != "ok":
        log.warning("decode failed for %s (%s): %s", row["video_id"], row["reason"], row["error"])
    return row
