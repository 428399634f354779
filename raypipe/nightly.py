"""The night's work as one job (``jobs/nightly.py`` under ``ray job submit``, or ``raypipe nightly``).

    embed new videos (incremental) -> [retrain -> promote, on nights with nightly.retrain] -> label with the
    champion -> summary.json

Why a state file per night: a scheduler retries a failed night by submitting the same job again, and the rerun
must finish that night exactly once, not start a second one. ``<nightly.output>/<night>/state.json`` records
each finished step (written atomically after the step), so a rerun skips what is done and redoes only the step
that was cut short. Each step is also idempotent on its own, which covers a crash between a step's work and
its state entry: embedding and labelling skip committed work and reuse the part files of an interrupted run
(every labelling attempt of a night stamps the same run id, ``nightly-<night>``, on its rows), training
continues its Ray run (``nightly-<night>``) and registers a run's model at most once, and promotion of a
challenger that is already champion changes nothing. ``summary.json`` is written last; a night that has one is
finished and a rerun returns it untouched.

Labelling always uses ``models:/<tracking.registered_model_name>@<tracking.champion_alias>``: a training run
can only register a challenger, so nothing but a recorded promotion changes what the night labels with.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from raypipe.config import RaypipeConfig
from raypipe.io import fs as rfs

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"
CRASH_ENV = "RAYPIPE_NIGHTLY_CRASH_AFTER"  # test hook: raise after the named step's work, before its state entry


class NightlyCrash(RuntimeError):
    """Raised by the crash hook; an ordinary failure of the job as far as the scheduler is concerned."""


class _NightState:
    """``<output>/<night>/state.json``: the steps done (with their results) and the attempts made."""

    def __init__(self, cfg: RaypipeConfig, night: str) -> None:
        self.fs, self.root = rfs.resolve(rfs.join(cfg.nightly.output, night), cfg.storage)
        self.path = rfs.join(self.root, STATE_FILE)
        self.data: dict[str, Any] = (json.loads(self.fs.cat_file(self.path)) if self.fs.exists(self.path)
                                     else {"night": night, "attempts": 0, "steps": {}})

    def save(self) -> None:
        rfs.atomic_write_bytes(self.fs, self.path, json.dumps(self.data, indent=1, default=str).encode())

    def done(self, step: str) -> bool:
        return step in self.data["steps"]

    def mark(self, step: str, result: dict[str, Any]) -> None:
        self.data["steps"][step] = {**result, "finished_at": _now()}
        self.save()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def night_id(cfg: RaypipeConfig) -> str:
    return cfg.nightly.night or datetime.now(UTC).strftime("%Y-%m-%d")


def label_run_id(night: str) -> str:
    """The run id stamped on every prediction row labelled in ``night`` (all attempts)."""
    return f"nightly-{night}"


# ------------------------------------------------------------------------------------------------ steps


def _embed(cfg: RaypipeConfig, night: str) -> dict[str, Any]:
    from raypipe.embed.pipeline import embed_videos

    s = embed_videos(cfg)
    return {k: s[k] for k in ("videos_listed", "videos_skipped", "videos_processed", "videos_ok", "videos_failed",
                              "rows_total", "output")}


def _train(cfg: RaypipeConfig, night: str) -> dict[str, Any]:
    from raypipe.train import fit

    train_cfg = cfg.model_copy(deep=True)
    train_cfg.train.run_name = f"nightly-{night}"
    result = fit(train_cfg)
    return {"run_name": result.run_name, "metric": result.metric, "best_value": result.best_value,
            "mlflow_run_id": result.mlflow_run_id, "registered_version": result.registered_model_version}


def _promote(cfg: RaypipeConfig, night: str) -> dict[str, Any]:
    """A refused promotion (incompatible model, no challenger) is recorded and the night labels on."""
    from raypipe.promote import PromotionError, promote

    try:
        r = promote(cfg)
    except PromotionError as err:
        log.error("nightly %s: promotion refused: %s (the champion stays)", night, err)
        return {"decision": "refused", "error": str(err)}
    return {"decision": r["decision"], "champion_before": r["champion"]["version"],
            "challenger": r["challenger"]["version"], "fingerprint": r.get("evaluation", {}).get("fingerprint"),
            "report": r.get("report_path")}


def _label(cfg: RaypipeConfig, night: str) -> dict[str, Any]:
    from raypipe.label import label_videos

    label_cfg = cfg.model_copy(deep=True)
    tc = cfg.tracking
    label_cfg.label.model_uri = f"models:/{tc.registered_model_name}@{tc.champion_alias}"
    s = label_videos(label_cfg, run_id=label_run_id(night))
    return {"status": s["status"], "model_version": s["model"]["version"], "model_uri": s["model"]["uri"],
            "videos_seen": s["videos_seen"], "failure_rate": s["failure_rate"], "predictions": s["predictions"]}


def plan(cfg: RaypipeConfig) -> list[tuple[str, Callable[[RaypipeConfig, str], dict[str, Any]]]]:
    steps: list[tuple[str, Callable[[RaypipeConfig, str], dict[str, Any]]]] = []
    if cfg.nightly.embed:
        steps.append(("embed", _embed))
    if cfg.nightly.retrain:
        steps += [("train", _train), ("promote", _promote)]
    steps.append(("label", _label))
    return steps


# ----------------------------------------------------------------------------------------------- driver


def run_night(cfg: RaypipeConfig) -> dict[str, Any]:
    """Run (or finish) the night's steps and return its summary (see the module docstring)."""
    import os

    night = night_id(cfg)
    state = _NightState(cfg, night)
    summary_path = rfs.join(state.root, SUMMARY_FILE)
    if state.fs.exists(summary_path):
        log.info("nightly %s: already finished (%s); nothing to do", night, summary_path)
        return json.loads(state.fs.cat_file(summary_path))
    state.data["attempts"] += 1
    state.data.setdefault("started_at", _now())
    state.save()
    t0 = time.monotonic()
    for step, fn in plan(cfg):
        if state.done(step):
            log.info("nightly %s: step %s already done in an earlier attempt: skipped", night, step)
            continue
        log.info("nightly %s: step %s", night, step)
        result = fn(cfg, night)
        if os.environ.get(CRASH_ENV) == step:
            raise NightlyCrash(f"{CRASH_ENV}={step}: crashing after the step's work, before its state entry")
        state.mark(step, result)
    summary = _summary(cfg, night, state.data, time.monotonic() - t0)
    rfs.atomic_write_bytes(state.fs, summary_path, json.dumps(summary, indent=1, default=str).encode())
    log.info("nightly %s finished: %s", night, format_summary(summary))
    return summary


def _summary(cfg: RaypipeConfig, night: str, state: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The night's summary; label counts are read back from the prediction store by the night's run id, so
    they include the rows of every attempt (an attempt killed mid-label leaves its rows to the next one)."""
    from raypipe.label import read_predictions

    preds = read_predictions(cfg.label.output, cfg.storage, latest_only=False).to_pylist()
    mine = [r for r in preds if r["run_id"] == label_run_id(night)]
    label = state["steps"].get("label", {})
    status = label.get("status", "ok")
    return {
        "night": night, "status": status, "attempts": state["attempts"], "started_at": state.get("started_at"),
        "finished_at": _now(), "last_attempt_s": round(seconds, 3), "steps": state["steps"],
        "champion_version": label.get("model_version"),
        # Failed videos are kept per model version without a run id (see raypipe.label), so only the labelled
        # rows can be attributed to the night; the last attempt's failure rate is in steps.label.
        "labelled_tonight": sum(r["status"] == "ok" for r in mine),
    }


def format_summary(s: dict[str, Any]) -> str:
    promote = s["steps"].get("promote", {}).get("decision", "not scheduled")
    return (f"status {s['status']}, champion v{s['champion_version']}, {s['labelled_tonight']} labelled tonight, "
            f"failure rate {s['steps'].get('label', {}).get('failure_rate', 0):.1%}, promotion: {promote}, attempts: {s['attempts']}")


def run(cfg: RaypipeConfig) -> int:
    """``raypipe nightly`` / ``jobs/nightly.py``: 0 when the night finished and labelling stayed under its failure
    threshold, ``label.failure_exit_code`` when it did not (a config error is exit code 2 in raypipe.cli.run_stage)."""
    summary = run_night(cfg)
    return 0 if summary["status"] == "ok" else cfg.label.failure_exit_code
