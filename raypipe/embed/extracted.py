"""What the OCR and ASR stages share: the engine check on the driver and the merge into the tokenised text.

The merge follows the WBDC importer (:func:`raypipe.io.text.build_text`: cleaned ``title ASR OCR``); a shipped
field (annotations, manifest, WebDataset JSON) wins when present unless ``merge`` says otherwise, so a corpus
that already has good ASR/OCR keeps it and one with a title at best gets the text read from the video.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from raypipe.config.base import ConfigError
from raypipe.io.text import build_text

# engine -> (importable modules, any one of which will do; the extra that installs the default one)
_ENGINES = {
    "rapidocr": (("rapidocr_onnxruntime",), "ocr"),
    "pocketsphinx": (("pocketsphinx",), "asr"),
    "whisper": (("faster_whisper", "whisper"), "asr"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_engines(e: Any) -> None:
    """Refuse (one-line :class:`ConfigError`) an enabled OCR/ASR engine whose package is not installed, on the
    driver before any Ray work starts, instead of an ImportError in an actor minutes later."""
    for key, sub in (("embed.ocr", e.ocr), ("embed.asr", e.asr)):
        if not sub.enabled:
            continue
        modules, extra = _ENGINES[sub.engine]
        if not any(_installed(m) for m in modules):
            what = " or ".join(m.replace("_", "-") for m in modules)
            raise ConfigError(f"config error: {key}.engine={sub.engine!r} needs {what}, which is not installed: "
                              f"pip install 'raypipe[{extra}]'")


def merged(shipped: str, extracted: str, how: str) -> str:
    """The field that goes into the text: ``annotations`` (shipped wins when non-empty), ``extracted``, ``both``."""
    shipped, extracted = (shipped or "").strip(), (extracted or "").strip()
    if how == "extracted":
        return extracted or shipped
    if how == "both":
        return " ".join(p for p in (shipped, extracted) if p)
    return shipped or extracted


def set_field(batch: dict[str, Any], field: str, texts: list[str], how: str) -> None:
    """Merge ``texts`` (one per row; "" where nothing was read) into ``batch[field]`` and rebuild ``text``.

    The shipped value is kept once in ``shipped_<field>`` so that a second stage (ASR after OCR) merges with the
    original, not with an already merged value.
    """
    key = f"shipped_{field}"
    if key not in batch:
        batch[key] = np.asarray([str(x) for x in batch[field]], dtype=object)
    shipped = batch[key]
    batch[field] = np.asarray([merged(str(s), t, how) for s, t in zip(shipped, texts, strict=True)], dtype=object)
    batch["text"] = np.asarray(
        [build_text(str(ti), str(a), str(o)) for ti, a, o in zip(batch["title"], batch["asr"], batch["ocr"], strict=True)],
        dtype=object,
    )
