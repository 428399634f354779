"""The GPU checks of issue 21 in one call: embed, train on 1 and on all GPUs, label; figures as JSON.

Meant for a session that has a GPU machine for a few minutes: it runs every stage of the product on a small
generated corpus, each in its own process with its own local Ray and a time limit (a stage that hangs, e.g. an
actor pool waiting for GPUs that do not exist, is recorded as ``timeout`` and the next stage still runs), and
writes ``gpu_checks.json`` into the output folder:

* ``device`` (cuda / cpu), GPU name and count, torch / Ray versions;
* per stage: status, seconds, throughput (embed and label: videos/s; train: optimizer steps/s and samples/s
  after the first epoch) and, on GPUs, utilisation (mean / max %) and peak memory sampled by nvidia-smi
  every 0.5 s while the stage ran.

Stages: ``embed_default`` (the default graph: three encoder pools, ``num_gpus: auto``), ``embed_fused`` (one
fused pool), ``train_1`` (1 worker), ``train_all`` (one worker per GPU, NCCL; 2 gloo workers in CPU mode; skipped
on a single GPU since NCCL cannot put two ranks on one device) and ``label`` (fused pool on half a GPU, the
classifier on CPU beside it: on one GPU the default label graph asks for more GPUs than exist until the resource
planner lands). Without a GPU (or with ``--cpu``) everything runs on CPU with ``device: cpu``, which is how the
script is tested.

    bash bench/gpu/run_gpu_checks.sh [OUT_DIR]        # or: python bench/gpu/run_gpu_checks.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("run_gpu_checks")
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------- GPU utilisation sampling


class GpuSampler:
    """nvidia-smi every 0.5 s in a thread: utilisation % and memory MiB of every GPU (nothing without a GPU)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                for line in out.strip().splitlines():
                    util, mem = (float(v) for v in line.split(","))
                    self.samples.append((util, mem))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_mem_max_mib": None}
        utils = [u for u, _ in self.samples]
        return {"gpu_util_mean": round(sum(utils) / len(utils), 1), "gpu_util_max": max(utils),
                "gpu_mem_max_mib": max(m for _, m in self.samples)}


# ------------------------------------------------------------------------------------------ stages (child)


def _config(preset: str, overrides: list[str]) -> Any:
    from raypipe.config import load_config

    return load_config(preset, overrides)


def _init_ray(gpu: bool) -> None:
    import ray

    # Logical CPUs above the physical count on small machines (as the demo): encoder pools hold some for the
    # whole run and decode tasks still need theirs.
    ray.init(num_cpus=max(4, os.cpu_count() or 1), num_gpus=None if gpu else 0, include_dashboard=False,
             configure_logging=False, log_to_driver=False)


def _stage_embed(overrides: list[str]) -> dict[str, Any]:
    from raypipe.embed.pipeline import embed_videos

    s = embed_videos(_config("demo", overrides))
    return {"videos_per_s": s["videos_per_s"], "videos_ok": s["videos_ok"], "videos_failed": s["videos_failed"],
            "frames": s["frames"], "embed_seconds": s["seconds"]}


def _stage_train(overrides: list[str]) -> dict[str, Any]:
    from raypipe.train import fit

    cfg = _config("demo", overrides)
    res = fit(cfg)
    later = res.history[1:] or res.history  # epoch 1 includes worker start-up and the first data read
    samples = sum(h["train/samples_per_s"] * h["train/epoch_s"] for h in later)
    seconds = sum(h["train/epoch_s"] for h in later)
    t = cfg.train
    steps = sum(math.ceil(h["train/samples_per_s"] * h["train/epoch_s"] / t.num_workers / t.batch_size) for h in later)
    return {"steps_per_s": round(steps / max(seconds, 1e-9), 2), "samples_per_s": round(samples / max(seconds, 1e-9), 1),
            "workers": t.num_workers, "epochs": len(res.history), "best_checkpoint": res.best_checkpoint,
            # start-up to the first step and its phases, as bench/bench_train.py reports them (Ray already up here)
            "startup_s": res.phases.get("startup"),
            "startup_phases": {k: v for k, v in res.phases.items() if not k.startswith("epoch_") and k != "startup"},
            "best_metrics": {k: v for k, v in res.best_metrics.items() if k.startswith("val/")}}


def _stage_label(overrides: list[str]) -> dict[str, Any]:
    from raypipe.label import label_videos

    s = label_videos(_config("demo", overrides))
    seconds = float(s.get("duration_s") or 0.0)
    return {"videos_per_s": round(s["videos_seen"] / seconds, 2) if seconds else None, "labelled": s["labelled"],
            "failed": s["failed"], "status": s["status"], "label_seconds": seconds}


STAGES = {"embed": _stage_embed, "train": _stage_train, "label": _stage_label}


def child(kind: str, gpu: bool, overrides: list[str], result_path: str) -> int:
    logging.basicConfig(level=logging.WARNING)
    _init_ray(gpu)
    out = STAGES[kind](overrides)
    Path(result_path).write_text(json.dumps(out, default=str))
    return 0


# --------------------------------------------------------------------------------------- driver (parent)


def run_stage(name: str, kind: str, gpu: bool, overrides: list[str], work: Path, timeout: float) -> dict[str, Any]:
    result_path = work / f"{name}.result.json"
    log_path = work / f"{name}.log"
    cmd = [sys.executable, __file__, "--child", kind, "--result", str(result_path), "--gpu", str(int(gpu)),
           "--", *overrides]
    t0 = time.perf_counter()
    with GpuSampler() as sampler, open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"})
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 and result_path.is_file() else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the stage's own process group: its driver and the Ray it started
            proc.wait()
            status = "timeout"
    row: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "overrides": overrides}
    row.update(sampler.summary())
    if status == "ok":
        row.update(json.loads(result_path.read_text()))
    else:
        row["log_tail"] = log_path.read_text()[-1500:]
    log.info("%-14s %s", name, json.dumps({k: v for k, v in row.items() if k not in ("overrides", "log_tail")}))
    return row


def environment(force_cpu: bool) -> dict[str, Any]:
    import ray
    import torch

    gpus = 0 if force_cpu or not torch.cuda.is_available() else torch.cuda.device_count()
    return {"device": "cuda" if gpus else "cpu", "gpus": gpus,
            "gpu_name": torch.cuda.get_device_name(0) if gpus else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "ray": ray.__version__, "cpus": os.cpu_count()}


def make_corpora(out: Path, videos: int) -> tuple[Any, Any]:
    from raypipe.config import CorpusConfig
    from raypipe.corpus import generate_corpus

    workers = max(1, min(8, (os.cpu_count() or 1)))
    common = {"max_duration_s": 12.0, "long_fraction": 0.0, "workers": workers, "num_level1": 2,
              "num_level2_per_level1": 2}
    train = generate_corpus(CorpusConfig(out=str(out / "corpus"), videos=videos, seed=1, **common))
    new = generate_corpus(CorpusConfig(out=str(out / "label_corpus"), videos=max(4, videos // 2), seed=2,
                                       id_prefix="new", **common))
    return train, new


def plan(env: dict[str, Any], out: Path, train_c: Any, label_c: Any, epochs: int) -> list[tuple[str, str, list[str]]]:
    """(stage name, kind, config overrides) in run order; paths and devices filled in."""
    gpu = env["device"] == "cuda"
    src = [f"embed.source.uri={train_c.videos_dir}", f"embed.source.annotations={train_c.annotations_path}",
           "embed.progress_bars=false"]
    tr = [f"train.taxonomy={train_c.taxonomy_path}", f"train.epochs={epochs}", "train.batch_size=16",
          "tracking.enabled=false", "train.register_model=false", f"train.storage_path={out / 'ray_results'}"]
    tr += ["train.use_gpu=true", "train.amp=bf16"] if gpu else []
    all_workers = env["gpus"] if gpu else 2
    stages = [
        ("embed_default", "embed", src + [f"embed.output={out / 'features_default'}"]),
        ("embed_fused", "embed", src + [f"embed.output={out / 'features_fused'}", "embed.fuse_encoders=true"]),
        ("train_1", "train", tr + ["train.num_workers=1", "train.run_name=gpu-check-1"]),
    ]
    if not gpu or all_workers > 1:
        stages.append(("train_all", "train", tr + [f"train.num_workers={all_workers}", "train.run_name=gpu-check-all"]))
    stages.append(("label", "label", [
        f"embed.source.uri={label_c.videos_dir}", f"embed.source.annotations={label_c.annotations_path}",
        "embed.progress_bars=false", "embed.fuse_encoders=true", f"label.output={out / 'labels'}",
        f"label.class_names={label_c.class_names_path}",
        "label.use_gpu=false", "tracking.enabled=false", *(["embed.frame_pool.num_gpus=0.5"] if gpu else []),
    ]))
    return stages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench_out" / "gpu"),
                    help="gets gpu_checks.json and stage_logs.txt only")
    ap.add_argument("--work", default=None, help="corpora, features, runs, stage logs (default: a temp folder)")
    ap.add_argument("--videos", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--stage-timeout", type=float, default=150.0, help="seconds per stage before it counts as hung")
    ap.add_argument("--cpu", action="store_true", help="CPU mode even where a GPU is visible")
    ap.add_argument("--child", choices=sorted(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--gpu", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, bool(args.gpu), args.overrides, args.result)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="raypipe_gpu_checks_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = run_all(args, work)
    (out / "gpu_checks.json").write_text(json.dumps(report, indent=1, default=str))
    logs = [f"===== {p.name}\n{p.read_text()[-200_000:]}" for p in sorted(work.glob("*.log"))]
    (out / "stage_logs.txt").write_text("\n".join(logs))
    print(json.dumps(report, indent=1, default=str))
    bad = [n for n, r in report["stages"].items() if not str(r.get("status", "")).startswith(("ok", "skipped"))]
    return 1 if bad else 0


def run_all(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Corpora, then every stage in order; a train stage uses the first embed output that finished."""
    report: dict[str, Any] = {"env": environment(args.cpu), "videos": args.videos, "epochs": args.epochs,
                              "work": str(work), "stages": {}}
    report["device"] = report["env"]["device"]
    t0 = time.perf_counter()
    train_c, label_c = make_corpora(work / "data", args.videos)
    report["corpus_seconds"] = round(time.perf_counter() - t0, 1)
    gpu = report["device"] == "cuda"
    features = None
    for name, kind, overrides in plan(report["env"], work / "data", train_c, label_c, args.epochs):
        if kind == "train":
            if features is None:
                report["stages"][name] = {"status": "skipped (no features: both embed stages failed)"}
                continue
            overrides = [f"train.data={features}", *overrides]
        if name == "label":
            ckpt = report["stages"].get("train_1", {}).get("best_checkpoint")
            if not ckpt:
                report["stages"][name] = {"status": "skipped (train_1 produced no checkpoint)"}
                continue
            overrides = [f"label.model_uri={ckpt}", *overrides]
        row = run_stage(name, kind, gpu, overrides, work, args.stage_timeout)
        report["stages"][name] = row
        if kind == "embed" and row["status"] == "ok" and features is None:
            features = next(o.split("=", 1)[1] for o in overrides if o.startswith("embed.output="))
    if gpu and report["env"]["gpus"] == 1:
        report["stages"]["train_all"] = {"status": "skipped (1 GPU: train_1 is the all-GPU run)"}
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    return report


if __name__ == "__main__":
    sys.exit(main())
