"""Embedding from WebDataset tar shards: peak memory while the number of shards grows 4x, measured side by side,
and the same videos as loose files for comparison.

One corpus is generated first and written as shards of ``--per-shard`` samples. Each run is a fresh process (own
local Ray); a sampler sums the RSS of that process and all its descendants (raylet, decode workers, encoder actor)
every 0.5 s, and separately the driver process alone (where the shard listing lives). Streaming means both stay
nearly flat while the shards (and videos) grow 4x: the driver reads only tar headers, each decode task reads its
own member by a ranged read into a temp file that it removes.

    .venv/bin/python bench/bench_wds.py [--shards 3 12] [--per-shard 2] [--preset test] [--out bench/results/bench_wds.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import _tree_rss_mb  # noqa: E402

CHILD = r"""
import json, sys, ray
from raypipe.config import load_config
from raypipe.embed.pipeline import embed_videos
source, out, preset, ann = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
overrides = [f"embed.source.uri={source}", f"embed.output={out}", "embed.progress_bars=false",
             "embed.source.annotations=" + (ann or "null")]
cfg = load_config(preset, overrides)
ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
print("START", flush=True)
s = embed_videos(cfg)
print("SUMMARY " + json.dumps(s), flush=True)
ray.shutdown()
"""


def _rss_mb(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def run_one(label: str, source: str, annotations: str, root: str, preset: str) -> dict:
    log_path = Path(root) / f"{label}.out"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, source, f"{root}/{label}-features", preset, annotations],
                                stdout=log, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        peak = driver = 0.0
        started = False
        while proc.poll() is None:
            started = started or "START" in log_path.read_text()
            if started:
                peak = max(peak, _tree_rss_mb(proc.pid))
                driver = max(driver, _rss_mb(proc.pid))
            time.sleep(0.5)
    summary = next((json.loads(line[8:]) for line in log_path.read_text().splitlines() if line.startswith("SUMMARY ")), None)
    if summary is None:
        raise RuntimeError(f"embed run {label} failed (exit {proc.returncode})")
    return {"run": label, "videos": summary["videos_listed"], "videos_ok": summary["videos_ok"],
            "videos_per_s": summary["videos_per_s"], "seconds": summary["seconds"],
            "peak_rss_mb": round(peak, 1), "driver_peak_rss_mb": round(driver, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, nargs=2, default=[3, 12])
    ap.add_argument("--per-shard", type=int, default=2)
    ap.add_argument("--preset", default="test")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    from raypipe.config import CorpusConfig
    from raypipe.corpus import generate_corpus
    from raypipe.corpus_webdataset import write_corpus_shards

    small, large = args.shards
    with tempfile.TemporaryDirectory(prefix="bench_wds_") as root:
        info = generate_corpus(CorpusConfig(out=f"{root}/corpus", videos=large * args.per_shard, seed=1,
                                            max_duration_s=4.0, long_fraction=0.0, workers=2))
        shards = write_corpus_shards(info, "vid", args.per_shard, out=f"{root}/shards")
        results = [
            run_one(f"tars-{small}", f"{root}/shards/vid-{{00000..{small - 1:05d}}}.tar", "", root, args.preset),
            run_one(f"tars-{large}", f"{root}/shards/vid-{{00000..{large - 1:05d}}}.tar", "", root, args.preset),
            run_one("loose", str(info.videos_dir), str(info.annotations_path), root, args.preset),
        ]
        shard_mb = sum(Path(p).stat().st_size for p in shards) / 2**20
    print(f"{'run':>10} {'videos':>7} {'videos/s':>9} {'seconds':>8} {'peak RSS MiB':>13} {'driver MiB':>11}")
    for r in results:
        print(f"{r['run']:>10} {r['videos']:>7} {r['videos_per_s']:>9.2f} {r['seconds']:>8.1f} {r['peak_rss_mb']:>13.0f} "
              f"{r['driver_peak_rss_mb']:>11.0f}")
    a, b, loose = results
    ratios = {
        "shards_x": large / small,
        "peak_rss_x": round(b["peak_rss_mb"] / max(a["peak_rss_mb"], 1e-9), 3),
        "driver_peak_rss_x": round(b["driver_peak_rss_mb"] / max(a["driver_peak_rss_mb"], 1e-9), 3),
        "throughput_x": round(b["videos_per_s"] / max(a["videos_per_s"], 1e-9), 3),
        "tars_vs_loose_throughput_x": round(b["videos_per_s"] / max(loose["videos_per_s"], 1e-9), 3),
        "tars_vs_loose_peak_rss_x": round(b["peak_rss_mb"] / max(loose["peak_rss_mb"], 1e-9), 3),
    }
    print(f"{large}/{small} shards: peak RSS x{ratios['peak_rss_x']:.2f}, driver x{ratios['driver_peak_rss_x']:.2f}, "
          f"throughput x{ratios['throughput_x']:.2f}; tars/loose at {b['videos']} videos: throughput "
          f"x{ratios['tars_vs_loose_throughput_x']:.2f}, peak RSS x{ratios['tars_vs_loose_peak_rss_x']:.2f}")
    if args.out:
        doc = {"benchmark": "bench_wds", "preset": args.preset, "per_shard": args.per_shard,
               "shards_total_mb": round(shard_mb, 1), "cpus": os.cpu_count(), "results": results, "ratios": ratios,
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
