"""VideoBERT (Sun et al., ICCV 2019), the single-stream baseline of DMAFNet's Table 2 and Table 5.

::

    input_ids (B,L)      -> BERT word embeddings ----------------------------------> (B, L, H)  type 0
    frame_feats (B,T,Dv) -> Linear -> visual tokens in the word-embedding space ----> (B, T, H)  type 1
    cat -> [CLS] text [SEP] v_1 .. v_T  -> BERT (positions + token types + encoder) -> (B, L+T, H)
    hidden[:, 0] ([CLS]) -> MLP -> logits (B, C)

One transformer reads text and video as one sequence (single stream), unlike DMAFNet's two towers joined by
cross-attention: that is the contrast Table 2 draws.

What the paper does and what this implementation does instead, and why:

* Visual tokens. VideoBERT turns video into *words*: S3D features of 1.5 s clips are vector-quantised by
  hierarchical k-means (4 levels of 12 clusters: a vocabulary of 12^4 = 20,736 visual words), and the visual
  word ids are embedded like text. Here each frame feature (the shards' ``frame_feats``) is projected by one
  linear layer into the BERT embedding space and used as a continuous visual token (type id 1). Why: the
  quantiser is an offline clustering stage over a large video corpus with its own vocabulary, and it exists in
  the paper to make masked-frame prediction a classification over visual words; for the supervised baseline
  that DMAFNet compares against (classification from [CLS]), a continuous projection keeps the same
  single-stream architecture without a second, corpus-fitted vocabulary, and loses no feature detail to
  quantisation.
* Pretraining. The paper pretrains on cooking videos with masked text / masked visual-word prediction and
  linguistic-visual alignment; DMAFNet's table fine-tunes it on WBDC. This model is trained from the text
  tower's weights on the task's labels only (no VideoBERT pretraining objective: ``train.pretrain`` is
  DMAFNet's, and this model has no MLM / VTM switches).
* Text tower. As DMAFNet: the packaged MiniLM (``text_encoder_path="minilm"``, a pretrained 6-layer BERT whose
  tokenizer made the shards' ``input_ids``); ``None`` builds a random BERT (tests only). Its [CLS] and [SEP]
  come from the tokenizer; the paper's ``[>]`` separator between text and video is the token-type change here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from raypipe.models.layers import PACKAGED_TEXT_ENCODER, MLPHead, build_text_encoder
from raypipe.models.registry import register_model


class VideoBERT(nn.Module):
    def __init__(self, *, num_classes: int, frame_dim: int, vocab_size: int, text_encoder_path: str | None,
                 text_hidden: int, text_layers: int, text_heads: int, text_freeze_layers: int, dropout: float) -> None:
        super().__init__()
        if frame_dim <= 0:
            raise ValueError(f"videobert reads frame features but frame_dim={frame_dim}")
        self.text_encoder = build_text_encoder(path=text_encoder_path, vocab_size=vocab_size, hidden=text_hidden,
                                       layers=text_layers, heads=text_heads, dropout=dropout,
                                       freeze_layers=text_freeze_layers)
        self.hidden = int(self.text_encoder.config.hidden_size)
        self.max_positions = int(self.text_encoder.config.max_position_embeddings)
        self.visual_proj = nn.Linear(frame_dim, self.hidden)  # frame feature -> a visual "word" embedding
        self.head = MLPHead(self.hidden, self.hidden, num_classes, dropout=dropout)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        ids = batch["input_ids"].long()  # (B, L)
        text_mask = batch["attention_mask"].long()  # (B, L)
        frames = batch["frame_feats"].float()  # (B, T, Dv)
        frame_mask = batch["frame_mask"].long()  # (B, T)
        b, length, t = ids.shape[0], ids.shape[1], frames.shape[1]
        if length + t > self.max_positions:
            raise ValueError(f"videobert: {length} text tokens + {t} frames exceed the text tower's "
                             f"{self.max_positions} positions (lower embed.text.max_len or decode.max_frames)")
        words = self.text_encoder.get_input_embeddings()(ids)  # (B, L, H)
        visual = self.visual_proj(frames)  # (B, T, H)
        embeds = torch.cat([words, visual], dim=1)  # (B, L+T, H)
        mask = torch.cat([text_mask, frame_mask], dim=1)  # (B, L+T)
        mask[:, 0] = 1  # [CLS] is always a valid key, so a video with no text and no frames stays finite
        types = torch.cat([torch.zeros_like(ids), torch.ones(b, t, dtype=torch.long, device=ids.device)], dim=1)
        # positions: the text's own 0..L-1, then the frames right after each row's real tokens (as in the paper's
        # one sequence), not after the batch's padding, so a frame's position does not depend on its batch-mates
        steps = torch.arange(max(length, t), device=ids.device)
        frame_pos = text_mask.sum(1, keepdim=True) + steps[None, :t]  # (B, T)
        pos = torch.cat([steps[:length].expand(b, -1), frame_pos], dim=1)  # (B, L+T)
        hidden = self.text_encoder(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types,
                                   position_ids=pos).last_hidden_state
        return {"logits": self.head(hidden[:, 0])}  # (B, L+T, H) -> [CLS] (B, H) -> (B, C)


@register_model("videobert")
def videobert(
    *,
    num_classes: int,
    frame_dim: int = 768,
    audio_dim: int = 0,
    text_dim: int = 0,
    vocab_size: int = 30522,
    text_encoder_path: str | None = PACKAGED_TEXT_ENCODER,
    text_hidden: int = 768,
    text_layers: int = 12,
    text_heads: int = 12,
    text_freeze_layers: int = 0,
    dropout: float = 0.1,
) -> VideoBERT:
    """Defaults: the packaged MiniLM as the single stream. ``audio_dim`` / ``text_dim`` are accepted for the
    trainer's uniform call and unused (VideoBERT reads frames and token ids)."""
    del audio_dim, text_dim
    return VideoBERT(num_classes=num_classes, frame_dim=frame_dim, vocab_size=vocab_size,
                     text_encoder_path=text_encoder_path, text_hidden=text_hidden, text_layers=text_layers,
                     text_heads=text_heads, text_freeze_layers=text_freeze_layers, dropout=dropout)
