"""Capacity planning for a nightly run: how many nodes of each worker group of ``cluster.yaml`` a night of N videos
in H hours needs, the expected wall time and the bottleneck stage (``raypipe plan``). Pure: no Ray, no torch.

Why a model and not a guess: at scale cost is per-node efficiency times node count, and the per-video costs are
measured (``bench/results/*.json``, or an embed run's ``summary.json``). The model is deliberately simple and
every number it uses is printed with where it came from:

- decode CPU-seconds per video = ``decode_base_s + decode_per_sampled_s * min(duration, span)``, where ``span`` is
  the sampled span (32 frames at 1 fps = 32 s: only that part of a long video is decoded);
- encode CPU-seconds per video (CPU-only encoding) = ``encode_per_frame_s * frames + encode_per_video_s``, with
  ``frames = min(max_frames, ceil(duration * fps))``;
- with a GPU type, encoding runs on the GPU group at an assumed frames/s and texts/s per GPU (never measured
  here; :data:`GPU_ASSUMED`), and decoding on the CPU group;
- each stage gets ``utilization`` of the CPUs / GPUs of its group (the rest is Ray, I/O, writing); the stages
  stream, so the night's wall time is the slowest stage's time plus ``startup_s`` (nodes booting, models loading).

Node counts are the smallest that fit the night in ``hours``; the patch raises a group's ``max_workers`` (and the
top-level ``max_workers``) when the current limit is too low, and sets ``min_workers`` to the count so the nodes
are there when the night starts instead of being scaled up through the first hour.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Assumed, NOT measured here (no GPU in the development sessions): frames/s of the default frame + audio encoders
# (resnet10t at 112 px and the small log-mel CNN, fp16, batched across videos) and texts/s of MiniLM at 256 tokens,
# per GPU. Deliberately conservative (decode-side transfer and batching overheads included); replace with the
# figures of bench/gpu/run_gpu_checks.py when a GPU run exists (``--set`` keys gpu_frames_per_s / gpu_texts_per_s).
GPU_ASSUMED: dict[str, dict[str, float]] = {
    "T4": {"frames_per_s": 1500.0, "texts_per_s": 600.0},
    "A10G": {"frames_per_s": 3000.0, "texts_per_s": 1200.0},
    "L4": {"frames_per_s": 3000.0, "texts_per_s": 1200.0},
    "A100": {"frames_per_s": 8000.0, "texts_per_s": 3000.0},
    "H100": {"frames_per_s": 12000.0, "texts_per_s": 4500.0},
}

# Used when no measurement gives them (printed as "default, not measured").
DEFAULT_COSTS: dict[str, float] = {
    "decode_base_s": 0.05,
    "decode_per_sampled_s": 0.02,
    "encode_per_frame_s": 0.01,
    "encode_per_video_s": 0.05,
}


@dataclass
class Costs:
    """Per-video CPU costs (seconds on one CPU) and where each figure came from."""

    decode_base_s: float
    decode_per_sampled_s: float
    encode_per_frame_s: float
    encode_per_video_s: float
    sources: dict[str, str] = field(default_factory=dict)
    durations_s: list[float] = field(default_factory=list)
    decode_pixels: float = 0.0  # mean width * height of the videos the decode cost was measured on

    def decode_s(self, duration: float, span: float) -> float:
        return self.decode_base_s + self.decode_per_sampled_s * min(max(duration, 0.0), span)

    def encode_s(self, frames: int) -> float:
        return self.encode_per_frame_s * frames + self.encode_per_video_s


@dataclass(frozen=True)
class Group:
    """A worker group (``available_node_types`` entry) of cluster.yaml."""

    name: str
    cpus: float
    gpus: float
    max_workers: int
    min_workers: int = 0


@dataclass
class StageLoad:
    stage: str
    group: str
    work: float  # CPU-seconds or GPU-seconds for the night
    unit: str  # "CPU-s" or "GPU-s"
    per_node: float  # usable CPUs / GPUs per node of the group
    nodes: int = 0
    hours: float = 0.0  # wall time of this stage alone on ``nodes``


@dataclass
class CapacityPlan:
    videos: int
    hours: float
    gpu: str | None
    stages: list[StageLoad]
    nodes: dict[str, int]
    wall_hours: float
    bottleneck: str
    assumptions: list[str]
    warnings: list[str]
    patch: dict[str, Any]


def frames_for(duration: float, fps: float = 1.0, max_frames: int = 32) -> int:
    """Sampled frames of one video (the decode rule: ``min(max_frames, ceil(duration * fps))``, at least 1)."""
    return max(1, min(max_frames, math.ceil(max(duration, 0.0) * fps - 1e-6)))


def mean_costs(costs: Costs, durations: list[float], *, fps: float = 1.0, max_frames: int = 32) -> dict[str, float]:
    """Mean decode CPU-s, encode CPU-s and frames per video over a duration distribution."""
    if not durations:
        raise ValueError("no video durations to plan with")
    span = max_frames / fps
    n = len(durations)
    frames = [frames_for(d, fps, max_frames) for d in durations]
    return {
        "decode_s": sum(costs.decode_s(d, span) for d in durations) / n,
        "encode_s": sum(costs.encode_s(f) for f in frames) / n,
        "frames": sum(frames) / n,
        "duration_s": sum(durations) / n,
    }


def groups_from_yaml(data: dict[str, Any]) -> dict[str, Group]:
    """The worker groups of a cluster.yaml (the head, which runs no tasks, is left out)."""
    head = data.get("head_node_type")
    out = {}
    for name, spec in (data.get("available_node_types") or {}).items():
        if name == head:
            continue
        res = spec.get("resources") or {}
        out[name] = Group(name, float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                          int(spec.get("max_workers", data.get("max_workers", 0)) or 0), int(spec.get("min_workers", 0) or 0))
    return out


def _nodes_for(work: float, per_node: float, seconds: float) -> int:
    return max(1, math.ceil(work / (per_node * seconds) - 1e-9)) if work > 0 else 0


def plan_night(videos: int, hours: float, costs: Costs, groups: dict[str, Group], *, gpu: str | None = None,
               durations: list[float] | None = None, utilization: float = 0.75, startup_s: float = 600.0,
               fps: float = 1.0, max_frames: int = 32, gpu_rates: dict[str, float] | None = None,
               cluster_max_workers: int | None = None, decode_scale: float = 1.0) -> CapacityPlan:
    """Node counts per group for ``videos`` in ``hours`` (see the module docstring for the model)."""
    if videos < 1 or hours <= 0:
        raise ValueError("videos must be >= 1 and hours > 0")
    if not 0 < utilization <= 1:
        raise ValueError("utilization must be in (0, 1]")
    durs = durations or costs.durations_s
    m = mean_costs(costs, durs, fps=fps, max_frames=max_frames)
    m["decode_s"] *= decode_scale
    budget = hours * 3600.0 - startup_s
    if budget <= 0:
        raise ValueError(f"{hours} h leaves no time after the assumed start-up of {startup_s:.0f} s")
    cpu_groups = [g for g in groups.values() if g.cpus > 0 and g.gpus == 0]
    gpu_groups = [g for g in groups.values() if g.gpus > 0]
    if not cpu_groups:
        raise ValueError("cluster.yaml has no CPU-only worker group to decode on")
    cpu = max(cpu_groups, key=lambda g: g.cpus)
    stages = [StageLoad("decode", cpu.name, videos * m["decode_s"], "CPU-s", cpu.cpus * utilization)]
    assumptions = []
    if gpu:
        if not gpu_groups:
            raise ValueError(f"--gpu {gpu}: cluster.yaml has no worker group with GPUs")
        rates = gpu_rates or GPU_ASSUMED.get(gpu.upper()) or GPU_ASSUMED.get(gpu)
        if rates is None:
            raise ValueError(f"unknown GPU type {gpu!r}; known: {', '.join(GPU_ASSUMED)}")
        g = max(gpu_groups, key=lambda x: x.gpus)
        gpu_s = videos * (2 * m["frames"] / rates["frames_per_s"] + 1.0 / rates["texts_per_s"])  # frames + audio windows
        stages.append(StageLoad("encode", g.name, gpu_s, "GPU-s", g.gpus * utilization))
        assumptions.append(f"GPU encode rates for {gpu}: {rates['frames_per_s']:.0f} frames/s and "
                           f"{rates['texts_per_s']:.0f} texts/s per GPU: ASSUMED, NOT MEASURED (no GPU here)")
    else:
        stages.append(StageLoad("encode", cpu.name, videos * m["encode_s"], "CPU-s", cpu.cpus * utilization))
    for s in stages:
        s.nodes = _nodes_for(s.work, s.per_node, budget)
    nodes: dict[str, int] = {}
    for s in stages:
        nodes[s.group] = nodes.get(s.group, 0) + s.nodes
    # Stages sharing a group share its nodes: each gets its part of the group's time.
    for s in stages:
        shared = sum(x.work for x in stages if x.group == s.group)
        cap = nodes[s.group] * s.per_node * (s.work / shared if shared else 1.0)
        s.hours = (s.work / cap / 3600.0) if cap else 0.0
    slowest = max(stages, key=lambda s: (round(s.hours, 6), s.work))  # shared nodes: the larger stage
    wall = slowest.hours + startup_s / 3600.0
    warnings = [f"{name}: needs {n} nodes, cluster.yaml allows max_workers={groups[name].max_workers}"
                for name, n in nodes.items() if n > groups[name].max_workers]
    total = sum(nodes.values())
    if cluster_max_workers is not None and total > cluster_max_workers:
        warnings.append(f"needs {total} worker nodes in all, cluster.yaml allows max_workers={cluster_max_workers}")
    patch = {"max_workers": max(total, cluster_max_workers or 0),
             "available_node_types": {name: {"min_workers": n, "max_workers": max(n, groups[name].max_workers)}
                                      for name, n in nodes.items()}}
    if decode_scale != 1.0:
        assumptions.append(f"decode costs scaled x{decode_scale:g} from the measured resolution (--decode-scale; "
                           "extrapolated, e.g. pixels per frame of the night's videos / the bench corpus')")
    elif costs.decode_pixels:
        assumptions.append(f"decode measured on videos of ~{costs.decode_pixels / 1000:.0f} kpixels/frame; larger "
                           "videos decode slower roughly in proportion (use --decode-scale)")
    assumptions += [
        f"durations: {len(durs)} videos, mean {m['duration_s']:.1f} s, {m['frames']:.1f} sampled frames per video",
        f"decode {m['decode_s']:.3f} CPU-s/video, CPU encode {m['encode_s']:.3f} CPU-s/video (means over the durations)",
        f"each stage uses {utilization:.0%} of its group's CPUs/GPUs; {startup_s:.0f} s of start-up per night",
        "per-CPU costs measured on 2 CPUs are assumed to scale linearly to the node's CPUs (extrapolated)",
    ] + [f"{k}: {v}" for k, v in costs.sources.items()]
    return CapacityPlan(videos, hours, gpu, stages, nodes, wall, slowest.stage, assumptions, warnings, patch)


def load_costs(paths: list[Path]) -> Costs:
    """Merge the ``costs`` objects of bench results JSON files (later files win) and/or the stage metrics of an
    embed ``summary.json``; figures none of them gives come from :data:`DEFAULT_COSTS`, marked as such."""
    found: dict[str, float] = {}
    sources: dict[str, str] = {}
    durations: list[float] = []
    pixels = 0.0
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read costs from {p}: {exc}") from exc
        if "costs" in data:
            for k, v in data["costs"].items():
                if k in DEFAULT_COSTS:
                    found[k], sources[k] = float(v), f"measured ({Path(p).name}, {data.get('measured_at', '?')})"
            durations = list(data.get("durations_s") or durations)
            pixels = float(data.get("mean_pixels") or (data.get("corpus") or {}).get("mean_pixels") or pixels)
        elif "decode_seconds" in data and data.get("videos_ok"):  # an embed run's summary.json
            found["decode_base_s"] = data["decode_seconds"] / data["videos_processed"]
            found["decode_per_sampled_s"] = 0.0
            sources["decode_base_s"] = f"run summary {p}: mean decode time per video (no duration split)"
            encode = data.get("encode_seconds") or (data.get("stage_seconds") or {}).get("encode")
            if encode:
                found["encode_per_video_s"] = encode / data["videos_processed"]
                found["encode_per_frame_s"] = 0.0
                sources["encode_per_video_s"] = f"run summary {p}: mean encode time per video"
    for k, v in DEFAULT_COSTS.items():
        if k not in found:
            found[k], sources[k] = v, "default, not measured"
    return Costs(**found, sources=sources, durations_s=durations, decode_pixels=pixels)


def render(plan: CapacityPlan) -> str:
    """The plan as a table, the cluster.yaml patch and the assumptions (what the CLI prints)."""
    lines = [f"plan: {plan.videos:,} videos in {plan.hours:g} h" + (f" with {plan.gpu} GPUs" if plan.gpu else " (CPU only)"),
             f"{'stage':<8} {'group':<12} {'work':>14} {'nodes':>6} {'hours':>6}"]
    for s in plan.stages:
        lines.append(f"{s.stage:<8} {s.group:<12} {s.work:>10,.0f} {s.unit:<4}{s.nodes:>5} {s.hours:>6.2f}")
    lines.append(f"expected wall time {plan.wall_hours:.2f} h, bottleneck: {plan.bottleneck}")
    lines += [f"WARNING: {w}" for w in plan.warnings]
    lines.append("cluster.yaml patch:")
    lines.append(f"max_workers: {plan.patch['max_workers']}")
    lines.append("available_node_types:")
    for name, v in plan.patch["available_node_types"].items():
        lines.append(f"  {name}:\n    min_workers: {v['min_workers']}\n    max_workers: {v['max_workers']}")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


def load_durations(path: Path) -> list[float]:
    """Video durations (s): a JSON list of numbers, any JSON holding ``duration_s`` fields (a corpus.json, a bench
    result), or a text file with one number per line."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except ValueError:
        return [float(x) for x in text.split() if x.strip()]
    if isinstance(data, list) and all(isinstance(x, (int, float)) for x in data):
        return [float(x) for x in data]
    out: list[float] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if isinstance(x.get("duration_s"), (int, float)):
                out.append(float(x["duration_s"]))
            if isinstance(x.get("durations_s"), list):
                out.extend(float(v) for v in x["durations_s"])
            for k, v in x.items():
                if k not in ("duration_s", "durations_s"):
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(data)
    return out


DEFAULT_COST_FILES = ("bench/results/bench_decode.json", "bench/results/bench_loop.json")


def run(cfg: Any, *, videos: int, hours: float, gpu: str | None = None, costs: list[str] | None = None,
        durations: str | None = None, cluster_yaml: str | None = None, utilization: float = 0.75,
        startup_s: float = 600.0, decode_scale: float = 1.0) -> int:
    """``raypipe plan``: print the plan for a night (exit 2 on unreadable inputs, one line)."""
    import yaml

    cost_files = [Path(p) for p in (costs or [p for p in DEFAULT_COST_FILES if Path(p).is_file()])]
    yaml_path = Path(cluster_yaml or cfg.ray.cluster_yaml or "cluster.yaml")
    try:
        data = yaml.safe_load(yaml_path.read_text())
        measured = load_costs(cost_files)
        durs = load_durations(Path(durations)) if durations else measured.durations_s
        plan = plan_night(videos, hours, measured, groups_from_yaml(data), gpu=gpu, durations=durs,
                          utilization=utilization, startup_s=startup_s, fps=cfg.embed.decode.fps,
                          max_frames=cfg.embed.decode.max_frames, cluster_max_workers=data.get("max_workers"),
                          decode_scale=decode_scale)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        log.error("plan: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 2
    if not cost_files:
        log.warning("plan: no bench results found (%s): every cost below is a default, not a measurement",
                    ", ".join(DEFAULT_COST_FILES))
    print(render(plan))  # noqa: T201 - the plan is the command's output
    return 0
