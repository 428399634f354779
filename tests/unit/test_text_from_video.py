"""OCR / ASR stages without Ray: real decode of generated videos, the real engines, error rates against truth."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from raypipe.config.embed import AsrConfig, EmbedConfig, OcrConfig, config_hash

log = logging.getLogger(__name__)

pytest.importorskip("rapidocr_onnxruntime", reason="OCR engine not installed: pip install 'raypipe[ocr]'")
pytest.importorskip("pocketsphinx", reason="ASR engine not installed: pip install 'raypipe[asr]'")


def _vocabulary(truth: dict) -> list[str]:
    return sorted({w for words in truth["classes"].values() for w in words})


def _decoded_batch(corpus: dict, e: EmbedConfig) -> dict[str, np.ndarray]:
    """The decode task's rows (with OCR frames when ``e.ocr`` is on) stacked like a Ray Data numpy batch."""
    from raypipe.embed.pipeline import _decode_row, _ref_item
    from raypipe.io.sources import list_videos

    refs = list_videos(e.source, None)
    rows = [_decode_row(_ref_item(r), decode_cfg=e.decode, image_size=48, storage=None,
                        ocr_cfg=e.ocr if e.ocr.enabled else None) for r in refs]
    return {k: np.asarray([r[k] for r in rows], dtype=object if isinstance(rows[0][k], str) else None)
            for k in rows[0]}


def _embed_cfg(corpus: dict, **kw) -> EmbedConfig:
    return EmbedConfig(source={"uri": corpus["videos"], "annotations": corpus["annotations"]}, **kw)


def test_ocr_reads_burned_in_captions(text_corpus, record_property):
    from raypipe.embed.ocr import OcrStage
    from raypipe.metrics import char_error_rate

    e = _embed_cfg(text_corpus, ocr={"enabled": True, "every": 1})
    batch = OcrStage(e.ocr)(_decoded_batch(text_corpus, e))
    truth = {v["id"]: v for v in text_corpus["truth"]["videos"]}
    refs = [" ".join(truth[v]["captions"]) for v in batch["video_id"]]
    cer = char_error_rate(refs, list(batch["ocr"]))
    record_property("ocr_cer", cer)
    log.warning("OCR character error rate on %d generated videos: %.3f", len(refs), cer)
    assert cer <= 0.15, list(zip(refs, batch["ocr"], strict=True))
    timed = [json.loads(t) for t in batch["ocr_timed"]]
    assert all(len(t) >= 2 and t[0]["time"] < t[-1]["time"] for t in timed), timed  # both captions, in time order
    assert "ocr_frames" not in batch and all(s > 0 for s in batch["ocr_s"])
    # Merged into the tokenised text after the (neutral) title, as the WBDC importer does with shipped OCR.
    assert all(t.startswith("clip ") and o in t for t, o in zip(batch["text"], batch["ocr"], strict=True))


def test_asr_recognises_espeak_speech(text_corpus, record_property):
    from raypipe.embed.asr import AsrStage
    from raypipe.metrics import word_error_rate

    if not text_corpus["truth"]["speech"]:
        from raypipe.corpus_text import speech_unavailable

        pytest.skip(f"no synthetic speech: {speech_unavailable()}")
    truth = {v["id"]: v for v in text_corpus["truth"]["videos"]}
    e = _embed_cfg(text_corpus, asr={"enabled": True, "vocabulary": _vocabulary(text_corpus["truth"])})
    batch = AsrStage(e.asr)(_decoded_batch(text_corpus, e))
    refs = [truth[v]["spoken"] for v in batch["video_id"]]
    wer = word_error_rate(refs, list(batch["asr"]))
    record_property("asr_wer_vocabulary", wer)
    log.warning("ASR word error rate (pocketsphinx, class vocabulary) on espeak-ng speech: %.3f", wer)
    assert wer <= 0.34, list(zip(refs, batch["asr"], strict=True))
    words = json.loads(batch["asr_timed"][0])["words"]
    assert words and all(0 <= w["start"] < w["end"] <= 6.0 for w in words)  # word times inside the clip
    assert all(a in t for t, a in zip(batch["text"], batch["asr"], strict=True))


def test_silent_or_corrupt_audio_gives_empty_asr_and_a_row(tmp_path):
    from raypipe.corpus_text import generate_text_corpus
    from raypipe.embed.asr import AsrStage

    silent = generate_text_corpus(tmp_path / "silent", videos_per_class=1, seed=2, duration_s=3.0, speech=False,
                                  classes={"0101": ["goal", "team", "score", "match", "player", "football"]})
    e = _embed_cfg(silent, asr={"enabled": True})
    batch = _decoded_batch(silent, e)
    assert batch["audio_mask"].any()  # a real (silent) audio track, decoded
    w = batch["audio"].shape[-1]
    garbage = np.random.default_rng(0).normal(0, 1e30, (1,) + batch["audio"].shape[1:]).astype(np.float32)
    garbage[0, 0, : w // 2] = np.nan
    batch = {k: np.concatenate([v, v, v]) for k, v in batch.items()}  # silent, corrupt, no audio at all
    batch["audio"][1] = garbage[0]
    batch["audio_mask"][2] = False
    out = AsrStage(e.asr)(batch)
    assert list(out["status"]) == ["ok"] * 3
    assert list(out["asr"]) == ["", "", ""]
    assert [json.loads(t) for t in out["asr_timed"]] == [{"text": "", "words": []}] * 3
    assert list(out["text"]) == ["clip 0"] * 3


def test_fingerprint_changes_only_when_ocr_or_asr_are_on():
    base = config_hash(EmbedConfig())
    assert config_hash(EmbedConfig(ocr={"every": 2})) == base  # off: the old fingerprint, old outputs resume
    hashes = {config_hash(EmbedConfig(ocr={"enabled": True})), config_hash(EmbedConfig(asr={"enabled": True})),
              config_hash(EmbedConfig(ocr={"enabled": True}, asr={"enabled": True})),
              config_hash(EmbedConfig(ocr={"enabled": True, "every": 2}))}
    assert base not in hashes and len(hashes) == 4


def test_missing_engine_is_a_one_line_config_error(monkeypatch):
    import sys

    from raypipe.config import ConfigError
    from raypipe.embed.extracted import check_engines

    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # what an environment without the extra sees
    with pytest.raises(ConfigError) as exc:
        check_engines(EmbedConfig(ocr={"enabled": True}))
    assert "\n" not in str(exc.value) and "pip install 'raypipe[ocr]'" in str(exc.value)
    check_engines(EmbedConfig())  # off: nothing needed
    with pytest.raises(ValueError, match="model_path"):
        AsrConfig(engine="whisper")


def test_merge_follows_the_shipped_fields_rule():
    from raypipe.embed.extracted import merged

    assert merged("shipped", "read", "annotations") == "shipped"
    assert merged("", "read", "annotations") == "read"
    assert merged("shipped", "read", "extracted") == "read"
    assert merged("shipped", "", "extracted") == "shipped"
    assert merged("shipped", "read", "both") == "shipped read"


def test_ocr_and_asr_pools_fit_a_two_cpu_laptop():
    from raypipe.config import RaypipeConfig
    from raypipe.resources import Cluster, check, plan_embed, plan_label

    laptop = Cluster.single(2)
    cfg = RaypipeConfig(embed={"ocr": {"enabled": True}, "asr": {"enabled": True}})
    for plan in (plan_embed(cfg.embed, laptop), plan_label(cfg, laptop)):
        check(plan, laptop)
        assert {"embed.ocr_pool.num_cpus", "embed.asr_pool.num_cpus"} <= set(plan.settings)
        assert plan.settings["embed.ocr_pool.num_gpus"] == 0
    assert "embed.ocr_pool.num_cpus" not in plan_embed(EmbedConfig(), laptop).settings


def test_label_refuses_a_model_trained_with_ocr_when_ocr_is_off():
    from raypipe.embed.ocr import ocr_info
    from raypipe.label import _check_embedders

    same = {"frames": {"name": "f"}, "audio": {"name": "a"}, "text": {"name": "t"}}
    with pytest.raises(ValueError, match=r"trained with embed\.ocr on, embed\.ocr\.enabled is false"):
        _check_embedders({**same, "ocr": ocr_info(OcrConfig(enabled=True))}, same)
    with pytest.raises(ValueError, match="ocr.every"):
        _check_embedders({**same, "ocr": ocr_info(OcrConfig(enabled=True))}, {**same, "ocr": ocr_info(OcrConfig(every=2))})
    _check_embedders(same, dict(same))


def test_ocr_frames_skip_repeated_screens(text_corpus):
    def counts(threshold: float) -> list[int]:
        e = _embed_cfg(text_corpus, ocr={"enabled": True, "every": 1, "max_frames": 6, "dedup_threshold": threshold})
        return [int(n) for n in _decoded_batch(text_corpus, e)["ocr_count"]]

    assert counts(0) == [6] * 4  # 6 sampled seconds, all kept
    kept = counts(OcrConfig().dedup_threshold)  # the default drops near-identical screens, keeps the caption change
    assert all(2 <= n < 6 for n in kept), kept
    assert counts(255) == [1] * 4  # nothing differs enough: the first screen only
