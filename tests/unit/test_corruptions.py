"""Corruptions keep features and masks consistent, touch only real positions and hit their proportions."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from raypipe.config.corruption import CorruptionConfig
from raypipe.corruptions import (
    apply_corruption,
    corrupt_with_config,
    corruption_generator,
    drop_features,
    drop_tokens,
    gaussian_noise,
    zero_modality,
)

B, T, DV, DA, L, DT = 64, 32, 8, 4, 12, 6


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A contract batch: 1..32 real frames per video, audio on even videos only, padded text."""
    g = torch.Generator().manual_seed(seed)
    n_frames = torch.randint(1, T + 1, (B,), generator=g)
    frame_mask = torch.arange(T)[None, :] < n_frames[:, None]  # (B, T)
    audio_mask = frame_mask & (torch.arange(B) % 2 == 0)[:, None]
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    attention = (torch.arange(L)[None, :] < lengths[:, None]).long()
    return {
        "frame_feats": (torch.randn(B, T, DV, generator=g) + 3.0) * frame_mask[..., None],
        "frame_mask": frame_mask,
        "audio_feats": (torch.randn(B, T, DA, generator=g) - 3.0) * audio_mask[..., None],
        "audio_mask": audio_mask,
        "input_ids": torch.randint(1000, 2000, (B, L), generator=g) * attention,
        "attention_mask": attention,
        "text_emb": torch.randn(B, DT, generator=g),
        "label": torch.arange(B),
    }


def assert_consistent(original: dict, corrupted: dict, feats: str, mask: str) -> None:
    """Masked-out positions are all zero; kept positions are untouched; no position is newly masked in."""
    new_mask, old_mask = corrupted[mask], original[mask]
    assert new_mask.dtype == old_mask.dtype
    assert not (new_mask & ~old_mask).any()
    assert (corrupted[feats][~new_mask] == 0).all()
    assert torch.equal(corrupted[feats][new_mask], original[feats][new_mask])


def _within_5_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p))


def test_drop_features_p03_drops_about_30_percent_and_keeps_masks_consistent() -> None:
    batch = make_batch()
    snapshot = {k: v.clone() for k, v in batch.items()}
    out = drop_features(batch, 0.3, torch.Generator().manual_seed(1), keep_one_frame=False)
    for feats, mask in (("frame_feats", "frame_mask"), ("audio_feats", "audio_mask")):
        assert_consistent(batch, out, feats, mask)
        n_real = int(batch[mask].sum())
        n_dropped = n_real - int(out[mask].sum())
        assert _within_5_sigma(n_dropped, n_real, 0.3), (feats, n_dropped / n_real)
    for key, value in snapshot.items():  # the input batch is never modified
        assert torch.equal(batch[key], value)
    assert out["input_ids"] is batch["input_ids"] and out["label"] is batch["label"]


def test_drop_features_keeps_one_frame_per_video() -> None:
    batch = make_batch()
    out = drop_features(batch, 1.0, torch.Generator().manual_seed(2))
    assert (out["frame_mask"].sum(dim=1) == 1).all()
    assert not out["audio_mask"].any()  # audio may vanish entirely, as for audio-less videos
    assert_consistent(batch, out, "frame_feats", "frame_mask")
    assert_consistent(batch, out, "audio_feats", "audio_mask")
    kept_index = out["frame_mask"].float().argmax(dim=1)
    assert (kept_index < batch["frame_mask"].sum(dim=1)).all()  # the survivor is a real frame
    assert len(set(kept_index.tolist())) > 5  # chosen at random, not always the first


def test_drop_features_p0_and_determinism() -> None:
    batch = make_batch()
    same = drop_features(batch, 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(same["frame_mask"], batch["frame_mask"]) and torch.equal(
        same["frame_feats"], batch["frame_feats"]
    )
    a = drop_features(batch, 0.5, torch.Generator().manual_seed(4))
    b = drop_features(batch, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a["frame_mask"], b["frame_mask"]) and torch.equal(a["audio_mask"], b["audio_mask"])
    with pytest.raises(ValueError, match="p must be in"):
        drop_features(batch, 1.5)


def test_gaussian_noise_only_on_real_frames() -> None:
    batch = make_batch()
    out = gaussian_noise(batch, 0.5, torch.Generator().manual_seed(5))
    mask = batch["frame_mask"]
    assert torch.equal(out["frame_mask"], mask)
    assert (out["frame_feats"][~mask] == 0).all()  # padding stays exactly zero
    noise = (out["frame_feats"] - batch["frame_feats"])[mask]  # (n_real, DV)
    assert noise.std().item() == pytest.approx(0.5, rel=0.05)
    assert abs(noise.mean().item()) < 0.05
    assert out["audio_feats"] is batch["audio_feats"] and out["input_ids"] is batch["input_ids"]


def test_gaussian_noise_relative_scales_with_feature_rms() -> None:
    batch = make_batch()
    rms = batch["frame_feats"][batch["frame_mask"]].pow(2).mean().sqrt().item()
    out = gaussian_noise(batch, 0.1, torch.Generator().manual_seed(6), relative=True)
    noise = (out["frame_feats"] - batch["frame_feats"])[batch["frame_mask"]]
    assert noise.std().item() == pytest.approx(0.1 * rms, rel=0.05)


@pytest.mark.parametrize("name", ["frames", "audio"])
def test_zero_modality_features(name: str) -> None:
    batch = make_batch()
    out = zero_modality(batch, name)
    feats, mask = ("frame_feats", "frame_mask") if name == "frames" else ("audio_feats", "audio_mask")
    other = ("audio_feats", "audio_mask") if name == "frames" else ("frame_feats", "frame_mask")
    assert (out[feats] == 0).all() and not out[mask].any() and out[mask].dtype == batch[mask].dtype
    assert out[other[0]] is batch[other[0]] and out[other[1]] is batch[other[1]]
    assert batch[mask].any()  # input intact


def test_zero_modality_text() -> None:
    batch = make_batch()
    out = zero_modality(batch, "text", pad_token_id=0)
    assert (out["input_ids"] == 0).all() and (out["attention_mask"] == 0).all() and (out["text_emb"] == 0).all()
    assert out["input_ids"].dtype == batch["input_ids"].dtype
    assert out["frame_feats"] is batch["frame_feats"]
    with pytest.raises(ValueError, match="modality"):
        zero_modality(batch, "video")


def test_apply_corruption_dispatches_and_rejects_bad_options() -> None:
    batch = make_batch()
    direct = drop_features(batch, 0.3, torch.Generator().manual_seed(7))
    via = apply_corruption(batch, "drop_features", generator=torch.Generator().manual_seed(7), p=0.3)
    assert torch.equal(direct["frame_mask"], via["frame_mask"]) and torch.equal(direct["audio_mask"], via["audio_mask"])
    none = apply_corruption(batch, "none")
    assert all(none[k] is batch[k] for k in batch)
    text = apply_corruption(batch, "zero_modality", modality="text", pad_token_id=0)
    assert not text["attention_mask"].any()
    with pytest.raises(TypeError, match=r"\['std'\]"):
        apply_corruption(batch, "drop_features", std=0.1)
    with pytest.raises(TypeError, match="pad_token_id"):
        apply_corruption(batch, "drop_features", pad_token_id=0)
    with pytest.raises(ValueError, match="unknown corruption kind"):
        apply_corruption(batch, "blur")


def test_corruption_config_drives_apply_and_rejects_stray_options() -> None:
    cfg = CorruptionConfig(kind="gaussian_noise", std=0.2, seed=11)
    assert cfg.params() == {"std": 0.2, "relative": False}
    batch = make_batch()
    a = corrupt_with_config(batch, cfg, corruption_generator(cfg))
    b = gaussian_noise(batch, 0.2, torch.Generator().manual_seed(11))
    assert torch.equal(a["frame_feats"], b["frame_feats"])
    with pytest.raises(ValidationError, match="not used by kind='drop_features'"):
        CorruptionConfig(kind="drop_features", std=0.5)
    with pytest.raises(ValidationError):
        CorruptionConfig(kind="drop_features", p=1.3)
    with pytest.raises(ValidationError):
        CorruptionConfig(kind="zero_modality", modality="video")
    assert CorruptionConfig().params() == {}


def test_full_config_dump_round_trips() -> None:
    from raypipe.config import RaypipeConfig, load_config

    cfg = load_config("demo")
    assert RaypipeConfig.model_validate(cfg.model_dump()) == cfg


def _bert_batch() -> dict[str, torch.Tensor]:
    """make_batch's text with a [CLS] (101) first and a [SEP] (102) last in every row, pad id 0."""
    batch = make_batch()
    ids, attn = batch["input_ids"].clone(), batch["attention_mask"]
    lengths = attn.sum(1)
    ids[:, 0] = 101
    ids[torch.arange(B), lengths - 1] = 102
    batch["input_ids"] = ids
    return batch


@pytest.mark.parametrize("special", [(0, 101, 102), None])
def test_drop_tokens_drops_about_p_of_the_words_and_keeps_cls_sep(special) -> None:
    batch = _bert_batch()
    snapshot = {k: v.clone() for k, v in batch.items()}
    out = drop_tokens(batch, 0.3, torch.Generator().manual_seed(3), pad_token_id=0, special_token_ids=special)
    assert all(torch.equal(batch[k], snapshot[k]) for k in batch)  # the input batch is left as it was
    real, kept = batch["attention_mask"].bool(), out["attention_mask"].bool()
    words = real & (batch["input_ids"] != 101) & (batch["input_ids"] != 102)
    dropped = real & ~kept
    assert not (kept & ~real).any() and not (dropped & ~words).any()  # only real non-special tokens go
    assert (out["input_ids"][dropped] == 0).all() and torch.equal(out["input_ids"][kept], batch["input_ids"][kept])
    assert (out["input_ids"][real & ~words] == batch["input_ids"][real & ~words]).all()  # [CLS]/[SEP] stay
    assert _within_5_sigma(int(dropped.sum()), int(words.sum()), 0.3)
    assert out["attention_mask"].dtype == batch["attention_mask"].dtype
    # text_emb: whole rows zeroed with probability p, the others untouched; frames and audio not touched at all
    zeroed = (out["text_emb"] == 0).all(dim=1)
    assert torch.equal(out["text_emb"][~zeroed], batch["text_emb"][~zeroed]) and 0 < int(zeroed.sum()) < B
    assert out["frame_feats"] is batch["frame_feats"] and out["audio_mask"] is batch["audio_mask"]


def test_drop_tokens_p0_p1_seeded_and_via_config() -> None:
    batch = _bert_batch()
    none = drop_tokens(batch, 0.0, torch.Generator().manual_seed(0), special_token_ids=(101, 102))
    assert torch.equal(none["input_ids"], batch["input_ids"]) and torch.equal(none["text_emb"], batch["text_emb"])
    everything = drop_tokens(batch, 1.0, torch.Generator().manual_seed(0), special_token_ids=(101, 102))
    assert torch.equal(everything["attention_mask"].sum(1), torch.full((B,), 2))  # only [CLS] and [SEP] left
    assert (everything["text_emb"] == 0).all()
    cfg = CorruptionConfig(kind="drop_tokens", p=0.5, seed=4)
    assert cfg.params() == {"p": 0.5}
    a = corrupt_with_config(batch, cfg, corruption_generator(cfg))
    b = apply_corruption(batch, "drop_tokens", generator=torch.Generator().manual_seed(4), p=0.5)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["text_emb"], b["text_emb"])
    with pytest.raises(ValidationError, match="not used by kind='drop_tokens'"):
        CorruptionConfig(kind="drop_tokens", std=0.5)
    with pytest.raises(KeyError, match="drop_tokens needs"):
        drop_tokens({"frame_feats": batch["frame_feats"]}, 0.3)
