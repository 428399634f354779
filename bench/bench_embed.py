"""Embedding throughput and peak memory, measured side by side: a small vs a 4x larger corpus, and the three
encoder pools vs one fused pool (``embed.fuse_encoders``) on the small corpus.

Each run is a fresh process (own local Ray); a sampler sums the RSS of that process and all its descendants
(raylet, decode workers, encoder actors) every 0.5 s. Streaming means peak memory should stay nearly flat while
the corpus grows 4x; videos/s should not drop. The fused pool should start fewer processes and use less memory.

    .venv/bin/python bench/bench_embed.py [--sizes 50 200] [--preset test] [--no-compare]
    raypipe bench embed --sizes 3 --no-compare     # the smallest run: one size, the fused pool only
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

CHILD = r"""
import json, sys, ray
from raypipe.config import CorpusConfig, load_config
from raypipe.corpus import generate_corpus
from raypipe.embed.pipeline import embed_videos
n, root, preset, fused = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
info = generate_corpus(CorpusConfig(out=f"{root}/corpus", videos=n, seed=1, max_duration_s=12.0, long_fraction=0.0, workers=2))
cfg = load_config(preset, [f"embed.source.uri={info.videos_dir}", f"embed.source.annotations={info.annotations_path}",
                           f"embed.output={root}/features", "embed.progress_bars=false",
                           f"embed.fuse_encoders={fused}"])
ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
print("START", flush=True)
s = embed_videos(cfg)
print("SUMMARY " + json.dumps(s), flush=True)
ray.shutdown()
"""


def _tree_rss_mb(pid: int) -> float:
    """Sum of RSS over pid and its descendants, from /proc (no psutil dependency)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            rss[int(d)] = int(stat.rsplit(")", 1)[1].split()[21]) * os.sysconf("SC_PAGE_SIZE")
            children.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total / 2**20


def run_size(n: int, preset: str, *, fused: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench_embed_{n}_") as root:
        log_path = Path(root) / "child.out"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(n), root, preset, str(fused).lower()], stdout=log, stderr=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            peak, summary, started = 0.0, None, False
            while proc.poll() is None:
                started = started or "START" in log_path.read_text()
                if started:  # measure the embed run, not corpus generation
                    peak = max(peak, _tree_rss_mb(proc.pid))
                time.sleep(0.5)
        buf = log_path.read_text()
        for line in buf.splitlines():
            if line.startswith("SUMMARY "):
                summary = json.loads(line[len("SUMMARY "):])
        if summary is None:
            raise RuntimeError(f"embed run with {n} videos failed (exit {proc.returncode})")
        return {"videos": n, "graph": "fused" if fused else "3 pools", "videos_per_s": summary["videos_per_s"], "seconds": summary["seconds"],
                "frames": summary["frames"], "peak_rss_mb": round(peak, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--preset", default="test")
    ap.add_argument("--no-compare", action="store_true", help="skip the three-pool run at the first size")
    ap.add_argument("--out", default=None, help="also write the results as JSON (machine, versions) here")
    args = ap.parse_args()
    results = [run_size(n, args.preset, fused=True) for n in args.sizes]
    if not args.no_compare:
        results.append(run_size(args.sizes[0], args.preset, fused=False))
    print(f"{'videos':>8} {'graph':>8} {'videos/s':>10} {'seconds':>9} {'frames':>8} {'peak RSS MiB':>13}")
    for r in results:
        print(f"{r['videos']:>8} {r['graph']:>8} {r['videos_per_s']:>10.2f} {r['seconds']:>9.1f} {r['frames']:>8} "
              f"{r['peak_rss_mb']:>13.0f}")
    fused, pools = results[0], results[-1]
    if not args.no_compare:
        print(f"fused / 3 pools at {fused['videos']} videos: throughput x{fused['videos_per_s'] / max(pools['videos_per_s'], 1e-9):.2f}, "
              f"peak RSS x{fused['peak_rss_mb'] / max(pools['peak_rss_mb'], 1e-9):.2f}")
    ratios = {}
    if len(args.sizes) >= 2:
        a, b = results[0], results[len(args.sizes) - 1]
        ratios = {"videos_x": round(b["videos"] / a["videos"], 2),
                  "throughput_x": round(b["videos_per_s"] / max(a["videos_per_s"], 1e-9), 3),
                  "peak_rss_x": round(b["peak_rss_mb"] / max(a["peak_rss_mb"], 1e-9), 3)}
        print(f"ratio {b['videos']}/{a['videos']} videos (fused): throughput x{ratios['throughput_x']:.2f}, "
              f"peak RSS x{ratios['peak_rss_x']:.2f}")
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import environment, write_result

        write_result(args.out, {"benchmark": "bench_embed", **environment(), "preset": args.preset,
                                "corpus": "raypipe.corpus seed=1 max_duration_s=12 long_fraction=0", "results": results,
                                "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
