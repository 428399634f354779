"""Frames for OCR: a subset of the sampled frame times, re-read at a size text can be read at.

Why a second pass over the file (not a change to :func:`raypipe.io.decode.decode_video`): the encoders get
square 112 px frames, far too small for captions, and carrying full-size frames for every sampled time through
Ray would multiply the decoded bytes. Only every ``every``-th sampled time is read (at most ``max_frames``),
letterboxed into ``width`` x ``height``, and a frame nearly identical to the previous kept one is dropped
(captions stay on screen for seconds). The file is local after the decode task's copy for loose files; a
remote file is copied again (see docs/OCR_ASR.md).

:func:`read_ocr_frames` never raises: a failure gives no frames and a warning, the row keeps its other features.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from raypipe.config import StorageConfig
from raypipe.config.embed import OcrConfig
from raypipe.io.fs import remove_tree

log = logging.getLogger(__name__)


def pick_times(frame_times: np.ndarray, count: int, cfg: OcrConfig) -> list[float]:
    """Every ``cfg.every``-th of the first ``count`` sampled times, at most ``cfg.max_frames`` of them."""
    return [float(t) for t in np.asarray(frame_times)[:count][:: cfg.every][: cfg.max_frames]]


def letterbox(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (height, width, 3), aspect kept, black bars (text is never stretched)."""
    import cv2

    h, w = img.shape[:2]
    scale = min(width / w, height / h)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    out = np.zeros((height, width, 3), np.uint8)
    y0, x0 = (height - nh) // 2, (width - nw) // 2
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    out[y0 : y0 + nh, x0 : x0 + nw] = cv2.resize(img, (nw, nh), interpolation=interp)
    return out


def _thumb(img: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.resize(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)


def _decode_at(path: str, times: list[float]) -> list[tuple[float, np.ndarray]]:
    """The frame on screen at each time (last frame with pts <= t), full size, one sequential pass."""
    import av

    out: list[tuple[float, np.ndarray]] = []
    with av.open(path, mode="r", metadata_errors="ignore") as container:
        vs = container.streams.video[0]
        start = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
        k, prev = 0, None
        for frame in container.decode(vs):
            ts = float(frame.time) - start if frame.time is not None else 0.0
            while k < len(times) and ts > times[k] + 1e-4:
                if prev is not None:
                    out.append((times[k], prev.to_ndarray(format="rgb24")))
                k += 1
            if k >= len(times):
                break
            prev = frame
        while k < len(times) and prev is not None:  # targets at or after the last frame
            out.append((times[k], prev.to_ndarray(format="rgb24")))
            k += 1
    return out


def read_ocr_frames(ref: dict[str, Any], row: dict[str, Any], cfg: OcrConfig, *, decode_cfg: Any,
                    storage: StorageConfig | None) -> dict[str, Any]:
    """``ocr_frames`` (K, H, W, 3) uint8, ``ocr_times`` (K,) float32 and ``ocr_count`` of one decoded ``row``
    (``ref``: the listing's item, which knows whether the video is a WebDataset member).

    Fixed shapes (K = ``cfg.max_frames``) so Ray Data batches rows of any video together; failed rows get zeros.
    """
    from raypipe.io.decode import DecodeFailure, _tar_member_file, _video_file

    k = cfg.max_frames
    frames = np.zeros((k, cfg.height, cfg.width, 3), np.uint8)
    times = np.zeros(k, np.float32)
    result = {"ocr_frames": frames, "ocr_times": times, "ocr_count": 0}
    if row.get("status") != "ok":
        return result
    targets = pick_times(row["frame_times"], int(row["num_frames"]), cfg)
    tmp = None
    try:
        offset = ref.get("tar_offset")
        if offset is not None and int(offset) >= 0:
            local, tmp, _ = _tar_member_file(row["source_uri"], int(offset), int(ref["tar_size"]),
                                             decode_cfg, storage)
        else:
            local, tmp, _ = _video_file(row["source_uri"], decode_cfg, storage)
        last = None
        n = 0
        for t, img in _decode_at(local, targets):
            thumb = _thumb(img)
            if last is not None and float(np.abs(thumb - last).mean()) < cfg.dedup_threshold:
                continue  # the same screen as the last kept frame: read it once
            frames[n], times[n], last = letterbox(img, cfg.width, cfg.height), t, thumb
            n += 1
        result["ocr_count"] = n
    except (DecodeFailure, OSError, ValueError, RuntimeError) as exc:
        log.warning("ocr frames: cannot read %s, continuing without OCR for it: %s", row.get("video_id"), exc)
    except Exception as exc:  # noqa: BLE001 - PyAV's errors; one video must not fail the row
        log.warning("ocr frames: %s: %s: %s", row.get("video_id"), type(exc).__name__, exc)
    finally:
        remove_tree(tmp)
    return result
