"""Pure-PyTorch fusion models of the four papers plus baselines; nothing here imports Ray.

Batch contract (what every model's ``forward(batch)`` receives; built by the train/label collate from the
feature-shard columns in :mod:`raypipe.schema`)::

    frame_feats     (B, T, Dv) float32   T = 32, zero-padded
    frame_mask      (B, T)     bool      True = real frame
    audio_feats     (B, T, Da) float32   aligned to the frames
    audio_mask      (B, T)     bool      all False for a silent / audio-less video
    input_ids       (B, L)     int64     text token ids
    attention_mask  (B, L)     int64
    text_emb        (B, Dt)    float32   sentence embedding (language guidance, CAV-Net)
    label           (B,)       int64     level-2 class index          (single-label tasks)
    labels          (B, C)     float32   multi-hot targets            (multi-label tasks)

Output contract: a dict with ``logits`` (B, C) and, when the model was built with the matching switch on,
the inputs of the auxiliary losses in :mod:`raypipe.losses`:

    con_video (B, D), con_text (B*K, D), logit_scale ()    contrastive / MIL-NCE
    mlm_logits (B, L, V), mlm_labels (B, L)                masked language modelling
    vtm_logits (3B, 2), vtm_labels (3B,)                   video-text matching with hard negatives
"""

# Importing the model modules runs their @register_model decorators.
from raypipe.models import baselines, bilstm_attn, cavnet, dmafnet, mfb, videobert  # noqa: F401
from raypipe.models.registry import builder_params, create_model, default_lr, list_models, register_model
from raypipe.models.resolve import ModelOptionError, resolve_kwargs

__all__ = [
    "ModelOptionError", "builder_params", "create_model", "default_lr", "list_models", "register_model", "resolve_kwargs",
]
