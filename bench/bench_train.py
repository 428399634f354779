"""``raypipe train`` (Ray Train, 1 worker) against a plain PyTorch loop on the same model, data and optimizer.

The anchor: one process that reads the feature shards with pyarrow, builds the same model (same builder kwargs,
same seed), the same objective, AdamW groups and schedule, and runs raypipe's own ``forward_backward`` /
``optimizer_step`` on shuffled batches, validating every epoch and saving its best weights with ``torch.save``
(what anyone would write first). Two figures, kept apart:

* **steps/s after warm-up**: optimizer steps of epochs 2..E over the training seconds of those epochs (batches
  fetched and stepped; validation and checkpoints excluded), on both sides the same definition (Ray's from
  ``train/epoch_s`` of the run history);
* **start-up**: from the process start to the first optimizer step, split into phases (imports, config and shard
  checks, Ray start, MLflow run, datasets, worker group, model build, first batch: :func:`raypipe.train_timeline.phase_seconds`),
  and the rest of the wall time (validation, checkpoints, final logging, test scoring, registration) beside it;
* **Ray Train's floor**: once per repeat, the same Ray start and worker group running a loop that does nothing
  (``FLOOR``): the part of the start-up that belongs to Ray and Ray Train, not to raypipe (``--no-floor`` skips it).

Each run is a fresh child process (the way ``raypipe train`` runs), plain and Ray alternated ``--repeats`` times
on the same shards, so every ratio is measured side by side in one invocation. Needs the machine-wide Ray lock:

    flock /tmp/raypipe-ray.lock env PYTHONPATH=$PWD .venv/bin/python bench/bench_train.py [--videos 64] [--epochs 6]
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
from common import environment, write_result  # noqa: E402

PLAIN = r"""
import json, sys, time
marks = [("start", float(sys.argv[1]))]
import numpy as np, torch, pyarrow.parquet as pq
from raypipe.config import load_config
from raypipe.data import prepare_batch, to_torch
from raypipe.losses import FusionObjective
from raypipe.models import create_model
from raypipe.models.resolve import contrastive_loss_kind, effective_loss_weights
from raypipe.config import LossConfig
from raypipe.io import fs as rfs
from raypipe.metrics import compute_metrics
from raypipe.train import prepare
from raypipe.train_worker import (amp_setup, forward_backward, lr_schedule, needs_pairs, optimizer_step, param_groups,
                                  seed_everything, steps_per_epoch, validate_batches)
marks.append(("imports", time.time()))
if int(sys.argv[5]):
    torch.set_num_threads(int(sys.argv[5]))
cfg = load_config(sys.argv[2], json.loads(sys.argv[3]))
cfg, spec, kwargs = prepare(cfg)
t = cfg.train
marks.append(("prepare", time.time()))
arrays = {"train": [], "val": []}
for uri in spec.files:
    fs, path = rfs.resolve(uri, cfg.storage)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=spec.columns)
    for split in arrays:
        part = prepare_batch(table, info=spec.info, classes=spec.classes, task=spec.task, split=split,
                             val_fraction=spec.val_fraction, test_fraction=spec.test_fraction)
        if len(part["video_id"]):
            arrays[split].append(part)
data = {s: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} for s, parts in arrays.items()}
marks.append(("datasets", time.time()))
seed_everything(t.seed)
model = create_model(cfg.model.name, **kwargs)
loss_cfg = LossConfig(**effective_loss_weights(cfg.model.name, t.loss.model_dump()))
objective = FusionObjective.from_config(loss_cfg, t.task, contrastive_loss=contrastive_loss_kind(model))
val_objective = FusionObjective(task=t.task, classification=1.0, contrastive=0.0, mlm=0.0, vtm=0.0)
optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=t.optim.lr)
scheduler = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lr_schedule(t.optim, steps_per_epoch=steps_per_epoch(spec, cfg, 1), epochs=t.epochs))
autocast, scaler = amp_setup(torch.device("cpu"), "none")
aux = needs_pairs(loss_cfg)
marks.append(("model_ready", time.time()))
n_train = len(data["train"]["video_id"])
epochs, best = [], None
key = "label" if t.task == "single_label" else "labels"
for epoch in range(1, t.epochs + 1):
    seed_everything(t.seed * 100_003 + epoch * 1_009)
    order = np.random.default_rng(t.seed * 7_919 + epoch).permutation(n_train)
    model.train()
    t0, steps = time.perf_counter(), 0
    for i in range(0, n_train, t.batch_size):
        idx = order[i:i + t.batch_size]
        if aux and len(idx) < 2:
            continue
        if epoch == 1 and steps == 0:
            marks.append(("first_batch", time.time()))
        batch = to_torch({k: v[idx] for k, v in data["train"].items() if k != "video_id"}, "cpu")
        forward_backward(model, batch, objective, autocast=autocast, scaler=scaler, grad_accum=1, sync_grads=True)
        optimizer_step(model, optimizer, scheduler, scaler, t.optim.grad_clip)
        steps += 1
        if epoch == 1 and steps == 1:
            marks.append(("first_step", time.time()))
    train_s = time.perf_counter() - t0
    marks.append((f"epoch_{epoch}_train", time.time()))
    model.eval()
    v = data["val"]
    batches = [{k: a[i:i + t.batch_size] for k, a in v.items()} for i in range(0, len(v["video_id"]), t.batch_size)]
    val = validate_batches(model, batches, rank=0, world=1, device="cpu", autocast=autocast, objective=val_objective,
                           task=t.task, target_key=key, cache=None)
    m = compute_metrics(val.scores, val.targets, task=t.task, classes=spec.classes, prefix="val/")
    marks.append((f"epoch_{epoch}_val", time.time()))
    if best is None or m[t.metric] > best:
        best = m[t.metric]
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, sys.argv[4] + "/best.pt")
    marks.append((f"epoch_{epoch}_checkpoint", time.time()))
    epochs.append({"epoch": epoch, "steps": steps, "train_s": train_s, t.metric: m[t.metric]})
print("SUMMARY " + json.dumps({"timeline": marks, "epochs": epochs, "best": best}), flush=True)
"""

RAY = r"""
import json, sys, time
marks = [("start", float(sys.argv[1]))]
from raypipe.config import load_config
from raypipe.train import fit
marks.append(("imports", time.time()))
cfg = load_config(sys.argv[2], json.loads(sys.argv[3]))
res = fit(cfg)
t = cfg.train
epochs = [{"epoch": int(h["epoch"]), "train_s": h["train/epoch_s"], t.metric: h.get(t.metric)} for h in res.history]
print("SUMMARY " + json.dumps({"timeline": marks + [tuple(m) for m in res.timeline], "epochs": epochs,
                               "best": res.best_value, "registered": res.registered_model_version}), flush=True)
"""

# Ray Train's own start-up: the same Ray start as ``raypipe train`` (``ensure_ray``, imports of torch, timm and
# transformers warmed beside ``ray.init``), the worker group it plans, and a loop that only notes the time it was
# entered; ``trainer.fit`` to the loop is Ray Train's part alone, which no raypipe change can cut (Train V2 starts
# its controller, a placement-group cleaner, a synchronization actor, the worker and a dataset manager, each a
# fresh process).
FLOOR = r"""
import json, sys, time
marks = [("start", float(sys.argv[1]))]
from raypipe.config import load_config
from raypipe.runtime import ensure_ray, planned
from raypipe.train import worker_group_configs
marks.append(("imports", time.time()))
cfg = load_config(sys.argv[2], json.loads(sys.argv[3]))
ensure_ray(cfg)
marks.append(("ray_init", time.time()))
cfg, _ = planned(cfg, "train")
from ray.train import RunConfig
from ray.train.torch import TorchTrainer
torch_config, scaling_config = worker_group_configs(cfg.train)
entered = sys.argv[4] + "/floor_entered.txt"
def loop(_):
    with open(entered, "w") as f:
        f.write(repr(time.time()))
trainer = TorchTrainer(loop, torch_config=torch_config, scaling_config=scaling_config,
                       run_config=RunConfig(storage_path=cfg.train.storage_path, name="floor"))
marks.append(("trainer_built", time.time()))
trainer.fit()
returned = time.time()
marks += [("worker_start", float(open(entered).read())), ("fit_returned", returned)]
print("SUMMARY " + json.dumps({"timeline": marks}), flush=True)
"""

CHILD_TIMEOUT_S = 300


def run_child(code: str, preset: str, overrides: list[str], workdir: str, name: str, threads: int = 0,
              pythonpath: str | None = None) -> dict:
    """One child process; returns its SUMMARY plus wall time (process start to exit) and peak tree RSS.
    ``pythonpath``: import raypipe from that tree instead (``--before-tree``)."""
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    log_path = Path(workdir) / f"{name}.log"
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, repr(start), preset, json.dumps(overrides), workdir, str(threads)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_mb(proc.pid))
            time.sleep(0.5)
            if time.time() - start > CHILD_TIMEOUT_S:
                proc.kill()  # its Ray processes die with their raylet's parent
    wall = time.time() - start
    for line in log_path.read_text().splitlines():
        if line.startswith("SUMMARY "):
            return {**json.loads(line[len("SUMMARY "):]), "wall_s": round(wall, 2), "peak_rss_mb": round(peak, 1)}
    raise RuntimeError(f"{name} failed (exit {proc.returncode}); last output:\n{log_path.read_text()[-3000:]}")


def steady_steps_per_s(epochs: list[dict], steps_per_epoch: int) -> float:
    """Steps/s over epochs 2..E (epoch 1 is the warm-up); every epoch runs ``steps_per_epoch`` steps."""
    later = [e for e in epochs if e["epoch"] > 1] or epochs
    return steps_per_epoch * len(later) / max(sum(e["train_s"] for e in later), 1e-9)


def summarise_run(r: dict, steps_per_epoch: int) -> dict:
    """steps/s after warm-up, start-up (process start to the first step) and its phases, the rest of the wall."""
    from raypipe.train_timeline import phase_seconds

    phases = phase_seconds([tuple(m) for m in r["timeline"]])
    epoch_keys = [k for k in phases if k.startswith("epoch_")]
    return {
        "steps_per_s": round(steady_steps_per_s(r["epochs"], steps_per_epoch), 3),
        "startup_s": phases.get("startup"),
        "startup_phases": {k: v for k, v in phases.items() if not k.startswith("epoch_") and k != "startup"},
        "train_s": round(sum(phases[k] for k in epoch_keys if k.endswith("_train")), 2),
        "val_s": round(sum(phases[k] for k in epoch_keys if k.endswith("_val")), 2),
        "checkpoint_s": round(sum(phases[k] for k in epoch_keys if k.endswith("_checkpoint")), 2),
        "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "best": r["best"],
        "epoch_train_s": [round(e["train_s"], 2) for e in r["epochs"]],
    }


def summarise_floor(r: dict) -> dict:
    """Ray Train's fixed start-up: process start to the (empty) loop, Ray start and Train's own part apart."""
    from raypipe.train_timeline import phase_seconds

    phases = phase_seconds([tuple(m) for m in r["timeline"]])
    t = dict(r["timeline"])
    return {"to_loop_s": round(t["worker_start"] - t["start"], 2), "phases": phases, "wall_s": r["wall_s"],
            "peak_rss_mb": r["peak_rss_mb"]}


def make_shards(root: Path, videos: int) -> str:
    """Feature shards of a generated corpus (demo class grid), embedded once with the tiny test encoders."""
    import ray

    from raypipe.config import CorpusConfig, load_config
    from raypipe.corpus import generate_corpus
    from raypipe.embed.pipeline import embed_videos

    info = generate_corpus(CorpusConfig(out=str(root / "corpus"), videos=videos, seed=3, num_level1=2,
                                        num_level2_per_level1=2, noise_rate=0.1, max_duration_s=5.0,
                                        long_fraction=0.0, workers=2))
    cfg = load_config("test", [f"embed.source.uri={info.videos_dir}", f"embed.source.annotations={info.annotations_path}",
                               f"embed.output={root / 'features'}"])
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        embed_videos(cfg)
    finally:
        ray.shutdown()
    return str(root / "features")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2, help="plain and Ray runs, alternated")
    ap.add_argument("--preset", default="demo", help="the model and train settings (demo: DMAFNet + MiniLM)")
    ap.add_argument("--data-dir", default=None, help="make the shards here once and reuse them")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VAL", help="extra overrides for both sides")
    ap.add_argument("--ray-variant", action="append", default=[], metavar="KEY=VAL[,KEY=VAL]",
                    help="also run Ray with these overrides in every repeat (e.g. the settings before a change)")
    ap.add_argument("--plain-threads", type=int, default=0, help="torch threads of the plain loop (0: torch's default)")
    ap.add_argument("--before-tree", default=None, metavar="DIR",
                    help="also run the Ray side with raypipe imported from DIR (a checkout of an earlier commit), "
                         "labelled 'before', in every repeat")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the Ray Train floor run (an empty loop on the same Ray and worker group) per repeat")
    ap.add_argument("--out", default="bench/results/bench_train.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(args.data_dir or tmp)
        data = str(root / "features")
        if not (root / "features").is_dir():
            make_shards(root, args.videos)
        runs: dict[str, list[dict]] = {"plain": [], "ray": [], **{f"ray[{v}]": [] for v in args.ray_variant},
                                       **({"before": []} if args.before_tree else {})}
        floors: list[dict] = []
        for i in range(args.repeats):
            common = [f"train.data={data}", "train.taxonomy=null", "train.num_workers=1", f"train.epochs={args.epochs}",
                      f"train.storage_path={tmp}/ray_{i}", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow_{i}.db",
                      "train.early_stopping_patience=null", *args.set]
            runs["plain"].append(run_child(PLAIN, args.preset, common, tmp, f"plain_{i}", args.plain_threads))
            runs["ray"].append(run_child(RAY, args.preset, common, tmp, f"ray_{i}"))
            for j, v in enumerate(args.ray_variant):
                extra = [f"train.storage_path={tmp}/ray_{i}_{j}", *[x for x in v.split(",") if x]]
                runs[f"ray[{v}]"].append(run_child(RAY, args.preset, common + extra, tmp, f"ray_{i}_{j}"))
            if args.before_tree:
                runs["before"].append(run_child(RAY, args.preset, common + [f"train.storage_path={tmp}/before_{i}"],
                                                tmp, f"before_{i}", pythonpath=args.before_tree))
            if args.floor:
                floors.append(run_child(FLOOR, args.preset, common + [f"train.storage_path={tmp}/floor_{i}"], tmp,
                                        f"floor_{i}"))
        from raypipe.config import load_config
        from raypipe.train import prepare

        cfg, spec, _ = prepare(load_config(args.preset, [f"train.data={data}", "train.taxonomy=null", *args.set]))
    steps = runs["plain"][0]["epochs"][0]["steps"]
    table = {side: [summarise_run(r, steps) for r in rs] for side, rs in runs.items()}
    ratios = [{f"{side}_vs_plain_steps_per_s": round(table[side][i]["steps_per_s"] / p["steps_per_s"], 3)
               for side in table if side != "plain"}
              | {f"{side}_startup_s": table[side][i]["startup_s"] for side in table}
              | {f"{side}_vs_plain_wall": round(table[side][i]["wall_s"] / p["wall_s"], 3) for side in table if side != "plain"}
              for i, p in enumerate(table["plain"])]
    result = {"benchmark": "bench_train", **environment(), "preset": args.preset, "overrides": args.set,
              "before_tree": args.before_tree,
              "plain_threads": args.plain_threads or "torch default",
              "corpus": {"generator": "raypipe.corpus seed=3 2x2 classes max_duration_s=5, test-preset encoders",
                         "videos": args.videos, "train_rows": spec.num_train, "val_rows": spec.num_val,
                         "test_rows": spec.num_test, "batch_size": cfg.train.batch_size, "steps_per_epoch": steps,
                         "epochs": args.epochs, "model": cfg.model.name},
              "runs": table, "ratios": ratios, "ray_train_floor": [summarise_floor(r) for r in floors]}
    write_result(args.out, result)
    print(f"{'run':<12} {'steps/s':>8} {'start-up s':>10} {'train s':>8} {'val s':>6} {'ckpt s':>7} {'wall s':>7} {'RSS MiB':>8}")
    for side, rs in table.items():
        for i, r in enumerate(rs):
            print(f"{(side[:8] + '_' + str(i)):<12} {r['steps_per_s']:>8.2f} {r['startup_s']:>10.1f} {r['train_s']:>8.1f} {r['val_s']:>6.1f} "
                  f"{r['checkpoint_s']:>7.1f} {r['wall_s']:>7.1f} {r['peak_rss_mb']:>8.0f}")
            print("    start-up phases: " + ", ".join(f"{k} {v:.1f}" for k, v in r["startup_phases"].items()))
    for i, f in enumerate(result["ray_train_floor"]):
        ph = f["phases"]
        print(f"floor_{i}: process start to an empty Train loop {f['to_loop_s']:.1f} s (ray_init {ph['ray_init']:.1f}, "
              f"trainer.fit to the loop {ph['worker_start']:.1f}); fit returned {ph['fit_returned']:.1f} s later")
    for i, r in enumerate(ratios):
        for side in (s for s in table if s != "plain"):
            print(f"repeat {i}: {side} / plain steps/s x{r[f'{side}_vs_plain_steps_per_s']:.2f}, start-up "
                  f"{r[f'{side}_startup_s']:.1f} s vs {r['plain_startup_s']:.1f} s, wall x{r[f'{side}_vs_plain_wall']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
