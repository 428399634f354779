"""`raypipe embed` with the OCR and ASR stages on: Ray Data actor pools, rows, timed text and stage times."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("rapidocr_onnxruntime", reason="OCR engine not installed: pip install 'raypipe[ocr]'")
pytest.importorskip("pocketsphinx", reason="ASR engine not installed: pip install 'raypipe[asr]'")


def test_embed_with_ocr_and_asr_stages(ray_session, text_corpus, test_config_factory):
    from raypipe.config.embed import config_hash
    from raypipe.embed.pipeline import embed_videos
    from raypipe.io.shards import read_shards

    vocab = sorted({w for words in text_corpus["truth"]["classes"].values() for w in words})
    cfg = test_config_factory(
        f"embed.source.uri={text_corpus['videos']}",
        f"embed.source.annotations={text_corpus['annotations']}",
        "embed.ocr.enabled=true", "embed.asr.enabled=true", f"embed.asr.vocabulary={json.dumps(vocab)}",
        name="text_from_video",
    )
    summary = embed_videos(cfg)
    assert summary["videos_ok"] == 4 and summary["rows_total"] == 4
    stages = summary["stage_seconds"]
    # decode, OCR and ASR; "encode" too where the encoders are one fused pool (the test preset's)
    assert {"decode", "ocr", "asr"} <= set(stages) <= {"decode", "ocr", "asr", "encode"}, stages
    assert all(v > 0 for v in stages.values()), stages
    assert summary["config_hash"] != config_hash(cfg.embed.model_copy(update={"ocr": cfg.embed.ocr.model_copy(
        update={"enabled": False})}))

    table, info = read_shards(cfg.embed.output, cfg.storage)
    assert info is not None and {"ocr", "asr"} <= set(info.embedders)
    truth = {v["id"]: v for v in text_corpus["truth"]["videos"]}
    for row in table.to_pylist():
        t = truth[row["video_id"]]
        ocr_timed = json.loads(row["ocr_timed"])
        assert [o["text"] for o in ocr_timed] and row["ocr"] == " ".join(o["text"] for o in ocr_timed)
        assert t["captions"][0].split()[0] in row["ocr"]  # a word of the first caption was read
        if text_corpus["truth"]["speech"]:
            assert set(json.loads(row["asr_timed"])["text"].split()) & set(t["spoken"].split())
        assert row["text"].startswith(f"{row['title']} ") and row["ocr"] in row["text"]
