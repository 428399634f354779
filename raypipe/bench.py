"""``raypipe bench``: run the benchmark scripts in ``bench/`` (each prints ratios measured side by side).

Benchmarks live outside the package on purpose: they are for developers of a checkout, measure this machine,
and must never gate the test suite (speed targets are not asserted in tests).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from raypipe.config import RaypipeConfig

log = logging.getLogger(__name__)


def find_benchmarks(root: Path) -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted((root / "bench").glob("bench_*.py"))}


def run(cfg: RaypipeConfig, names: list[str] | None = None, script_args: list[str] | None = None) -> int:
    """Run the named benchmarks (all by default), each as ``python bench/bench_NAME.py *script_args``."""
    available = find_benchmarks(Path.cwd())
    if not available:
        log.error("no bench/bench_*.py here: run raypipe bench from the repository root")
        return 2
    unknown = sorted(set(names or []) - set(available))
    if unknown:
        log.error("unknown benchmark(s) %s; available: %s", unknown, ", ".join(available))
        return 2
    failed = 0
    for name in names or list(available):
        log.info("running benchmark %s (%s)", name, available[name])
        cmd = [sys.executable, str(available[name]), *(script_args or [])]
        failed += subprocess.run(cmd, check=False).returncode != 0
    return 1 if failed else 0
