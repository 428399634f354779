"""Evaluation-time corruptions of model batches (pure PyTorch), for the robustness numbers of ``raypipe eval``.

They act on the batch contract of :mod:`raypipe.models` (``frame_feats``/``frame_mask``, ``audio_feats``/
``audio_mask``, ``input_ids``/``attention_mask``, ``text_emb``) and keep features and masks consistent: a
dropped vector is zeroed *and* its mask bit cleared, so a model sees a shorter video rather than a zero
feature it would attend to as if it were real. Only real (masked-in) positions are ever touched, so padding
stays exactly zero. Every function returns a new dict and leaves the input batch unmodified; entries it does not
touch are shared, not copied.

DMAFNet's robustness study drops 30 % of the features (``drop_features(p=0.3)``) and adds Gaussian noise to the
frame features (``gaussian_noise``); ``zero_modality`` gives the single-modality ablations at test time;
``drop_tokens`` drops words of the text (each non-special token with probability ``p``), the text counterpart of
``drop_features``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from raypipe.config.corruption import KIND_PARAMS, CorruptionConfig

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]
MODALITY_KEYS: dict[str, tuple[str, ...]] = {
    "frames": ("frame_feats", "frame_mask"),
    "audio": ("audio_feats", "audio_mask"),
    "text": ("input_ids", "attention_mask", "text_emb"),
}

# Options that are not part of CorruptionConfig (they follow from the data, not the experiment).
_EXTRA_PARAMS: dict[str, set[str]] = {
    "drop_features": {"keep_one_frame"},
    "drop_tokens": {"pad_token_id", "special_token_ids"},
    "zero_modality": {"pad_token_id"},
}


def _draw(kind: str, shape: torch.Size, *, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Random numbers on the generator's device (torch requires it), moved to ``like``'s device."""
    device = generator.device if generator is not None else like.device
    fn = torch.rand if kind == "uniform" else torch.randn
    return fn(shape, generator=generator, device=device).to(like.device)


def _require(batch: Batch, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{what} needs batch keys {missing}; present: {sorted(batch)}")


def drop_features(
    batch: Batch, p: float, generator: torch.Generator | None = None, *, keep_one_frame: bool = True
) -> dict[str, Any]:
    """Drop each real frame vector and each real audio vector independently with probability ``p``.

    A dropped vector is zeroed and its mask bit cleared. Frames and audio are dropped independently (a
    feature extractor failing on one stream does not take the other down). With ``keep_one_frame`` a video
    whose every real frame was drawn keeps one of them at random: every real video has at least one frame,
    and a fully masked frame sequence is an input no model was trained on (attention over it is undefined).
    Audio may be dropped entirely, as for audio-less videos.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability p must be in [0, 1], got {p}")
    out = dict(batch)
    for feats_key, mask_key in (MODALITY_KEYS["frames"], MODALITY_KEYS["audio"]):
        if feats_key not in batch and mask_key not in batch:
            continue
        _require(batch, (feats_key, mask_key), "drop_features")
        feats, mask = batch[feats_key], batch[mask_key].bool()  # (B, T, D), (B, T)
        drop = mask & (_draw("uniform", mask.shape, like=mask, generator=generator) < p)  # (B, T)
        if keep_one_frame and feats_key == "frame_feats":
            emptied = mask.any(dim=1) & ~(mask & ~drop).any(dim=1)  # (B,) videos that would lose every frame
            if emptied.any():
                # Re-admit one real frame chosen uniformly: the argmax of random keys over the real frames.
                keys = _draw("uniform", mask.shape, like=mask, generator=generator).masked_fill(~mask, -1.0)
                rescue = torch.zeros_like(mask)
                rescue[torch.arange(mask.shape[0], device=mask.device), keys.argmax(dim=1)] = True
                drop = drop & ~(rescue & emptied[:, None])
        out[feats_key] = feats.masked_fill(drop[..., None], 0.0)
        out[mask_key] = (mask & ~drop).to(batch[mask_key].dtype)
    if "frame_feats" not in batch and "audio_feats" not in batch:
        raise KeyError(
            f"drop_features needs frame_feats/frame_mask or audio_feats/audio_mask; present: {sorted(batch)}"
        )
    return out


def drop_tokens(
    batch: Batch,
    p: float,
    generator: torch.Generator | None = None,
    *,
    pad_token_id: int = 0,
    special_token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Drop each real, non-special text token independently with probability ``p``.

    A dropped token becomes ``pad_token_id`` with its attention bit cleared, so the text encoder reads a shorter
    text (the tokens are not moved together: positions keep their embeddings, as for a dropped frame).
    Special tokens ([CLS], [SEP], ...) stay: a BERT tower pools from [CLS] and was never trained without it.
    They are ``special_token_ids`` (``raypipe eval`` passes the tokenizer's ``special_ids`` from ShardInfo);
    with None the first and the last real position of each row are kept (BERT's [CLS] ... [SEP] layout).

    ``text_emb`` is one sentence embedding of the whole text, which cannot be recomputed from the surviving
    tokens without the text encoder; it is zeroed for each row with probability ``p`` (one draw per row), so a
    model reading it loses the same expected share of its text evidence as one reading the tokens.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability p must be in [0, 1], got {p}")
    _require(batch, ("input_ids", "attention_mask"), "drop_tokens")
    ids, attn = batch["input_ids"], batch["attention_mask"]  # (B, L), (B, L)
    real = attn.bool()
    if special_token_ids is not None:
        special = torch.isin(ids, torch.as_tensor(list(special_token_ids), dtype=ids.dtype, device=ids.device))
    else:
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :]  # (1, L)
        first = real.float().argmax(dim=1, keepdim=True)  # (B, 1)
        last = ids.shape[1] - 1 - real.flip(1).float().argmax(dim=1, keepdim=True)  # (B, 1)
        special = (positions == first) | (positions == last)  # (B, L)
    drop = real & ~special & (_draw("uniform", ids.shape, like=attn, generator=generator) < p)  # (B, L)
    out = dict(batch)
    out["input_ids"] = ids.masked_fill(drop, pad_token_id)
    out["attention_mask"] = attn.masked_fill(drop, 0)
    if "text_emb" in batch:
        gone = _draw("uniform", batch["text_emb"].shape[:1], like=batch["text_emb"], generator=generator) < p  # (B,)
        out["text_emb"] = batch["text_emb"].masked_fill(gone[:, None], 0.0)
    return out


def gaussian_noise(
    batch: Batch, std: float, generator: torch.Generator | None = None, *, relative: bool = False
) -> dict[str, Any]:
    """Add ``N(0, std^2)`` noise to the real frame features; padding stays zero and masks are unchanged.

    ``relative=True`` multiplies ``std`` by the RMS of the batch's real frame features, so one setting means
    the same signal-to-noise ratio for embedders whose feature scales differ (raw CNN activations vs.
    layer-normalised ViT tokens).
    """
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    _require(batch, MODALITY_KEYS["frames"], "gaussian_noise")
    feats, mask = batch["frame_feats"], batch["frame_mask"].bool()  # (B, T, D), (B, T)
    scale = std
    if relative:
        real = feats[mask]  # (n_real, D)
        scale = std * (real.float().pow(2).mean().sqrt().item() if real.numel() else 0.0)
    noise = _draw("normal", feats.shape, like=feats, generator=generator).to(feats.dtype) * scale  # (B, T, D)
    out = dict(batch)
    out["frame_feats"] = feats + noise * mask[..., None].to(feats.dtype)
    return out


def zero_modality(batch: Batch, name: str, *, pad_token_id: int = 0) -> dict[str, Any]:
    """Remove one modality: ``"frames"`` / ``"audio"`` zero the features and clear the mask; ``"text"`` sets
    every token to ``pad_token_id`` with attention 0 and zeroes ``text_emb``."""
    if name not in MODALITY_KEYS:
        raise ValueError(f"modality must be one of {sorted(MODALITY_KEYS)}, got {name!r}")
    out = dict(batch)
    if name == "text":
        _require(batch, ("input_ids", "attention_mask"), "zero_modality('text')")
        out["input_ids"] = torch.full_like(batch["input_ids"], pad_token_id)
        out["attention_mask"] = torch.zeros_like(batch["attention_mask"])
        if "text_emb" in batch:
            out["text_emb"] = torch.zeros_like(batch["text_emb"])
        return out
    feats_key, mask_key = MODALITY_KEYS[name]
    _require(batch, (feats_key, mask_key), f"zero_modality({name!r})")
    out[feats_key] = torch.zeros_like(batch[feats_key])
    out[mask_key] = torch.zeros_like(batch[mask_key])
    return out


def apply_corruption(
    batch: Batch, kind: str, *, generator: torch.Generator | None = None, **params: Any
) -> dict[str, Any]:
    """Apply the corruption ``kind`` (a :class:`~raypipe.config.corruption.CorruptionConfig` kind) to a batch.

    ``params`` are the kind's options (``CorruptionConfig.params()``); an option the kind does not read is a
    ``TypeError`` naming it, so a mistyped evaluation never runs uncorrupted by accident.
    """
    if kind not in KIND_PARAMS:
        raise ValueError(f"unknown corruption kind {kind!r}; choose from {sorted(KIND_PARAMS)}")
    stray = sorted(set(params) - set(KIND_PARAMS[kind]) - _EXTRA_PARAMS.get(kind, set()))
    if stray:
        raise TypeError(f"corruption {kind!r} got unknown option(s) {stray}; it reads {list(KIND_PARAMS[kind])}")
    if kind == "none":
        return dict(batch)
    if kind == "drop_features":
        return drop_features(batch, params.get("p", 0.3), generator, keep_one_frame=params.get("keep_one_frame", True))
    if kind == "drop_tokens":
        return drop_tokens(batch, params.get("p", 0.3), generator, pad_token_id=params.get("pad_token_id", 0),
                           special_token_ids=params.get("special_token_ids"))
    if kind == "gaussian_noise":
        return gaussian_noise(batch, params.get("std", 0.1), generator, relative=params.get("relative", False))
    return zero_modality(batch, params.get("modality", "frames"), pad_token_id=params.get("pad_token_id", 0))


def corrupt_with_config(
    batch: Batch, cfg: CorruptionConfig, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """``apply_corruption`` driven by a config; pass one generator seeded with ``cfg.seed`` across all batches."""
    return apply_corruption(batch, cfg.kind, generator=generator, **cfg.params())


def corruption_generator(cfg: CorruptionConfig) -> torch.Generator:
    """A CPU generator seeded from the config, so repeated evaluations corrupt identically."""
    return torch.Generator().manual_seed(cfg.seed)
