"""Zero-shot scoring inside an experiment trial (no Ray): a CAV-Net trained with classes held out, its held-out
classes' test rows scored against the embedded class names by raypipe eval's scoring code."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from raypipe.config import load_config
from raypipe.data import DataSpec
from raypipe.schema import ShardInfo

CLASSES = ["0101", "0102", "0201", "0202"]
NAMES = {"0101": "beach sports", "0102": "mountain sports", "0201": "beach music", "0202": "mountain music"}
HELD = ["0202"]
T, L = 4, 8


def _spec() -> DataSpec:
    from raypipe.config.embed import TextEncoderConfig
    from raypipe.embed.text import text_encoder_info

    text, tok = text_encoder_info(TextEncoderConfig(max_len=128))  # the shards' text encoder (MiniLM, 128 tokens)
    info = ShardInfo(frame_dim=16, audio_dim=8, text_dim=int(text["dim"]), text_len=L, max_frames=T, tokenizer=tok,
                     embedders={"text": text})
    return DataSpec(uri="/mem", files=[], info=asdict(info), classes=CLASSES, task="single_label", val_fraction=0.25,
                    num_train=24, num_val=8, test_fraction=0.25, num_test=16, holdout_classes=HELD)


def _rows(labels: list[int], seed: int) -> dict[str, np.ndarray]:
    """Model arrays as :func:`raypipe.data.prepare_batch` gives them; the class is in the frames."""
    rng = np.random.default_rng(seed)
    n, y = len(labels), np.asarray(labels, dtype=np.int64)
    ids = rng.integers(1000, 2000, size=(n, L))
    ids[:, 0], ids[:, -1] = 101, 102
    return {"video_id": np.asarray([f"v{seed}-{i}" for i in range(n)], dtype=object), "label": y,
            "frame_feats": (rng.normal(size=(n, T, 16)) + y[:, None, None]).astype(np.float32),
            "frame_mask": np.ones((n, T), bool), "audio_feats": rng.normal(size=(n, T, 8)).astype(np.float32),
            "audio_mask": np.ones((n, T), bool), "input_ids": ids.astype(np.int32),
            "attention_mask": np.ones((n, L), np.int32), "text_emb": rng.normal(size=(n, 384)).astype(np.float32)}


def _cfg(tmp_path, *, zero_shot: bool):
    names = tmp_path / "class_names.txt"
    names.write_text("".join(f"{c}\t{n}\n" for c, n in NAMES.items()))
    return load_config(None, [
        "model.name=cavnet", "model.params.dim=16", "model.params.heads=2", "model.params.gate_hidden=8",
        "model.params.proj_dim=8", "train.loss.mlm=0", "train.loss.vtm=0", "train.metric=val/top1", "train.epochs=2", "train.early_stopping_patience=null",
        "train.batch_size=4", "train.use_gpu=false", "train.val_fraction=0.25", "train.test_fraction=0.25",
        f"train.holdout_classes={HELD}", f"eval.zero_shot={str(zero_shot).lower()}", f"eval.class_names={names}"])


def test_a_zero_shot_trial_scores_its_held_out_classes_against_the_class_names(tmp_path) -> None:
    from raypipe.experiments.trial import build_worker, run_trial, score, zero_shot_class_embeddings
    from raypipe.label import embed_class_names
    from raypipe.train import model_kwargs

    spec = _spec()
    seen = [0, 1, 2] * 8  # train / val hold no row of the held-out class 3 ("0202"), as prepare_batch keeps them
    splits = {"train": _rows(seen, 0), "val": _rows(seen[:9], 1), "test": _rows([0, 1, 2, 3] * 4, 2)}
    cfg = _cfg(tmp_path, zero_shot=True)
    kwargs = model_kwargs(cfg, spec)
    result = run_trial(cfg, spec, kwargs, splits, {})
    zs = result["zero_shot"]
    assert zs["n"] == 4.0 and 0.0 <= zs["top1"] <= zs["top5"] == 1.0  # 4 held-out rows; top-5 of 4 classes
    assert {"top1", "top5", "zs/top1"} <= set(result["test"])
    assert "zero_shot" not in run_trial(_cfg(tmp_path, zero_shot=False), spec, kwargs, splits, {})

    # The numbers are the zero-shot rule itself: argmax over cos(z, class-name embedding) on the held-out rows only,
    # the class names embedded by the shards' text encoder (what raypipe label embeds them with).
    w = build_worker(cfg, spec, kwargs, splits, torch.device("cpu"))
    emb = zero_shot_class_embeddings(w)
    np.testing.assert_allclose(emb, embed_class_names(cfg, NAMES), rtol=1e-5, atol=1e-6)
    test = splits["test"]
    from raypipe.data import to_torch

    w.core.eval()
    with torch.no_grad():
        sims = w.core.zero_shot_logits(to_torch(test), torch.as_tensor(emb))  # (N, C)
    held = test["label"] == 3
    expected = float((sims.argmax(1).numpy()[held] == 3).mean())
    got = score(w, test, None, class_emb=emb)
    assert got["zs/top1"] == pytest.approx(expected) and got["zs/n"] == held.sum()
    # the supervised metrics leave the held-out rows out (the classifier never trained on their class)
    with torch.no_grad():
        logits = w.core(to_torch(test))["logits"]
    assert got["top1"] == pytest.approx(float((logits.argmax(1).numpy()[~held] == test["label"][~held]).mean()))
