"""bench/bench_loop.py's ratios without running it: both readings of the plain-loop anchor come from the same
children's summaries, and the one with the loop's model start-up only ever adds that start-up to the loop's side."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_loop():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_loop", ROOT / "bench" / "bench_loop.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return mod


def _child(seconds: float, total: float, **kw) -> dict:
    return {"seconds": seconds, "total_s": total, "peak_rss_mb": 1000.0, "decode_s": seconds / 2, **kw}


def test_ratios_read_the_anchor_with_and_without_the_loops_model_start_up(bench_loop) -> None:
    plain = _child(60.0, 70.0, startup_s=6.0)
    pipe = _child(50.0, 58.0, first_row_s=10.0)
    staged = _child(66.0, 75.0)
    r = bench_loop.loop_ratios(plain, pipe, {"embed.inline_decode=false": staged}, {})
    assert r["pipeline_vs_plain_videos_per_s"] == pytest.approx(60 / 50, abs=1e-3)
    assert r["pipeline_vs_plain_videos_per_s_incl_model_startup"] == pytest.approx(66 / 50, abs=1e-3)
    assert r["pipeline_vs_plain_total_time"] == pytest.approx(58 / 70, abs=1e-3)
    assert r["pipeline_vs_plain_after_first_row"] == pytest.approx(60 / 40, abs=1e-3)
    assert r["plain_decode_share"] == pytest.approx(0.5)
    assert r["pipeline[embed.inline_decode=false]_vs_plain_videos_per_s"] == pytest.approx(60 / 66, abs=1e-3)
    assert r["pipeline[embed.inline_decode=false]_vs_plain_videos_per_s_incl_model_startup"] == pytest.approx(1.0)
    assert "pipeline_2cpu_vs_1cpu_videos_per_s" not in r


def test_one_cpu_ratios_are_added_when_the_scaling_runs_exist(bench_loop) -> None:
    plain, pipe = _child(60.0, 70.0, startup_s=6.0), _child(50.0, 58.0)
    one_cpu = {"plain": _child(100.0, 110.0, startup_s=8.0), "pipeline": _child(90.0, 99.0)}
    r = bench_loop.loop_ratios(plain, pipe, {}, one_cpu)
    assert r["pipeline_2cpu_vs_1cpu_videos_per_s"] == pytest.approx(90 / 50, abs=1e-3)
    assert r["plain_2cpu_vs_1cpu_videos_per_s"] == pytest.approx(100 / 60, abs=1e-3)
    assert r["pipeline_vs_plain_videos_per_s_1cpu"] == pytest.approx(100 / 90, abs=1e-3)
    assert "pipeline_vs_plain_after_first_row" not in r
