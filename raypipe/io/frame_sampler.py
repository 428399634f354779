"""Which frames of one video stream the decoder produces for a list of sampled times, and the frames chosen.

Split from :mod:`raypipe.io.decode` (which owns the row, the files, the audio and the failure reasons) because
this is the part that decides the cost of decoding: decoding through while the sampled times are close, seeking
across large gaps, seeking GOP by GOP while they are dense (:func:`_gop_index`), and leaving the non-reference
frames that no sampled time shows undecoded (:class:`_Cursor`). Whatever it skips, the frame chosen for a time is
the one a full decode gives: the last frame with ``pts <= t`` (``tests/unit/test_decode_gop.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from raypipe.config import DecodeConfig

_EPS = 1e-4


class DecodeFailure(Exception):
    """One video cannot be decoded; ``reason`` is one of :data:`raypipe.io.decode.REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Sampled:
    """The frames chosen for the sampled times, and what it cost (the decode benchmark and the tests read it)."""

    frames: np.ndarray  # (T, S, S, 3) uint8, zero-padded
    times: np.ndarray  # (T,) float32, NaN-free, zero-padded
    count: int
    end_s: float | None  # where the video stream really ended, when decoding reached its end early
    decoded: int = 0  # frames the decoder produced (the GOP-aware floor is ``count``: one per target)
    seeks: int = 0
    skippable: int = 0  # packets sent with skip_frame=NONREF (the non-reference ones among them were not decoded)
    resampled: bool = False  # skipping could not be shown exact for a target: sampled again without it


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


def _rgb_converter(size: int) -> Callable[[Any], np.ndarray]:
    """frame -> (S, S, 3) uint8 RGB, through one reformatter per video: ``frame.to_ndarray(width=...)`` gives every
    frame its own reformatter, i.e. a new swscale context (the downscale's filter set-up) per sampled frame: 2.8 ms
    a conversion at 720p against 0.7 ms reused, ~12 % of a long-GOP clip's sampling (docs/PERFORMANCE.md, Decode).
    The shared one is rebuilt only when the source size or format changes; the pixels are the same (same scaler,
    same bilinear default)."""
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    return lambda frame: reformatter.reformat(frame, width=size, height=size, format="rgb24").to_ndarray()


def _rewind(container: Any, vs: Any, why: str) -> None:
    """Back to the first keyframe, so decoding without a seek starts at the beginning again."""
    import av

    try:
        container.seek(vs.start_time or 0, stream=vs, backward=True, any_frame=False)
    except (av.error.FFmpegError, ValueError, RuntimeError, OSError) as exc:
        raise DecodeFailure("corrupt", f"cannot seek back to the start {why}: {exc}") from exc


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
    # back to the start: a target before the first indexed keyframe decodes from there
    _rewind(container, vs, "after indexing keyframes")
    return index


class _SkipUnsafe(Exception):
    """A frame left undecoded might have been the one on screen at a target: sample again without skipping."""


class _Cursor:
    """Where decoding stands in one video: the frames since the last seek (``gen``), the last frame at or before
    the current target (``prev``), the first one after it (``pending``), and the counts the benchmark reads.

    Frames that no target can use and no other frame is predicted from are not decoded at all (``skip_nonref``):
    each packet whose time lies before ``horizon`` (the current target minus ``guard_s``, two frame periods) goes
    to the decoder with ``skip_frame="NONREF"``. That drops the non-reference frames (most B-frames of h264 and
    hevc, mpeg4's B-frames, vp9 frames that refresh no reference) and changes no decoded frame: nothing is predicted
    from what was dropped. Streams without such frames (x264's ultrafast, all-intra prores) decode as before. The
    choice for a target stays exact as long as its frame lies within the guard, i.e. after every packet sent
    skippable; :meth:`advance` checks that (``max_skipped``) and raises :class:`_SkipUnsafe` where it does not
    (a gap in a variable-rate stream, a stream that ends before its header says).
    """

    def __init__(self, container: Any, vs: Any, start: float, *, skip_nonref: bool, guard_s: float) -> None:
        self.container, self.vs, self.start = container, vs, start
        self.skip_nonref, self.guard_s = skip_nonref and vs.time_base is not None, guard_s
        self.gen: Iterator[Any] | None = None
        self.prev: Any = None
        self.pending: Any = None
        self.pos = -math.inf  # time of the last frame at or before a target
        self.horizon = self.max_skipped = -math.inf
        self.decoded = self.seeks = self.skippable = 0

    def restart(self, seek_pts: int | None) -> None:
        """Frames from the keyframe at or before ``seek_pts`` (None: from where the container stands)."""
        if seek_pts is not None:
            self.container.seek(seek_pts, stream=self.vs, backward=True, any_frame=False)
            self.seeks += 1
        self.gen = self._frames()
        self.prev = self.pending = None
        self.max_skipped = -math.inf

    def position(self, t: float, index: list[tuple[float, int]], seek_gap_s: float) -> bool:
        """Seek before target ``t`` where that is cheaper than decoding on; True after a plain (non-GOP) seek."""
        kf = _keyframe_before(index, t) if index else None
        if kf is not None:
            p = self.pending
            nxt = float(p.time) - self.start if p is not None and p.time is not None else self.pos
            if self.gen is None or kf[0] > nxt + _EPS:
                self.restart(kf[1])
            return False
        if self.gen is None or t - self.pos > seek_gap_s:
            self.restart(int((t + self.start) / self.vs.time_base) if t > 0 else None)
            return t > 0
        return False

    def _frames(self) -> Iterator[Any]:
        """``container.decode(vs)``, each packet sent skippable or not by its time against ``horizon``."""
        cc = self.vs.codec_context
        tb = float(self.vs.time_base) if self.skip_nonref else 0.0
        cc.skip_frame = mode = "DEFAULT"
        for pkt in self.container.demux(self.vs):
            t = float(pkt.pts) * tb - self.start if self.skip_nonref and pkt.pts is not None else math.inf
            want = "NONREF" if t < self.horizon else "DEFAULT"
            if want != mode:
                cc.skip_frame = mode = want
            if mode == "NONREF":
                self.max_skipped = max(self.max_skipped, t)
                self.skippable += 1
            yield from pkt.decode()

    def advance(self, t: float, deadline: float, max_decode_s: float) -> Any:
        """Decode up to target ``t``: the last frame at or before it, else the first after it (None at the end)."""
        self.horizon = t - self.guard_s
        cur, self.pending = self.pending, None
        while True:
            if cur is None:
                cur = next(self.gen, None)
                if cur is None:
                    break
                self.decoded += 1
            ts = float(cur.time) - self.start
            if ts > t + _EPS:
                self.pending = cur
                break
            self.prev, self.pos, cur = cur, ts, None
            if time.monotonic() > deadline:
                raise DecodeFailure("decode_timeout", f"decoding took longer than {max_decode_s}s")
        prev_t = float(self.prev.time) - self.start if self.prev is not None else -math.inf
        if self.max_skipped > prev_t:  # a skippable packet after the chosen frame: it may have been on screen at t
            raise _SkipUnsafe
        return self.prev if self.prev is not None else self.pending


def sample_video(
    container: Any, vs: Any, targets: list[float], cfg: DecodeConfig, *, size: int, deadline: float,
    keyframe_only: bool, gop_seek: bool = True, skip_nonref: bool = True,
) -> Sampled:
    """Decode only what the target times need: sequentially while they are close, seeking across large gaps,
    GOP-aware (``gop_seek``, see :func:`_gop_index`) from one keyframe to the next while they are dense, and
    without the non-reference frames no target shows (``skip_nonref``, see :class:`_Cursor`). Where skipping
    cannot be shown exact, the video is sampled again without it (``Sampled.resampled``)."""
    kwargs = dict(size=size, deadline=deadline, keyframe_only=keyframe_only, gop_seek=gop_seek)
    try:
        return _sample_pass(container, vs, targets, cfg, skip_nonref=skip_nonref and not keyframe_only, **kwargs)
    except _SkipUnsafe:
        _rewind(container, vs, "to sample without skipping")
        sampled = _sample_pass(container, vs, targets, cfg, skip_nonref=False, **kwargs)
        sampled.resampled = True
        return sampled


def _sample_pass(
    container: Any, vs: Any, targets: list[float], cfg: DecodeConfig, *, size: int, deadline: float,
    keyframe_only: bool, gop_seek: bool, skip_nonref: bool,
) -> Sampled:
    """One pass of :func:`sample_video` over the targets."""
    import av

    start = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
    n, to_rgb = len(targets), _rgb_converter(size)
    frames = np.zeros((cfg.max_frames, size, size, 3), np.uint8)
    times = np.zeros(cfg.max_frames, np.float32)
    frame_period = 1.0 / float(vs.average_rate) if vs.average_rate else 1.0 / cfg.fps
    cur = _Cursor(container, vs, start, skip_nonref=skip_nonref, guard_s=2 * frame_period)
    got, end_s = 0, None
    index = _gop_index(container, vs, targets, cfg, start) if gop_seek and not keyframe_only else []
    try:
        for k, t in enumerate(targets):
            if time.monotonic() > deadline:
                raise DecodeFailure("decode_timeout", f"decoding took longer than {cfg.max_decode_s}s")
            if cur.position(t, index, cfg.seek_gap_s) and keyframe_only:
                chosen = next(cur.gen, None)
                cur.pos = t
            else:
                chosen = cur.advance(t, deadline, cfg.max_decode_s)
                if chosen is not None and cur.pending is None and t >= cur.pos + 0.9 * frame_period:  # timestamps are rounded (ms in webm)
                    # End of stream before this target: the last frame is no longer on screen at t (the header
                    # duration may count a longer audio track). Stop; the video really ends at pos + period.
                    end_s = cur.pos + frame_period
                    break
            if chosen is None:
                break
            frames[k] = to_rgb(chosen)
            times[k] = max(0.0, float(chosen.time) - start) if chosen.time is not None else t
            got = k + 1
    except (DecodeFailure, _SkipUnsafe):
        raise
    except (av.error.FFmpegError, ValueError, RuntimeError, OSError) as exc:
        if got == 0:
            raise DecodeFailure("corrupt", f"no frame could be decoded: {exc}") from exc
        raise DecodeFailure("truncated", f"decoding stopped after {got} of {n} frames: {exc}") from exc
    if got == 0:
        raise DecodeFailure("corrupt", "the video stream has no decodable frame")
    return Sampled(frames=frames, times=times, count=got, end_s=end_s, decoded=cur.decoded, seeks=cur.seeks,
                    skippable=cur.skippable)
