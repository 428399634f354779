"""`ray job submit` against a real local Ray cluster with token auth, as the nightly schedule runs it.

The cluster is a separate `ray start --head --block` process group on free ports with its own temp dir, so it
cannot touch the test session's own Ray instance (or anyone else's on the machine). It is always torn down by
killing exactly that process group: `ray stop` would kill every Ray process on the host.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.own_cluster

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
# What the working-dir upload leaves out: the venv (7 GB), caches and local outputs.
EXCLUDES = [".venv", ".git", "demo_out", "raypipe_runs", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.db", "mlruns", "runs"]
PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalCluster:
    proc: subprocess.Popen
    temp_dir: Path
    dashboard_port: int
    token: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, *, with_token: bool = True) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", PATH=self.env["PATH"])
        if with_token:
            env["RAY_AUTH_TOKEN"] = self.token
        else:
            # No token anywhere: not in the environment and not in a default file.
            env["RAY_AUTH_TOKEN_PATH"] = str(self.temp_dir / "missing-token")
        return env

    def job_info(self, job_id: str) -> dict:
        """The Jobs REST API, authenticated with the same token as a bearer header."""
        req = urllib.request.Request(
            f"{self.address}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def job(self, *args: str, timeout: float = 600, with_token: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, "job", *args], cwd=cwd, env=self.client_env(with_token=with_token),
            capture_output=True, text=True, timeout=timeout,
        )


def _stop(cluster: LocalCluster) -> None:
    """Kill exactly the process group `ray start --block` leads (every Ray process it started is in it)."""
    pgid = cluster.proc.pid
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            cluster.proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.3)
    cluster.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def local_cluster(registered_model) -> Iterator[LocalCluster]:
    # The shared model is trained on the session's Ray instance before this second one starts (see conftest).
    # A short temp dir: Ray puts unix sockets under it and socket paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rpj", dir="/tmp"))
    token = secrets.token_hex(32)
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # `python` in a job entrypoint must be this venv's interpreter: put its bin first on the cluster's PATH.
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, OMP_NUM_THREADS="1",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    log_path = temp_dir / "ray_start.log"
    cmd = [
        RAY, "start", "--head", "--block", "--num-cpus=4", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        *(f"--{flag}={port}" for flag, port in ports.items()),
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = LocalCluster(proc, temp_dir, ports["dashboard-port"], token, log_path, env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if cluster.job("list", timeout=60).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield cluster
    finally:
        _stop(cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit_job(cluster: LocalCluster, entrypoint: list[str], *, working_dir: Path, timeout: float,
                wait: bool, env_vars: dict[str, str] | None = None) -> tuple[str, str]:
    """`ray job submit` (following the logs to the end unless ``wait`` is False); return (job id, CLI output)."""
    runtime_env = {"excludes": EXCLUDES,
                   "env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_vars or {})}}
    flags = [] if wait else ["--no-wait"]
    deadline = time.monotonic() + 120
    while True:
        res = cluster.job(
            "submit", *flags, "--working-dir", str(working_dir), "--runtime-env-json", json.dumps(runtime_env),
            "--", *entrypoint, timeout=timeout, cwd=working_dir,
        )
        out = res.stdout + res.stderr
        # The dashboard answers `job list` before its job agent has registered; nothing was submitted then.
        if "No available agent to submit job" not in out or time.monotonic() > deadline:
            break
        time.sleep(3)
    match = re.search(r"Job '(raysubmit_\w+)'", out)
    assert match, f"no job id in submit output:\n{out[-4000:]}"
    return match.group(1), out


def _submit(cluster: LocalCluster, entrypoint: list[str], *, working_dir: Path, timeout: float = 900,
            env_vars: dict[str, str] | None = None) -> tuple[str, str]:
    """Submit and wait (the CLI follows the logs until the job ends); return (status, logs)."""
    job, out = _submit_job(cluster, entrypoint, working_dir=working_dir, timeout=timeout, wait=True, env_vars=env_vars)
    return cluster.job_info(job)["status"], out


def test_token_auth_and_working_dir(local_cluster: LocalCluster, tmp_path: Path) -> None:
    """The mechanics first: a trivial script runs with the token, from the uploaded dir, on the venv python."""
    denied = local_cluster.job("list", with_token=False, timeout=60)
    assert denied.returncode != 0
    assert "token" in (denied.stdout + denied.stderr).lower()

    (tmp_path / "helper_mod.py").write_text("ANSWER = 42\n")
    (tmp_path / "hello.py").write_text(
        "import sys, ray, helper_mod\n"
        "ray.init()\n"
        "@ray.remote\n"
        "def f():\n"
        "    return helper_mod.ANSWER\n"
        "print('EXE', sys.executable)\n"
        "print('RESULT', ray.get(f.remote()))\n"
    )
    status, logs = _submit(local_cluster, ["python", "hello.py"], working_dir=tmp_path, timeout=300)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "RESULT 42" in logs
    assert f"EXE {VENV_BIN}" in logs


def test_nightly_label_job_via_job_submit(local_cluster: LocalCluster, registered_model, corpus, tmp_path: Path) -> None:
    """`ray job submit -- python jobs/label_nightly.py ...` labels videos on the cluster with the registered model."""
    from raypipe.label import read_predictions

    cfg = registered_model
    out = tmp_path / "labels"
    sets = {
        "embed.source.uri": corpus.videos_dir,
        "embed.source.annotations": corpus.annotations_path,
        "embed.source.limit": 10,
        "label.output": out,
        "tracking.tracking_uri": cfg.tracking.tracking_uri,
        "tracking.registered_model_name": cfg.tracking.registered_model_name,
        "label.class_names": cfg.label.class_names,
    }
    entry = ["python", "jobs/label_nightly.py", "-c", "test", "--model-uri", cfg.label.model_uri]
    for key, value in sets.items():
        entry += ["--set", f"{key}={value}"]
    status, logs = _submit(local_cluster, entry, working_dir=REPO, timeout=900)
    assert status == "SUCCEEDED", logs[-6000:]
    summary = json.loads((out / "reports" / "latest" / "summary.json").read_text())
    assert summary["videos_seen"] == 10 and summary["labelled"] + summary["failed"] == 10
    assert summary["model"]["name"] == cfg.tracking.registered_model_name
    preds = read_predictions(str(out))
    assert preds.num_rows == 10 and set(preds.column("model_version").to_pylist()) == {summary["model"]["version"]}
    assert "videos seen" in logs  # the human table is in the job log


def test_a_second_submission_with_the_same_id_is_refused(local_cluster: LocalCluster, tmp_path: Path) -> None:
    """`--submission-id` makes a schedule safe against double starts (docs/OPERATIONS.md, scheduling)."""
    (tmp_path / "ok.py").write_text("print('RAN ONCE')\n")
    job_id = f"label-{secrets.token_hex(4)}"
    args = ["submit", "--submission-id", job_id, "--working-dir", str(tmp_path), "--", "python", "ok.py"]
    first = local_cluster.job(*args, timeout=300, cwd=tmp_path)
    assert first.returncode == 0 and "RAN ONCE" in first.stdout + first.stderr, first.stdout + first.stderr
    second = local_cluster.job(*args, timeout=120, cwd=tmp_path)
    out = second.stdout + second.stderr
    assert second.returncode != 0 and job_id in out and "already exists" in out, out[-3000:]
    assert local_cluster.job_info(job_id)["status"] == "SUCCEEDED"  # the first run stands, it did not run twice
    assert "RAN ONCE" not in second.stdout


def test_label_job_over_the_failure_threshold_is_failed(local_cluster: LocalCluster, registered_model, corpus,
                                                        tmp_path: Path) -> None:
    """Only the session corpus's bad inputs (a glob source): most fail to decode, the share is above
    label.max_failure_rate, so the job exits with label.failure_exit_code and Ray marks it FAILED; the predictions
    of the videos that did decode are committed all the same."""
    from raypipe.label import read_predictions

    cfg = registered_model
    out = tmp_path / "labels"
    entry = ["python", "jobs/label_nightly.py", "-c", "test", "--model-uri", cfg.label.model_uri,
             "--source", f"{corpus.videos_dir}/vid_bad_*", "--output", str(out),
             "--set", f"tracking.tracking_uri={cfg.tracking.tracking_uri}",
             "--set", f"tracking.registered_model_name={cfg.tracking.registered_model_name}",
             "--set", "label.max_failure_rate=0.2"]
    status, logs = _submit(local_cluster, entry, working_dir=REPO, timeout=900)
    assert status == "FAILED", logs[-6000:]
    summary = json.loads((out / "reports" / "latest" / "summary.json").read_text())
    bad = [b for b in corpus.bad if b.video_id.startswith("vid_bad_")]
    assert summary["videos_seen"] == len(bad) and summary["status"] == "too_many_failures"
    assert summary["failed"] == sum(not b.expect_ok for b in bad) and summary["failure_rate"] > 0.2
    assert "exit code 3" in logs, logs[-3000:]  # label.failure_exit_code, as Ray reports the entrypoint's exit
    preds = read_predictions(str(out)).to_pylist()
    assert sorted(r["video_id"] for r in preds if r["status"] == "ok") == sorted(b.video_id for b in bad if b.expect_ok)


def _ops_config(tmp_path: Path, corpus) -> Path:
    """docs/OPERATIONS.md's production config (``base: demo``) with only its locations moved to this machine.

    Everything else is the documented file: the demo preset it inherits (the one that once set ``ray.num_cpus``
    and crashed ``ray.init`` on every joined cluster), its label failure threshold, its registered model name.
    ``ray.cluster_yaml`` is dropped: this one-node cluster is not cluster.yaml's (planning against those node
    types is tests/e2e/test_cluster_config.py's job; the bucket and MLflow server are the services tests').
    """
    import yaml

    text = (REPO / "docs" / "OPERATIONS.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if re.search(r"^base: demo$", b, re.M))
    cfg = yaml.safe_load(block)
    assert cfg["base"] == "demo"
    name = cfg["tracking"]["registered_model_name"]
    cfg["embed"].update(source={"uri": str(corpus.videos_dir), "annotations": str(corpus.annotations_path)},
                        output=str(tmp_path / "features"))
    cfg["train"].update(data=str(tmp_path / "features"), storage_path=str(tmp_path / "ray"),
                        taxonomy=str(corpus.taxonomy_path))
    cfg["label"].update(model_uri=f"models:/{name}@challenger", output=str(tmp_path / "labels"),
                        class_names=str(corpus.class_names_path))
    cfg["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    del cfg["ray"]["cluster_yaml"]
    path = tmp_path / "prod.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_every_job_with_the_documented_ops_config(local_cluster: LocalCluster, tmp_path: Path) -> None:
    """jobs/embed.py, train.py, tune.py and label_nightly.py as Ray jobs with the operations guide's config
    (one submission runs them in turn): embed a fresh corpus, train and register a model, sweep, label with it."""
    import shlex

    from raypipe.config import CorpusConfig
    from raypipe.corpus import generate_corpus
    from raypipe.io.shards import read_manifest
    from raypipe.label import read_predictions
    from raypipe.tune import BEST_CONFIG_NAME

    corpus = generate_corpus(CorpusConfig(out=str(tmp_path / "corpus"), videos=10, seed=23, bad_inputs=False,
                                          min_duration_s=2.0, max_duration_s=4.0, long_fraction=0.0, id_prefix="ops"))
    ops = str(_ops_config(tmp_path, corpus))
    steps = [
        ["python", "jobs/embed.py", "-c", ops],
        ["python", "jobs/train.py", "-c", ops, "--epochs", "1", "--run-name", "job-train"],
        ["python", "jobs/tune.py", "-c", ops, "--name", "job-sweep", "--set", "train.epochs=1",
         "--set", "tune.num_samples=1", "--set", 'tune.search_space={"train.optim.lr": {"choice": [0.001]}}'],
        ["python", "jobs/label_nightly.py", "-c", ops],
    ]
    script = " && ".join(shlex.join(step) for step in steps)
    status, logs = _submit(local_cluster, ["bash", "-c", script], working_dir=REPO, timeout=900)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "num_cpus" not in logs  # the joined cluster is never asked to start with a CPU count
    assert read_manifest(str(tmp_path / "features"))["rows"] == len(corpus.videos)
    assert list((tmp_path / "ray" / "job-train").rglob("model.pt")), "jobs/train.py left no checkpoint"
    assert (tmp_path / "ray" / "job-sweep" / BEST_CONFIG_NAME).is_file() and "best trial" in logs
    rows = read_predictions(str(tmp_path / "labels")).to_pylist()
    assert sorted(r["video_id"] for r in rows) == sorted(v.video_id for v in corpus.videos)
    # train registered version 1, the sweep's best trial version 2 (tune.register_best): @challenger is version 2
    assert {r["status"] for r in rows} == {"ok"} and {r["model_version"] for r in rows} == {"2"}


def test_the_token_auth_commands_of_the_operations_guide(local_cluster: LocalCluster, tmp_path: Path) -> None:
    """docs/OPERATIONS.md's token block as written, with this cluster's address and token file put in for the
    doc's placeholders: `ray job list` works with the token and fails without it (as the block's comment says)."""
    from docs_blocks import parse_blocks

    (block,) = [b for b in parse_blocks("docs/OPERATIONS.md") if b.cluster]
    token_file = tmp_path / "ray_token"
    token_file.write_text(local_cluster.token)
    script = block.script().replace("http://127.0.0.1:8265", local_cluster.address)
    script = script.replace("/secure/place/ray_token", str(token_file))
    assert local_cluster.address in script and str(token_file) in script, "the doc's placeholders changed"
    env = {k: v for k, v in local_cluster.client_env(with_token=False).items() if k != "RAY_ADDRESS"}
    ok = subprocess.run(["bash", "-ec", script], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    no_token = script.replace(f'"$(cat {token_file})"', '""')
    denied = subprocess.run(["bash", "-ec", no_token + "\n"], env=env, capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0 and "token" in (denied.stdout + denied.stderr).lower(), denied.stdout + denied.stderr


def _submit_no_wait(cluster: LocalCluster, entrypoint: list[str], *, working_dir: Path) -> str:
    return _submit_job(cluster, entrypoint, working_dir=working_dir, timeout=300, wait=False)[0]


def _job_logs(cluster: LocalCluster, job_id: str) -> str:
    req = urllib.request.Request(f"{cluster.address}/api/jobs/{job_id}/logs",
                                 headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read()).get("logs", "")


def _wait_status(cluster: LocalCluster, job_id: str, done: set[str], timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while (status := cluster.job_info(job_id)["status"]) not in done:
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(0.5)
    return status


def test_nightly_job_killed_mid_label_and_resubmitted_labels_every_video_once(
    local_cluster: LocalCluster, registered_model, tmp_path: Path
) -> None:
    """`ray job submit -- python jobs/nightly.py`: embed the new videos, label them with the champion; the job is
    stopped (`ray job stop`) once its label step has started, and the resubmitted night skips the
    embedding, finishes the labelling and ends with every video labelled exactly once."""
    from raypipe.config import CorpusConfig
    from raypipe.corpus import generate_corpus
    from raypipe.label import read_predictions

    cfg = registered_model
    corpus = generate_corpus(CorpusConfig(out=str(tmp_path / "corpus"), videos=6, seed=21, bad_inputs=False,
                                          min_duration_s=2.0, max_duration_s=4.0, long_fraction=0.0, id_prefix="nite"))
    ids = {v.video_id for v in corpus.videos}
    night, out, nightly = "2026-01-31", tmp_path / "labels", tmp_path / "nightly"
    sets = {
        "embed.source.uri": corpus.videos_dir, "embed.source.annotations": corpus.annotations_path,
        "embed.output": tmp_path / "features", "label.output": out, "nightly.output": nightly,
        "promote.output": tmp_path / "promotion", "tracking.tracking_uri": cfg.tracking.tracking_uri,
        "tracking.registered_model_name": cfg.tracking.registered_model_name, "label.class_names": cfg.label.class_names,
        "label.batch_size": 1, "label.write_batch_size": 1,
    }
    entry = ["python", "jobs/nightly.py", "-c", "test", "--night", night]
    for key, value in sets.items():
        entry += ["--set", f"{key}={value}"]

    job = _submit_no_wait(local_cluster, entry, working_dir=REPO)
    # Stop it as soon as the label step has listed its work (a dozen seconds before its rows are committed).
    deadline = time.monotonic() + 600
    while "raypipe.label: label: " not in (logs := _job_logs(local_cluster, job)):
        status = local_cluster.job_info(job)["status"]
        if status not in ("PENDING", "RUNNING"):
            pytest.fail(f"job ended ({status}) before labelling started:\n{logs[-6000:]}")
        assert time.monotonic() < deadline, "labelling never started"
        time.sleep(0.3)
    stop = local_cluster.job("stop", job, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert _wait_status(local_cluster, job, {"STOPPED", "SUCCEEDED", "FAILED"}) == "STOPPED"
    state = json.loads((nightly / night / "state.json").read_text())
    assert "embed" in state["steps"] and "label" not in state["steps"] and state["attempts"] == 1
    assert not (nightly / night / "summary.json").exists()
    assert read_predictions(str(out)).num_rows == 0  # nothing committed yet: readers see no half night

    status, logs = _submit(local_cluster, entry, working_dir=REPO, timeout=900)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "step embed already done in an earlier attempt" in logs
    summary = json.loads((nightly / night / "summary.json").read_text())
    assert summary["attempts"] == 2 and summary["status"] == "ok" and summary["labelled_tonight"] == len(ids)
    assert summary["steps"]["embed"]["videos_ok"] == len(ids) and "train" not in summary["steps"]
    rows = read_predictions(str(out), latest_only=False).to_pylist()
    assert sorted(r["video_id"] for r in rows) == sorted(ids)  # every video exactly once
    assert {r["run_id"] for r in rows} == {f"nightly-{night}"} and {r["status"] for r in rows} == {"ok"}
    champion = make_champion_version(cfg)
    assert {r["model_version"] for r in rows} == {champion} == {summary["champion_version"]}


def make_champion_version(cfg) -> str:
    from raypipe.tracking import alias_version, make_client

    return alias_version(make_client(cfg.tracking), cfg.tracking.registered_model_name, cfg.tracking.champion_alias)


@pytest.fixture(scope="module")
def mlflow_server(moto_s3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (one for the module): SQLite backend file, artifacts in the moto S3 bucket written
    by the clients (``--no-serve-artifacts``: jobs reach S3 with their own keys and MLFLOW_S3_ENDPOINT_URL, as in
    production)."""
    tmp_path = tmp_path_factory.mktemp("mlflow_server")
    port = _free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    cmd = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--default-artifact-root", f"s3://{moto_s3.bucket}/mlflow", "--no-serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(tmp_path / "mlflow_server.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass  # not listening yet: the checks below decide whether to keep polling
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up:\n{(tmp_path / 'mlflow_server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield uri
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


def test_train_promote_label_and_tune_jobs_against_an_mlflow_server_with_s3_artifacts(
        local_cluster: LocalCluster, registered_model, corpus, moto_s3, mlflow_server: str, tmp_path: Path) -> None:
    """Issue #15 item 3: the settings reach the jobs only through `runtime_env` env vars (tracking server, S3
    endpoint and keys); `raypipe doctor` (what the job sees, printed) reaches both; train registers version 1,
    promote makes it the champion, label uses it, tune runs a one-trial sweep whose parent run is on the server; the
    runs, versions, aliases and artifacts are on the server / in S3, and the S3 keys are in no MLflow param or
    tag, no raypipe log file, no text artifact and not in the job's output (the doctor's printout included)."""
    import shlex

    from mlflow import MlflowClient

    from raypipe.io.fs import resolve
    from raypipe.label import read_predictions

    key_id, secret = f"AKIA{secrets.token_hex(8).upper()}", secrets.token_urlsafe(30)
    # AWS_ENDPOINT_URL: raypipe's own S3 access (storage.endpoint_url unset); MLFLOW_S3_ENDPOINT_URL: MLflow's.
    env_vars = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_S3_ENDPOINT_URL": moto_s3.endpoint_url,
                "AWS_ENDPOINT_URL": moto_s3.endpoint_url, "AWS_ACCESS_KEY_ID": key_id,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
    name, cfg = "raypipe-prod", registered_model
    common = ["-c", "test", "--set", f"tracking.registered_model_name={name}"]
    small = ["--set", "train.num_workers=1", "--set", f"train.storage_path={tmp_path / 'ray'}",
             "--set", "model.name=cavnet", "--set", "model.params={dim: 32, heads: 2, proj_dim: 16}",
             "--set", "train.loss.mlm=0", "--set", "train.loss.vtm=0", "--set", f"train.data={cfg.train.data}"]
    steps = [
        ["python", "-m", "raypipe.cli", "doctor", *common, "--set", f"embed.output=s3://{moto_s3.bucket}/doctor",
         "--set", f"train.storage_path={tmp_path / 'ray'}"],
        ["python", "jobs/train.py", *common, *small, "--epochs", "1", "--run-name", "prod-train"],
        ["python", "-m", "raypipe.cli", "promote", *common, "--set", f"embed.output={cfg.train.data}",
         "--set", f"train.data={cfg.train.data}", "--set", f"promote.output={tmp_path / 'promotion'}", "--set", "promote.split=all"],
        ["python", "jobs/label_nightly.py", *common, "--model-uri", f"models:/{name}@champion",
         "--source", str(corpus.videos_dir), "--set", f"embed.source.annotations={corpus.annotations_path}",
         "--set", "embed.source.limit=4", "--output", str(tmp_path / "labels"),
         "--set", f"label.class_names={cfg.label.class_names}"],
        # Last: registering its best trial would move the challenger alias.
        ["python", "jobs/tune.py", *common, *small, "--name", "prod-sweep", "--set", "train.epochs=1",
         "--set", "tune.num_samples=1", "--set", 'tune.search_space={"train.optim.lr": {"choice": [0.001]}}'],
    ]
    script = " && ".join(shlex.join(step) for step in steps)
    status, logs = _submit(local_cluster, ["bash", "-c", script], working_dir=REPO, timeout=900, env_vars=env_vars)
    assert status == "SUCCEEDED", logs[-6000:]
    doctor = [ln for ln in logs.splitlines() if ln.startswith(("ok ", "BAD "))]
    assert any(ln.split()[1] == "mlflow" and f"{mlflow_server} reachable" in ln for ln in doctor), doctor
    assert any(f"s3://{moto_s3.bucket}/doctor" in ln and ln.startswith("ok ") for ln in doctor), doctor

    # registry_uri too: this process's MLflow may have a global registry URI from the session's SQLite tests.
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1", champion
    # The sweep's parent run is on the server and its best trial's model is version 2, the challenger.
    sweeps = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.`raypipe.stage` = 'tune'")
    assert [r.info.run_name for r in sweeps] == ["prod-sweep"], [r.info.run_name for r in sweeps]
    assert "best trial" in logs, logs[-3000:]
    assert client.get_model_version_by_alias(name, "challenger").version == "2", logs[-3000:]
    run = client.get_run(champion.run_id)
    assert run.info.run_name == "prod-train" and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(f"s3://{moto_s3.bucket}/mlflow/"), run.info.artifact_uri
    fs, _ = resolve(f"s3://{moto_s3.bucket}", moto_s3.storage)
    stored = fs.find(f"{moto_s3.bucket}/mlflow")
    assert any(p.endswith("config.yaml") for p in stored) and any("model" in p for p in stored), stored[:20]
    preds = read_predictions(str(tmp_path / "labels"))
    assert preds.num_rows == 4 and set(preds.column("model_version").to_pylist()) == {"1"}
    assert (tmp_path / "promotion" / "latest.json").is_file()

    # The keys: nowhere in MLflow (params, tags of every run), raypipe's log files, the job output, S3 text files.
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 4, [r.info.run_name for r in runs]  # train, promote, label, the sweep
    logged = [v for r in runs for v in (*r.data.params.values(), *r.data.tags.values())]
    log_files = [p for d in local_cluster.temp_dir.rglob("raypipe-logs") for p in d.rglob("*") if p.is_file()]
    assert log_files, "the jobs wrote no raypipe log file"
    texts = {str(p): p.read_text(errors="replace") for p in log_files}
    texts |= {p: fs.cat(p).decode(errors="replace") for p in stored if p.endswith((".yaml", ".json", ".txt"))}
    for value in (key_id, secret):
        assert not [v for v in logged if value in v], "an S3 key is in an MLflow param or tag"
        assert value not in logs, "an S3 key is in the job output (the doctor's printout included)"
        assert not [p for p, t in texts.items() if value in t], "an S3 key is in a log file or an artifact"
