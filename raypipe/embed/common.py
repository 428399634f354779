"""What the three encoder actors share: device choice, weight loading (local or s3://), fault injection."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raypipe.config import StorageConfig
from raypipe.device import pick_device
from raypipe.io.fs import local_copy, remove_tree

log = logging.getLogger(__name__)

FAULT_ENV = "RAYPIPE_FAULT_CRASH_AFTER_BATCHES"
# Hang (instead of exit) after N batches: exercises the stall watchdog (armed in the fused encoder pool).
STALL_ENV = "RAYPIPE_FAULT_STALL_AFTER_BATCHES"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth", "weights.pt")
_F16_MAX = float(np.finfo(np.float16).max)

__all__ = [
    "FaultInjector", "autocast", "batch_across_videos", "embed_parts", "load_weights", "ok_rows", "pick_device",
    "to_device", "to_f16",
]


def autocast(device: torch.device):
    """Mixed precision on GPU only; CPU stays fp32 (bf16 autocast on CPU changes results for no speed gain here)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", enabled=False)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> ``device``. On CUDA through pinned memory with a non-blocking copy: the transfer is a DMA that
    overlaps the GPU work already queued instead of a synchronous staged copy of pageable memory."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def batch_across_videos(device: torch.device, override: bool | None) -> bool:
    """Whether an encoder embeds all videos of a Ray batch in one forward pass (``override`` None: on accelerators).

    One pass per video leaves a GPU mostly idle (a few frames per kernel launch), so accelerators batch across
    videos; their fp16 rows then match the per-video rows to rounding, not bit for bit. On CPU the gain is small and
    the per-video pass keeps each row independent of how Ray batched the videos: a resumed or re-batched run
    (three pools vs one fused pool) reproduces the same rows exactly.
    """
    return device.type != "cpu" if override is None else override


def embed_parts(fn: Any, parts: list[np.ndarray], *, together: bool) -> list[np.ndarray]:
    """``fn`` ((N, ...) -> (N, D)) on each part, or once on their concatenation, split back into the parts."""
    if not parts:
        return []
    if not together:
        return [fn(p) for p in parts]
    out = fn(np.concatenate(parts))  # (sum N, D): one host->device copy and one forward pass
    return np.split(out, np.cumsum([len(p) for p in parts])[:-1])


def to_f16(x: torch.Tensor) -> np.ndarray:
    """Float16 for storage, clamped so a large activation becomes the fp16 maximum instead of inf."""
    return x.float().clamp_(-_F16_MAX, _F16_MAX).cpu().numpy().astype(np.float16)


def load_state_dict(uri: str, storage: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a file or a folder holding one of the usual weight files, local or s3:// (copied once)."""
    local, tmp = local_copy(uri, storage)
    try:
        p = Path(local)
        if p.is_dir():
            found = next((p / n for n in _WEIGHT_FILES if (p / n).is_file()), None)
            if found is None:
                candidates = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.pt")) + sorted(p.glob("*.pth"))
                if not candidates:
                    raise FileNotFoundError(f"no weight file ({', '.join(_WEIGHT_FILES)}) in {uri}")
                found = candidates[0]
            p = found
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        return state
    finally:
        remove_tree(tmp)


def load_weights(model: torch.nn.Module, uri: str, storage: StorageConfig | None, what: str) -> None:
    """Strict load: a weight file for another architecture must fail loudly, not embed with half-random weights."""
    state = load_state_dict(uri, storage)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{what}: weights at {uri} do not match the configured model: {exc}") from None
    log.info("%s: loaded weights from %s", what, uri)


class FaultInjector:
    """Hard-exits the process after N batches (``RAYPIPE_FAULT_CRASH_AFTER_BATCHES``), to test crash recovery.

    The driver reads the variable and passes N to the actor constructor: Ray workers do not see environment
    changes made after the cluster started. The pipeline arms it in the last encoder (text), and the process
    lingers ``linger_s`` before exiting so that batches it already returned reach the part writer, as they
    would in a crash late in a long run (otherwise the test could not tell "resumed" from "restarted").
    """

    def __init__(self, crash_after: int | tuple[int, float] | None, linger_s: float = 6.0,
                 stall_after: int | None = None) -> None:
        if isinstance(crash_after, tuple | list):  # (batches, linger_s): "N:S" in the variable
            crash_after, linger_s = int(crash_after[0]), float(crash_after[1])
        self.crash_after = crash_after
        self.stall_after = stall_after
        self.linger_s = linger_s
        self.batches = 0

    def tick(self) -> None:
        if self.stall_after is not None and self.batches >= self.stall_after:
            log.error("fault injection: hanging after %d batches", self.batches)
            while True:  # a stuck actor: alive, holding its resources, never returning
                time.sleep(60)
        if self.crash_after is not None and self.batches >= self.crash_after:
            log.error("fault injection: exiting after %d batches", self.batches)
            time.sleep(self.linger_s)
            os._exit(17)
        self.batches += 1


def fault_from_env() -> int | tuple[int, float] | None:
    """``N`` (crash after N batches) or ``N:S`` (and linger S seconds first, when downstream actors, e.g. the
    labelling classifier, need longer to start than the default linger gives them)."""
    raw = os.environ.get(FAULT_ENV, "").strip()
    if not raw:
        return None
    batches, _, linger = raw.partition(":")
    return (int(batches), float(linger)) if linger else int(batches)


def stall_from_env() -> int | None:
    raw = os.environ.get(STALL_ENV, "").strip()
    return int(raw) if raw else None


def ok_rows(batch: dict[str, Any]) -> np.ndarray:
    """Indices of rows that decoded fine (failed rows pass through the encoders untouched)."""
    return np.flatnonzero(np.asarray(batch["status"]) == "ok")
