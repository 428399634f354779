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


# ------------------------------------------------------------------------------ first-real-run checks (issue 21)


def _quoted_tildes(cmd: str) -> list[int]:
    """Offsets of ``~`` inside single or double quotes: neither bash nor pip expands those (``"~/raypipe"``)."""
    out, quote = [], None
    for i, ch in enumerate(cmd):
        if quote is None and ch in "'\"":
            quote = ch
        elif ch == quote:
            quote = None
        elif ch == "~" and quote is not None:
            out.append(i)
    return out


def _commands(prepared: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    cmds = [c for k in keys for c in prepared.get(k) or []]
    for t in prepared["available_node_types"].values():
        cmds += t.get("worker_setup_commands") or []
    return cmds


def test_quoted_tilde_detector() -> None:
    assert _quoted_tildes('pip install -e "~/raypipe"') == [16]
    assert _quoted_tildes("echo 'x ~' >> ~/.bashrc") == [8]
    assert _quoted_tildes("pip install -c ~/raypipe/constraints.txt -e ~/raypipe") == []


def test_commands_expand_home(cluster_cfg: dict[str, Any]) -> None:
    prepared = _ray_validate(cluster_cfg)
    bad = [c for c in _commands(prepared) if _quoted_tildes(c)]
    assert not bad, f"quoted ~ is never expanded: {bad}"


def test_image_matches_constraints(cluster_cfg: dict[str, Any]) -> None:
    """A container image with the pinned Python and Ray, and a host AMI on every node type (no launcher default)."""
    pins = dict(
        line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line
    )
    image = cluster_cfg["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{pins['ray']}-py311-"), image
    cuda_major = pins["nvidia-cuda-runtime"].split(".")[0]  # the CUDA torch's wheel was built for
    assert image.endswith((f"-cu{cuda_major}0", f"-cu{cuda_major}", "-gpu")), (image, cuda_major)
    for name, t in cluster_cfg["available_node_types"].items():
        assert t["node_config"].get("ImageId"), f"{name}: no ImageId (the launcher would pick a CUDA 11 DLAMI)"


def test_head_takes_no_work_and_setup_uses_constraints(cluster_cfg: dict[str, Any]) -> None:
    prepared = _ray_validate(cluster_cfg)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    installs = [c for c in prepared["setup_commands"] if "pip install" in c and "raypipe" in c]
    assert installs and all("-c ~/raypipe/constraints.txt" in c for c in installs), installs


def _docs_ops_config() -> dict[str, Any]:
    """The production config documented in docs/OPERATIONS.md (the ```yaml block that says ``base: demo``)."""
    text = (REPO / "docs" / "OPERATIONS.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    ops = [yaml.safe_load(b) for b in blocks if "base: demo" in b]
    assert ops, "docs/OPERATIONS.md lost its production config example"
    return ops[0]


def _fits(shape: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(r, 0) >= v for r, v in shape.items())


@pytest.mark.parametrize("source", ["demo", "test", "docs-ops"])
def test_every_request_shape_fits_a_node_type(cluster_cfg: dict[str, Any], source: str, tmp_path: Path) -> None:
    """A request no node type can hold stays pending forever, and the autoscaler never starts a node for it.

    The shapes are the resource planner's own (raypipe.runtime.stage_plan), planned for this cluster.yaml as a
    cold autoscaling cluster: what each stage would ask for on the real cluster."""
    from raypipe.config import load_config
    from raypipe.resources import check, cluster_from_yaml
    from raypipe.runtime import stage_plan

    if source == "docs-ops":
        path = tmp_path / "prod.yaml"
        path.write_text(yaml.safe_dump(_docs_ops_config()))
        cfg = load_config(path)
    else:
        cfg = load_config(source)
    cluster = cluster_from_yaml(_ray_validate(cluster_cfg))
    nodes = {n.name: n.resources for n in cluster.nodes}
    asked_gpu = False
    for stage in ("embed", "label", "train", "tune"):
        plan = check(stage_plan(cfg, stage, cluster), cluster)  # the planner's one-line ResourceError otherwise
        for r in plan.requests:
            shape = {k: v for k, v in r.shape.items() if k != "memory" and v > 0}
            asked_gpu |= shape.get("GPU", 0) > 0
            assert any(_fits(shape, res) for res in nodes.values()), f"{stage}: no node type holds {r.what} {shape}"
    # a cold cluster (GPU group at 0 nodes) is still planned with GPUs, so the autoscaler has a GPU request to act on
    assert asked_gpu
    # The check is real: a shape bigger than every node is reported.
    assert not any(_fits({"CPU": 1, "GPU": 2}, r) for r in nodes.values())
