"""ASHA whose rung records survive a resumed sweep."""

from __future__ import annotations

import json
import logging
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from raypipe.io import fs as rfs

log = logging.getLogger(__name__)


ASHA_STATE_NAME = "asha_rungs.json"


class ResumableASHA(ASHAScheduler):
    """ASHA whose rung records survive ``Tuner.restore``.

    Tune checkpoints the searcher and the callbacks but rebuilds the scheduler from the pickle made when the
    sweep started, so after a resume ASHA would have no results at any rung and could not stop the remaining
    trials. This subclass writes its rung records beside the sweep after every decision and reads them back
    once, before its first decision in a resumed run (rungs are keyed by the stable trial ids).
    """

    def __init__(self, *, state_uri: str, storage: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_uri = state_uri
        self._storage = storage
        self._loaded = False

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        fs, p = rfs.resolve(self._state_uri, self._storage)
        if not fs.exists(p):
            return
        saved = json.loads(fs.cat_file(p))
        for bracket, rungs in zip(self._brackets, saved["brackets"], strict=False):
            for (_, recorded), saved_recorded in zip(bracket._rungs, rungs, strict=False):
                recorded.update({k: float(v) for k, v in saved_recorded.items()})
        self._num_stopped = int(saved.get("num_stopped", 0))
        log.info("ASHA rung records restored from %s", self._state_uri)

    def _save(self) -> None:
        state = {
            "brackets": [[dict(recorded) for _, recorded in b._rungs] for b in self._brackets],
            "num_stopped": self._num_stopped,
        }
        fs, p = rfs.resolve(self._state_uri, self._storage)
        rfs.atomic_write_bytes(fs, p, json.dumps(state).encode())

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load_once()
        decision = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return decision
