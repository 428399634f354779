"""`raypipe bench`: the smallest benchmark run through the CLI from the repository root, as the README shows it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.own_cluster  # the benchmark's child process starts a Ray instance of its own

REPO = Path(__file__).resolve().parents[2]


def _raypipe(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "raypipe.cli", "bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_smallest_embed_benchmark_prints_its_table() -> None:
    res = _raypipe("embed", "--sizes", "3", "--no-compare")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    row = re.search(r"^\s+3\s+fused\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)$", res.stdout, re.M)
    assert row, res.stdout
    videos_per_s, seconds, frames, peak_mb = float(row[1]), float(row[2]), int(row[3]), int(row[4])
    assert videos_per_s > 0 and seconds > 0 and peak_mb > 100  # Ray + torch processes: hundreds of MiB
    assert frames >= 3  # at least one sampled frame per video (clips of a few seconds, 1 fps)


def test_unknown_benchmark_is_refused_with_the_list() -> None:
    res = _raypipe("nope", timeout=120)
    assert res.returncode == 2 and "unknown benchmark(s) ['nope']; available: decode, embed," in res.stderr
