"""OCR stage: on-screen text of the frames read by :mod:`raypipe.io.ocr_frames`, as timed text like WBDC's.

Engine: ``rapidocr`` (PP-OCRv4 detection + recognition ONNX models inside the ``rapidocr-onnxruntime`` wheel,
Chinese and English, CPU). The stage is a Ray Data actor (one engine load per actor) with its own pool
(``embed.ocr_pool``). It drops the large ``ocr_frames`` column, writes ``ocr_timed`` (JSON ``[{time, text}]``)
and merges the read text into ``ocr`` / ``text`` (:func:`raypipe.embed.extracted.set_field`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from raypipe.config.embed import OcrConfig
from raypipe.embed.common import ok_rows
from raypipe.embed.extracted import set_field

log = logging.getLogger(__name__)


def ocr_info(cfg: OcrConfig) -> dict[str, Any]:
    """What ShardInfo.embedders records for OCR (the engine and its version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("rapidocr-onnxruntime")
    except PackageNotFoundError:
        v = "missing"
    return {"name": f"{cfg.engine}/PP-OCRv4", "version": v, "every": cfg.every, "max_frames": cfg.max_frames,
            "size": [cfg.width, cfg.height], "merge": cfg.merge}


class RapidOcrEngine:
    """One RGB image -> its text lines in reading order (top to bottom, left to right)."""

    def __init__(self, min_score: float, side: int = 640) -> None:
        import logging as _logging

        from rapidocr_onnxruntime import RapidOCR

        _logging.getLogger("RapidOCR").setLevel(_logging.WARNING)  # it logs every model load at INFO
        # One thread (the actor's CPU share), no text-angle classifier (captions are upright), and detection at
        # the frame's own size: the default upscales the short side to 736 px, ~4x the work for 640x360 frames.
        self.engine = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1, use_cls=False,
                               det_limit_type="max", det_limit_side_len=side)
        self.min_score = min_score

    def read(self, rgb: np.ndarray) -> str:
        result, _ = self.engine(rgb[:, :, ::-1].copy())  # the engine expects OpenCV's BGR order
        if not result:
            return ""
        lines = [(float(box[0][1]), float(box[0][0]), str(text)) for box, text, score in result
                 if float(score) >= self.min_score and str(text).strip()]
        lines.sort(key=lambda x: (round(x[0] / 20), x[1]))  # rows of ~20 px, then left to right
        return " ".join(t for _, _, t in lines)


def read_frames(engine: Any, frames: np.ndarray, times: np.ndarray, count: int) -> list[dict[str, Any]]:
    """``[{time, text}]`` of the first ``count`` frames; text repeated from the previous frame is kept once."""
    out: list[dict[str, Any]] = []
    for k in range(int(count)):
        text = engine.read(frames[k])
        # The same caption over a changing background is often read with and without a space: compare without.
        if text and (not out or _squash(out[-1]["text"]) != _squash(text)):
            out.append({"time": round(float(times[k]), 3), "text": text})
    return out


def _squash(text: str) -> str:
    return "".join(text.split()).lower()


class OcrStage:
    """Ray Data actor: ``ocr_frames`` / ``ocr_times`` / ``ocr_count`` -> ``ocr_timed``, ``ocr``, ``text``, ``ocr_s``.

    A frame the engine fails on is skipped with a warning (the row keeps everything else).
    """

    def __init__(self, cfg: OcrConfig) -> None:
        self.cfg = cfg
        self.engine = RapidOcrEngine(cfg.min_score, max(cfg.width, cfg.height))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        frames = batch.pop("ocr_frames")  # (B, K, H, W, 3): not needed downstream
        n = len(batch["video_id"])
        timed: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        seconds = np.asarray(batch.get("ocr_s", np.zeros(n)), np.float64).copy()  # + the decode task's frame reads
        for i in ok_rows(batch):
            t0 = time.monotonic()
            try:
                timed[i] = read_frames(self.engine, frames[i], batch["ocr_times"][i], batch["ocr_count"][i])
            except Exception as exc:  # noqa: BLE001 - an engine failure costs this video's OCR, not the row
                log.warning("ocr failed for %s: %s: %s", batch["video_id"][i], type(exc).__name__, exc)
            seconds[i] += time.monotonic() - t0
        batch["ocr_timed"] = np.asarray([json.dumps(t, ensure_ascii=False) for t in timed], dtype=object)
        batch["ocr_s"] = seconds
        for k in ("ocr_times", "ocr_count"):
            batch.pop(k, None)
        set_field(batch, "ocr", [" ".join(o["text"] for o in t) for t in timed], self.cfg.merge)
        return batch
