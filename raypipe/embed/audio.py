"""Audio encoder actor: log-mel front end (pure torch; torchaudio is not a dependency) + a small CNN per window.

The CNN pools over time only and keeps the mel (frequency) axis until a final linear projection, so which
frequencies sound survives into the embedding even with random weights (global pooling over frequency would
throw away the pitch of a tone).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from raypipe.config import StorageConfig
from raypipe.config.embed import AudioEncoderConfig
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


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(*, n_fft: int, n_mels: int, sample_rate: int, fmin: float, fmax: float) -> torch.Tensor:
    """HTK-scale triangular filters, (n_fft // 2 + 1, n_mels)."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mels = torch.linspace(_hz_to_mel(torch.tensor(fmin)), _hz_to_mel(torch.tensor(min(fmax, sample_rate / 2))), n_mels + 2)
    hz = _mel_to_hz(mels)
    lower, centre, upper = hz[:-2], hz[1:-1], hz[2:]
    up = (freqs[:, None] - lower[None, :]) / (centre - lower)[None, :]
    down = (upper[None, :] - freqs[:, None]) / (upper - centre)[None, :]
    return torch.clamp(torch.minimum(up, down), min=0.0)


class LogMel(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig, sample_rate: int) -> None:
        super().__init__()
        self.n_fft, self.hop = cfg.n_fft, cfg.hop_length
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        fb = mel_filterbank(n_fft=cfg.n_fft, n_mels=cfg.n_mels, sample_rate=sample_rate, fmin=cfg.fmin, fmax=cfg.fmax)
        self.register_buffer("fb", fb, persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(N, W) waveform -> (N, n_mels, frames) log-mel."""
        spec = torch.stft(wav, self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        power = spec.real.pow(2) + spec.imag.pow(2)  # (N, F, frames)
        mel = torch.einsum("nft,fm->nmt", power, self.fb)  # (N, M, frames)
        return torch.log(mel + 1e-6)


class AudioCNN(nn.Module):
    """Log-mel (N, M, frames) -> (N, dim). Conv blocks stride over frequency, mean+max pool over time."""

    def __init__(self, cfg: AudioEncoderConfig, sample_rate: int) -> None:
        super().__init__()
        self.frontend = LogMel(cfg, sample_rate)
        c = cfg.channels
        self.convs = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=(2, 1), padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=(2, 1), padding=1), nn.ReLU(),
        )
        f_out = math.ceil(math.ceil(cfg.n_mels / 2) / 2)
        self.proj = nn.Linear(2 * c * f_out, cfg.dim)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = self.frontend(wav)  # (N, M, frames)
        x = (x + 7.0) / 4.0  # fixed affine to a unit-ish range; the values still reflect loudness
        h = self.convs(x.unsqueeze(1))  # (N, C, M/4, frames)
        pooled = torch.cat([h.mean(-1), h.amax(-1)], dim=1)  # (N, 2C, M/4)
        return self.proj(pooled.flatten(1))  # (N, dim)


def build_audio_model(
    cfg: AudioEncoderConfig, sample_rate: int, storage: StorageConfig | None = None
) -> AudioCNN:
    torch.manual_seed(cfg.seed)
    model = AudioCNN(cfg, sample_rate)
    if cfg.weights:
        load_weights(model, cfg.weights, storage, "embed.audio.weights")
    return model.eval()


def audio_encoder_info(cfg: AudioEncoderConfig, sample_rate: int) -> dict[str, Any]:
    return {
        "name": "raypipe/logmel-cnn",
        "version": "1",
        "dim": cfg.dim,
        "n_mels": cfg.n_mels,
        "sample_rate": sample_rate,
        "weights": cfg.weights or f"random(seed={cfg.seed})",
    }


class AudioEncoder:
    """Ray Data actor: ``audio`` (B, T, W) + ``audio_mask`` -> ``audio_emb`` (B, T, Da) float16."""

    def __init__(
        self, cfg: AudioEncoderConfig, sample_rate: int, storage: StorageConfig | None = None,
        crash_after: int | None = None, batch_videos: bool | None = None,
    ) -> None:
        torch.set_num_threads(1)
        self.device = pick_device()
        self.model = build_audio_model(cfg, sample_rate, storage).to(self.device)
        self.dim = cfg.dim
        self.batch_videos = batch_across_videos(self.device, batch_videos)
        self.fault = FaultInjector(crash_after)

    @torch.inference_mode()
    def embed(self, windows: np.ndarray) -> np.ndarray:
        """(n, W) float32 windows (one video, or several concatenated) -> (n, Da) float16."""
        x = to_device(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)), self.device)
        with autocast(self.device):
            return to_f16(self.model(x))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.fault.tick()
        audio = batch.pop("audio")  # (B, T, W)
        mask = np.asarray(batch["audio_mask"]).astype(bool)  # (B, T)
        b, t = audio.shape[:2]
        out = np.zeros((b, t, self.dim), np.float16)
        picks = [(int(i), np.flatnonzero(mask[i])) for i in ok_rows(batch)]
        picks = [(i, idx) for i, idx in picks if len(idx)]
        parts = [audio[i, idx] for i, idx in picks]
        for (i, idx), emb in zip(picks, embed_parts(self.embed, parts, together=self.batch_videos), strict=True):
            out[i, idx] = emb
        batch["audio_emb"] = out
        return batch
