"""``raypipe doctor``: what raypipe sees, and what each stage would ask for, without running any stage.

Why: the usual first-run failures are environmental (no Ray, no GPU where one was expected, an MLflow server or
bucket out of reach, an FFmpeg build without a codec) or a resource plan that cannot be placed; each is one line
here instead of a stage that fails (or waits) half-way. Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import sys
from typing import Any

from raypipe.config import RaypipeConfig

# Decoders the generated corpus and typical uploads need (video, then audio).
CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "aac", "mp3", "opus", "vorbis", "flac", "pcm_s16le")
STAGES = ("embed", "label", "train", "tune")


def _ray(cfg: RaypipeConfig) -> list[tuple[str, bool, str]]:
    import ray

    from raypipe.runtime import current_cluster, ensure_ray, joining_cluster, session_log_dir

    ensure_ray(cfg)
    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    where = cfg.ray.address or ("joined cluster" if joining_cluster(cfg) else "local instance started by raypipe")
    shown = ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if not k.startswith("node:") and "memory" not in k)
    gib = res.get("memory", 0) / 2**30
    out = [("ray", True, f"{ray.__version__} at {where}; {len(nodes)} node(s); worker logs in {session_log_dir()}"),
           ("resources", True, f"{shown}, memory {gib:.1f} GiB")]
    if cfg.ray.cluster_yaml:
        out.append(("autoscaling", True, f"planning from {cfg.ray.cluster_yaml}: {current_cluster(cfg).describe()}"))
    return out


def _gpus() -> tuple[str, bool, str]:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return "gpus", True, f"torch {torch.__version__}, CUDA {torch.version.cuda}: " + ", ".join(names)
    return "gpus", True, f"none visible to torch {torch.__version__} on this host (CPU paths, fp32)"


def _mlflow(cfg: RaypipeConfig) -> tuple[str, bool, str]:
    uri = cfg.tracking.tracking_uri
    if not cfg.tracking.enabled:
        return "mlflow", True, "tracking.enabled=false (not used)"
    import os

    # One quick try: MLflow's client otherwise retries an unreachable server for minutes.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        from raypipe.tracking import make_client

        exps = make_client(cfg.tracking).search_experiments(max_results=5)
        return "mlflow", True, f"{uri} reachable ({len(exps)} experiment(s) seen)"
    except Exception as exc:
        return "mlflow", False, f"{uri} not reachable: {_line(exc)}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _storage(cfg: RaypipeConfig) -> list[tuple[str, bool, str]]:
    from raypipe.io.fs import resolve

    out = []
    for key, uri in (("embed.source.uri", cfg.embed.source.uri), ("embed.output", cfg.embed.output),
                     ("train.storage_path", cfg.train.storage_path), ("label.output", cfg.label.output)):
        if not uri:
            continue
        try:
            fs, path = resolve(uri, cfg.storage)
            parent = path.rstrip("/").rsplit("/", 1)[0] or "/"
            if fs.exists(path):
                out.append(("storage", True, f"{key}={uri}: exists"))
            elif fs.exists(parent) or (uri.startswith("s3://") and fs.exists(path.split("/", 1)[0])):
                out.append(("storage", True, f"{key}={uri}: not there yet (its parent is, so it can be created)"))
            else:
                out.append(("storage", False, f"{key}={uri}: neither it nor its parent exists"))
        except Exception as exc:
            out.append(("storage", False, f"{key}={uri}: {_line(exc)}"))
    return out


def _codecs() -> tuple[str, bool, str]:
    import av

    have = set(av.codecs_available)
    ffmpeg = ".".join(str(x) for x in getattr(av, "library_versions", {}).get("libavcodec", ()))
    missing = [c for c in CODECS if c not in have]
    text = f"PyAV {av.__version__} (libavcodec {ffmpeg or '?'}): " + ", ".join(f"{c}{'' if c in have else ' MISSING'}"
                                                                          for c in CODECS)
    return "codecs", not missing or missing == ["av1"], text


def _plans(cfg: RaypipeConfig) -> list[tuple[str, bool, str]]:
    from raypipe.resources import problems
    from raypipe.runtime import current_cluster, stage_plan

    cluster = current_cluster(cfg)
    out = []
    for stage in STAGES:
        plan = stage_plan(cfg, stage, cluster)
        found = problems(plan, cluster)
        out.append((f"plan {stage}", not found, plan.describe() + "".join(f"\n  PROBLEM: {p}" for p in found)))
    return out


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def diagnose(cfg: RaypipeConfig) -> list[tuple[str, bool, str]]:
    """(check, ok, detail) rows; a check that raises becomes a failed row, never an exception."""
    rows: list[tuple[str, bool, str]] = []
    for name, fn in (("ray", lambda: _ray(cfg)), ("gpus", _gpus), ("mlflow", lambda: _mlflow(cfg)),
                     ("storage", lambda: _storage(cfg)), ("codecs", _codecs), ("plans", lambda: _plans(cfg))):
        try:
            got: Any = fn()
            rows.extend(got if isinstance(got, list) else [got])
        except Exception as exc:
            rows.append((name, False, _line(exc)))
    return rows


def run(cfg: RaypipeConfig) -> int:
    rows = diagnose(cfg)
    for name, ok, detail in rows:
        sys.stdout.write(f"{'ok ' if ok else 'BAD'} {name:<12} {detail}\n")
    bad = [name for name, ok, _ in rows if not ok]
    sys.stdout.write(f"\n{len(rows) - len(bad)} of {len(rows)} checks passed" + (f"; failed: {', '.join(bad)}\n" if bad else "\n"))
    return 1 if bad else 0
