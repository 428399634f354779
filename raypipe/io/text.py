"""Sidecar text: cleaning, the "title ASR OCR" concatenation (DMAFNet's order) and fixed-length tokenisation."""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

_URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
_TAG = re.compile(r"<[^>]{0,200}>")
_MENTION = re.compile(r"[@#]\S+")
_REPEAT_PUNCT = re.compile(r"([!?.,;:~\-_*=+。！？，、])\1+")
_REPEAT_CHAR = re.compile(r"(\w)\1{3,}")
_SPACE = re.compile(r"\s+")


def _keep(ch: str) -> bool:
    cat = unicodedata.category(ch)
    # Letters, marks, numbers, punctuation and spaces carry meaning; symbols (emoji, box drawing, math/currency
    # noise), control and private-use characters are ASR/OCR noise.
    return cat[0] in "LMNPZ"


def clean_text(text: str | None) -> str:
    """Normalise and strip noise: HTML entities/tags, URLs, @/# handles, emoji and symbols, control characters,
    runs of punctuation (``!!!`` -> ``!``) and of one character (``aaaaaa`` -> ``aaa``), extra whitespace."""
    if not text:
        return ""
    s = unicodedata.normalize("NFKC", html.unescape(str(text)))
    s = _TAG.sub(" ", s)
    s = _URL.sub(" ", s)
    s = _MENTION.sub(" ", s)
    s = "".join(ch if _keep(ch) else " " for ch in s)
    s = _REPEAT_PUNCT.sub(r"\1", s)
    s = _REPEAT_CHAR.sub(r"\1\1\1", s)
    return _SPACE.sub(" ", s).strip()


def flatten_ocr(ocr: Any) -> str:
    """WBDC OCR is a list of ``{time, text}``; manifests may give a plain string. Ordered by time."""
    if ocr is None:
        return ""
    if isinstance(ocr, str):
        return ocr
    items = [o for o in ocr if isinstance(o, dict)]
    items.sort(key=lambda o: float(o.get("time", 0) or 0))
    return " ".join(str(o.get("text", "")) for o in items if o.get("text"))


def build_text(title: str | None, asr: str | None, ocr: Any) -> str:
    """Cleaned ``title ASR OCR`` in that order, empty parts skipped."""
    parts = [clean_text(title), clean_text(asr), clean_text(flatten_ocr(ocr))]
    return " ".join(p for p in parts if p)


def tokenize(tokenizer: Any, texts: Sequence[str], max_len: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, truncated and padded to exactly ``max_len``: int32 ``(N, max_len)`` each."""
    enc = tokenizer(
        list(texts), max_length=max_len, truncation=True, padding="max_length", return_tensors="np"
    )
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """What ShardInfo.tokenizer records: vocab size and the special ids MLM must never mask."""
    return {
        "name": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "vocab_size": int(len(tokenizer)),
        "pad_token_id": tokenizer.pad_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "unk_token_id": tokenizer.unk_token_id,
        "special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
    }
