"""cluster.yaml is checked with Ray's own cluster-launcher validation, offline (no cloud calls).

Why: `ray up` validates late, after credentials and network; a typo there costs a failed launch. Ray's
``prepare_config`` merges the provider defaults exactly as `ray up` does and ``validate_config`` applies the
JSON schema shipped in ray/autoscaler/ray-schema.json plus its cross-field rules.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster_cfg() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _ray_validate(cfg: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_schema(cluster_cfg: dict[str, Any]) -> None:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster_cfg, schema)
    prepared = _ray_validate(cluster_cfg)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["idle_timeout_minutes"] > 0


def test_cluster_shape(cluster_cfg: dict[str, Any]) -> None:
    prepared = _ray_validate(cluster_cfg)
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    workers = {name: t for name, t in types.items() if name != head}
    gpu = [t for t in workers.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if not t.get("resources", {}).get("GPU")]
    assert gpu and cpu, "need a CPU decode group and a GPU group"
    assert all(t["min_workers"] == 0 for t in gpu), "GPU workers must scale from zero"
    assert all(t["max_workers"] >= 1 for t in gpu + cpu)
    assert types[head].get("resources", {}).get("GPU", 0) == 0
    setup = " ".join(prepared["setup_commands"])
    assert "pip install" in setup and "raypipe" in setup
    # Every node runs Ray with token auth.
    start = " ".join(prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2


def _too_many_min_workers(c: dict[str, Any]) -> None:
    c["max_workers"] = 1
    c["available_node_types"]["cpu_decode"]["min_workers"] = 2


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
        (lambda c: c["available_node_types"]["gpu"].update(min_workers="zero"), "zero"),
        (_too_many_min_workers, "max_workers"),
        (lambda c: c.update(idle_timeout_mins=5), "idle_timeout_mins"),
    ],
    ids=["unknown-head-type", "non-integer-min-workers", "min-workers-over-max", "misspelt-key"],
)
def test_validation_catches_broken_variants(cluster_cfg: dict[str, Any], mutate, expected: str) -> None:
    """The check is real: broken variants of the same file are rejected by the same functions."""
    broken = copy.deepcopy(cluster_cfg)
    mutate(broken)
    with pytest.raises((ValueError, jsonschema.ValidationError)) as info:
        _ray_validate(broken)
    assert expected in str(info.value)
