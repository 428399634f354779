"""The search space and the config each trial starts from (no Ray needed to check a sweep up front)."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Literal

from raypipe.config import ConfigError, RaypipeConfig, config_to_dict, validate_config
from raypipe.config.base import apply_override
from raypipe.config.paths import resolve_paths
from raypipe.config.tune import SEARCH_KINDS
from raypipe.io import fs as rfs

log = logging.getLogger(__name__)


def sample_values(spec: dict[str, Any]) -> list[Any]:
    """Values that stand in for a dimension when checking it against the config: every listed value, or both
    ends of a range (the ends are where a type or bound error shows)."""
    kind, arg = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return list(arg)
    low, high = arg
    if kind == "randint":
        return [int(low), int(high) - 1]
    return [float(low), float(high)]


def to_param_space(search_space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Dotted keys -> a nested Tune param space (``{"train": {"optim": {"lr": tune.loguniform(..)}}}``).

    Nested rather than flat dotted keys so trial configs read like the YAML they override.
    """
    from ray import tune as rt

    makers = {
        "choice": lambda a: rt.choice(list(a)),
        "grid": lambda a: rt.grid_search(list(a)),
        "uniform": lambda a: rt.uniform(float(a[0]), float(a[1])),
        "loguniform": lambda a: rt.loguniform(float(a[0]), float(a[1])),
        "randint": lambda a: rt.randint(int(a[0]), int(a[1])),
    }
    space: dict[str, Any] = {}
    for key, spec in search_space.items():
        kind, arg = next(iter(spec.items()))
        node = space
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = makers[kind](arg)
    return space


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> RaypipeConfig:
    """The base config with dotted-key ``params`` applied, validated in full (the same rules as ``--set``)."""
    data = json.loads(json.dumps(base))  # deep copy; base is plain JSON
    for key, value in params.items():
        apply_override(data, key.split("."), plain(value))
    return validate_config(data)


def plain(value: Any) -> Any:
    """numpy scalars from Tune's samplers -> Python scalars, so pydantic and YAML see ordinary numbers."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, list | dict | str) else value


def validate_search_space(cfg: RaypipeConfig) -> None:
    """Fail before Ray starts if a search-space key is not a real config key or a sampled value is invalid.

    Each key is checked by applying representative values through the full config validation, so the error
    is the same one-line message ``--set`` would give, prefixed with the search-space key.
    """
    space = cfg.tune.search_space
    if not space:
        raise ConfigError("config error: tune.search_space: is empty; name at least one dotted config key to sweep")
    base = config_to_dict(cfg)
    errors: list[str] = []
    for key, spec in space.items():
        for value in sample_values(spec):
            try:
                trial = apply_params(base, {key: value})
            except ConfigError as err:
                first = str(err).splitlines()[0].removeprefix("config error: ")
                errors.append(f"config error: tune.search_space.{key}: value {value!r} is rejected: {first}")
                break
            if key.startswith("model.params."):
                problem = _model_param_problem(trial, key.split(".", 2)[2])
                if problem:
                    errors.append(f"config error: tune.search_space.{key}: {problem}")
                    break
    max_epochs = max_epochs_of(cfg)  # "auto": checked again once the sweep has resolved it from the data
    if (cfg.tune.scheduler == "asha" and max_epochs != "auto"
            and cfg.tune.asha.grace_period > (cfg.tune.asha.max_t or max_epochs)):
        errors.append(
            f"config error: tune.asha.grace_period: {cfg.tune.asha.grace_period} exceeds the trials' epochs "
            f"({cfg.tune.asha.max_t or max_epochs}); ASHA could never stop a trial"
        )
    try:
        validate_config(portable_base(cfg))
    except ConfigError as err:  # e.g. tune.metric not produced for the task, amp without GPUs
        errors += [line.replace("config error: train.", "config error: tune (applied as train.)", 1)
                   for line in str(err).splitlines()]
    if errors:
        raise ConfigError("\n".join(errors))


def _model_param_problem(cfg: RaypipeConfig, name: str) -> str | None:
    """model.params are free-form in the config; the model builder's keyword arguments are the real keys."""
    from raypipe.models.resolve import option_problem

    try:
        return option_problem(cfg.model.name, name.split(".")[0])
    except KeyError:
        return None  # unknown model name: the trainer reports it with the registry's own message


def expected_trials(cfg: RaypipeConfig) -> int:
    """num_samples x the size of every grid (Tune's count of trials for a basic-variant search)."""
    n = cfg.tune.num_samples
    for spec in cfg.tune.search_space.values():
        if "grid" in spec:
            n *= len(spec["grid"])
    return n


def max_epochs_of(cfg: RaypipeConfig) -> int | Literal["auto"]:
    """The most epochs any trial can run (train.epochs, or the largest value it is swept over); ``auto`` until
    :func:`raypipe.train.resolve_schedule` has sized it from the data."""
    spec = cfg.tune.search_space.get("train.epochs")
    if not spec:
        return cfg.train.epochs
    return max(int(v) for v in sample_values(spec))


def describe_dimension(spec: dict[str, Any]) -> str:
    kind, arg = next(iter(spec.items()))
    return f"{kind}{list(arg)}" if kind in SEARCH_KINDS else str(spec)


def sweep_path(cfg: RaypipeConfig) -> str:
    root = rfs.absolute(cfg.tune.storage_path or cfg.train.storage_path)
    assert root is not None
    return rfs.join(root, cfg.tune.name)


def portable_base(cfg: RaypipeConfig) -> dict[str, Any]:
    """The base config every trial starts from: absolute paths, trial resources applied, tune section dropped
    from what trials see as "their" settings (it is kept only as defaults)."""
    data = config_to_dict(resolve_paths(cfg))
    train = data.setdefault("train", {})
    train["storage_path"] = rfs.join(sweep_path(cfg), "train_runs")
    res = cfg.tune.resources
    if res.num_workers is not None:
        train["num_workers"] = res.num_workers
    if res.cpus_per_worker is not None:
        train["cpus_per_worker"] = res.cpus_per_worker
    if res.gpus_per_worker is not None:
        train["use_gpu"] = res.gpus_per_worker > 0
        if res.gpus_per_worker > 0:
            train["gpus_per_worker"] = res.gpus_per_worker
    # Every trial keeps (and the sweep registers) the checkpoint that is best by the sweep's own metric; the
    # sweep registers only its best trial's model.
    train["metric"], train["mode"] = sweep_metric(cfg)
    train["register_model"] = False
    data.pop("tune", None)
    return data


def sweep_metric(cfg: RaypipeConfig) -> tuple[str, str]:
    return cfg.tune.metric or cfg.train.metric, cfg.tune.mode or cfg.train.mode


def fingerprint(cfg: RaypipeConfig) -> str:
    """Identifies what a sweep searches; a resumed sweep must search the same thing."""
    t = cfg.tune
    payload = {
        "space": t.search_space,
        "metric": sweep_metric(cfg),
        "num_samples": t.num_samples,
        "scheduler": t.scheduler,
        "asha": t.asha.model_dump(),
        "base": {k: v for k, v in portable_base(cfg).items() if k not in ("tracking", "tune")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}_{trial_id}"
