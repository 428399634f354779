"""Which torch device a process computes on, following Ray's GPU assignment.

Why one function: on a GPU node, ``torch.cuda.is_available()`` is true in *every* worker process, including the
actors and tasks that asked Ray for no GPU. Choosing CUDA there piles them all onto ``cuda:0`` beside the actor
that did reserve it (out of memory, or a GPU shared without the scheduler knowing). So inside a Ray worker the
device follows ``ray.get_gpu_ids()``: no assigned GPU means CPU. Outside a Ray worker (a driver, ``raypipe eval``
on a workstation, a unit test) nothing assigns GPUs, so a visible GPU is ours to use.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def ray_gpu_ids() -> list[str] | None:
    """GPU ids Ray assigned to this task or actor; ``None`` outside a Ray worker process (driver or no Ray)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - Ray is a dependency; kept so pure-torch callers never fail here
        return None
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return [str(i) for i in ray.get_gpu_ids()]


def _cuda_index(gpu_id: str) -> int:
    """Torch's index of a Ray GPU id: Ray normally narrows ``CUDA_VISIBLE_DEVICES`` to the assigned ids (index 0
    is the first); with that disabled (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES) the id is the index."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if gpu_id in visible:
        return visible.index(gpu_id)
    return int(gpu_id) if gpu_id.isdigit() else 0


def pick_device(gpu_ids: list[str] | None = None, *, assigned: bool | None = None) -> torch.device:
    """``cuda:<i>`` when this process may use a GPU, else ``cpu``.

    ``gpu_ids`` / ``assigned`` default to what Ray says about this process (:func:`ray_gpu_ids`); tests pass them.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if assigned is None:
        ids = ray_gpu_ids()
        assigned, gpu_ids = ids is not None, ids
    if not assigned:
        return torch.device("cuda", 0)  # not a Ray worker: nothing reserves GPUs, the first visible one is ours
    if not gpu_ids:
        return torch.device("cpu")  # a Ray worker without a GPU of its own, even on a GPU node
    return torch.device("cuda", _cuda_index(str(gpu_ids[0])))
