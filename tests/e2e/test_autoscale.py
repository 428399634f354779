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
    data = yaml.safe_load((REPO / "cluster.yaml").read_text())
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
def fake_cluster() -> Iterator[FakeCluster]:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # two Ray instances on one host confuse each other (conftest.py)
        ray.shutdown()
    from ray._private.services import get_node_ip_address

    temp_dir = Path(tempfile.mkdtemp(prefix="rpa", dir="/tmp"))  # short: Ray's socket paths are length-limited
    port = _free_port()
    address = f"{get_node_ip_address()}:{port}"
    config = fake_config(yaml.safe_load((REPO / "cluster.yaml").read_text()), address)
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


VIDEOS = 8


def _embed_args(cluster: FakeCluster, corpus, output: str) -> list[str]:
    """`raypipe embed` on the fake cluster, planned from its node types (ray.cluster_yaml), pools left to the planner."""
    return ["embed", "-c", "test", "--source", str(corpus.videos_dir), "--annotations", str(corpus.annotations_path),
            "--output", output,
            *_sets(embed__source__limit=VIDEOS, embed__videos_per_block=1, ray__cluster_yaml=cluster.config_path,
                   ray__stall_timeout_s=120, embed__frame_pool__num_cpus="auto", embed__decode_num_cpus="auto")]


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


def test_gpu_group_scales_from_zero_for_embed_and_back(fake_cluster: FakeCluster, cold_embed: ColdRun) -> None:
    """The encoder actors bring up the GPU group, decode tasks the decode group (up to its max), the stage
    finishes with every video accounted for, and the idle nodes are removed after the idle timeout."""
    summary = json.loads((cold_embed.output / "summary.json").read_text())
    assert summary["rows_total"] + summary["errors_total"] == VIDEOS and summary["videos_ok"] > 0
    peak = {g: max((s.get(g, 0) for s in cold_embed.samples), default=0) for g in ("gpu", "cpu_decode")}
    assert peak["gpu"] >= 1, cold_embed.samples
    assert peak["cpu_decode"] == fake_cluster.config["available_node_types"]["cpu_decode"]["max_workers"], peak
    plan = next((ln for ln in cold_embed.log.splitlines() if "plan for" in ln), "")
    assert "GPU: 1" in plan and "raypipe_cpu_worker: 1" in plan, plan  # the actors asked for GPUs; decode for the group
    print(f"embed {cold_embed.seconds:.0f}s, peak nodes {peak}, idle nodes gone {cold_embed.scale_down_s:.0f}s "
          f"after the stage; {plan.split('INFO ')[-1]}")


def test_a_node_killed_mid_embed_to_s3_then_rerun_commits_every_video_once(
        fake_cluster: FakeCluster, cold_embed: ColdRun, corpus, moto_s3) -> None:
    """Issue #15 item 2: the same embed on several nodes, writing to S3 (moto), loses its GPU node mid-run; after
    the rerun every video is in exactly once and every row is bit-identical to the undisturbed cold run's."""
    from raypipe.io.fs import resolve
    from raypipe.io.shards import read_errors, read_shards

    out = f"s3://{moto_s3.bucket}/autoscale-features"
    fs, _ = resolve(out, moto_s3.storage)
    # Parts written video by video, so that some are in S3 while the rest still waits for the GPU node.
    args = [*_embed_args(fake_cluster, corpus, out), "--set", f"storage.endpoint_url={moto_s3.endpoint_url}",
            "--set", "embed.write_batch_size=1"]
    proc = subprocess.Popen([sys.executable, "-m", "raypipe.cli", *args], env=fake_cluster.client_env(),
                            cwd=fake_cluster.temp_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parts = f"{moto_s3.bucket}/autoscale-features/_parts"
    deadline = time.monotonic() + 240
    while not ("gpu" in fake_cluster.ids and fs.exists(parts)
               and [p for p in fs.find(parts) if "/shard-" in p and p.endswith(".parquet")]):
        assert proc.poll() is None and time.monotonic() < deadline, "no part written before the run ended"
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before the node could be killed"
    fake_cluster.kill_node("gpu")
    first_rc = proc.wait(timeout=300)
    first_log = proc.stdout.read()
    rerun = fake_cluster.raypipe(*args)
    assert rerun.returncode == 0, (first_log + rerun.stdout + rerun.stderr)[-4000:]

    table, _ = read_shards(out, moto_s3.storage)
    rows = {r["video_id"]: r for r in table.to_pylist()}
    errors = read_errors(out, moto_s3.storage).column("video_id").to_pylist()
    assert table.num_rows == len(rows), "a video has two rows"
    assert len(rows) + len(errors) == VIDEOS and not set(rows) & set(errors)
    ref, _ = read_shards(str(cold_embed.output))
    reference = {r["video_id"]: r for r in ref.to_pylist()}
    assert rows.keys() == reference.keys()
    for vid, row in rows.items():
        assert row == reference[vid], vid
    print(f"first run exit {first_rc} after the GPU node was killed; rerun: "
          + next((ln for ln in rerun.stderr.splitlines() + rerun.stdout.splitlines() if "already done" in ln), "?"))
