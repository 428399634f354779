"""Frame encoder actor: a timm image model over each video's sampled frames, globally average-pooled.

On CPU each video is one forward pass over its own frames: results then do not depend on which videos Ray
happened to batch together, so a resumed run reproduces the same rows bit for bit. On a GPU all frames of a Ray
batch go through in one pass (see :func:`raypipe.embed.common.batch_across_videos`), copied as uint8 through
pinned memory and normalised on the device (4x fewer bytes over PCIe than float32, no CPU float pass).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from raypipe.config import StorageConfig
from raypipe.config.embed import FrameEncoderConfig
from raypipe.embed.common import (
    FaultInjector,
    autocast,
    batch_across_videos,
    embed_parts,
    load_weights,
    ok_rows,
    pick_device,
    to_device,
    to_f16,
)

log = logging.getLogger(__name__)

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def build_frame_model(cfg: FrameEncoderConfig, storage: StorageConfig | None = None) -> torch.nn.Module:
    """Random init from ``cfg.seed`` (identical in every actor) or strict-loaded weights; eval mode."""
    import timm

    torch.manual_seed(cfg.seed)
    model = timm.create_model(cfg.model, pretrained=False, num_classes=0, global_pool="avg")
    if cfg.weights:
        load_weights(model, cfg.weights, storage, f"embed.frames.weights ({cfg.model})")
    return model.eval()


def frame_encoder_info(cfg: FrameEncoderConfig) -> dict[str, Any]:
    import timm

    model = timm.create_model(cfg.model, pretrained=False, num_classes=0)
    return {
        "name": f"timm/{cfg.model}",
        "version": timm.__version__,
        "dim": int(model.num_features),
        "image_size": cfg.image_size,
        "weights": cfg.weights or f"random(seed={cfg.seed})",
    }


class FrameEncoder:
    """Ray Data actor: ``frames`` (B, T, S, S, 3) uint8 -> ``frame_emb`` (B, T, D) float16 + ``frame_mask``."""

    def __init__(
        self, cfg: FrameEncoderConfig, storage: StorageConfig | None = None, crash_after: int | None = None,
        batch_videos: bool | None = None,
    ) -> None:
        torch.set_num_threads(1)
        self.device = pick_device()
        self.model = build_frame_model(cfg, storage).to(self.device)
        self.mean, self.std = _MEAN.to(self.device), _STD.to(self.device)
        self.dim = int(self.model.num_features)
        self.batch_videos = batch_across_videos(self.device, batch_videos)
        self.fault = FaultInjector(crash_after)

    @torch.inference_mode()
    def embed(self, frames: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 frames (one video, or several concatenated) -> (n, D) float16."""
        x = to_device(torch.from_numpy(np.ascontiguousarray(frames)), self.device)  # uint8 over the bus
        x = x.permute(0, 3, 1, 2).float().div_(255)  # (n, 3, S, S)
        x = (x - self.mean) / self.std
        with autocast(self.device):
            return to_f16(self.model(x))  # (n, D)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.fault.tick()
        frames = batch.pop("frames")  # (B, T, S, S, 3)
        b, t = frames.shape[:2]
        num = np.asarray(batch["num_frames"]).astype(np.int64)
        out = np.zeros((b, t, self.dim), np.float16)  # (B, T, D)
        rows = [int(i) for i in ok_rows(batch) if num[i] > 0]
        parts = [frames[i, : num[i]] for i in rows]
        for i, emb in zip(rows, embed_parts(self.embed, parts, together=self.batch_videos), strict=True):
            out[i, : num[i]] = emb
        batch["frame_emb"] = out
        batch["frame_mask"] = np.arange(t)[None, :] < num[:, None]  # (B, T)
        return batch
