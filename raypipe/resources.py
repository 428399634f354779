"""Resource planning: what each stage asks Ray for, decided from what the cluster has (pure; no Ray import).

Why: fixed defaults either waste a big node or wait forever on a small one (three encoder pools asking for
3 CPUs on a 2-CPU laptop listed the videos and then hung). Each stage therefore turns the ``auto`` values of
its config into numbers from a :class:`Cluster` (built by :mod:`raypipe.runtime` from ``ray.nodes()``, or from
the node types of ``ray.cluster_yaml`` on an autoscaling cluster) and checks that what it asks for can be placed
before any Ray work starts. Explicit config values always win; the check still applies to them.

The rules (C = CPUs, G = GPUs the cluster has or its node types can provide; "small" = C < 6):

- ``embed.inline_decode: auto``: on a small CPU-only cluster without OCR / ASR, decode nodes
  (``ray.decode_resource``) or ``fuse_encoders: false``, the embed stage is one pool of actors that decode,
  encode and write, one per CPU (:func:`plan_inline`; ``inline_calls: auto`` = the actor's whole CPUs, as
  threaded calls, for an actor given more than one); no decode tasks, no other pools. Measured x1.18-1.39 the
  staged pipeline's videos/s on 2 CPUs (docs/PERFORMANCE.md).
- Encoder pools (embed and label): ``embed.fuse_encoders: auto`` fuses the three encoders into one pool on a
  small CPU-only cluster (three pools plus decoding do not fit), and keeps three pools otherwise.
- ``num_gpus: auto``: 0 without GPUs; with GPUs every GPU pool of the stage (3 encoders, or 1 fused; plus the
  label classifier) asks ``1/k`` GPU, so one actor of each pool shares one GPU, and ``max_size: auto`` is G.
- ``num_cpus: auto`` per actor: 1; on a small cluster one actor of every pool gets at most half the CPUs
  together (0.25 to 0.5 each).
- ``max_size: auto``: half the CPUs go to encoders (the rest decode and write); the frame pool gets half of
  that share, audio and text a quarter each (fused: all of it); at least 1, and at most G for GPU pools. The
  label classifier pool gets up to an eighth of the CPUs (and at most G).
- OCR / ASR stages (``embed.ocr`` / ``embed.asr`` on): one more CPU pool each (``ocr_pool`` / ``asr_pool``), counted
  with the encoder pools for the small-cluster CPU share; ``max_size: auto`` a quarter of the encoders' half of
  the CPUs; ``num_gpus: auto`` = 0 (the packaged engines run on CPU).
- ``encoder_threads: auto``: Ray's default torch threads (the actor's CPUs, at least 1). An explicit number sets
  the fused encoder's threads (measured on 2 CPUs: no reliable gain from 2 threads, see docs/PERFORMANCE.md).
- ``decode_num_cpus: auto``: 1; 0.5 on a small cluster (0.25 below 2 CPUs). Decode tasks also ask one unit of
  ``ray.decode_resource`` when some node defines it (the CPU worker group in cluster.yaml), which keeps them off
  the head and the GPU nodes; they ask ``embed.decode_memory_mb`` of memory (raised to what a block of
  ``embed.videos_per_block`` decoded videos needs at ``decode.max_frames``, :func:`decode_bytes_per_video`, when
  that is more: 300 frames at 224 px hold 64 MB per video) unless the plan is made from node
  types that declare no memory (an autoscaler could not match such a request to a node type: it would never
  start a node for it).
- Training: ``use_gpu: auto`` = G > 0 (and G >= an explicit ``num_workers``: one GPU per worker); ``num_workers: auto`` = G with GPUs (fewer when each would get under a quarter CPU), else 2 below 16 CPUs and
  ``min(8, C // 8)`` above; ``cpus_per_worker: auto`` = what is left after reserving max(1, C/8) CPUs for data
  reading, split over the workers (0.25 steps, between 0.25 and 1 below 16 CPUs, 8 above). A sweep plans each trial with
  1 / ``tune.max_concurrent_trials`` of the cluster.

Feasibility (:func:`check`): every single actor / task / worker must fit on some node, and everything that must
run at once (each pool's ``min_size`` actors and one decode task; or the whole training worker group)
must fit in the cluster's total. A failure is a :class:`ResourceError` (a ConfigError: exit code 2) whose one
line names the config keys, what they ask for and what the cluster has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from raypipe.config.base import ConfigError

SMALL_CPUS = 6


class ResourceError(ConfigError):
    """What a stage asks for cannot be placed on the cluster (exit code 2, like any config error)."""


@dataclass(frozen=True)
class NodeType:
    """One kind of node and how many of it there are (alive now, or at most under the autoscaler)."""

    resources: dict[str, float]
    count: int = 1
    name: str = ""


@dataclass(frozen=True)
class Cluster:
    """The resources a stage may plan with: alive nodes, or what an autoscaling cluster's node types can reach."""

    nodes: tuple[NodeType, ...]
    autoscaling: bool = False

    @classmethod
    def single(cls, cpus: float, gpus: float = 0, **custom: float) -> Cluster:
        """One node (a laptop, a single big machine); mostly for tests and ``ray.init()`` on one host."""
        return cls((NodeType({"CPU": float(cpus), "GPU": float(gpus), **custom}),))

    def total(self, key: str) -> float:
        return sum(n.resources.get(key, 0.0) * n.count for n in self.nodes)

    def largest(self, key: str) -> float:
        return max((n.resources.get(key, 0.0) for n in self.nodes if n.count > 0), default=0.0)

    def has(self, key: str) -> bool:
        return self.total(key) > 0

    def fits_one(self, shape: dict[str, float]) -> bool:
        return any(
            n.count > 0 and all(
                n.resources.get(k, 0.0) + 1e-9 >= v for k, v in shape.items()
                if v > 0 and (k != "memory" or "memory" in n.resources)  # node types in a cluster.yaml name no memory
            )
            for n in self.nodes
        )

    def describe(self) -> str:
        keys = ["CPU", "GPU"] + sorted(k for k in {k for n in self.nodes for k in n.resources}
                                       - {"CPU", "GPU", "memory", "object_store_memory"} if not k.startswith("node:"))
        have = ", ".join(f"{k} {_num(self.total(k))}" for k in keys if self.total(k) or k in ("CPU", "GPU"))
        kind = f"{len(self.nodes)} node types (autoscaling, at most)" if self.autoscaling else f"{sum(n.count for n in self.nodes)} node(s)"
        return f"{have} on {kind}"


@dataclass
class Request:
    """``count`` actors/tasks/workers of ``shape`` that must be placed at the same time."""

    what: str
    keys: tuple[str, ...]
    shape: dict[str, float]
    count: int = 1


@dataclass
class StagePlan:
    """The resolved settings (config key -> value) of one stage and the requests they make."""

    stage: str
    settings: dict[str, Any] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: each request with its count (pools: min..max actors) and shape."""
        parts = []
        for r in self.requests:
            key = next((k.rsplit(".", 1)[0] for k in r.keys if k.endswith(".min_size")), None)
            top = self.settings.get(f"{key}.max_size") if key else None
            if "label.min_actors" in r.keys:
                top = self.settings.get("label.max_actors")
            n = f"{r.count}..{top}" if top and top != r.count else f"{r.count}"
            parts.append(f"{n} x {r.what.split(' (')[0]} {{{_shape({k: v for k, v in r.shape.items() if k != 'memory'})}}}")
        return "; ".join(parts)

    def describe(self) -> str:
        lines = [f"{self.stage}: " + ", ".join(f"{k}={_num(v)}" for k, v in self.settings.items())]
        lines += [f"  {r.count} x {r.what} {{{_shape(r.shape)}}}" for r in self.requests]
        lines += [f"  rule: {r}" for r in self.rules]
        return "\n".join(lines)


def _num(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, float):
        return round(v, 4)
    return v


def _shape(shape: dict[str, float]) -> str:
    return ", ".join(f"{k}: {_num(v)}" for k, v in shape.items() if v > 0) or "nothing"


def _floor(x: float, step: float) -> float:
    return math.floor(x / step + 1e-9) * step


def actor_share(cpus: float, pools: int) -> float:
    """CPUs per encoder / classifier actor: 1, or on a small cluster at most half the CPUs for one actor of each
    of ``pools`` pools (0.25 to 0.5 each), so decoding always has CPUs left."""
    if cpus >= SMALL_CPUS:
        return 1.0
    return max(0.25, min(0.5, _floor(cpus / 2 / max(1, pools), 0.25)))


def gpu_fraction(pools: int) -> float:
    """Share of one GPU per actor when ``pools`` GPU pools put one actor each on every GPU (4 decimals, Ray's
    precision, rounded down so the shares never add up to more than the GPU)."""
    return _floor(1.0 / max(1, pools), 0.0001)


# --------------------------------------------------------------------------------------------------- embed


def _auto(value: Any, default: Any) -> Any:
    return default if value == "auto" else value


DECODE_OVERHEAD_MB = 64  # PyAV's demuxer, codec and frame buffers beside the sampled arrays


def decode_bytes_per_video(e: Any) -> int:
    """Bytes of one decoded video's sampled arrays (``e`` an EmbedConfig): ``max_frames`` RGB frames of
    ``frames.image_size`` px (uint8) + as many float32 audio windows (see :class:`raypipe.config.embed.DecodeConfig`)."""
    d, size = e.decode, e.frames.image_size
    window = int(round(d.window_s * d.audio_sample_rate))
    return d.max_frames * (size * size * 3 + window * 4)


def decode_memory_bytes(e: Any) -> tuple[int, bool]:
    """``(memory a decode task asks, raised?)``: ``embed.decode_memory_mb``, or more when its block of
    ``videos_per_block`` videos needs it (each held twice: the task's rows and the block Ray Data builds of them)."""
    asked = e.decode_memory_mb * 2**20
    needed = 2 * e.videos_per_block * decode_bytes_per_video(e) + DECODE_OVERHEAD_MB * 2**20
    return max(asked, needed), needed > asked


def plan_embed(e: Any, cluster: Cluster, *, extra_pools: int = 0, extra_gpu_pools: int = 0,
               decode_resource: str | None = None, stage: str = "embed") -> StagePlan:
    """Resolve ``embed.*`` pool settings for ``cluster`` (``e`` is an EmbedConfig; see the module rules).

    ``extra_pools`` / ``extra_gpu_pools``: further actor pools that run beside the encoders (the label
    classifier), which share the CPUs of a small cluster / the GPUs.
    """
    cpus, gpus = cluster.total("CPU"), cluster.total("GPU")
    small = cpus < SMALL_CPUS
    decode_nodes = bool(decode_resource and cluster.has(decode_resource))
    if stage == "embed" and _auto(e.inline_decode, small and gpus == 0 and not decode_nodes and
                                  e.fuse_encoders is not False and not e.ocr.enabled and not e.asr.enabled):
        return plan_inline(e, cluster, auto=e.inline_decode == "auto")
    plan = StagePlan(stage)
    fuse = _auto(e.fuse_encoders, small and gpus == 0)
    if e.fuse_encoders == "auto":
        plan.rules.append("encoders fused into one pool (small CPU-only cluster)" if fuse else "three encoder pools")
    pools = [("frame_pool", "FusedEncoder" if fuse else "FrameEncoder", 1.0 if fuse else 0.5)]
    if not fuse:
        pools += [("audio_pool", "AudioEncoder", 0.25), ("text_pool", "TextEncoder", 0.25)]
    frac = gpu_fraction(len(pools) + extra_gpu_pools) if gpus > 0 else 0.0
    cpu_only = {k for k, on in (("ocr_pool", e.ocr.enabled), ("asr_pool", e.asr.enabled)) if on}
    pools += [(k, "OcrStage" if k == "ocr_pool" else "AsrStage", 0.25) for k in sorted(cpu_only, reverse=True)]
    plan.settings["embed.fuse_encoders"] = fuse
    if stage == "embed":
        plan.settings["embed.inline_decode"] = False
    if e.encoder_threads != "auto":  # auto: Ray's default (the actor's CPUs); see docs/PERFORMANCE.md
        plan.settings["embed.encoder_threads"] = int(e.encoder_threads)
    actor_cpus = actor_share(cpus, len(pools) + extra_pools)
    for key, cls, share in pools:
        p = getattr(e, key)
        ncpu = float(_auto(p.num_cpus, actor_cpus))
        ngpu = float(_auto(p.num_gpus, 0.0 if key in cpu_only else frac))
        default_max = max(1, int(_floor(cpus * 0.5 * share / max(ncpu, 0.25), 1)))
        if ngpu > 0:
            default_max = max(1, min(int(gpus), default_max))
        max_size = int(_auto(p.max_size, max(default_max, p.min_size)))
        plan.settings.update({f"embed.{key}.num_cpus": ncpu, f"embed.{key}.num_gpus": ngpu,
                              f"embed.{key}.min_size": p.min_size, f"embed.{key}.max_size": max_size})
        plan.requests.append(Request(f"{cls} actor (embed.{key})",
                                     (f"embed.{key}.min_size", f"embed.{key}.num_cpus", f"embed.{key}.num_gpus"),
                                     {"CPU": ncpu, "GPU": ngpu}, p.min_size))
    dcpu = float(_auto(e.decode_num_cpus, (0.5 if cpus >= 2 else 0.25) if small else 1.0))
    memory, raised = decode_memory_bytes(e)
    shape = {"CPU": dcpu, "memory": memory}
    if raised:
        plan.rules.append(f"decode tasks ask {memory / 2**20:.0f} MB (> embed.decode_memory_mb): "
                          f"{e.videos_per_block} videos x {e.decode.max_frames} frames per block")
    if cluster.autoscaling and not cluster.has("memory"):
        # Node types planned from a cluster.yaml name no memory, and an autoscaler only matches a request that
        # asks for memory to a node type whose memory its provider fills in (AWS does; the local/fake providers
        # and others do not): such a decode task would wait forever with "no node type can satisfy it".
        del shape["memory"]
        plan.rules.append("decode tasks ask no memory (the cluster's node types declare none)")
    if decode_resource and cluster.has(decode_resource):
        shape[decode_resource] = 1.0
        plan.rules.append(f"decode tasks ask 1 {decode_resource} (CPU worker nodes only)")
    plan.settings["embed.decode_num_cpus"] = dcpu
    plan.settings["embed.decode_resources"] = {k: v for k, v in shape.items() if k not in ("CPU", "memory")}
    plan.settings["embed.decode_memory"] = shape.get("memory", 0)  # bytes Ray reserves per decode task (0: none)
    plan.requests.append(Request("decode task", ("embed.decode_num_cpus", "embed.decode_memory_mb"), shape))
    return plan


def plan_inline(e: Any, cluster: Cluster, *, auto: bool = False) -> StagePlan:
    """``embed.inline_decode``: one pool of actors that each decode, encode and write (``frame_pool`` keys).

    ``num_cpus: auto`` = 1 (each actor is a plain loop) or all the CPUs below 1; ``inline_calls: auto`` = the
    actor's whole CPUs: an actor given more than one CPU runs that many batches at once, in threads of one torch
    thread each (``encoder_threads: auto`` = the actor's CPUs / calls), instead of one batch on a single decode
    thread; ``max_size: auto`` = as many actors as the CPUs hold, at most one per GPU when the actors ask GPUs
    (``num_gpus: auto`` = 1 with GPUs). There are no decode tasks, so nothing else needs CPUs.
    """
    cpus, gpus = cluster.total("CPU"), cluster.total("GPU")
    why = " (small CPU-only cluster)" if auto else ""
    plan = StagePlan("embed", rules=[f"decode, encode and write in one actor pool{why}"])
    p = e.frame_pool
    ncpu = float(_auto(p.num_cpus, min(1.0, max(0.25, _floor(cpus, 0.25)))))
    ngpu = float(_auto(p.num_gpus, 1.0 if gpus > 0 else 0.0))
    calls = int(_auto(e.inline_calls, max(1, int(ncpu))))
    default_max = max(1, int(_floor(cpus / ncpu, 1)))
    if ngpu > 0:
        default_max = max(1, min(default_max, int(gpus / ngpu)))
    max_size = int(_auto(p.max_size, max(default_max, p.min_size)))
    plan.settings.update({"embed.inline_decode": True, "embed.fuse_encoders": True, "embed.frame_pool.num_cpus": ncpu,
                          "embed.frame_pool.num_gpus": ngpu, "embed.frame_pool.min_size": p.min_size,
                          "embed.frame_pool.max_size": max_size, "embed.inline_calls": calls})
    if e.encoder_threads != "auto" or calls > 1:  # auto with threads: the actor's CPUs shared by its calls
        plan.settings["embed.encoder_threads"] = int(_auto(e.encoder_threads, max(1, int(ncpu) // calls)))
    plan.requests.append(Request("InlineEmbedder actor (embed.frame_pool)",
                                 ("embed.frame_pool.min_size", "embed.frame_pool.num_cpus", "embed.frame_pool.num_gpus"),
                                 {"CPU": ncpu, "GPU": ngpu}, p.min_size))
    return plan


def plan_label(cfg: Any, cluster: Cluster, *, decode_resource: str | None = None) -> StagePlan:
    """The embed plan with one more GPU pool, plus the classifier pool (``label.*``)."""
    lc = cfg.label
    gpus, cpus = cluster.total("GPU"), cluster.total("CPU")
    use_gpu = bool(_auto(lc.use_gpu, gpus > 0))
    plan = plan_embed(cfg.embed, cluster, extra_pools=1, extra_gpu_pools=1 if use_gpu else 0,
                      decode_resource=decode_resource, stage="label")
    fused = plan.settings["embed.fuse_encoders"]
    ngpu = gpu_fraction((1 if fused else 3) + 1) if use_gpu else 0.0
    ncpu = actor_share(cpus, (1 if fused else 3) + int(cfg.embed.ocr.enabled) + int(cfg.embed.asr.enabled) + 1)
    by_cpu = max(1, int(_floor(cpus / 8 / ncpu, 1)))
    max_actors = int(_auto(lc.max_actors, max(lc.min_actors, min(int(gpus), by_cpu) if use_gpu else by_cpu)))
    plan.settings.update({"label.use_gpu": use_gpu, "label.num_gpus": ngpu, "label.num_cpus": ncpu,
                          "label.min_actors": lc.min_actors, "label.max_actors": max_actors})
    plan.requests.insert(-1, Request("classifier actor (label)", ("label.min_actors", "label.use_gpu"),
                                     {"CPU": ncpu, "GPU": ngpu}, lc.min_actors))
    return plan


def decode_capacity(plan: StagePlan, cluster: Cluster, tasks: int, resource: str | None) -> list[dict[str, float]]:
    """Whole decode nodes to ask an autoscaling cluster for while ``tasks`` decode tasks wait: one bundle per node.

    Why: Ray Data only submits the tasks that fit the nodes already up, so a backlog never shows the autoscaler
    any demand beyond them and the decode group would stay at its first node. Each bundle is the node type's
    whole amount of ``resource`` (only one fits per node, and it holds no CPU, so Ray Data's CPU budget is
    untouched); their count is ceil(tasks / decode tasks per node), at most the node type's ``max_workers``.
    Empty unless the plan comes from an autoscaling cluster's node types that define ``resource``.
    """
    node = max((n for n in cluster.nodes if n.count > 0 and n.resources.get(resource or "", 0) > 0),
               key=lambda n: n.count, default=None)
    decode = next((r for r in plan.requests if r.what == "decode task"), None)
    if not cluster.autoscaling or node is None or decode is None or tasks <= 0:
        return []
    per_node = min(int(node.resources.get(k, 0.0) / v + 1e-9) for k, v in decode.shape.items()
                   if v > 0 and k in node.resources)
    wanted = min(node.count, math.ceil(tasks / max(1, per_node)))
    return [{resource: node.resources[resource]} for _ in range(wanted)]


# --------------------------------------------------------------------------------------------------- train


def lone_cached_worker(t: Any, stage: str, workers: int, use_gpu: bool, share: int, extra: Any) -> bool:
    """True for a single CPU worker that trains on cached data (``train.cache_data``) in ``raypipe train``."""
    return (stage == "train" and workers == 1 and not use_gpu and share == 1 and extra is None
            and bool(getattr(t, "cache_data", False)))


def plan_train(t: Any, cluster: Cluster, *, stage: str = "train", extra: Request | None = None,
               share: int = 1) -> StagePlan:
    """Resolve ``train.use_gpu`` / ``num_workers`` / ``cpus_per_worker`` (``t`` is a TrainConfig).

    ``share``: runs that go on at once (a sweep's concurrent trials); each plans with its part of the cluster.
    """
    cpus, gpus = cluster.total("CPU") / share, float(int(cluster.total("GPU") / share))
    # A worker holds a whole GPU (NCCL wants one rank per device): auto uses GPUs when there are enough of them
    # for an explicit num_workers.
    use_gpu = bool(_auto(t.use_gpu, gpus > 0 and (t.num_workers == "auto" or gpus >= t.num_workers)))
    reserve = max(1.0, cpus / 8)
    if use_gpu:  # one per GPU, as long as each still gets a quarter CPU beside the data-reading reserve
        workers = int(_auto(t.num_workers, max(1, min(int(gpus), int((cpus - reserve) / 0.25)))))
    else:
        workers = int(_auto(t.num_workers, 2 if cpus < 16 else min(8, int(cpus // 8))))
    cap = 8.0 if cpus >= 16 else 1.0  # more than one thread per worker pays off on big nodes only
    free = cpus - reserve
    if lone_cached_worker(t, stage, workers, use_gpu, share, extra):
        # ``raypipe train`` with one CPU worker on cached data: no read tasks run while it trains, so the reserve
        # would idle and the worker would get one torch thread of the node's CPUs (bench_train: 0.75x a plain
        # loop's steps/s on 2 CPUs); it gets them all, as a plain loop would.
        cap, free = max(cap, cpus), cpus
    cpw = float(_auto(t.cpus_per_worker, min(cap, max(0.25, _floor(free / workers, 0.25)))))
    plan = StagePlan(stage, {"train.use_gpu": use_gpu, "train.num_workers": workers, "train.cpus_per_worker": cpw})
    plan.requests.append(Request("training worker", ("train.num_workers", "train.cpus_per_worker", "train.use_gpu"),
                                 {"CPU": cpw, "GPU": float(getattr(t, "gpus_per_worker", 1.0)) if use_gpu else 0.0},
                                 workers))
    if extra is not None:
        plan.requests.append(extra)
    return plan


# --------------------------------------------------------------------------------------------------- check


def problems(plan: StagePlan, cluster: Cluster) -> list[str]:
    """Why ``plan`` cannot be placed on ``cluster`` (empty when it can)."""
    out = []
    for r in plan.requests:
        if not cluster.fits_one(r.shape):
            out.append(f"{'/'.join(r.keys)} ask {{{_shape(r.shape)}}} per {r.what}; no node has that "
                       f"(largest node: CPU {_num(cluster.largest('CPU'))}, GPU {_num(cluster.largest('GPU'))})")
    at_once: dict[str, float] = {}
    for r in plan.requests:
        for k, v in r.shape.items():
            if k != "memory":
                at_once[k] = at_once.get(k, 0.0) + v * r.count
    short = {k: v for k, v in at_once.items() if v > cluster.total(k) + 1e-9}
    if short:
        keys = sorted({k for r in plan.requests for k in r.keys if "min" in k or "num_" in k or "cpus" in k})
        need = ", ".join(f"{k} {_num(v)}" for k, v in short.items())
        have = ", ".join(f"{k} {_num(cluster.total(k))}" for k in short)
        out.append(f"{', '.join(keys)} need {need} at once; the cluster has {have}")
    return out


def check(plan: StagePlan, cluster: Cluster) -> StagePlan:
    """Raise :class:`ResourceError` (one line) when ``plan`` cannot be placed; return it otherwise."""
    found = problems(plan, cluster)
    if found:
        raise ResourceError(f"resource error: {plan.stage}: " + "; ".join(found) + f" [cluster: {cluster.describe()}]")
    return plan


def cluster_from_yaml(data: dict[str, Any]) -> Cluster:
    """What an autoscaling cluster's node types can reach (``available_node_types`` of a cluster.yaml)."""
    types = data.get("available_node_types") or {}
    head = data.get("head_node_type")
    nodes = []
    for name, spec in types.items():
        count = 1 if name == head else int(spec.get("max_workers", data.get("max_workers", 0)) or 0)
        nodes.append(NodeType({k: float(v) for k, v in (spec.get("resources") or {}).items()}, count, name))
    return Cluster(tuple(nodes), autoscaling=True)


def cluster_from_nodes(nodes: list[dict[str, Any]]) -> Cluster:
    """The alive nodes of ``ray.nodes()``."""
    shapes = [NodeType({k: float(v) for k, v in (n.get("Resources") or {}).items()}, 1, n.get("NodeManagerAddress", ""))
              for n in nodes if n.get("Alive")]
    return Cluster(tuple(shapes))
