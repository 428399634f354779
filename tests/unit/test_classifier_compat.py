"""Registered models keep loading after the classifier moved out of ``raypipe.tracking`` (issue #12).

Models registered before the split pickled their pyfunc class by reference as ``raypipe.tracking.RaypipePyfunc``
(cloudpickle stores the module path, not the code). Here a model is logged exactly that way, then loaded with
``mlflow.pyfunc.load_model`` in a fresh interpreter (nothing of raypipe imported yet, as on a serving host) and
must give the scores ``load_classifier`` gives; a model logged now names ``raypipe.classifier``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data import INFO, write_shards

from raypipe.config import load_config

CLASSES = ["0101", "0102", "0103", "0201", "0202", "0203"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def registry(tmp_path: Path):
    features = write_shards(tmp_path / "features", 24, num_files=1)
    cfg = load_config("test", [
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.data={features}",
        "tracking.registered_model_name=compat",
    ])
    return cfg, str(features)


def _register(register_checkpoint, cfg, features: str) -> str:
    return register_checkpoint(cfg, model_name="frames_only", info=INFO, classes=CLASSES, data=features,
                               val_fraction=0.4, params={"aggregation": "avgpool", "hidden": 8, "dropout": 0.0})


def _pickled_module(cfg, version: str, tmp: Path) -> bytes:
    import mlflow

    uri = cfg.tracking.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/compat/{version}", dst_path=str(tmp))
    return (Path(local) / "python_model.pkl").read_bytes()


def test_a_model_pickled_under_the_old_module_path_still_loads(registry, register_checkpoint, tmp_path) -> None:
    from raypipe.classifier import load_classifier, pyfunc_class

    cfg, features = registry
    cls = pyfunc_class()
    cls.__module__ = "raypipe.tracking"  # how every model registered before the split was pickled
    try:
        old = _register(register_checkpoint, cfg, features)
    finally:
        cls.__module__ = "raypipe.classifier"
    new = _register(register_checkpoint, cfg, features)
    assert b"raypipe.tracking" in _pickled_module(cfg, old, tmp_path / "old")
    pickled_new = _pickled_module(cfg, new, tmp_path / "new")
    assert b"raypipe.classifier" in pickled_new and b"raypipe.tracking" not in pickled_new

    rng = np.random.default_rng(0)
    t, n = INFO.max_frames, 3
    batch = {
        "frame_emb": rng.normal(size=(n, t * INFO.frame_dim)).astype(np.float32),
        "frame_mask": np.ones((n, t), bool),
        "audio_emb": np.zeros((n, t * INFO.audio_dim), np.float32), "audio_mask": np.zeros((n, t), bool),
        "input_ids": np.ones((n, INFO.text_len), np.int32), "attention_mask": np.ones((n, INFO.text_len), np.int32),
        "text_emb": np.zeros((n, INFO.text_dim), np.float32),
    }
    np.savez(tmp_path / "batch.npz", **batch)
    expected = load_classifier(f"models:/compat/{old}", tracking_uri=cfg.tracking.tracking_uri).predict_proba(batch)
    script = (
        "import json, sys, numpy as np, mlflow\n"
        "mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])\n"
        "m = mlflow.pyfunc.load_model(sys.argv[2])\n"
        "impl = type(m.unwrap_python_model())\n"
        "out = m.predict(dict(np.load(sys.argv[3])))\n"
        "print(json.dumps({'cls': f'{impl.__module__}.{impl.__qualname__}', 'scores': np.asarray(out).tolist()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script, cfg.tracking.tracking_uri, f"models:/compat/{old}", str(tmp_path / "batch.npz")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cls"] == "raypipe.classifier.RaypipePyfunc"  # the old name resolved to today's class
    np.testing.assert_allclose(np.asarray(got["scores"]), expected, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_records_every_builder_default(tmp_path: Path) -> None:
    """Training writes the builder's defaults into the checkpoint's kwargs, so changing a default later (as the
    text tower's did) cannot rebuild an old checkpoint as another architecture."""
    from raypipe.models import create_model
    from raypipe.models.registry import with_defaults

    kwargs = with_defaults("frames_only", {"num_classes": 3, "frame_dim": 8, "hidden": 4})
    assert kwargs["hidden"] == 4 and kwargs["aggregation"] == "nextvlad" and kwargs["dropout"] == 0.2
    assert json.loads(json.dumps(kwargs)) == kwargs  # stored as the checkpoint's JSON meta
    assert with_defaults("dmafnet", {})["modalities"] == ["frames", "text"]
    create_model("frames_only", **json.loads(json.dumps(kwargs)))  # and builds from what the JSON gives back


def test_weights_that_do_not_fit_the_recorded_options_are_one_clear_error(tmp_path: Path) -> None:
    """An old checkpoint whose recorded options now build another architecture: a CheckpointError (exit 2)
    naming the folder and the first mismatch, not torch's multi-line state-dict dump."""
    import torch

    from raypipe.classifier import META_FILE, MODEL_FILE, CheckpointError, load_checkpoint_dir
    from raypipe.models import create_model

    base = {"num_classes": 3, "frame_dim": 8, "aggregation": "avgpool", "dropout": 0.0}
    torch.save(create_model("frames_only", **base, hidden=4).state_dict(), tmp_path / MODEL_FILE)
    (tmp_path / META_FILE).write_text(json.dumps({"model_name": "frames_only", "model_kwargs": {**base, "hidden": 6}}))
    with pytest.raises(CheckpointError, match=r"do not fit model 'frames_only'.*retrain") as err:
        load_checkpoint_dir(tmp_path)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
