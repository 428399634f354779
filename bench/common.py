"""What every benchmark records with its figures: the machine, the versions and when (bench/results/*.json)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

CONTENDED = ("taken on a shared development host (2 CPUs, several other engineers' jobs running): absolute "
             "figures vary run to run; the ratios measured side by side in one run are what counts")


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("ray", "torch", "av", "timm", "transformers", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "loadavg_at_start": load, "note": CONTENDED},
        "versions": versions,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(path: str, result: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=1) + "\n")


def mean_sd(vals: list[float]) -> str:
    """``mean +- std`` over seeds; one seed is marked as such (a std of 0 would read as "stable")."""
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f} (1 seed)"
    return f"{statistics.mean(vals):.3f} +- {statistics.pstdev(vals):.3f}"
