"""Generalisation benchmark: the registered models and the single-modality baselines on several generated corpora
(evidence layouts x seeds x class counts), scored on each corpus's held-out test split.

Nothing is tuned here: every model trains with the shipped defaults (``train.optim``, ``train.loss``, the model's
own builder defaults, the packaged MiniLM text tower) plus the tiny sizes of the demo preset, through the same
``raypipe.train.fit`` (Ray Train, same loop, same loss, same epoch choice on val) as ``raypipe train``. The epoch
is chosen on val; the table reports test F_sco, mean +- std over seeds, and the fusion-minus-best-single margin
per layout (fusion = DMAFNet; best single = the best of text_only / frames_only / audio_only on that corpus).

    raypipe bench generalization [--layouts split text_rich weak_text] [--seeds 0 1] [--models dmafnet ...]
        [--videos 64] [--epochs 8] [--out docs/generalization] [--merge]

(or ``python bench/bench_generalization.py ...`` from the repository root). Writes ``results.json`` (every run and
the wall time of every invocation), ``table.md`` and ``generalization.png`` under ``--out``. One local Ray
instance per invocation (take the machine-wide lock on a shared host). On a small shared host run it in chunks
(a few layouts/seeds each, ``--merge``) so no invocation holds the machine for long; the table covers every run
in results.json. ``--summarise-only`` rewrites table and PNG from results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# Class grid per layout (level1 x level2-per-level1): 4 to 9 classes, so no default is judged on one grid only.
GRIDS = {"split": (2, 2), "text_rich": (3, 2), "weak_text": (2, 3), "no_audio": (3, 3)}
SINGLE = ("text_only", "frames_only", "audio_only")
# Demo-preset sizes; DMAFNet keeps its default (pretrained MiniLM) text tower.
SIZES: dict[str, dict[str, Any]] = {
    "dmafnet": dict(frame_layers=1, frame_heads=2, fusion_layers=1, fusion_heads=2, proj_dim=16),
    "mfb": dict(k=2, o=16, clusters=2, dbof_size=16, nextvlad_out=16),
    "bilstm_attn": dict(lstm_hidden=8, text_categories=3),
    "cavnet": dict(dim=16, heads=2, gate_hidden=8, proj_dim=8),
    "wbdc_baseline": dict(clusters=4, groups=2, nextvlad_out=16),
    "frames_only": dict(aggregation="avgpool", hidden=32),
    "audio_only": dict(aggregation="avgpool", hidden=32),
    "text_only": dict(hidden=32),
}

# Diagnostic DMAFNet variants (``--variants``): trained on the same corpora, reported on VAL only (their test
# scores are not recorded), so a default can be chosen from them without reading a test row.
VARIANTS: dict[str, list[str]] = {
    "noaux": ["train.loss.contrastive=0", "train.loss.vtm=0"],  # classification loss only
}

log = logging.getLogger("bench_generalization")


def make_shards(layout: str, seed: int, videos: int, root: Path) -> str:
    from raypipe.config import CorpusConfig, load_config
    from raypipe.corpus import generate_corpus
    from raypipe.embed.pipeline import embed_videos

    n1, n2 = GRIDS[layout]
    info = generate_corpus(CorpusConfig(out=str(root / "corpus"), videos=videos, seed=1000 + seed, layout=layout,
                                        num_level1=n1, num_level2_per_level1=n2, noise_rate=0.1,
                                        max_duration_s=5.0, long_fraction=0.0, workers=2))
    cfg = load_config("test", [f"embed.source.uri={info.videos_dir}", f"embed.source.annotations={info.annotations_path}",
                               f"embed.output={root / 'features'}"])
    embed_videos(cfg)
    return str(root / "features")


def train_one(model: str, data: str, root: Path, seed: int, epochs: int, variant: str | None = None) -> dict[str, Any]:
    from raypipe.config import load_config
    from raypipe.train import fit

    cfg = load_config("demo", [
        f"train.data={data}", "train.taxonomy=null", f"train.storage_path={root / 'ray'}",
        # A variant gets its own run name: under the same name Ray Train would resume the shipped model's run.
        f"train.run_name={model}-{variant}" if variant else f"train.run_name={model}",
        f"model.name={model}", f"model.params={json.dumps(SIZES[model])}", f"train.seed={seed}",
        f"train.epochs={epochs}", "train.num_workers=1", "train.val_fraction=0.25", "train.test_fraction=0.25",
        "tracking.enabled=false", "train.register_model=false", *VARIANTS.get(variant or "", []),
    ])
    t0 = time.perf_counter()
    res = fit(cfg)
    test = None if variant else res.test_metrics.get("test/f_sco")  # variants: val only, by design
    return {"model": f"{model}@{variant}" if variant else model, "test_f_sco": test, "val_f_sco": res.best_value,
            "best_epoch": res.best_epoch, "epochs": epochs, "num_test": res.num_test, "seconds": time.perf_counter() - t0}


def _mean_sd(vals: list[float]) -> str:
    """``mean +- std`` over seeds; one seed is marked as such (a std of 0 would read as "stable")."""
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f} (1 seed)"
    return f"{statistics.mean(vals):.3f} +- {statistics.pstdev(vals):.3f}"


def summarise(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Markdown table (layout x model, test F_sco mean +- std) and the per-layout fusion margins."""
    layouts = sorted({r["layout"] for r in rows}, key=list(GRIDS).index)
    models = [m for m in SIZES if any(r["model"] == m for r in rows)]
    lines = ["| layout (classes) | " + " | ".join(models) + " | DMAFNet - best single (which, per seed) |",
             "|---|" + "---|" * (len(models) + 1)]
    margins: dict[str, Any] = {}
    for lay in layouts:
        cells = []
        for m in models:
            vals = [r["test_f_sco"] for r in rows if r["layout"] == lay and r["model"] == m]
            cells.append(_mean_sd(vals))
        per_seed, best = [], []
        for seed in sorted({r["seed"] for r in rows if r["layout"] == lay}):
            got = {r["model"]: r["test_f_sco"] for r in rows if r["layout"] == lay and r["seed"] == seed}
            singles = {m: got[m] for m in SINGLE if m in got}
            if "dmafnet" in got and singles:
                top = max(singles, key=singles.__getitem__)
                per_seed.append(got["dmafnet"] - singles[top])
                best.append(top)
        margins[lay] = {"per_seed": per_seed, "best_single_per_seed": best,
                        "mean": statistics.mean(per_seed) if per_seed else None,
                        "std": statistics.pstdev(per_seed) if per_seed else None}
        margin = (f"{margins[lay]['mean']:+.3f} +- {margins[lay]['std']:.3f} ({', '.join(best)})" if per_seed
                  else "-")
        n1, n2 = GRIDS[lay]
        lines.append(f"| {lay} ({n1 * n2}) | " + " | ".join(cells) + f" | {margin} |")
    return "\n".join(lines), margins


def val_table(rows: list[dict[str, Any]]) -> str:
    """DMAFNet as shipped vs its diagnostic variants: best-epoch VAL F_sco per layout (mean +- std over seeds)."""
    names = ["dmafnet", *sorted({r["model"] for r in rows if r["model"].startswith("dmafnet@")})]
    if len(names) == 1:
        return ""
    layouts = sorted({r["layout"] for r in rows}, key=list(GRIDS).index)
    lines = ["| layout | " + " | ".join(f"{n} (val)" for n in names) + " |", "|---|" + "---|" * len(names)]
    for lay in layouts:
        cells = []
        for n in names:
            vals = [r["val_f_sco"] for r in rows if r["layout"] == lay and r["model"] == n]
            cells.append(_mean_sd(vals))
        lines.append(f"| {lay} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layouts = sorted({r["layout"] for r in rows}, key=list(GRIDS).index)
    models = [m for m in SIZES if any(r["model"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(layouts), 4))
    width = 0.8 / max(1, len(models))
    for k, m in enumerate(models):
        vals = [[r["test_f_sco"] for r in rows if r["layout"] == lay and r["model"] == m] for lay in layouts]
        means = [np.mean(v) if v else np.nan for v in vals]
        sds = [np.std(v) if v else 0 for v in vals]
        ax.bar(np.arange(len(layouts)) + k * width, means, width, yerr=sds, label=m, capsize=2)
    ax.set_xticks(np.arange(len(layouts)) + 0.4 - width / 2, layouts)
    ax.set_ylabel("test F_sco")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("held-out test F_sco per evidence layout (mean +- std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_previous(path: Path) -> dict[str, Any]:
    """Runs and chunk timings of earlier invocations (``--merge``); a partial file (a list of runs) is accepted."""
    if not path.exists():
        return {"runs": [], "chunks": []}
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return {"runs": data, "chunks": []}
    return {"runs": data.get("runs", []), "chunks": data.get("chunks", [])}


def run_chunk(args: argparse.Namespace, previous: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Train ``args.models`` on each (layout, seed) corpus of this chunk; runs of the same (layout, seed, model)
    from earlier chunks are replaced, others kept. results.json is rewritten after every run (nothing is lost)."""
    import ray

    names = [*args.models, *(f"dmafnet@{v}" for v in args.variants)]
    fresh = {(lay, s, m) for lay in args.layouts for s in args.seeds for m in names}
    rows = [r for r in previous["runs"] if (r["layout"], r["seed"], r["model"]) not in fresh]
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for layout in args.layouts:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory(prefix=f"bench-gen-{layout}-{seed}-") as tmp:
                    data = make_shards(layout, seed, args.videos, Path(tmp))
                    for model, variant in [(m, None) for m in args.models] + [("dmafnet", v) for v in args.variants]:
                        row = {"layout": layout, "seed": seed, "videos": args.videos,
                               **train_one(model, data, Path(tmp), seed, args.epochs, variant)}
                        log.info("%s", row)
                        rows.append(row)
                        (out / "results.json").write_text(json.dumps({**previous, "runs": rows}, indent=1))
    finally:
        ray.shutdown()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", nargs="+", default=["split", "text_rich", "weak_text"], choices=list(GRIDS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--models", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="diagnostic DMAFNet variants, scored on val only")
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", default="docs/generalization")
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs already in OUT/results.json (other layouts/seeds/models) and add these: run a "
                         "big benchmark in chunks on a shared host, then the table covers all of them")
    ap.add_argument("--summarise-only", action="store_true", help="train nothing; rewrite the table and PNG from OUT/results.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = load_previous(out / "results.json") if (args.merge or args.summarise_only) else {"runs": [], "chunks": []}
    t0 = time.perf_counter()
    rows = previous["runs"] if args.summarise_only else run_chunk(args, previous, out)
    chunks = previous["chunks"] + ([] if args.summarise_only else [{"args": vars(args), "seconds": time.perf_counter() - t0}])
    table, margins = summarise(rows)
    (out / "results.json").write_text(json.dumps({"runs": rows, "margins": margins, "chunks": chunks,
                                                  "seconds": sum(c["seconds"] for c in chunks)}, indent=1))
    diagnostic = val_table(rows)
    (out / "table.md").write_text(table + "\n" + (f"\nValidation-only diagnostic:\n\n{diagnostic}\n" if diagnostic else ""))
    plot(rows, out / "generalization.png")
    print(table + (f"\n\n{diagnostic}" if diagnostic else ""))
    total = sum(c["seconds"] for c in chunks)
    print(f"\n{len(rows)} runs in {len(chunks)} invocation(s), {total:.0f} s of wall time in all; written to {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
