"""An autoscaling Ray cluster built from cluster.yaml's own node types, scaled by raypipe's own requests.

Why: the production cluster's GPU group starts at 0 nodes and must be brought up by what raypipe asks Ray for
(and given back when idle); its decode group must grow with the backlog. Ray's fake multi-node provider (the
one behind ``ray.cluster_utils.AutoscalingCluster``) runs the real autoscaler (v1, the one `ray up` starts)
against nodes that are extra raylets on this host, so that loop is exercised here without a cloud.

The cluster config is derived from cluster.yaml at test time (:func:`fake_config`): the node type names, their
custom resources, ``min_workers``, which groups have GPUs, the head's CPU count and the ``setup_commands`` are
read from the file; only what a 2-core host cannot hold is scaled down (CPUs per node, ``max_workers``, the idle
timeout), and GPUs are Ray's fake GPUs (``num_gpus`` on a node without CUDA: the actors run on the CPU, see
raypipe.device). ``AutoscalingCluster.start`` itself is not used: it runs ``ray stop --force`` (every Ray process
on the host, other sessions' included) and reads a template the wheel does not ship; the head is started here
the way it does it (``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``), in its own process group on
free ports, and torn down by killing exactly that group.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.stops_session_ray

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
HEAD_TYPE = "ray.head.default"  # the fake provider tags its head with this type name
CPUS_PER_NODE = 1  # each fake node's CPUs (cluster.yaml's are 8-16: too many worker processes on 2 cores)
MAX_NODES = 2  # per worker group (cluster.yaml: 8 decode, 4 GPU)
IDLE_TIMEOUT_MIN = 0.1  # 6 s (cluster.yaml: 10 min)
CLUSTER_YAML = yaml.safe_load((REPO / "cluster.yaml").read_text())


def _group_with(resource: str) -> str:
    """The worker group of cluster.yaml whose nodes have ``resource`` (its name is the file's, not repeated here)."""
    return next(n for n, t in CLUSTER_YAML["available_node_types"].items()
                if n != CLUSTER_YAML["head_node_type"] and t.get("resources", {}).get(resource))


DECODE_RESOURCE = "raypipe_cpu_worker"  # raypipe's ray.decode_resource default: decode tasks run where it is
GPU_GROUP, DECODE_GROUP = _group_with("GPU"), _group_with(DECODE_RESOURCE)


def fake_config(cluster_yaml: dict[str, Any], gcs_address: str) -> dict[str, Any]:
    """cluster.yaml's node types for Ray's fake multi-node provider (see the module docstring for what is scaled)."""
    head_name = cluster_yaml["head_node_type"]
    types: dict[str, Any] = {}
    for name, spec in cluster_yaml["available_node_types"].items():
        res = {k: v for k, v in spec.get("resources", {}).items()}
        if name == head_name:
            types[HEAD_TYPE] = {"resources": res, "node_config": {}, "max_workers": 0}
            continue
        res["CPU"] = CPUS_PER_NODE
        types[name] = {"resources": res, "node_config": {}, "min_workers": spec.get("min_workers", 0),
                       "max_workers": min(MAX_NODES, spec["max_workers"])}
    return {
        "cluster_name": "raypipe-fake", "max_workers": min(cluster_yaml["max_workers"], 2 * MAX_NODES),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": types, "head_node_type": HEAD_TYPE, "auth": {},
        "upscaling_speed": cluster_yaml.get("upscaling_speed", 1.0), "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "docker": {}, "initialization_commands": [], "setup_commands": list(cluster_yaml["setup_commands"]),
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def test_the_test_cluster_is_cluster_yaml_s_own_node_types() -> None:
    """Issue #15 item 4: what the autoscaling tests run is read from cluster.yaml, so the two cannot drift: same
    worker groups, custom resources, GPUs, min_workers and setup_commands; only the documented scaling differs."""
    from raypipe.config import load_config

    assert load_config(None).ray.decode_resource == DECODE_RESOURCE
    data = CLUSTER_YAML
    cfg = fake_config(data, "127.0.0.1:1")
    head = data["head_node_type"]
    fake, real = cfg["available_node_types"], data["available_node_types"]
    assert set(fake) - {HEAD_TYPE} == set(real) - {head} and fake[HEAD_TYPE]["resources"] == real[head]["resources"]
    for name in set(real) - {head}:
        assert {k: v for k, v in fake[name]["resources"].items() if k != "CPU"} == \
            {k: v for k, v in real[name]["resources"].items() if k != "CPU"}, name
        assert fake[name]["min_workers"] == real[name].get("min_workers", 0)
        assert fake[name]["max_workers"] == min(MAX_NODES, real[name]["max_workers"])
    assert cfg["setup_commands"] == data["setup_commands"]
    assert any(t["resources"].get("GPU") and t["min_workers"] == 0 for t in fake.values()), "GPU group from 0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WATCHER = """
import json, sys, time, ray
ray.init(address=sys.argv[1], configure_logging=False, log_to_driver=False)
while True:
    alive = [dict(n["Resources"], _id=n["NodeID"]) for n in ray.nodes() if n.get("Alive")]
    print(json.dumps(alive), flush=True)
    time.sleep(0.5)
"""


@dataclass
class FakeCluster:
    proc: subprocess.Popen
    address: str
    config_path: Path
    config: dict[str, Any]
    temp_dir: Path
    token: str
    samples: list[dict[str, int]] = field(default_factory=list)
    ids: dict[str, list[str]] = field(default_factory=dict)  # node ids per group, latest sample

    def client_env(self) -> dict[str, str]:
        """What a driver on the head needs: the address and the cluster's token (as `ray job submit` jobs get)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO))
        return env

    def group_of(self, resources: dict[str, float]) -> str | None:
        for name, spec in self.config["available_node_types"].items():
            if name != HEAD_TYPE and all(resources.get(k, 0) == v for k, v in spec["resources"].items()):
                return name
        return None

    def _add_sample(self, line: str) -> None:
        counts: dict[str, int] = {}
        ids: dict[str, list[str]] = {}
        for res in json.loads(line):
            node_id = res.pop("_id")
            if group := self.group_of(res):
                counts[group] = counts.get(group, 0) + 1
                ids.setdefault(group, []).append(node_id)
        self.samples.append(counts)
        self.ids = ids

    def kill_node(self, group: str) -> str:
        """SIGKILL the raylet of one alive node of ``group`` (its workers die with it), as a lost machine."""
        import psutil

        node_id = self.ids[group][0]
        for p in psutil.process_iter(["name", "cmdline"]):
            if "raylet" in (p.info["name"] or "") and f"--node_id={node_id}" in (p.info["cmdline"] or []):
                p.kill()
                return node_id
        raise AssertionError(f"no raylet of node {node_id}")

    def alive(self) -> dict[str, int]:
        return self.samples[-1] if self.samples else {}

    def peak(self, group: str, since: int = 0) -> int:
        return max((s.get(group, 0) for s in self.samples[since:]), default=0)

    def wait_for(self, pred, timeout: float, what: str) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        n = len(self.samples)
        while time.monotonic() < deadline:
            if len(self.samples) > n and pred(now := self.alive()):
                return now
            time.sleep(0.5)
        raise AssertionError(f"{what}: not reached in {timeout:.0f}s; alive worker nodes: {self.alive()}")

    def watch(self) -> subprocess.Popen:
        """A second driver that samples ``ray.nodes()`` twice a second (the test process itself never connects:
        its Ray may already have been initialised without this cluster's token)."""
        proc = subprocess.Popen([sys.executable, "-c", WATCHER, self.address], env=self.client_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)

        def read() -> None:
            for line in proc.stdout:
                if line.startswith("["):
                    self._add_sample(line)

        threading.Thread(target=read, daemon=True).start()
        return proc

    def raypipe(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raypipe.cli", *args], env=self.client_env(), cwd=self.temp_dir,
                              capture_output=True, text=True, timeout=timeout)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.3)


@pytest.fixture(scope="module")
def fake_cluster(single_node) -> Iterator[FakeCluster]:
    """The autoscaling cluster, started after the single-node references (made on the session's Ray instance)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # two Ray instances on one host confuse each other (conftest.py)
        ray.shutdown()
    from ray._private.services import get_node_ip_address

    temp_dir = Path(tempfile.mkdtemp(prefix="rpa", dir="/tmp"))  # short: Ray's socket paths are length-limited
    port = _free_port()
    address = f"{get_node_ip_address()}:{port}"
    config = fake_config(CLUSTER_YAML, address)
    config_path = temp_dir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", OMP_NUM_THREADS="1",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    head = config["available_node_types"][HEAD_TYPE]["resources"]
    cmd = [RAY, "start", "--head", "--block", f"--port={port}", f"--num-cpus={int(head.get('CPU', 0))}",
           "--num-gpus=0", f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
           f"--ray-client-server-port={_free_port()}", f"--autoscaling-config={config_path}"]
    with open(temp_dir / "ray_start.log", "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = FakeCluster(proc, address, config_path, config, temp_dir, token)
    watcher = None
    try:
        watcher = cluster.watch()
        deadline = time.monotonic() + 120
        while not cluster.samples:
            if proc.poll() is not None or watcher.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake cluster did not come up: {(temp_dir / 'ray_start.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield cluster
    finally:
        if watcher is not None:
            _kill_group(watcher)
        _kill_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _sets(**kv: Any) -> list[str]:
    return [a for k, v in kv.items() for a in ("--set", f"{k.replace('__', '.')}={v}")]


VIDEOS = 6  # enough for a decode backlog of more than one node (2 decode tasks per 1-CPU node)
MODEL_NAME, MODEL_VERSION = "raypipe-classifier-test", "1"  # conftest's registered_model: its registry's version 1
# Label rows that depend on the run, not on the video: compared everywhere except these.
RUN_COLUMNS = ("run_id", "labelled_at")


def _planned_sets(cluster: FakeCluster) -> list[str]:
    """What embed and label share on the fake cluster: planned from its node types, pools left to the planner."""
    return _sets(embed__source__limit=VIDEOS, embed__videos_per_block=1, ray__cluster_yaml=cluster.config_path,
                 ray__stall_timeout_s=120, embed__frame_pool__num_cpus="auto", embed__decode_num_cpus="auto")


def _embed_args(cluster: FakeCluster, corpus, output: str) -> list[str]:
    """`raypipe embed` on the fake cluster."""
    return ["embed", "-c", "test", "--source", str(corpus.videos_dir), "--annotations", str(corpus.annotations_path),
            "--output", output, *_planned_sets(cluster)]


def _label_sets(registered_model, output: str) -> list[str]:
    """Label the first VIDEOS videos with conftest's registered model, one video per classifier batch, no MLflow
    run (not what is tested here)."""
    cfg = registered_model
    return [*_sets(label__model_uri=f"models:/{MODEL_NAME}/{MODEL_VERSION}", label__output=output,
                   tracking__tracking_uri=cfg.tracking.tracking_uri, tracking__registered_model_name=MODEL_NAME,
                   label__class_names=cfg.label.class_names, label__batch_size=1, label__log_mlflow="false")]


# The runs that lose a node: one video per encoder batch and per part file, so that the encoder's hold (below)
# leaves at most HOLD_AFTER videos written (on CPU the rows do not depend on the batching).
ONE_BY_ONE = _sets(embed__frames__batch_size=1, embed__audio__batch_size=1, embed__text__batch_size=1,
                   embed__write_batch_size=1, label__write_batch_size=1)
HOLD_AFTER = 2

@dataclass
class SingleNode:
    features: dict[str, dict]  # video id -> feature row of the session's single-node embed (conftest)
    labels: dict[str, dict]  # video id -> prediction row of a single-node label run, less RUN_COLUMNS


@pytest.fixture(scope="module")
def single_node(feature_shards, registered_model, corpus, test_config_factory) -> SingleNode:
    """The clean single-node references, made on the session's Ray instance before the fake cluster starts:
    conftest's feature shards (every corpus video) and a label run of the first VIDEOS videos (~15 s)."""
    from raypipe.io.shards import read_shards
    from raypipe.label import label_videos, read_predictions

    feat_cfg, _ = feature_shards
    table, _ = read_shards(feat_cfg.embed.output)
    out = test_config_factory(name="label_ref").label.output
    sets = _label_sets(registered_model, out)
    cfg = test_config_factory(f"embed.source.uri={corpus.videos_dir}",
                              f"embed.source.annotations={corpus.annotations_path}", f"embed.source.limit={VIDEOS}",
                              *sets[1::2], name="label_ref")
    summary = label_videos(cfg)
    assert summary["labelled"] + summary["failed"] == VIDEOS, summary
    labels = {r["video_id"]: {k: v for k, v in r.items() if k not in RUN_COLUMNS}
              for r in read_predictions(out).to_pylist()}
    return SingleNode({r["video_id"]: r for r in table.to_pylist()}, labels)


@dataclass
class ColdRun:
    output: Path
    samples: list[dict[str, int]]
    log: str
    seconds: float
    scale_down_s: float


@pytest.fixture(scope="module")
def cold_embed(fake_cluster: FakeCluster, corpus, tmp_path_factory) -> ColdRun:
    """Embed on the cold cluster (both worker groups at 0 nodes), then wait until the idle nodes are gone."""
    assert fake_cluster.alive() == {}, "the worker groups must start at 0 nodes"
    out = tmp_path_factory.mktemp("autoscale") / "features"
    start, t0 = len(fake_cluster.samples), time.monotonic()
    res = fake_cluster.raypipe(*_embed_args(fake_cluster, corpus, str(out)))
    took = time.monotonic() - t0
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    samples = fake_cluster.samples[start:]
    t1 = time.monotonic()
    fake_cluster.wait_for(lambda alive: not alive, 90, "idle worker nodes removed")
    return ColdRun(out, samples, log, took, time.monotonic() - t1)


def _plan_line(log: str) -> str:
    return next((ln for ln in log.splitlines() if "plan for" in ln), "")


def test_gpu_group_scales_from_zero_for_embed_and_back(fake_cluster: FakeCluster, cold_embed: ColdRun,
                                                       single_node: SingleNode) -> None:
    """The encoder actors bring up the GPU group, decode tasks the decode group (up to its max), the stage
    finishes with every video accounted for (rows bit-identical to the single-node embed), and the idle nodes
    are removed after the idle timeout."""
    from raypipe.io.shards import read_shards

    summary = json.loads((cold_embed.output / "summary.json").read_text())
    assert summary["rows_total"] + summary["errors_total"] == VIDEOS and summary["videos_ok"] > 0
    peak = {g: max((s.get(g, 0) for s in cold_embed.samples), default=0) for g in (GPU_GROUP, DECODE_GROUP)}
    assert peak[GPU_GROUP] >= 1, cold_embed.samples
    assert peak[DECODE_GROUP] == fake_cluster.config["available_node_types"][DECODE_GROUP]["max_workers"], peak
    plan = _plan_line(cold_embed.log)
    assert "GPU: 1" in plan and f"{DECODE_RESOURCE}: 1" in plan, plan  # the actors asked for GPUs; decode for the group
    rows, _ = read_shards(str(cold_embed.output))
    for row in rows.to_pylist():
        assert row == single_node.features[row["video_id"]], row["video_id"]
    print(f"embed {cold_embed.seconds:.0f}s, peak nodes {peak}, idle nodes gone {cold_embed.scale_down_s:.0f}s "
          f"after the stage; {plan.split('INFO ')[-1]}")


@dataclass
class FailedRun:
    rc: int
    log: str
    samples: list[dict[str, int]]
    parts: int


def _kill_node_mid_run(cluster: FakeCluster, args: list[str], fs, output: str) -> FailedRun:
    """``raypipe <args>`` on the cold cluster, its GPU node killed while the stage holds uncommitted work.

    To make "mid-run" exact, the encoder actor holds (raypipe's test hook RAYPIPE_FAULT_STALL_AFTER_BATCHES:
    it stops returning after HOLD_AFTER one-video batches); once the videos that got through are in S3, the GPU
    node's raylet is SIGKILLed, the held actor dies with it, and with the hook armed Ray does not restart it
    (max_restarts=0), so the stage itself fails (a lost node alone is recovered by Ray: the same run would
    finish and a rerun would have nothing to do). The first run must end with a failure, not hang or succeed.
    """
    from raypipe.embed.common import STALL_ENV

    assert cluster.alive() == {}, "the worker groups must start at 0 nodes"
    start = len(cluster.samples)
    proc = subprocess.Popen([sys.executable, "-m", "raypipe.cli", *args], env=cluster.client_env() | {
        STALL_ENV: str(HOLD_AFTER)}, cwd=cluster.temp_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prefix = output.removeprefix("s3://")

    def parts() -> int:
        fs.invalidate_cache()  # s3fs caches listings
        return len([p for p in fs.find(prefix) if "/_parts/shard-" in p and p.endswith(".parquet")])

    deadline = time.monotonic() + 240
    while not (GPU_GROUP in cluster.ids and parts() >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, \
            f"no part written before the run ended:\n{proc.stdout.read()[-4000:] if proc.poll() is not None else ''}"
        time.sleep(0.3)
    time.sleep(3.0)  # the videos that got through the held encoder are written meanwhile; the kill comes after
    assert proc.poll() is None, "the run ended before the node could be killed"
    cluster.kill_node(GPU_GROUP)
    try:
        rc = proc.wait(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run did not fail after its GPU node was killed:\n{proc.stdout.read()[-4000:]}") \
            from None
    # What the rerun finds is what the failed run left once it ended: a video that was already past the held
    # encoder (buffered in Ray Data) may be written after the kill, so the count is taken when the listing has
    # stopped changing, not before the kill (a CI run counted 1 there and the rerun then kept 2).
    written, stable_since = parts(), time.monotonic()
    while time.monotonic() - stable_since < 3.0:
        time.sleep(0.5)
        if (now := parts()) != written:
            written, stable_since = now, time.monotonic()
    # At most HOLD_AFTER videos get through the held encoder.
    assert 0 < written <= HOLD_AFTER, written
    return FailedRun(rc, proc.stdout.read(), cluster.samples[start:], written)


def _rerun(cluster: FakeCluster, args: list[str], *, cold: bool) -> tuple[subprocess.CompletedProcess,
                                                                         list[dict[str, int]]]:
    """The same command again, without the hook (``cold``: once the GPU group is back at 0 nodes)."""
    if cold:
        cluster.wait_for(lambda alive: not alive.get(GPU_GROUP), 90, "GPU group back at 0 nodes before the rerun")
    start = len(cluster.samples)
    res = cluster.raypipe(*args)
    return res, cluster.samples[start:]


def test_a_node_killed_mid_embed_to_s3_then_rerun_commits_every_video_once(
        fake_cluster: FakeCluster, cold_embed: ColdRun, single_node: SingleNode, corpus, moto_s3) -> None:
    """Issue #15 item 2: the same embed on several nodes, writing to S3 (moto), loses its GPU node mid-run and
    fails; the rerun embeds exactly the videos the first run had not written, and then every video is in
    exactly once with every row bit-identical to the single-node embed's."""
    from raypipe.io.fs import resolve
    from raypipe.io.shards import read_errors, read_shards

    out = f"s3://{moto_s3.bucket}/autoscale-features"
    fs, _ = resolve(out, moto_s3.storage)
    args = [*_embed_args(fake_cluster, corpus, out), "--set", f"storage.endpoint_url={moto_s3.endpoint_url}",
            *ONE_BY_ONE]
    first = _kill_node_mid_run(fake_cluster, args, fs, out)
    assert first.rc == 1 and "raypipe embed failed" in first.log, first.log[-4000:]
    rerun, _ = _rerun(fake_cluster, args, cold=False)
    assert rerun.returncode == 0, (first.log + rerun.stdout + rerun.stderr)[-4000:]

    summary = json.loads(fs.cat(f"{moto_s3.bucket}/autoscale-features/summary.json"))
    kept, redone = summary["videos_skipped"], summary["videos_processed"]
    # The rerun did exactly the failed run's leftover work; what that run had written (uncommitted) was kept.
    assert kept == first.parts and redone == VIDEOS - kept, summary
    table, _ = read_shards(out, moto_s3.storage)
    rows = {r["video_id"]: r for r in table.to_pylist()}
    errors = read_errors(out, moto_s3.storage).column("video_id").to_pylist()
    assert table.num_rows == len(rows), "a video has two rows"
    assert len(rows) + len(errors) == VIDEOS and not set(rows) & set(errors)
    ref, _ = read_shards(str(cold_embed.output))
    assert rows.keys() == {r["video_id"] for r in ref.to_pylist()}
    for vid, row in rows.items():
        assert row == single_node.features[vid], vid
    print(f"embed: first run exit {first.rc} (GPU node killed mid-run) with {kept} videos written; "
          f"the rerun embedded the other {redone}")


def test_label_scales_the_gpu_group_and_a_node_killed_mid_label_then_rerun_labels_every_video_once(
        fake_cluster: FakeCluster, cold_embed: ColdRun, single_node: SingleNode, registered_model, corpus,
        moto_s3) -> None:
    """Issue #15 items 1 and 2 for label (after the embed tests, so the GPU group is cold again): the label
    stage's accelerator actors (fused encoder, classifier) make the autoscaler add a GPU node; that node is
    killed mid-run and the run fails; the rerun, from 0 GPU nodes again, brings one up, labels exactly the
    videos the first run had not written, finishes, and its node is removed after the idle timeout. Every
    video then has exactly one prediction in S3, bit-identical (less run id and time) to the single-node run's."""
    from raypipe.io.fs import resolve
    from raypipe.label import read_predictions

    out = f"s3://{moto_s3.bucket}/autoscale-labels"
    fs, _ = resolve(out, moto_s3.storage)
    args = ["label", "-c", "test", "--source", str(corpus.videos_dir), "--annotations", str(corpus.annotations_path),
            *_planned_sets(fake_cluster), *_label_sets(registered_model, out), *ONE_BY_ONE,
            "--set", f"storage.endpoint_url={moto_s3.endpoint_url}"]
    fake_cluster.wait_for(lambda alive: not alive, 90, "idle worker nodes removed before label")
    first = _kill_node_mid_run(fake_cluster, args, fs, out)
    assert first.rc == 1 and "raypipe label failed" in first.log, first.log[-4000:]
    plan = _plan_line(first.log)
    assert "classifier" in plan and "GPU: 0.5" in plan, plan  # encoder and classifier pools share one GPU
    assert max(s.get(GPU_GROUP, 0) for s in first.samples) >= 1, first.samples  # up from 0 (asserted at its start)

    rerun, samples = _rerun(fake_cluster, args, cold=True)
    assert rerun.returncode == 0, (first.log + rerun.stdout + rerun.stderr)[-4000:]
    t0 = time.monotonic()
    fake_cluster.wait_for(lambda alive: not alive.get(GPU_GROUP), 90, "idle GPU node removed after label")
    scale_down_s = time.monotonic() - t0
    assert samples[0].get(GPU_GROUP, 0) == 0 and max(s.get(GPU_GROUP, 0) for s in samples) >= 1, samples

    summary = json.loads(fs.cat(f"{moto_s3.bucket}/autoscale-labels/reports/latest/summary.json"))
    # The rerun labelled exactly what the failed run had not written (its parts were kept and committed now).
    assert summary["videos_seen"] == VIDEOS and summary["skipped"] == first.parts, summary
    assert summary["to_label"] == VIDEOS - first.parts == summary["labelled"] + summary["failed"], summary
    rows = read_predictions(out, moto_s3.storage, latest_only=False).to_pylist()
    assert sorted(r["video_id"] for r in rows) == sorted(single_node.labels), "not every video exactly once"
    assert len({r["run_id"] for r in rows}) == 2  # the failed run's rows and the rerun's
    for row in rows:
        assert {k: v for k, v in row.items() if k not in RUN_COLUMNS} == single_node.labels[row["video_id"]], row
    print(f"label: first run exit {first.rc} (GPU node killed mid-run) with {first.parts} videos "
          f"written; the rerun labelled the other {summary['to_label']} from 0 GPU nodes, its node gone "
          f"{scale_down_s:.0f}s after; {plan.split('INFO ')[-1]}")
