"""``raypipe label`` (one Ray Data stream: decode -> encode -> classify -> prediction shards) against a plain loop
applying the same encoders and the same classifier to the same videos.

The anchor: one process calling raypipe's own :func:`decode_video`, :class:`FusedEncoder` and the classifier's
``predict_proba`` on batches of 8, keeping the top-k (what anyone would write first). The classifier is a DMAFNet
checkpoint written from a freshly built model (untrained: throughput does not depend on the weights; its labels
mean nothing). Both sides run in fresh child processes on the same generated corpus with the planned 2-CPU config;
``--repeats`` alternates them so the ratio is measured side by side in one invocation. Needs the Ray lock:

    flock /tmp/raypipe-ray.lock env PYTHONPATH=$PWD .venv/bin/python bench/bench_label.py [--videos 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loop import run_child  # noqa: E402
from common import environment, write_result  # noqa: E402

PLAIN = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from raypipe.classifier import load_classifier
from raypipe.config import load_config
from raypipe.embed.pipeline import FusedEncoder
from raypipe.io.decode import decode_video
from raypipe.io.sources import list_videos
from raypipe.resources import Cluster, plan_embed
from raypipe.runtime import apply_plan
corpus, out, preset, cpus, ckpt = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
cfg = load_config(preset or None, [f"embed.source.uri={corpus}/videos", f"embed.source.annotations={corpus}/annotations.json"])
cfg = apply_plan(cfg, plan_embed(cfg.embed, Cluster.single(cpus)))
e = cfg.embed
refs = list_videos(e.source, cfg.storage)
enc = FusedEncoder(e, cfg.storage)
clf = load_classifier(ckpt, cfg.storage)
t_ready = time.perf_counter()
print("START", flush=True)
ok = 0
for i in range(0, len(refs), 8):
    rows = [decode_video(r, e.decode, image_size=e.frames.image_size, storage=cfg.storage) for r in refs[i:i + 8]]
    batch = {k: np.stack([r[k] for r in rows]) if isinstance(rows[0][k], np.ndarray) else np.array([r[k] for r in rows], dtype=object)
             for k in rows[0]}
    feats = enc(batch)
    good = np.flatnonzero(np.asarray(feats["status"]).astype(str) == "ok")
    if len(good):
        proba = clf.predict_proba({k: v[good] for k, v in feats.items()})
        top = np.argsort(-proba, axis=1, kind="stable")[:, :cfg.label.top_k]
        ok += len(top)
t_end = time.perf_counter()
print("SUMMARY " + json.dumps({"videos": len(refs), "videos_ok": ok, "startup_s": t_ready - t0, "seconds": t_end - t_ready,
                               "total_s": t_end - t0}), flush=True)
"""

PIPE = r"""
import json, sys, time
t0 = time.perf_counter()
import ray
from raypipe.config import load_config
from raypipe.label import label_videos
corpus, out, preset, cpus, ckpt = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
cfg = load_config(preset or None, [f"embed.source.uri={corpus}/videos", f"embed.source.annotations={corpus}/annotations.json",
                                   f"label.model_uri={ckpt}", f"label.output={out}", "tracking.enabled=false",
                                   "embed.progress_bars=false", "label.max_failure_rate=1.0"])
ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
print("START", flush=True)
s = label_videos(cfg)
n = s["labelled"] + s["failed"]
print("SUMMARY " + json.dumps({"videos": n, "videos_ok": s["labelled"], "seconds": s["duration_s"],
                               "total_s": time.perf_counter() - t0, "failed": s["failed"]}), flush=True)
ray.shutdown()
"""


def write_untrained_checkpoint(cfg, path: Path, classes: list[str]) -> None:
    """A DMAFNet checkpoint for ``cfg``'s encoders (dims from :func:`feature_info`), weights as initialised."""
    from dataclasses import asdict

    import numpy as np
    import torch

    from raypipe.classifier import write_checkpoint
    from raypipe.config import config_to_dict
    from raypipe.embed.pipeline import feature_info
    from raypipe.models import create_model, resolve_kwargs
    from raypipe.models.registry import with_defaults

    info = feature_info(cfg)
    kwargs = with_defaults(cfg.model.name, resolve_kwargs(
        cfg.model.name, info=info, num_classes=len(classes), multi_label=False,
        loss_weights=cfg.train.loss.model_dump(), params=dict(cfg.model.params)))
    torch.manual_seed(0)
    model = create_model(cfg.model.name, **kwargs)
    opt = torch.optim.AdamW(model.parameters())
    meta = {"model_name": cfg.model.name, "model_kwargs": kwargs, "classes": classes, "task": "single_label",
            "shard_info": asdict(info), "val_fraction": 0.2, "test_fraction": 0.0, "has_split_column": False,
            "epoch": 0, "metrics": {}, "history": [], "run_name": "bench-label-untrained", "mlflow_run_id": None,
            "config": config_to_dict(cfg)}
    path.mkdir(parents=True, exist_ok=True)
    write_checkpoint(path, model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                     scaler=torch.amp.GradScaler("cpu", enabled=False), meta=meta,
                     val_scores=np.zeros((0, len(classes))), val_targets=np.zeros(0), val_ids=np.zeros(0, dtype=object))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=60)
    ap.add_argument("--cpus", type=float, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--preset", default="test", help="encoders and model (test: the tiny ones of the suite)")
    ap.add_argument("--out", default="bench/results/bench_label.json")
    args = ap.parse_args()
    from raypipe.config import CorpusConfig, load_config
    from raypipe.corpus import generate_corpus
    from raypipe.resources import Cluster, plan_embed
    from raypipe.runtime import apply_plan

    with tempfile.TemporaryDirectory(prefix="bench_label_") as tmp:
        root = Path(tmp) / "corpus"
        generate_corpus(CorpusConfig(out=str(root), videos=args.videos, seed=9, max_duration_s=10.0, long_fraction=0.0,
                                     bad_inputs=True, num_level1=2, num_level2_per_level1=2, workers=2))
        cfg = load_config(args.preset, [f"embed.source.uri={root}/videos"])
        cfg = apply_plan(cfg, plan_embed(cfg.embed, Cluster.single(args.cpus)))
        classes = sorted(json.loads((root / "taxonomy.json").read_text())["level2"])
        ckpt = Path(tmp) / "ckpt"
        write_untrained_checkpoint(cfg, ckpt, classes)
        runs: dict[str, list[dict]] = {"plain": [], "pipeline": []}
        for i in range(args.repeats):
            extra = [str(ckpt)]
            runs["plain"].append(run_child(PLAIN, str(root), f"{tmp}/plain{i}", args.preset, args.cpus, extra))
            runs["pipeline"].append(run_child(PIPE, str(root), f"{tmp}/labels{i}", args.preset, args.cpus, extra))
    ratios = [round((r["videos"] / r["seconds"]) / (p["videos"] / p["seconds"]), 3)
              for p, r in zip(runs["plain"], runs["pipeline"], strict=True)]
    result = {"benchmark": "bench_label", **environment(), "cpus": args.cpus, "preset": args.preset,
              "corpus": {"generator": "raypipe.corpus seed=9 max_duration_s=10 bad_inputs=true 2x2 classes",
                         "files": runs["plain"][0]["videos"]},
              "model": "dmafnet (test preset sizes), untrained weights", "runs": runs,
              "ratios": {"pipeline_vs_plain_videos_per_s": ratios}}
    write_result(args.out, result)
    print(f"{'run':<11} {'videos':>6} {'ok':>4} {'work s':>7} {'videos/s':>8} {'peak RSS MiB':>12}")
    for side, rs in runs.items():
        for i, r in enumerate(rs):
            print(f"{side + '_' + str(i):<11} {r['videos']:>6} {r['videos_ok']:>4} {r['seconds']:>7.1f} "
                  f"{r['videos'] / r['seconds']:>8.2f} {r['peak_rss_mb']:>12.0f}")
    print("raypipe label / plain loop, videos/s: " + ", ".join(f"x{x:.2f}" for x in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
