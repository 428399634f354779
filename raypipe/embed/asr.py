"""ASR stage: speech to text on the decoded 16 kHz mono audio of the sampled span.

The audio is what decode already produced for the audio encoder: the frame-aligned windows of ``audio``
joined in time order (with ``sampling=head`` at the default window that is the contiguous span
``[-w/2, T - w/2)``), so no second read of the file. Engines:

* ``pocketsphinx`` (default): the US-English acoustic model, dictionary and language model inside the wheel;
  ``embed.asr.vocabulary`` swaps the language model for a loop over those words (JSGF), which a narrow domain
  needs (the general model is weak on synthetic or noisy speech). Word times come from its segmentation.
* ``whisper``: faster-whisper (CTranslate2 weights folder) or openai-whisper (a ``.pt`` file) at
  ``embed.asr.model_path`` (local or s3://, copied once per actor); nothing is downloaded.

Silence (RMS under ``min_rms``), no audio, or an engine failure give empty text and a normal row.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from raypipe.config import StorageConfig
from raypipe.config.embed import AsrConfig
from raypipe.embed.common import ok_rows
from raypipe.embed.extracted import set_field

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000


def asr_info(cfg: AsrConfig) -> dict[str, Any]:
    """What ShardInfo.embedders records for ASR (engine, its version, the vocabulary size)."""
    from importlib.metadata import PackageNotFoundError, version

    dist = {"pocketsphinx": "pocketsphinx", "whisper": "faster-whisper"}[cfg.engine]
    try:
        v = version(dist)
    except PackageNotFoundError:
        v = "missing"
    return {"name": cfg.engine if cfg.engine != "whisper" else f"whisper:{cfg.model_path}", "version": v,
            "vocabulary": len(cfg.vocabulary), "merge": cfg.merge}


def span_audio(audio: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(T, W) windows + (T,) mask -> one float32 signal of the windows that hold real audio, in order."""
    idx = np.flatnonzero(np.asarray(mask, bool))
    if not len(idx):
        return np.zeros(0, np.float32)
    return np.ascontiguousarray(np.asarray(audio)[idx].reshape(-1), dtype=np.float32)


def is_silent(signal: np.ndarray, min_rms: float) -> bool:
    """Too short, not finite, or quieter than ``min_rms``: nothing to recognise."""
    if signal.size < SAMPLE_RATE // 10 or not np.all(np.isfinite(signal)):
        return True
    return float(np.sqrt(np.mean(signal.astype(np.float64) ** 2))) < min_rms


def _jsgf(words: list[str]) -> str:
    alts = " | ".join(sorted({w.lower() for w in words if w.strip()}))
    return f"#JSGF V1.0;\ngrammar vocab;\npublic <s> = ( {alts} )+ ;\n"


class PocketsphinxEngine:
    """16 kHz float32 -> ``(text, [{word, start, end}])``; fillers and silences (``<sil>``, ``[NOISE]``) dropped."""

    def __init__(self, cfg: AsrConfig) -> None:
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
        if cfg.vocabulary:
            known = [w.lower() for w in cfg.vocabulary if self.decoder.lookup_word(w.lower())]
            unknown = sorted({w for w in cfg.vocabulary if w.lower() not in known})
            if unknown:
                log.warning("asr: %d vocabulary words are not in the pronunciation dictionary and are skipped: %s",
                            len(unknown), ", ".join(unknown[:10]))
            if known:
                self.decoder.add_jsgf_string("vocab", _jsgf(known))
                self.decoder.activate_search("vocab")
        self.frame_s = 1.0 / float(self.decoder.config["frate"])

    def transcribe(self, signal: np.ndarray) -> tuple[str, list[dict[str, Any]]]:
        pcm = (np.clip(signal, -1.0, 1.0) * 32767).astype(np.int16)
        self.decoder.start_utt()
        self.decoder.process_raw(pcm.tobytes(), full_utt=True)
        self.decoder.end_utt()
        words = [
            {"word": s.word.split("(")[0], "start": round(s.start_frame * self.frame_s, 2),
             "end": round(s.end_frame * self.frame_s, 2)}
            for s in self.decoder.seg()
            if not s.word.startswith(("<", "[")) and s.word not in ("<s>", "</s>")
        ]
        return " ".join(w["word"] for w in words), words


class WhisperEngine:
    """faster-whisper when installed (``model_path`` = a CTranslate2 folder), else openai-whisper (a ``.pt``)."""

    def __init__(self, cfg: AsrConfig, storage: StorageConfig | None) -> None:
        from raypipe.io.fs import local_copy

        path, _ = local_copy(str(cfg.model_path), storage)
        try:
            from faster_whisper import WhisperModel

            self.model, self.kind = WhisperModel(path, device="auto", cpu_threads=1), "faster"
        except ImportError:
            import whisper

            self.model, self.kind = whisper.load_model(path), "openai"

    def transcribe(self, signal: np.ndarray) -> tuple[str, list[dict[str, Any]]]:
        if self.kind == "faster":
            segments, _ = self.model.transcribe(signal, word_timestamps=True)
            words = [{"word": w.word.strip(), "start": round(w.start, 2), "end": round(w.end, 2)}
                     for s in segments for w in (s.words or [])]
            return " ".join(w["word"] for w in words), words
        out = self.model.transcribe(signal, word_timestamps=True)
        words = [{"word": w["word"].strip(), "start": round(w["start"], 2), "end": round(w["end"], 2)}
                 for s in out.get("segments", []) for w in s.get("words", [])]
        return str(out.get("text", "")).strip(), words


def make_engine(cfg: AsrConfig, storage: StorageConfig | None = None) -> Any:
    return WhisperEngine(cfg, storage) if cfg.engine == "whisper" else PocketsphinxEngine(cfg)


def transcribe_row(engine: Any, audio: np.ndarray, mask: np.ndarray, cfg: AsrConfig) -> dict[str, Any]:
    """``{"text", "words"}`` of one video; empty for silence, no audio or an engine failure (never raises)."""
    signal = span_audio(audio, mask)
    if is_silent(signal, cfg.min_rms):
        return {"text": "", "words": []}
    try:
        text, words = engine.transcribe(signal)
    except Exception as exc:  # noqa: BLE001 - bad audio costs this video's ASR, not its row
        log.warning("asr failed: %s: %s", type(exc).__name__, exc)
        return {"text": "", "words": []}
    return {"text": text, "words": words}


class AsrStage:
    """Ray Data actor: ``audio`` / ``audio_mask`` (kept for the audio encoder) -> ``asr_timed``, ``asr``, ``text``,
    ``asr_s`` (seconds spent per row)."""

    def __init__(self, cfg: AsrConfig, storage: StorageConfig | None = None) -> None:
        self.cfg = cfg
        self.engine = make_engine(cfg, storage)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["video_id"])
        results = [{"text": "", "words": []} for _ in range(n)]
        seconds = np.zeros(n, np.float64)
        for i in ok_rows(batch):
            t0 = time.monotonic()
            results[i] = transcribe_row(self.engine, batch["audio"][i], batch["audio_mask"][i], self.cfg)
            seconds[i] = time.monotonic() - t0
        batch["asr_timed"] = np.asarray([json.dumps(r, ensure_ascii=False) for r in results], dtype=object)
        batch["asr_s"] = seconds
        set_field(batch, "asr", [r["text"] for r in results], self.cfg.merge)
        return batch
