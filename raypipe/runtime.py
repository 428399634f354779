"""Ray start-up, resource plans applied to configs, the stall watchdog and the one-line progress of a stage.

Every stage calls :func:`ensure_ray` and then :func:`planned` (embed, label, train, tune): the ``auto`` values
of its config become numbers planned by :mod:`raypipe.resources` from the cluster seen at start, and a request
that cannot be placed ends the stage at once with a :class:`~raypipe.resources.ResourceError` (exit code 2)
instead of a silent wait. While a Ray Data stream runs, :class:`Watchdog` ends it when nothing comes out for
``ray.stall_timeout_s`` (a :class:`StallError`, exit code 4) and says which operators wait for what.
"""

from __future__ import annotations

import _thread
import contextlib
import importlib
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from raypipe.config import RaypipeConfig
from raypipe.resources import (
    Cluster,
    StagePlan,
    check,
    cluster_from_nodes,
    cluster_from_yaml,
    decode_capacity,
    plan_embed,
    plan_label,
    plan_train,
)

log = logging.getLogger(__name__)

STALL_EXIT_CODE = 4


class StallError(RuntimeError):
    """A running stage made no progress for ``ray.stall_timeout_s``; ``str()`` is the diagnostic."""

    exit_code = 4  # == STALL_EXIT_CODE: committed work is kept, a rerun resumes


class RayUnavailableError(RuntimeError):
    """Ray could not be started or reached (one line: which address, what Ray said)."""


def joining_cluster(cfg: RaypipeConfig) -> bool:
    """True when ``ray.init`` connects to a running cluster: an address, RAY_ADDRESS (set inside ``ray job submit``),
    or a local ``ray start`` cluster that Ray finds by itself; ``local`` (or nothing found) starts a new instance."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        return address != "local"
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is not None
    except Exception:  # nothing to find (Ray raises when no address is recorded)
        return False


# What every stage imports on the driver after Ray is up (encoder and model dims, the text tower's tokenizer).
WARM_IMPORTS = ("torch", "timm", "transformers")


def warm_imports(modules: tuple[str, ...] = WARM_IMPORTS) -> threading.Thread:
    """Import ``modules`` in a daemon thread while the caller waits on something else.

    Why: ``ray.init`` spends most of its 4-5 s waiting for the GCS and raylet processes to come up, and the
    stage then spends as long again importing torch, timm and transformers (measured, docs/PERFORMANCE.md). Done
    here they overlap; :func:`ensure_ray` joins the thread once Ray is up, so stage code never imports beside it.
    A failure is left for the stage's own import to raise with its own message.
    """

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the stage's own import reports it
                return

    thread = threading.Thread(target=run, name="raypipe-warm-imports", daemon=True)
    thread.start()
    return thread


def ensure_ray(cfg: RaypipeConfig) -> None:
    """Start or join Ray once per process. ``ray.num_cpus`` / ``ray.num_gpus`` only apply to a local instance
    raypipe starts itself: Ray refuses them when connecting to a cluster (every job under ``ray job submit``).
    The stage's heavy imports run beside ``ray.init`` (:func:`warm_imports`)."""
    import ray

    if ray.is_initialized():
        return
    from raypipe.logs import verbose

    kwargs: dict[str, Any] = {
        "address": cfg.ray.address, "runtime_env": cfg.ray.runtime_env or None, "configure_logging": False,
        # Worker output (model loading, per-epoch reports) goes to Ray's session logs unless -v.
        "log_to_driver": verbose(),
    }
    local = {k: v for k, v in (("num_cpus", cfg.ray.num_cpus), ("num_gpus", cfg.ray.num_gpus)) if v is not None}
    if joining_cluster(cfg):
        if local:
            log.info("ray: joining a running cluster, so %s (local instance only) is not used",
                     ", ".join(f"ray.{k}" for k in local))
    else:
        kwargs.update(local)
    _check_reachable(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    warming = warm_imports()
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        where = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "a new local instance"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RayUnavailableError(f"cannot start or reach Ray at {where}: {first}") from exc
    finally:
        # Joined on every path: a thread left importing would race the caller's own next import of the same
        # module (a half-initialised transformers: "cannot import name 'AutoConfig'"; seen in the unit tests).
        warming.join()
    log.debug("ray: %s, session logs in %s", ray.cluster_resources(), session_log_dir())


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """A GCS address (host:port) that refuses connections fails in seconds here; ``ray.init`` would retry for
    minutes. Other forms (``auto``, ``local``, ``ray://``, ``http://``) are left to Ray."""
    import socket

    if not address or "://" in address or address in ("auto", "local") or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayUnavailableError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def session_log_dir() -> str | None:
    """Where this Ray session's worker logs are (on this node)."""
    try:
        import ray

        return str(Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs")
    except Exception:  # not initialised, or a client connection
        return None


def current_cluster(cfg: RaypipeConfig) -> Cluster:
    """What to plan with: the node types of ``ray.cluster_yaml`` (autoscaling), else the alive nodes."""
    if cfg.ray.cluster_yaml:
        path = Path(cfg.ray.cluster_yaml)
        if not path.is_file():
            from raypipe.config import ConfigError

            raise ConfigError(f"config error: ray.cluster_yaml: file {str(path)!r} does not exist")
        return cluster_from_yaml(yaml.safe_load(path.read_text()) or {})
    import ray

    return cluster_from_nodes(ray.nodes())


def stage_plan(cfg: RaypipeConfig, stage: str, cluster: Cluster) -> StagePlan:
    """The (unchecked) plan of ``stage`` for ``cluster``."""
    res = cfg.ray.decode_resource
    if stage == "embed":
        return plan_embed(cfg.embed, cluster, decode_resource=res)
    if stage == "label":
        return plan_label(cfg, cluster, decode_resource=res)
    if stage == "train":
        return plan_train(cfg.train, cluster)
    if stage == "tune":
        from raypipe.resources import Request

        trial = cfg.model_copy(deep=True)
        r = cfg.tune.resources
        for key, value in (("num_workers", r.num_workers), ("cpus_per_worker", r.cpus_per_worker)):
            if value is not None:
                setattr(trial.train, key, value)
        if r.gpus_per_worker is not None:
            trial.train.use_gpu = r.gpus_per_worker > 0
            if r.gpus_per_worker > 0:
                trial.train.gpus_per_worker = r.gpus_per_worker
        driver = Request("trial driver (tune.resources.driver_cpus)", ("tune.resources.driver_cpus",),
                         {"CPU": float(r.driver_cpus)})
        return plan_train(trial.train, cluster, stage="tune", extra=driver, share=max(1, cfg.tune.max_concurrent_trials))
    raise ValueError(f"no resource plan for stage {stage!r}")


def apply_plan(cfg: RaypipeConfig, plan: StagePlan) -> RaypipeConfig:
    """A copy of ``cfg`` with the plan's numbers in place of ``auto`` (keys the config does not have are skipped)."""
    out = cfg.model_copy(deep=True)
    for key, value in plan.settings.items():
        *parents, leaf = key.split(".")
        node: Any = out
        for p in parents:
            node = getattr(node, p, None)
        if node is not None and leaf in type(node).model_fields:
            setattr(node, leaf, value)
    return out


def planned(cfg: RaypipeConfig, stage: str) -> tuple[RaypipeConfig, StagePlan]:
    """Plan ``stage`` on the running cluster, refuse what cannot be placed, return the resolved config + plan."""
    cluster = current_cluster(cfg)
    plan = check(stage_plan(cfg, stage, cluster), cluster)
    log.info("%s: plan for %s: %s", stage, cluster.describe(), plan.summary())
    log.debug("resource plan:\n%s", plan.describe())
    return apply_plan(cfg, plan), plan


# ------------------------------------------------------------------------------------------------ capacity


class CapacityRequest:
    """Asks the autoscaler for ``bundles`` while a stage runs (see :func:`raypipe.resources.decode_capacity`).

    The request goes through Ray Data's autoscaling coordinator, which merges the requests of every Ray Data
    execution and re-sends them to the autoscaler every few seconds (a plain ``ray.autoscaler.sdk.request_resources``
    would be overwritten by its next send); a plain SDK request is the fallback where that coordinator is missing.
    It is renewed every ``every_s`` and expires after three times that, so a driver that dies leaves no request
    behind for long, and it is cancelled when the stage ends so the idle nodes go back after the idle timeout.
    """

    def __init__(self, name: str, bundles: list[dict[str, float]], every_s: float = 20.0) -> None:
        self.name, self.bundles, self.every_s = name, bundles, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CapacityRequest:
        if self.bundles:
            log.info("%s: asking the autoscaler for %d decode node(s) (%s each)", self.name, len(self.bundles),
                     _res(self.bundles[0]))
            self._thread = threading.Thread(target=self._run, name=f"raypipe-capacity-{self.name}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        """One thread sends and cancels: the coordinator's client must be used from a single thread."""
        send, cancel = self._client()
        while True:
            try:
                send()
            except Exception as exc:  # the stage goes on without the extra nodes
                log.warning("%s: capacity request failed: %s", self.name, exc)
            if self._stop.wait(self.every_s):
                break
        try:
            cancel()
        except Exception as exc:
            log.debug("%s: cancelling the capacity request failed: %s", self.name, exc)

    def _client(self) -> tuple[Any, Any]:
        try:
            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                DefaultAutoscalingCoordinator,
            )
        except ImportError:  # another Ray version: the plain SDK (a Ray Data run may overwrite it)
            from ray.autoscaler.sdk import request_resources

            return (lambda: request_resources(bundles=self.bundles)), (lambda: request_resources(bundles=[]))
        coordinator = DefaultAutoscalingCoordinator(f"raypipe-{self.name}")
        return ((lambda: coordinator.request_resources(self.bundles, expire_after_s=3 * self.every_s)),
                coordinator.cancel_request)


def decode_capacity_request(cfg: RaypipeConfig, plan: StagePlan, videos: int) -> CapacityRequest:
    """The decode nodes that ``videos`` pending videos ask for (none unless planned from ``ray.cluster_yaml``)."""
    tasks = math.ceil(videos / max(1, cfg.embed.videos_per_block))
    bundles = decode_capacity(plan, current_cluster(cfg), tasks, cfg.ray.decode_resource) if cfg.ray.cluster_yaml else []
    return CapacityRequest(f"{plan.stage}-decode", bundles)


# ------------------------------------------------------------------------------------------------ watchdog


def waiting_report() -> str:
    """Which actors / tasks wait to be placed, and for what (Ray's state API; a shorter report without it)."""
    import ray

    free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    parts: list[str] = []
    try:
        from ray.util.state import list_actors, list_tasks

        for a in list_actors(filters=[("state", "=", "PENDING_CREATION")], timeout=5, raise_on_missing_output=False):
            parts.append(f"actor {a.class_name} waits for {_res(a.required_resources)}")
        tasks = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], timeout=5,
                           raise_on_missing_output=False)
        for t in tasks[:5]:
            parts.append(f"task {t.name} waits for {_res(t.required_resources)}")
        if not parts:
            running = list_tasks(filters=[("state", "=", "RUNNING")], timeout=5, raise_on_missing_output=False)
            names = sorted({t.name for t in running})
            parts.append("nothing waits for resources; running without output: " + (", ".join(names) or "nothing"))
    except Exception as exc:  # no dashboard: fall back to the GCS actor table
        log.debug("state API unavailable: %s", exc)
        pending = [a["ActorClassName"] for a in ray._private.state.actors().values()
                   if a.get("State") in ("PENDING_CREATION", "DEPENDENCIES_UNREADY")]
        parts.append(f"pending actors: {', '.join(pending) or 'none'}")
    return "; ".join(parts) + f"; free: {_res(free)}"


def _res(d: dict[str, Any] | None) -> str:
    d = {k: v for k, v in (d or {}).items() if not k.startswith("node:") and k != "memory"}
    return "{" + ", ".join(f"{k}: {round(float(v), 3):g}" for k, v in sorted(d.items())) + "}"


@contextlib.contextmanager
def sigint_handler(handler: Any = None):
    """Install ``handler`` for SIGINT while the block runs (None: leave it), and put the previous one back after.

    Why: Ray Tune's ``fit()`` installs its own SIGINT handler in the main thread and leaves it there after a
    normal finish, so in a process that ran a sweep (a notebook, the experiment runner, the test session) a
    Ctrl+C, or the watchdog's interrupt, only logged "ending Ray Tune run" and the stalled wait went on forever.
    Only the main thread may set handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if handler is not None:
        signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def fit_tuner(tuner: Any) -> Any:
    """``tuner.fit()`` with the process's SIGINT handler as it was before (Tune leaves its own installed)."""
    with sigint_handler():
        return tuner.fit()


class Watchdog:
    """Ends the main thread's wait on a Ray Data stream when :meth:`tick` is not called for ``timeout_s``.

    A daemon thread checks the time of the last tick; on a stall it builds the diagnostic and interrupts the
    main thread (KeyboardInterrupt), which :meth:`raise_if_fired` turns into a :class:`StallError`. Work that
    was committed before stays; the caller commits what is complete before re-raising, so a rerun resumes.
    """

    def __init__(self, stage: str, timeout_s: float, key: str = "ray.stall_timeout_s") -> None:
        self.stage, self.timeout_s, self.key = stage, timeout_s, key
        self.last = time.monotonic()
        self.message: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._main_ident = threading.main_thread().ident

    def __enter__(self) -> Watchdog:
        if self.timeout_s > 0:
            self._sigint = sigint_handler(signal.default_int_handler)  # KeyboardInterrupt, whatever ran before
            self._sigint.__enter__()
            self._thread = threading.Thread(target=self._watch, name=f"raypipe-watchdog-{self.stage}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._sigint.__exit__(*exc)

    def tick(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle >= self.timeout_s:
                try:
                    detail = waiting_report()
                except Exception as exc:
                    detail = f"(no detail: {exc})"
                self.message = (f"{self.stage}: stalled, no progress for {idle:.0f}s ({self.key}="
                                f"{self.timeout_s:g}): {detail}. Committed work is kept; rerun to resume")
                # A real SIGINT to the main thread: interrupt_main() alone only sets Python's flag, which a main
                # thread blocked on a lock (Ray Data's output queue) would not see until something woke it.
                try:
                    signal.pthread_kill(self._main_ident, signal.SIGINT)
                except (AttributeError, OSError, ValueError):
                    _thread.interrupt_main()
                return

    def raise_if_fired(self) -> None:
        if self.message is not None:
            raise StallError(self.message)


# ------------------------------------------------------------------------------------------------ progress


class Progress:
    """One progress line per stage: redrawn in place on a terminal, a log line every ``every_s`` otherwise."""

    def __init__(self, stage: str, total: int, every_s: float = 10.0) -> None:
        self.stage, self.total, self.every_s = stage, total, every_s
        self.done = 0
        self.failed = 0
        self.t0 = self._last = time.monotonic()
        from raypipe.logs import console_is_tty

        self.tty = console_is_tty()

    def update(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        now = time.monotonic()
        if self.tty:
            from raypipe.logs import console_write

            console_write(f"\r{self._line(now)}")
        elif now - self._last >= self.every_s or self.done == self.total:
            log.info("%s", self._line(now))
        else:
            return
        self._last = now

    def close(self) -> None:
        if self.tty and self.done:
            from raypipe.logs import console_write

            console_write("\n")

    def _line(self, now: float) -> str:
        el = now - self.t0
        rate = self.done / el if el > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.stage}: {self.done}/{self.total} videos ({pct:.0f}%), {self.failed} failed, "
                f"{rate:.2f}/s, {el:.0f}s")
