"""The resource planner on simulated clusters (no Ray): plans fit, never ask for more than exists, and what cannot
be placed is one line naming the keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raypipe.config import ConfigError, load_config
from raypipe.resources import (
    Cluster,
    NodeType,
    ResourceError,
    check,
    cluster_from_yaml,
    plan_embed,
    plan_label,
    plan_train,
    problems,
)
from raypipe.runtime import apply_plan, stage_plan

REPO = Path(__file__).resolve().parents[2]
LAPTOP = Cluster.single(2)
BIG = Cluster.single(64, 8)


def _plans(cfg, cluster):
    return {s: stage_plan(cfg, s, cluster) for s in ("embed", "label", "train", "tune")}


def _max_use(plan, key: str) -> float:
    """What the plan asks for of ``key`` with every pool at its max_size (train: the whole worker group)."""
    s = plan.settings
    if plan.stage in ("train", "tune"):
        return s["train.num_workers"] * (s["train.cpus_per_worker"] if key == "CPU" else float(s["train.use_gpu"]))
    pools = ["frame_pool"] + ([] if s["embed.fuse_encoders"] else ["audio_pool", "text_pool"])
    per = "num_cpus" if key == "CPU" else "num_gpus"
    total = sum(s[f"embed.{p}.max_size"] * s[f"embed.{p}.{per}"] for p in pools)
    if plan.stage == "label":
        total += s["label.max_actors"] * s[f"label.{per}"]
    return total


def test_default_config_on_a_2cpu_laptop_fuses_and_fits() -> None:
    cfg = load_config(None)
    plans = _plans(cfg, LAPTOP)
    for stage, plan in plans.items():
        assert problems(plan, LAPTOP) == [], stage
    embed = plans["embed"].settings
    # embed: one actor per CPU decodes, encodes and writes (no decode tasks, no other pool)
    assert embed["embed.inline_decode"] is True and embed["embed.fuse_encoders"] is True
    assert (embed["embed.frame_pool.num_cpus"], embed["embed.frame_pool.max_size"]) == (1.0, 2)
    assert embed["embed.inline_calls"] == 1 and "embed.encoder_threads" not in embed
    assert [r.what for r in plans["embed"].requests] == ["InlineEmbedder actor (embed.frame_pool)"]
    label = plans["label"].settings
    assert label["embed.fuse_encoders"] is True and "embed.inline_decode" not in label  # three pools do not fit
    assert label["embed.frame_pool.num_gpus"] == 0
    # the label pools leave room to decode: actors at their max plus one decode task fit the 2 CPUs
    assert _max_use(plans["label"], "CPU") + label["embed.decode_num_cpus"] <= 2
    assert plans["train"].settings == {"train.use_gpu": False, "train.num_workers": 2, "train.cpus_per_worker": 0.5}


def test_default_config_on_a_64cpu_8gpu_node_uses_it() -> None:
    cfg = load_config(None)
    plans = _plans(cfg, BIG)
    for stage, plan in plans.items():
        assert problems(plan, BIG) == [], stage
    e = plans["embed"].settings
    assert e["embed.fuse_encoders"] is False
    for pool in ("frame_pool", "audio_pool", "text_pool"):
        assert e[f"embed.{pool}.max_size"] == 8 and 0 < e[f"embed.{pool}.num_gpus"] < 1
    assert _max_use(plans["embed"], "GPU") == pytest.approx(8, abs=0.01)
    assert _max_use(plans["label"], "GPU") <= 8
    assert plans["train"].settings["train.use_gpu"] is True and plans["train"].settings["train.num_workers"] == 8
    assert _max_use(plans["train"], "CPU") <= 64 - 1  # CPUs left for data reading


@pytest.mark.parametrize("gpus", [0, 1, 8])
@pytest.mark.parametrize("cpus", [2, 4, 16, 64])
def test_plans_never_ask_for_more_than_exists(cpus: int, gpus: int) -> None:
    cluster = Cluster.single(cpus, gpus)
    for preset in (None, "demo"):
        for stage, plan in _plans(load_config(preset), cluster).items():
            assert problems(plan, cluster) == [], (preset, stage, plan.describe())
            assert _max_use(plan, "GPU") <= gpus + 1e-6, (preset, stage, plan.describe())
            if stage != "tune":  # a trial adds its driver's CPU
                assert _max_use(plan, "CPU") <= cpus, (preset, stage, plan.describe())
            for r in plan.requests:
                assert cluster.fits_one(r.shape)


def test_gpu_pools_share_one_gpu_on_a_1gpu_node() -> None:
    """Issue #21 item 4: one whole GPU per pool with min_size=1 left pools pending forever on 1-2 GPU nodes."""
    cfg = load_config(None)
    one = Cluster.single(8, 1)
    label = plan_label(cfg, one).settings
    shares = [label[f"embed.{p}.num_gpus"] for p in ("frame_pool", "audio_pool", "text_pool")] + [label["label.num_gpus"]]
    assert all(0 < s < 1 for s in shares) and sum(shares) <= 1


def test_inline_decode_only_where_it_was_measured_to_win_and_never_with_text_stages() -> None:
    """auto: inline on a small CPU-only cluster; staged with GPUs, on 6+ CPUs, with OCR / ASR or unfused encoders;
    an explicit true with OCR is refused when the config loads."""
    def inline(cluster, *sets):
        return stage_plan(load_config(None, list(sets)), "embed", cluster).settings["embed.inline_decode"]

    assert inline(LAPTOP) is True and inline(Cluster.single(4)) is True
    assert inline(Cluster.single(2, 1)) is False and inline(Cluster.single(16)) is False
    assert inline(LAPTOP, "embed.ocr.enabled=true") is False and inline(LAPTOP, "embed.fuse_encoders=false") is False
    assert inline(Cluster.single(16), "embed.inline_decode=true") is True
    with pytest.raises(ConfigError, match="inline_decode runs the fused encoders without OCR"):
        load_config(None, ["embed.inline_decode=true", "embed.asr.enabled=true"])


def test_an_inline_actor_given_several_cpus_runs_one_threaded_call_per_cpu() -> None:
    """Default: one 1-CPU actor per CPU, one call each; an actor of N CPUs runs N calls of one torch thread each;
    explicit values win, and one call per actor gives the actor's CPUs to torch."""
    def inline(cluster, *sets):
        s = stage_plan(load_config(None, list(sets)), "embed", cluster).settings
        return (s["embed.frame_pool.num_cpus"], s["embed.frame_pool.max_size"], s["embed.inline_calls"],
                s.get("embed.encoder_threads"))

    assert inline(Cluster.single(4)) == (1.0, 4, 1, None)
    assert inline(Cluster.single(0.5)) == (0.5, 1, 1, None)
    assert inline(LAPTOP, "embed.frame_pool.num_cpus=2") == (2.0, 1, 2, 1)
    assert inline(Cluster.single(4), "embed.frame_pool.num_cpus=2") == (2.0, 2, 2, 1)
    assert inline(LAPTOP, "embed.frame_pool.num_cpus=2", "embed.inline_calls=1") == (2.0, 1, 1, None)  # Ray: 2 threads
    assert inline(LAPTOP, "embed.frame_pool.num_cpus=2", "embed.encoder_threads=2") == (2.0, 1, 2, 2)
    with pytest.raises(ConfigError, match="inline_calls must be 'auto' or at least 1"):
        load_config(None, ["embed.inline_calls=0"])


def test_infeasible_requests_are_one_line_naming_the_keys() -> None:
    cfg = load_config(None, ["embed.frame_pool.num_gpus=2", "embed.fuse_encoders=false"])
    with pytest.raises(ResourceError) as err:
        check(plan_embed(cfg.embed, Cluster.single(8, 1)), Cluster.single(8, 1))
    msg = str(err.value)
    assert "\n" not in msg and "embed.frame_pool.num_gpus" in msg and "GPU: 2" in msg and "GPU 1" in msg
    cfg = load_config(None, ["train.num_workers=4", "train.cpus_per_worker=1"])
    with pytest.raises(ResourceError, match=r"train.num_workers.*CPU 4.*CPU 2"):
        check(plan_train(cfg.train, LAPTOP), LAPTOP)


def test_explicit_values_win_over_the_plan() -> None:
    cfg = load_config(None, ["embed.frame_pool.num_cpus=0.75", "embed.frame_pool.max_size=3", "train.num_workers=1"])
    resolved = apply_plan(cfg, stage_plan(cfg, "embed", BIG))
    assert resolved.embed.frame_pool.num_cpus == 0.75 and resolved.embed.frame_pool.max_size == 3
    assert apply_plan(cfg, stage_plan(cfg, "train", BIG)).train.num_workers == 1


def test_cold_autoscaling_cluster_plans_from_its_node_types() -> None:
    """Issue #21 item 5: a cold cluster shows 0 GPUs; the node types of cluster.yaml still offer them."""
    cluster = cluster_from_yaml(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    assert cluster.autoscaling and cluster.has("GPU")
    cfg = load_config(None)
    for stage, plan in _plans(cfg, cluster).items():
        assert problems(plan, cluster) == [], stage
    embed = plan_embed(cfg.embed, cluster, decode_resource="raypipe_cpu_worker")
    assert embed.settings["embed.frame_pool.num_gpus"] > 0
    # Issue #21 item 8: decode asks for the CPU worker group's resource, which the head and GPU nodes lack
    assert embed.settings["embed.decode_resources"] == {"raypipe_cpu_worker": 1.0}
    hosts = [n.name for n in cluster.nodes if n.resources.get("raypipe_cpu_worker")]
    assert hosts and all(not n.resources.get("GPU") for n in cluster.nodes if n.name in hosts)


def test_decode_resource_only_when_some_node_defines_it() -> None:
    cfg = load_config(None, ["embed.inline_decode=false"])  # auto on a laptop: no decode tasks at all
    plain = plan_embed(cfg.embed, LAPTOP, decode_resource="raypipe_cpu_worker")
    assert plain.settings["embed.decode_resources"] == {}
    small = Cluster((NodeType({"CPU": 1}), NodeType({"CPU": 2, "raypipe_cpu_worker": 1000})))
    auto = plan_embed(load_config(None).embed, small, decode_resource="raypipe_cpu_worker")
    assert auto.settings["embed.inline_decode"] is False  # decode nodes of their own: staged
    two = Cluster((NodeType({"CPU": 2}), NodeType({"CPU": 16, "raypipe_cpu_worker": 1000}, 2)))
    assert plan_embed(cfg.embed, two, decode_resource="raypipe_cpu_worker").requests[-1].shape["raypipe_cpu_worker"] == 1


def test_decode_asks_memory_only_where_the_node_types_declare_it() -> None:
    """Issue #15: an autoscaler cannot match a memory request to a node type whose memory it does not know (Ray's
    fake/local providers: "could not find a node type to satisfy the request"), so a plan made from cluster.yaml's
    node types (which declare none) asks no memory; alive nodes always report theirs, so there it stays."""
    cfg = load_config(None)
    cold = cluster_from_yaml(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    plan = plan_embed(cfg.embed, cold, decode_resource="raypipe_cpu_worker")
    assert "memory" not in plan.requests[-1].shape and plan.settings["embed.decode_memory"] == 0
    alive = Cluster((NodeType({"CPU": 16, "memory": 64e9}),))
    assert plan_embed(cfg.embed, alive).settings["embed.decode_memory"] == cfg.embed.decode_memory_mb * 1024 * 1024


def test_decode_backlog_asks_for_whole_decode_nodes_up_to_the_group_max() -> None:
    """Issue #15: Ray Data submits only the tasks that fit the nodes up, so the backlog is asked for as whole
    decode nodes (one bundle of the node type's full custom resource each), capped by max_workers."""
    from raypipe.resources import decode_capacity

    cfg = load_config(None)
    cold = cluster_from_yaml(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    plan = plan_embed(cfg.embed, cold, decode_resource="raypipe_cpu_worker")
    dcpu = plan.settings["embed.decode_num_cpus"]
    per_node = int(16 / dcpu)
    assert decode_capacity(plan, cold, per_node + 1, "raypipe_cpu_worker") == [{"raypipe_cpu_worker": 1000.0}] * 2
    assert len(decode_capacity(plan, cold, 10_000, "raypipe_cpu_worker")) == 8  # cpu_decode max_workers
    assert decode_capacity(plan, cold, 0, "raypipe_cpu_worker") == []
    alive = Cluster((NodeType({"CPU": 16, "raypipe_cpu_worker": 1000}, 3),))  # no autoscaler: nothing to ask
    assert decode_capacity(plan_embed(cfg.embed, alive, decode_resource="raypipe_cpu_worker"), alive, 500,
                           "raypipe_cpu_worker") == []


def test_device_and_precision_are_in_the_feature_fingerprint() -> None:
    from raypipe.config.embed import config_hash

    cfg = load_config(None)
    cpu = apply_plan(cfg, stage_plan(cfg, "embed", Cluster.single(8)))
    gpu = apply_plan(cfg, stage_plan(cfg, "embed", Cluster.single(8, 1)))
    assert config_hash(cpu.embed) != config_hash(gpu.embed)
    # placement alone (more actors, other CPU shares) does not change features: same hash, so reruns resume
    assert config_hash(cpu.embed) == config_hash(apply_plan(cfg, stage_plan(cfg, "embed", Cluster.single(16))).embed)


def test_num_cpus_is_only_for_a_local_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #21 item 3: Ray refuses ray.num_cpus when joining a cluster (every `ray job submit` job)."""
    from raypipe.runtime import joining_cluster

    cfg = load_config("demo", ["ray.num_cpus=4"])
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what a job driver sees
    assert joining_cluster(cfg)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert not joining_cluster(cfg)
    assert joining_cluster(load_config("demo", ["ray.address=ray://head:10001"]))
    assert load_config("demo").ray.num_cpus is None  # the demo preset no longer needs it


def test_unknown_registered_model_is_one_line_with_the_traceback_in_the_log(tmp_path, monkeypatch, capfd) -> None:
    from raypipe.cli import main

    monkeypatch.setenv("RAYPIPE_LOG_DIR", str(tmp_path / "logs"))
    rc = main(["eval", "--set", "eval.model_uri=models:/no-such-model@candidate",
               "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", f"eval.data={tmp_path}"])
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 1 and len(err) == 1, err
    assert "raypipe eval failed: MlflowException: Registered Model with name=no-such-model not found" in err[0]
    log = next((tmp_path / "logs").glob("eval-*.log")).read_text()
    assert "Traceback (most recent call last)" in log and "no-such-model" in log


def test_watchdog_interrupts_a_wait_without_progress_and_says_so() -> None:
    """Also after a handler that swallows SIGINT, as Ray Tune's ``fit()`` leaves one installed (the full suite hung
    here for 900 s once the experiment runner's sweep had run in the same process)."""
    import queue
    import signal
    import time

    from raypipe.runtime import StallError, Watchdog

    swallowed: list[int] = []
    tune_like = lambda sig, frame: swallowed.append(sig)  # noqa: E731
    previous = signal.signal(signal.SIGINT, tune_like)
    t0 = time.monotonic()
    expected = r"embed: stalled, no progress for \ds \(ray.stall_timeout_s=1\).*rerun to resume"
    with pytest.raises(StallError, match=expected), Watchdog("embed", 1.0) as dog:
        try:
            queue.Queue().get(timeout=30)  # blocked on a lock, as Ray Data's iterator waits for output
        except KeyboardInterrupt:
            dog.raise_if_fired()
            raise
    assert time.monotonic() - t0 < 10
    with Watchdog("embed", 1.0) as dog:  # ticking keeps it quiet
        for _ in range(40):
            time.sleep(0.05)
            dog.tick()
    assert dog.message is None
    assert not swallowed and signal.getsignal(signal.SIGINT) is tune_like  # the caller's handler is back
    signal.signal(signal.SIGINT, previous)


def test_unreachable_cluster_is_one_line_in_seconds(tmp_path, monkeypatch, capfd) -> None:
    import socket
    import time

    from raypipe.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"not decoded: Ray is never reached")
    monkeypatch.setenv("RAYPIPE_LOG_DIR", str(tmp_path / "logs"))
    t0 = time.monotonic()
    rc = main(["embed", "--source", str(tmp_path / "videos"), "--set", "embed.source.annotations=null",
               "--output", str(tmp_path / "out"), "--set", f"ray.address=127.0.0.1:{port}"])
    err = [line for line in capfd.readouterr().err.splitlines() if " ERROR " in line]
    assert rc == 1 and time.monotonic() - t0 < 20
    assert len(err) == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused" in err[0], err


def test_encoder_threads_auto_is_ray_default_and_an_explicit_value_is_planned():
    """Measured on 2 CPUs, 2 torch threads in the 0.5-CPU fused actor gave no reliable gain: auto leaves Ray's."""
    cfg = load_config(None)
    assert "embed.encoder_threads" not in plan_embed(cfg.embed, Cluster.single(2)).settings
    two = load_config(None, ["embed.encoder_threads=2"])
    assert apply_plan(two, plan_embed(two.embed, Cluster.single(2))).embed.encoder_threads == 2


def test_a_lone_cpu_worker_on_cached_data_gets_every_cpu() -> None:
    """No read tasks run beside a single worker that trains on cached data: it gets the node's CPUs (torch threads),
    as a plain loop would; streamed data keeps the reserve, and Tune trials keep their share."""
    cached = load_config(None, ["train.num_workers=1", "train.cache_data=true"])
    assert plan_train(cached.train, LAPTOP).settings["train.cpus_per_worker"] == 2.0
    streamed = load_config(None, ["train.num_workers=1", "train.cache_data=false"])
    assert plan_train(streamed.train, LAPTOP).settings["train.cpus_per_worker"] == 1.0
    assert plan_train(cached.train, LAPTOP, stage="tune", share=2).settings["train.cpus_per_worker"] == 0.25
    two = load_config(None, ["train.num_workers=2", "train.cache_data=true"])
    assert plan_train(two.train, LAPTOP).settings["train.cpus_per_worker"] == 0.5
    assert problems(plan_train(cached.train, LAPTOP), LAPTOP) == []


def test_warm_imports_loads_modules_in_the_background_and_leaves_failures_to_the_stage() -> None:
    """ensure_ray overlaps the stage's heavy imports with ray.init: the modules end up imported, a missing one
    does not raise in the thread (the stage's own import reports it) and stops the rest of the list."""
    import sys

    from raypipe.runtime import WARM_IMPORTS, warm_imports

    assert set(WARM_IMPORTS) == {"torch", "timm", "transformers"}
    sys.modules.pop("colorsys", None)
    warm_imports(("colorsys",)).join(timeout=30)
    assert "colorsys" in sys.modules
    sys.modules.pop("this_module_does_not_exist", None)
    sys.modules.pop("wave", None)
    thread = warm_imports(("this_module_does_not_exist", "wave"))
    thread.join(timeout=30)
    assert not thread.is_alive() and "wave" not in sys.modules


def test_client_warming_opens_the_mlflow_store_beside_the_block_and_joins_it_on_every_exit(tmp_path: Path) -> None:
    """Training builds its MLflow client beside ray.init (driver) and the model build (rank 0): the store is
    open when the block ends, also when the block raises, and nothing is started when it is not needed."""
    import threading

    from raypipe.config import TrackingConfig
    from raypipe.tracking import client_warming

    def warming() -> bool:
        return any(t.name == "raypipe-warm-mlflow" for t in threading.enumerate())

    with client_warming(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/a/mlflow.db")):
        body_ran = True  # the caller's own start-up work
    assert body_ran and (tmp_path / "a" / "mlflow.db").stat().st_size > 0 and not warming()
    failing = client_warming(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/b/mlflow.db"))
    with pytest.raises(RuntimeError, match="stage failed"), failing:
        raise RuntimeError("stage failed")
    assert (tmp_path / "b" / "mlflow.db").stat().st_size > 0 and not warming()
    with client_warming(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/c/mlflow.db"), needed=False):
        assert not warming()
    assert not (tmp_path / "c").exists()
