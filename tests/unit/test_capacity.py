"""``raypipe plan`` arithmetic (raypipe.capacity): node counts, wall time, bottleneck, patch and cost loading.

Hand-computed cases, no speed measured: the plan must follow from the costs it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from raypipe.capacity import (
    Costs,
    Group,
    frames_for,
    groups_from_yaml,
    load_costs,
    load_durations,
    mean_costs,
    plan_night,
)
from raypipe.cli import main

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
GROUPS = {"cpu": Group("cpu", cpus=16, gpus=0, max_workers=8), "gpu": Group("gpu", cpus=8, gpus=1, max_workers=4)}


def _costs(**kw) -> Costs:
    base = dict(decode_base_s=0.1, decode_per_sampled_s=0.01, encode_per_frame_s=0.02, encode_per_video_s=0.0)
    return Costs(**{**base, **kw})


def test_frames_and_means_follow_the_sampling_rule():
    assert [frames_for(d) for d in (0.4, 1.0, 1.5, 31.9, 32.0, 90.0)] == [1, 1, 2, 32, 32, 32]
    m = mean_costs(_costs(), [10.0, 100.0])
    # decode: 0.1 + 0.01*10 = 0.2 and 0.1 + 0.01*32 = 0.42 (only the sampled 32 s); frames 10 and 32
    assert m["decode_s"] == pytest.approx(0.31)
    assert m["frames"] == 21 and m["encode_s"] == pytest.approx(0.42)


def test_cpu_only_night_counts_nodes_per_stage_and_names_the_bottleneck():
    # 1,000,000 videos of 10 s: decode 0.2 CPU-s, encode 10 frames * 0.02 = 0.2 CPU-s -> 200,000 CPU-s each.
    # 16 CPUs at 50% = 8 usable per node; budget 8 h - 0 s start-up = 28,800 s -> 230,400 CPU-s per node.
    p = plan_night(1_000_000, 8, _costs(encode_per_frame_s=0.03), GROUPS, durations=[10.0], utilization=0.5,
                   startup_s=0)
    decode, encode = p.stages
    assert decode.work == pytest.approx(200_000) and encode.work == pytest.approx(300_000)
    assert (decode.nodes, encode.nodes) == (1, 2) and p.nodes == {"cpu": 3}
    # both stages share the 3 nodes (24 usable CPUs): 500,000 / 24 / 3600 h
    assert p.wall_hours == pytest.approx(500_000 / 24 / 3600)
    assert p.bottleneck in ("decode", "encode")
    assert p.patch["available_node_types"] == {"cpu": {"min_workers": 3, "max_workers": 8}}
    assert not p.warnings


def test_gpu_night_puts_encoding_on_the_gpu_group_at_the_given_rates():
    rates = {"frames_per_s": 1000.0, "texts_per_s": 500.0}
    # per video: 2 * 10 frames / 1000 + 1/500 = 0.022 GPU-s -> 22,000 GPU-s; 1 GPU at 100% over 3600 s -> 7 nodes
    p = plan_night(1_000_000, 1.5, _costs(), GROUPS, gpu="custom", gpu_rates=rates, durations=[10.0],
                   utilization=1.0, startup_s=1800)
    decode, encode = p.stages
    assert encode.group == "gpu" and encode.work == pytest.approx(22_000) and encode.nodes == 7
    assert decode.nodes == 4  # 200,000 CPU-s / (16 * 3600)
    assert p.bottleneck == "encode" and p.wall_hours == pytest.approx(22_000 / 7 / 3600 + 0.5)
    assert any("ASSUMED, NOT MEASURED" in a for a in p.assumptions)
    assert p.warnings == ["gpu: needs 7 nodes, cluster.yaml allows max_workers=4"]
    assert p.patch["available_node_types"]["gpu"] == {"min_workers": 7, "max_workers": 7}
    assert p.patch["max_workers"] == 11


def test_bad_inputs_are_one_clear_error():
    with pytest.raises(ValueError, match="no time after"):
        plan_night(10, 0.1, _costs(), GROUPS, durations=[1.0], startup_s=600)
    with pytest.raises(ValueError, match="unknown GPU type"):
        plan_night(10, 8, _costs(), GROUPS, durations=[1.0], gpu="V7")
    with pytest.raises(ValueError, match="no video durations"):
        plan_night(10, 8, _costs(), GROUPS)


def test_costs_and_durations_loading(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"measured_at": "x", "costs": {"decode_base_s": 0.3},
                                                 "durations_s": [1.0, 2.0]}))
    (tmp_path / "e.json").write_text(json.dumps({"costs": {"encode_per_frame_s": 0.05}}))
    c = load_costs([tmp_path / "d.json", tmp_path / "e.json"])
    assert (c.decode_base_s, c.encode_per_frame_s, c.durations_s) == (0.3, 0.05, [1.0, 2.0])
    assert c.sources["decode_base_s"].startswith("measured (d.json") and c.sources["encode_per_video_s"].startswith("default")
    (tmp_path / "corpus.json").write_text(json.dumps({"videos": [{"duration_s": 3.5}, {"duration_s": 7}]}))
    assert load_durations(tmp_path / "corpus.json") == [3.5, 7.0]
    (tmp_path / "d.txt").write_text("1\n2.5\n")
    assert load_durations(tmp_path / "d.txt") == [1.0, 2.5]


def test_groups_from_the_repository_cluster_yaml_leave_out_the_head():
    groups = groups_from_yaml(yaml.safe_load(CLUSTER_YAML.read_text()))
    assert set(groups) == {"cpu_decode", "gpu"} and groups["gpu"].gpus == 1 and groups["cpu_decode"].cpus == 16


def test_cli_prints_table_patch_and_assumptions(tmp_path, capfd):
    (tmp_path / "d.txt").write_text("5\n40\n")
    assert main(["plan", "--videos-per-night", "1000", "--hours", "2", "--durations", str(tmp_path / "d.txt"),
                 "--costs", str(tmp_path / "none.json")]) == 2
    assert "cannot read costs" in capfd.readouterr().err
    assert main(["plan", "--videos-per-night", "1000", "--hours", "2", "--durations", str(tmp_path / "d.txt"),
                 "--cluster-yaml", str(CLUSTER_YAML)]) == 0
    out = capfd.readouterr().out
    assert "bottleneck:" in out and "cluster.yaml patch:" in out and "min_workers:" in out and "assumptions:" in out
    patch = yaml.safe_load(out.split("cluster.yaml patch:\n")[1].split("assumptions:")[0])
    assert patch["available_node_types"]["cpu_decode"]["min_workers"] >= 1


def test_costs_from_an_embed_run_summary(tmp_path):
    """``--costs summary.json``: the stage metrics of a real run (decode and encode busy seconds per video)."""
    (tmp_path / "summary.json").write_text(json.dumps({"videos_processed": 10, "videos_ok": 9, "decode_seconds": 2.0,
                                                        "stage_seconds": {"decode": 2.0, "encode": 5.0}}))
    c = load_costs([tmp_path / "summary.json"])
    assert (c.decode_base_s, c.decode_per_sampled_s) == (0.2, 0.0)
    assert (c.encode_per_video_s, c.encode_per_frame_s) == (0.5, 0.0)
    p = plan_night(1000, 1, c, GROUPS, durations=[30.0], utilization=1.0, startup_s=0)
    assert [s.work for s in p.stages] == [pytest.approx(200.0), pytest.approx(500.0)]
