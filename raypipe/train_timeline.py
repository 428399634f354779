"""The wall-clock timeline of a training run: marks of the driver (:mod:`raypipe.train`) and of rank 0
(:mod:`raypipe.train_worker`) in order, turned into the seconds of each phase and the start-up before the first
optimizer step. Why: a short run's cost is mostly start-up (Ray, the worker group, the model in a fresh process,
MLflow), and only a per-phase figure says which part to cut (docs/PERFORMANCE.md, bench/bench_train.py).
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("raypipe.train")

# The marks that end the start-up of a run: its first optimizer step (rank 0).
STARTUP_END = "first_step"


def phase_seconds(timeline: list[tuple[str, float]]) -> dict[str, float]:
    """Seconds of each phase: a mark's time minus the previous mark's (the first mark starts the clock).

    Marks come from the driver and from rank 0 (``time.time()``: on a cluster the two clocks may differ by the
    hosts' skew; on one node they are the same clock). ``startup`` is the first mark to :data:`STARTUP_END`.
    """
    out: dict[str, float] = {}
    for (_, before), (name, at) in zip(timeline, timeline[1:], strict=False):
        out[name] = round(out.get(name, 0.0) + at - before, 4)
    names = [n for n, _ in timeline]
    if timeline and STARTUP_END in names:
        out["startup"] = round(timeline[names.index(STARTUP_END)][1] - timeline[0][1], 4)
    return out


def mark(marks: list[tuple[str, float]], name: str) -> None:
    """Append ``(name, now)``: wall-clock time, so marks from the driver and a worker process line up."""
    marks.append((name, time.time()))


def log_phases(phases: dict[str, float]) -> None:
    """One line: the start-up before the first step and its largest parts (the rest of the timeline at debug)."""
    if "startup" not in phases:
        return
    parts = [k for k in ("prepare", "ray_init", "mlflow_open", "datasets", "worker_start", "worker_imports",
                         "model_built", "mlflow_params", "model_ready", "first_batch", "first_step") if k in phases]
    logger.info("train: start-up %.1f s before the first step (%s)", phases["startup"],
                ", ".join(f"{k} {phases[k]:.1f}" for k in parts))
    logger.debug("train: phases %s", phases)
