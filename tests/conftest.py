"""Shared fixtures: one local Ray instance, one generated corpus and one set of feature shards per session.

Tests are marked by folder (unit / pipeline / e2e) and run in that order, so the fast pure-PyTorch set fails
first. Heavy fixtures are session-scoped and built lazily: a unit-only run never starts Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s by default: each short test run would wait up to that long
# after its last epoch before it is seen to finish (Ray's processes inherit this when ray.init starts them).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Dummy credentials for the local moto S3 server, set before Ray starts so that its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

_ORDER = {"unit": 0, "pipeline": 1, "e2e": 2}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for name in _ORDER:
            if name in parts:
                item.add_marker(getattr(pytest.mark, name))
    # Tests that start a second Ray instance on this host go last: while two run, Ray's address auto-discovery
    # (which Ray Train's placement-group cleaner uses) cannot pick one, so nothing else should train then.
    items.sort(key=lambda it: (
        min((_ORDER[m.name] for m in it.iter_markers() if m.name in _ORDER), default=1),
        it.get_closest_marker("own_cluster") is not None,
        it.get_closest_marker("stops_session_ray") is not None,  # the docs test: the demo needs the host alone
    ))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (logical CPUs > physical so trainer + data can co-schedule)."""
    import ray

    if not ray.is_initialized():
        # The dashboard stays on: Ray Train V2 removes the placement group of a trial that Tune stopped through the
        # state API it serves; without it every early-stopped trial leaks its CPUs for the rest of the session.
        ray.init(num_cpus=4, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """A small generated corpus with every kind of bad input (see raypipe.corpus)."""
    from raypipe.config import CorpusConfig
    from raypipe.corpus import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    return generate_corpus(CorpusConfig(out=str(out), videos=40, seed=7, bad_inputs=True, max_duration_s=40.0, short_max_duration_s=8.0))


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory):
    """Four short videos (one per class) whose only class evidence is burned-in captions and espeak-ng speech
    (silent when espeak-ng is missing: ``truth["speech"]``); see raypipe.corpus_text. ~2 s to make."""
    from raypipe.corpus_text import generate_text_corpus

    return generate_text_corpus(tmp_path_factory.mktemp("text_corpus"), videos_per_class=1, seed=1, duration_s=6.0)


@pytest.fixture(scope="session")
def test_config_factory(tmp_path_factory: pytest.TempPathFactory):
    """Build a RaypipeConfig from the tiny ``test`` preset, with all outputs inside a fresh temp folder."""
    from raypipe.config import load_config

    def make(*overrides: str, name: str = "run"):
        root = tmp_path_factory.mktemp(name)
        base = [
            f"embed.output={root / 'features'}",
            f"train.storage_path={root / 'ray_results'}",
            f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"label.output={root / 'labels'}",
            f"promote.output={root / 'promotion'}",
            f"nightly.output={root / 'nightly'}",
        ]
        return load_config("test", base + list(overrides))

    return make


@pytest.fixture(scope="session")
def feature_shards(ray_session, corpus, test_config_factory):
    """Feature shards embedded from the session corpus with the tiny test encoders; returns (cfg, summary).

    Made by the production graph (one actor pool per encoder); the other embed runs of the suite use the test
    preset's single fused encoder pool and are compared with these rows.
    """
    from raypipe.embed.pipeline import embed_videos

    cfg = test_config_factory(
        f"embed.source.uri={corpus.videos_dir}",
        f"embed.source.annotations={corpus.annotations_path}",
        "embed.fuse_encoders=false",
        name="shards",
    )
    summary = embed_videos(cfg)
    return cfg, summary


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 API (moto's threaded server) on a free localhost port with one empty bucket.

    Returns ``SimpleNamespace(endpoint_url, bucket, storage)``; ``storage`` is the StorageConfig to put in
    ``cfg.storage`` (``--set storage.endpoint_url=...``). Credentials are the dummy AWS_* variables set above.
    """
    import logging
    import socket
    from types import SimpleNamespace

    from moto.server import ThreadedMotoServer

    from raypipe.config import StorageConfig
    from raypipe.io.fs import resolve

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    storage = StorageConfig(endpoint_url=endpoint)
    bucket = "raypipe-test"
    fs, _ = resolve(f"s3://{bucket}", storage)
    fs.mkdir(bucket)
    yield SimpleNamespace(endpoint_url=endpoint, bucket=bucket, storage=storage)
    server.stop()


@pytest.fixture(scope="session")
def registered_model(feature_shards, corpus, test_config_factory):
    """A tiny CAV-Net trained on the session shards (2 epochs) and registered in MLflow (its registry's first
    version: both ``@challenger`` and ``@champion``); returns the config that labels the session corpus with it.

    Shared by the labelling tests and the `ray job submit` test (both only read the registry entry it makes,
    except where a test registers a further version on purpose).
    """
    from raypipe.train import run as train_run

    feat_cfg, _ = feature_shards
    cfg = test_config_factory(
        f"embed.source.uri={corpus.videos_dir}",
        f"embed.source.annotations={corpus.annotations_path}",
        f"embed.output={feat_cfg.embed.output}",
        f"train.data={feat_cfg.embed.output}",
        "model.name=cavnet",
        "model.params={dim: 32, heads: 2, proj_dim: 16}",
        "train.epochs=2",
        "train.loss.mlm=0",
        "train.loss.vtm=0",
        f"label.class_names={corpus.class_names_path}",
        "label.model_uri=models:/raypipe-classifier-test@champion",
        "tracking.registered_model_name=raypipe-classifier-test",
        name="registered",
    )
    assert train_run(cfg) == 0, "training the shared test model failed"
    return cfg


@pytest.fixture(autouse=True)
def ray_resources_released():
    """Every test hands back the session Ray instance's CPUs: a leaked actor or placement group would starve the
    tests after it (a Train run then waits for workers until the timeout), so the leaking test fails instead."""
    yield
    import sys
    import time

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + 60
    while (free := ray.available_resources().get("CPU", 0.0)) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    if free < total:
        from ray.util.placement_group import placement_group_table

        alive = [a["ActorClassName"] for a in ray._private.state.actors().values() if a.get("State") == "ALIVE"]
        pgs = [pg["name"] or pg_id[:8] for pg_id, pg in placement_group_table().items() if pg.get("state") == "CREATED"]
        pytest.fail(f"test left {total - free:g} of {total:g} CPUs in use; alive actors: {alive}; placement groups: {pgs}")


@pytest.fixture(scope="session")
def assert_injected_actor_death():
    """Checks that an exception is the crash the fault injector causes (an encoder actor's process exits), so a
    crash test cannot pass on another error a regression raises."""

    def check(exc: BaseException) -> None:
        from ray.exceptions import RayActorError

        chain, seen = [exc], set()
        while chain:
            e = chain.pop()
            if id(e) in seen:
                continue
            seen.add(id(e))
            if isinstance(e, RayActorError):
                return
            chain.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        raise AssertionError(f"not the injected actor death: {type(exc).__name__}: {str(exc)[:2000]}")

    return check


@pytest.fixture(scope="session")
def register_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Log a torch model made outside Ray Train (e.g. on other feature dims) as an MLflow run's model, in the
    checkpoint layout training writes, and register it through the same ``register_run_model`` training calls.

    ``make(cfg, model_name=..., info=ShardInfo, classes=[...], data=features_uri)`` -> the registered version.
    """
    import json
    from dataclasses import asdict

    import numpy as np
    import torch

    from raypipe.classifier import META_FILE, MODEL_FILE, example_from_shaped
    from raypipe.models import builder_params, create_model
    from raypipe.tracking import RunLogger, experiment_id, make_client, register_run_model

    def make(cfg, *, model_name: str, info, classes: list[str], data: str, val_fraction: float, seed: int = 0,
             params: dict | None = None, test_fraction: float = 0.0) -> str:
        derived = {"num_classes": len(classes), "frame_dim": info.frame_dim, "audio_dim": info.audio_dim,
                   "text_dim": info.text_dim}
        kwargs = {k: v for k, v in derived.items() if k in builder_params(model_name)} | dict(params or {})
        torch.manual_seed(seed)
        model = create_model(model_name, **kwargs)
        ckpt = tmp_path_factory.mktemp("handmade_ckpt")
        torch.save(model.state_dict(), ckpt / MODEL_FILE)
        meta = {"model_name": model_name, "model_kwargs": kwargs, "classes": list(classes), "task": "single_label",
                "shard_info": asdict(info), "val_fraction": val_fraction, "test_fraction": test_fraction, "epoch": 0, "metrics": {},
                "config": {"train": {"data": data}}}
        (ckpt / META_FILE).write_text(json.dumps(meta))
        t, n = info.max_frames, 2
        example = example_from_shaped({
            "frame_feats": np.zeros((n, t, info.frame_dim), np.float32), "frame_mask": np.ones((n, t), bool),
            "audio_feats": np.zeros((n, t, info.audio_dim), np.float32), "audio_mask": np.ones((n, t), bool),
            "input_ids": np.ones((n, info.text_len), np.int32), "attention_mask": np.ones((n, info.text_len), np.int32),
            "text_emb": np.zeros((n, info.text_dim), np.float32),
        })
        client = make_client(cfg.tracking)
        run = client.create_run(experiment_id(client, cfg.tracking), run_name=f"handmade-{model_name}")
        run_logger = RunLogger(cfg.tracking, run.info.run_id)
        run_logger.log_model(str(ckpt), example)
        run_logger.finish()
        version = register_run_model(cfg, run_id=run.info.run_id)
        assert version is not None
        return version

    return make
