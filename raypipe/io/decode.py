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
:data:`REASONS` and the error text. Which frames the decoder produces to find the sampled ones (seeks, GOPs,
skipped non-reference frames) is :mod:`raypipe.io.frame_sampler`.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import tempfile
import time
from typing import Any

import numpy as np

from raypipe.config import DecodeConfig, StorageConfig
from raypipe.io.frame_sampler import DecodeFailure, Sampled, sample_video
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


def sample_file(
    path: str, cfg: DecodeConfig, *, image_size: int, gop_seek: bool = True, skip_nonref: bool = True
) -> Sampled:
    """The sampled frames of one local file with the decoder's own counts (frames decoded, seeks): what the decode
    benchmark and the equivalence tests compare. Raises :class:`DecodeFailure`; no audio."""
    import av

    with av.open(path, mode="r", metadata_errors="ignore") as container:
        vs = container.streams.video[0]
        duration = _video_duration(container, vs)
        return sample_video(container, vs, sample_times(duration or 0.0, cfg), cfg, size=image_size,
                             deadline=time.monotonic() + cfg.max_decode_s, keyframe_only=False, gop_seek=gop_seek,
                             skip_nonref=skip_nonref)


def decode_video(
    ref: VideoRef | dict[str, Any], decode_cfg: DecodeConfig, *, image_size: int, storage: StorageConfig | None = None,
    gop_seek: bool = True, skip_nonref: bool = True,
) -> dict[str, Any]:
    """Decode one video into the fixed-shape row of :func:`empty_result`; never raises (see module docstring).

    ``gop_seek=False`` decodes through dense targets instead of seeking keyframe to keyframe, ``skip_nonref=False``
    decodes the non-reference frames too (same rows either way; kept for the benchmark's before/after)."""
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
            sampled = sample_video(
                container, vs, targets, decode_cfg, size=image_size, deadline=deadline, keyframe_only=keyframe_only,
                gop_seek=gop_seek, skip_nonref=skip_nonref,
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
