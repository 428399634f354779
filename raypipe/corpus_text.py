"""A generated corpus whose class evidence is only in burned-in captions and speech (for OCR / ASR).

Every class has a small word list. Each video shows a caption of two of its class's words burned into the
frames (white on a black band, changed halfway through) and says three other words of the class (espeak-ng,
16 kHz), over frames and background noise drawn the same way for every class, with a neutral title
("clip 17"). So the visual, audio-embedding and title evidence is nil by construction: a text model can only
tell the classes apart from text read from the video. ``truth.json`` keeps what was shown and said (the tests'
reference for character / word error rates).

Speech comes from the espeak-ng library of the ``espeakng-loader`` package through ctypes (no binary, no
download); without it the videos are silent and :func:`speech_unavailable` says why (tests skip on it).
Separate from :mod:`raypipe.corpus` (the demo/test corpus generator) on purpose: different evidence, same output
layout (``videos/*.mp4`` + WBDC-style ``annotations.json``), so ``raypipe embed --source <out>/videos
--annotations <out>/annotations.json`` reads it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# Class code -> words (all in pocketsphinx's US-English dictionary). Codes follow the WBDC 4-digit rule.
DEFAULT_CLASSES: dict[str, list[str]] = {
    "0101": ["football", "goal", "score", "team", "match", "player"],
    "0102": ["cooking", "recipe", "kitchen", "dinner", "oven", "butter"],
    "0201": ["music", "guitar", "song", "concert", "piano", "singer"],
    "0202": ["weather", "rain", "storm", "cloud", "winter", "snow"],
}
_lock = threading.Lock()
_espeak: Any = None


def speech_unavailable() -> str | None:
    """None when espeak-ng can synthesise here, else the reason (for a test skip or a warning)."""
    try:
        _engine()
    except (ImportError, OSError, RuntimeError) as exc:
        return f"espeak-ng is not available ({type(exc).__name__}: {exc}); pip install espeakng-loader"
    return None


def _engine() -> Any:
    """The espeak-ng library, initialised once per process (synchronous mode, samples through a callback)."""
    global _espeak
    if _espeak is None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # 2 = synchronous
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize returned {rate}")
        chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def on_audio(wav: Any, n: int, _events: Any) -> int:
            if n > 0:
                chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        cb = callback_type(on_audio)
        lib.espeak_SetSynthCallback(cb)
        _espeak = {"lib": lib, "rate": rate, "chunks": chunks, "cb": cb}
    return _espeak


def synthesize(text: str, *, voice: str = "en-us", words_per_minute: int = 150) -> np.ndarray:
    """``text`` spoken by espeak-ng: float32 mono at 16 kHz."""
    from scipy.signal import resample_poly

    with _lock:
        eng = _engine()
        lib, chunks = eng["lib"], eng["chunks"]
        chunks.clear()
        lib.espeak_SetVoiceByName(voice.encode())
        lib.espeak_SetParameter(1, int(words_per_minute), 0)  # 1 = espeakRATE
        data = text.encode()
        lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None)  # 1 = POS_CHARACTER
        lib.espeak_Synchronize()
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    x = pcm.astype(np.float32) / 32768.0
    g = np.gcd(SAMPLE_RATE, int(eng["rate"]))
    return resample_poly(x, SAMPLE_RATE // g, int(eng["rate"]) // g).astype(np.float32)


def _frame(rng: np.random.Generator, width: int, height: int, caption: str, t: float, base: np.ndarray) -> np.ndarray:
    """Class-neutral moving background with ``caption`` on a black band at the bottom (like subtitles)."""
    import cv2

    shift = int(t * 12) % width
    img = np.roll(base, shift, axis=1).copy()
    band = int(height * 0.22)
    img[-band:] = 0
    scale = height / 240
    (tw, th), _ = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
    x = max(4, (width - tw) // 2)
    cv2.putText(img, caption, (x, height - (band - th) // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2,
                cv2.LINE_AA)
    return img


def _plan(index: int, code: str, words: list[str], seed: int, duration_s: float) -> dict[str, Any]:
    rng = np.random.default_rng([seed, index])
    picks = [str(w) for w in rng.permutation(words)]
    return {"id": f"text{index:04d}", "label": code, "captions": ["  ".join(picks[0:2]).upper(), "  ".join(picks[2:4]).upper()],
            "spoken": " ".join(picks[3:6]), "duration_s": duration_s, "seed": int(rng.integers(1 << 31))}


def _encode(plan: dict[str, Any], path: Path, *, width: int, height: int, speech: bool) -> None:
    import av

    rng = np.random.default_rng(plan["seed"])
    fps = 10
    n_frames = int(plan["duration_s"] * fps)
    n_samples = int(plan["duration_s"] * SAMPLE_RATE)
    audio = rng.normal(0, 0.003, n_samples).astype(np.float32)  # the same faint noise in every class
    if speech:
        voice = synthesize(plan["spoken"])[: n_samples - SAMPLE_RATE // 2]
        audio[SAMPLE_RATE // 2 : SAMPLE_RATE // 2 + len(voice)] += voice
    base = rng.integers(40, 200, (height, width, 3)).astype(np.uint8)
    import cv2

    base = cv2.GaussianBlur(base, (0, 0), 3)  # a soft texture: cheap to encode, still no class evidence
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "23", "threads": "1"})
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        ast = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for k in range(n_frames):
            t = k / fps
            caption = plan["captions"][0 if t < plan["duration_s"] / 2 else 1]
            vf = av.VideoFrame.from_ndarray(_frame(rng, width, height, caption, t, base), format="rgb24")
            vf.pts = k
            for pkt in vs.encode(vf):
                out.mux(pkt)
        for start in range(0, n_samples, 1024):
            fr = av.AudioFrame.from_ndarray(np.clip(audio[start : start + 1024], -1, 1)[None], format="fltp", layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
            for pkt in ast.encode(fr):
                out.mux(pkt)
        for stream in (vs, ast):
            for pkt in stream.encode(None):
                out.mux(pkt)
    os.replace(tmp, path)


def generate_text_corpus(out: str | Path, *, videos_per_class: int = 4, seed: int = 0, duration_s: float = 6.0,
                         width: int = 320, height: int = 180, classes: dict[str, list[str]] | None = None,
                         speech: bool = True) -> dict[str, Any]:
    """Write ``out/videos/*.mp4``, ``out/annotations.json`` and ``out/truth.json``; returns the paths and the plans.

    ``speech`` without espeak-ng logs a warning and writes silent videos (``truth.json`` says ``speech: false``).
    """
    classes = classes or DEFAULT_CLASSES
    root = Path(out)
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    why = speech_unavailable() if speech else "speech off"
    if speech and why:
        log.warning("corpus: videos will be silent: %s", why)
    plans = [_plan(i * len(classes) + c, code, words, seed, duration_s)
             for i in range(videos_per_class) for c, (code, words) in enumerate(sorted(classes.items()))]
    for p in plans:
        path = videos / f"{p['id']}.mp4"
        if not path.exists():
            _encode(p, path, width=width, height=height, speech=why is None)
    annotations = [{"id": p["id"], "title": f"clip {k}", "asr": "", "ocr": [], "category_id": p["label"]}
                   for k, p in enumerate(plans)]
    (root / "annotations.json").write_text(json.dumps(annotations, indent=1))
    truth = {"speech": why is None, "classes": classes, "videos": plans}
    (root / "truth.json").write_text(json.dumps(truth, indent=1))
    return {"root": str(root), "videos": str(videos), "annotations": str(root / "annotations.json"),
            "truth": truth}


def main(argv: list[str] | None = None) -> int:
    """``python -m raypipe.corpus_text OUT [--per-class N] [--seed S]``: the corpus of docs/OCR_ASR.md."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m raypipe.corpus_text", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--duration", type=float, default=6.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = generate_text_corpus(args.out, videos_per_class=args.per_class, seed=args.seed, duration_s=args.duration)
    log.info("corpus: %d videos in %s (speech: %s)", len(info["truth"]["videos"]), info["videos"],
             info["truth"]["speech"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
