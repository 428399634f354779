"""Generalisation benchmark: the registered models and the single-modality baselines on several generated corpora
(evidence layouts x seeds x class counts), scored on each corpus's held-out test split.

Protocol (docs/GENERALIZATION.md): every model trains with the shipped defaults (``train.optim`` with the model's
own default lr, ``train.loss``, the model's own builder defaults, the packaged MiniLM text tower) plus the tiny
sizes of the demo preset, through
the same ``raypipe.train.fit`` as ``raypipe train``, with the same epoch budget and early stopping on val for all
(``--epochs``, ``--patience``); the single-modality baselines (``--lr-grid-models``, DMAFNet too when named there)
also get their lr chosen per corpus on val from ``--lrs`` (only the chosen run's test score is kept; ``--reuse``
takes a candidate an earlier chunk already ran instead of training it again). The epoch is chosen on val; the table
reports test F_sco, mean +- std over seeds, and the fusion-minus-best-single margin per layout (fusion = DMAFNet;
best single = the best of text_only / frames_only / audio_only on that corpus's test split).

    raypipe bench generalization [--layouts split text_rich weak_text] [--seeds 0 1] [--models dmafnet ...]
        [--epochs 24] [--patience 6] [--lrs 3e-4 3e-3] [--lr-grid-models ...] [--cache DIR]
        [--out docs/generalization] [--merge [--reuse]]

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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_sd  # noqa: E402

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
    "videobert": {},  # the single stream *is* the packaged MiniLM: no tiny stack to set
    "frames_only": dict(aggregation="avgpool", hidden=32),
    "audio_only": dict(aggregation="avgpool", hidden=32),
    "text_only": dict(hidden=32),
}

# Diagnostic DMAFNet variants (``--variants``): trained on the same corpora, reported on VAL only (their test
# scores are not recorded), so a default can be chosen from them without reading a test row.
VARIANTS: dict[str, list[str]] = {
    "noaux": ["train.loss.contrastive=0", "train.loss.vtm=0"],  # classification loss only
    # The contrastive (MIL-NCE) weight down from the paper's 1.0 to the VTM's 0.25: between the shipped objective
    # and noaux, so a gain or loss from the auxiliary losses can be read as a function of their weight.
    "con025": ["train.loss.contrastive=0.25"],
    # The audio stream as DMAFNet input too (the paper's default is frames + text): where a layout puts evidence
    # in the audio (weak_text: the audio backs up a text that is wrong half the time), fusion without it cannot use it.
    "audio": ["model.params.modalities=[frames,audio,text]"],
    # One classifier head per input stream beside the fused head (train.loss.unimodal, deep supervision): keeps
    # the frame stream learning its own evidence where the fused head would lean on a wrong text.
    "uni": ["train.loss.unimodal=1.0"],
    # Modality dropout (model.params.modality_dropout): 30% of the training clips classified from one stream
    # alone, the other emptied (the paper's robustness study drops 30% of the features, at test time only).
    "drop": ["model.params.modality_dropout=0.3"],
}

log = logging.getLogger("bench_generalization")


def make_shards(layout: str, seed: int, videos: int, root: Path, cache: Path | None = None) -> str:
    """Generate and embed one corpus; with ``cache``, reuse the shards an earlier chunk embedded for the same
    (layout, seed, videos) (the generator and the embedders are deterministic, so the shards are the same)."""
    from raypipe.config import CorpusConfig, load_config
    from raypipe.corpus import generate_corpus
    from raypipe.embed.pipeline import embed_videos

    base = cache / f"{layout}-s{seed}-v{videos}" if cache else root
    done = base / "features.done"
    if done.exists():
        log.info("reusing the embedded corpus %s", base)
        return str(base / "features")
    n1, n2 = GRIDS[layout]
    info = generate_corpus(CorpusConfig(out=str(base / "corpus"), videos=videos, seed=1000 + seed, layout=layout,
                                        num_level1=n1, num_level2_per_level1=n2, noise_rate=0.1,
                                        max_duration_s=5.0, long_fraction=0.0, workers=2))
    cfg = load_config("test", [f"embed.source.uri={info.videos_dir}", f"embed.source.annotations={info.annotations_path}",
                               f"embed.output={base / 'features'}"])
    embed_videos(cfg)
    done.write_text("ok\n")
    return str(base / "features")


def train_one(model: str, data: str, root: Path, seed: int, args: argparse.Namespace, variant: str | None = None,
              lr: float | None = None) -> dict[str, Any]:
    """One ``fit``: the shipped defaults plus the protocol's epoch budget and early stopping (both on val)."""
    from raypipe.config import load_config
    from raypipe.train import fit
    from raypipe.train_worker import base_lr

    # A variant or an lr candidate gets its own run name: under the same name Ray Train would resume another run.
    name = model + (f"-{variant}" if variant else "") + (f"-lr{lr:g}" if lr is not None else "")
    cfg = load_config("demo", [
        f"train.data={data}", "train.taxonomy=null", f"train.storage_path={root / 'ray'}", f"train.run_name={name}",
        f"model.name={model}", f"model.params={json.dumps(SIZES[model])}", f"train.seed={seed}",
        f"train.epochs={args.epochs}", f"train.early_stopping_patience={args.patience}" if args.patience else
        "train.early_stopping_patience=null", "train.num_workers=1", "train.val_fraction=0.25",
        "train.test_fraction=0.25", "tracking.enabled=false", "train.register_model=false",
        *([f"train.optim.lr={lr}"] if lr is not None else []), *VARIANTS.get(variant or "", []),
    ])
    t0 = time.perf_counter()
    res = fit(cfg)
    test = None if variant else res.test_metrics.get("test/f_sco")  # variants: val only, by design
    return {"model": f"{model}@{variant}" if variant else model, "test_f_sco": test, "val_f_sco": res.best_value,
            "best_epoch": res.best_epoch, "epochs_run": len(res.history), "epochs": args.epochs,
            "patience": args.patience, "lr": lr if lr is not None else base_lr(cfg), "num_test": res.num_test,
            # val F_sco per epoch: what a shorter budget or another patience would have chosen, read from val only
            "val_curve": [h.get("val/f_sco") for h in res.history], "seconds": time.perf_counter() - t0}


def _same_lr(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(1.0, b)


def reusable(earlier: list[dict[str, Any]], model: str, lr: float, args: argparse.Namespace) -> dict[str, Any] | None:
    """An earlier run (same corpus, already filtered by the caller) of ``model`` at ``lr`` under the same protocol
    (epochs, patience, no variant): its chosen row (``model``) or a losing candidate (``model@lr=...``). Such a run
    is what training it again would give (same corpus, seed and defaults), so ``--reuse`` takes it instead."""
    for r in earlier:
        name = r["model"].split("@lr=")[0]
        if (name == model and r.get("lr") is not None and _same_lr(r["lr"], lr)
                and r.get("epochs") == args.epochs and r.get("patience") == args.patience):
            return r
    return None


def train_model(model: str, data: str, root: Path, seed: int, args: argparse.Namespace,
                earlier: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The model's row for the table, plus (for a model in ``--lr-grid-models``) one val-only row per losing lr.

    A model in the lr grid trains once per ``--lrs`` value; the lr with the best val F_sco (ties: the smaller lr)
    is its row, with its test score; the other candidates keep their val score only (``model@lr=...``, test
    None), so the choice is made, and can be checked, without reading a test row. ``earlier`` (``--reuse``): runs
    of this corpus from earlier chunks; a candidate found there (``reusable``) is taken, not retrained (marked
    ``reused``). A reused losing candidate that had been reported with a test score keeps it as
    ``earlier_test_f_sco``: already published, so kept visible, but never the table's number."""
    if model not in args.lr_grid_models:
        return [train_one(model, data, root, seed, args)]
    cands = []
    for lr in args.lrs:
        hit = reusable(earlier or [], model, lr, args)
        if hit is None:
            cands.append(train_one(model, data, root, seed, args, lr=lr))
        else:
            log.info("reusing the earlier %s run at lr %g (val %s)", model, lr, hit["val_f_sco"])
            keep = {k: v for k, v in hit.items() if k not in ("layout", "seed", "videos", "lr_candidates")}
            cands.append(dict(keep, model=model, reused=True))
    best = max(cands, key=lambda r: (r["val_f_sco"] or 0.0, -r["lr"]))
    rows = [dict(best, lr_candidates={f"{r['lr']:g}": r["val_f_sco"] for r in cands})]
    for r in cands:
        if r is not best:
            shown = {"earlier_test_f_sco": r["test_f_sco"]} if r.get("reused") and r["test_f_sco"] is not None else {}
            rows.append(dict(r, model=f"{model}@lr={r['lr']:g}", test_f_sco=None, **shown))
    return rows


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
            cells.append(mean_sd(vals))
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
        spread = f"+- {margins[lay]['std']:.3f}" if len(per_seed) > 1 else "(1 seed)"
        margin = f"{margins[lay]['mean']:+.3f} {spread} ({', '.join(best)})" if per_seed else "-"
        n1, n2 = GRIDS[lay]
        lines.append(f"| {lay} ({n1 * n2}) | " + " | ".join(cells) + f" | {margin} |")
    return "\n".join(lines), margins


def val_table(rows: list[dict[str, Any]], base_lr: float | None = None) -> str:
    """DMAFNet as shipped vs its diagnostic variants: best-epoch VAL F_sco per layout (mean +- std over seeds).

    The variants train at the shipped lr of their day; where DMAFNet's own lr was chosen on val, its column is its
    run at that ``base_lr`` (from ``lr_candidates``), not the val-chosen maximum of several lrs (that would flatter it). A
    variant may have run on fewer seeds than DMAFNet: its cell also gives its mean difference from DMAFNet on the
    seeds both have, the number a default is chosen on."""
    # lr candidates (``dmafnet@lr=...``) exist only where they lost: their means would be biased; see lr_val_table.
    names = ["dmafnet", *sorted({r["model"] for r in rows
                                 if r["model"].startswith("dmafnet@") and "@lr=" not in r["model"]})]
    if len(names) == 1:
        return ""

    def val(r: dict[str, Any]) -> float:
        cands = r.get("lr_candidates") or {}
        return cands.get(f"{base_lr:g}", r["val_f_sco"]) if base_lr is not None else r["val_f_sco"]

    layouts = sorted({r["layout"] for r in rows}, key=list(GRIDS).index)
    head = [f"dmafnet lr={base_lr:g} (val)" if base_lr is not None else "dmafnet (val)",
            *(f"{n} (val; minus dmafnet, same seeds)" for n in names[1:])]
    lines = ["| layout | " + " | ".join(head) + " |", "|---|" + "---|" * len(names)]
    for lay in layouts:
        base = {r["seed"]: val(r) for r in rows if r["layout"] == lay and r["model"] == "dmafnet"}
        cells = [f"{mean_sd(list(base.values()))} ({len(base)} seeds)"]
        for n in names[1:]:
            got = {r["seed"]: r["val_f_sco"] for r in rows if r["layout"] == lay and r["model"] == n}
            diffs = [v - base[s] for s, v in got.items() if s in base]
            diff = f"; {statistics.mean(diffs):+.3f} on {len(diffs)} seeds" if diffs else ""
            cells.append(mean_sd(list(got.values())) + diff)
        lines.append(f"| {lay} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(rows: list[dict[str, Any]]) -> str:
    """Per corpus (layout, seed): test F_sco (val F_sco) of DMAFNet and of each single-modality baseline, and the
    margin over the best single on test: the issue's "not worse than its best input" is checked per seed here.
    The last column is the same margin on val (best val single): the only margin a default may be chosen on."""
    lines = ["| layout | seed | " + " | ".join(("dmafnet", *SINGLE)) + " | DMAFNet - best single | same on val |",
             "|---|---|" + "---|" * (len(SINGLE) + 3)]
    for lay, seed in sorted({(r["layout"], r["seed"]) for r in rows}, key=lambda k: (list(GRIDS).index(k[0]), k[1])):
        got = {r["model"]: r for r in rows if r["layout"] == lay and r["seed"] == seed}
        cells = [f"{got[m]['test_f_sco']:.3f} ({got[m]['val_f_sco']:.3f})" if m in got else "-"
                 for m in ("dmafnet", *SINGLE)]
        singles = [got[m]["test_f_sco"] for m in SINGLE if m in got]
        margin = f"{got['dmafnet']['test_f_sco'] - max(singles):+.3f}" if "dmafnet" in got and singles else "-"
        vals = [got[m]["val_f_sco"] for m in SINGLE if m in got]
        on_val = f"{got['dmafnet']['val_f_sco'] - max(vals):+.3f}" if "dmafnet" in got and vals else "-"
        lines.append(f"| {lay} | {seed} | " + " | ".join(cells) + f" | {margin} | {on_val} |")
    return "\n".join(lines)


def lr_table(rows: list[dict[str, Any]]) -> str:
    """The val-chosen lr of each lr-grid model per corpus, with the val F_sco of every candidate (how the choice
    was made) and the epochs each chosen run trained before early stopping."""
    picked = [r for r in rows if r.get("lr_candidates")]
    if not picked:
        return ""
    lines = ["| layout | seed | model | chosen lr | val F_sco per lr | best / run epochs |", "|---|---|---|---|---|---|"]
    for r in sorted(picked, key=lambda r: (list(GRIDS).index(r["layout"]), r["seed"], r["model"])):
        cands = ", ".join(f"{k}: {v:.3f}" for k, v in r["lr_candidates"].items())
        lines.append(f"| {r['layout']} | {r['seed']} | {r['model']} | {r['lr']:g} | {cands} | "
                     f"{r['best_epoch']} / {r.get('epochs_run', '?')} |")
    return "\n".join(lines)


def lr_val_table(rows: list[dict[str, Any]]) -> str:
    """Per layout and lr-grid model: the best-epoch VAL F_sco of every lr candidate, mean +- std over the seeds that
    ran it (from the chosen rows' ``lr_candidates``, so every candidate counts, chosen or not): what the val
    evidence says about an lr, read without a test row."""
    picked = [r for r in rows if r.get("lr_candidates")]
    if not picked:
        return ""
    lines = ["| layout | model | val F_sco per lr (mean +- std over seeds) |", "|---|---|---|"]
    for lay in sorted({r["layout"] for r in picked}, key=list(GRIDS).index):
        for m in sorted({r["model"] for r in picked if r["layout"] == lay}):
            per_lr: dict[str, list[float]] = {}
            for r in picked:
                if r["layout"] == lay and r["model"] == m:
                    for k, v in r["lr_candidates"].items():
                        per_lr.setdefault(k, []).append(v)
            cells = ", ".join(f"{k}: {mean_sd(v)}" for k, v in sorted(per_lr.items(), key=lambda kv: float(kv[0])))
            lines.append(f"| {lay} | {m} | {cells} |")
    return "\n".join(lines)


def shipped_vs_chosen(rows: list[dict[str, Any]], shipped_lr: float, model: str = "dmafnet") -> str:
    """Per corpus: ``model`` at the shipped lr and at its val-chosen lr, test (val) F_sco. The shipped run's test
    number comes from its chosen row or, where it lost on val, from ``earlier_test_f_sco`` (published before the
    lr grid ran); where neither exists it is "-" (the choice never needs it)."""
    chosen = [r for r in rows if r["model"] == model and r.get("lr_candidates")]
    if not chosen:
        return ""
    lines = [f"| layout | seed | chosen lr | {model} at chosen lr | at shipped lr {shipped_lr:g} |", "|---|---|---|---|---|"]
    for c in sorted(chosen, key=lambda r: (list(GRIDS).index(r["layout"]), r["seed"])):
        if _same_lr(c["lr"], shipped_lr):
            ship: dict[str, Any] | None = c
        else:
            ship = next((r for r in rows if r["layout"] == c["layout"] and r["seed"] == c["seed"]
                         and r["model"] == f"{model}@lr={shipped_lr:g}"), None)
        shipped = "-"
        if ship is not None:
            test = ship["test_f_sco"] if ship is c else ship.get("earlier_test_f_sco")
            shipped = f"{test:.3f}" if test is not None else "-"
            shipped += f" ({ship['val_f_sco']:.3f})"
        lines.append(f"| {c['layout']} | {c['seed']} | {c['lr']:g} | {c['test_f_sco']:.3f} ({c['val_f_sco']:.3f}) "
                     f"| {shipped} |")
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


def replace_runs(kept: list[dict[str, Any]], got: list[dict[str, Any]], *, layout: str, seed: int, name: str,
                 videos: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(kept without the earlier runs of (layout, seed, name), got as result rows)``: called once a model's runs
    on one corpus are done, so an earlier run leaves results.json only when its replacement is written."""
    kept = [r for r in kept if (r["layout"], r["seed"], r["model"].split("@lr=")[0]) != (layout, seed, name)]
    rows = [{"layout": layout, "seed": seed, "videos": videos, **r} for r in got]
    for row in rows:
        log.info("%s", row)
    return kept, rows


def run_chunk(args: argparse.Namespace, previous: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Train ``args.models`` on each (layout, seed) corpus of this chunk; runs of the same (layout, seed, model)
    from earlier chunks are replaced, others kept. results.json is rewritten after every run, and an earlier run is
    dropped only when its replacement is there, so a chunk stopped half-way (timeout, kill) loses nothing."""
    import ray

    kept, rows = list(previous["runs"]), []
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for layout in args.layouts:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory(prefix=f"bench-gen-{layout}-{seed}-") as tmp:
                    cache = Path(args.cache) if args.cache else None
                    data = make_shards(layout, seed, args.videos, Path(tmp), cache)
                    jobs = [(m, None) for m in args.models] + [("dmafnet", v) for v in args.variants]
                    earlier = [r for r in previous["runs"] if r["layout"] == layout and r["seed"] == seed
                               and r.get("videos") == args.videos] if args.reuse else []
                    for model, variant in jobs:
                        got = (train_model(model, data, Path(tmp), seed, args, earlier) if variant is None
                               else [train_one(model, data, Path(tmp), seed, args, variant)])
                        name = model if variant is None else f"dmafnet@{variant}"
                        kept, new = replace_runs(kept, got, layout=layout, seed=seed, name=name, videos=args.videos)
                        rows += new
                        (out / "results.json").write_text(json.dumps({**previous, "runs": kept + rows}, indent=1))
    finally:
        ray.shutdown()
    return kept + rows


def shipped_lr(model: str) -> float:
    """The lr ``model`` trains at from the demo preset the benchmark starts from (its shipped default)."""
    from raypipe.config import load_config
    from raypipe.train_worker import base_lr

    return base_lr(load_config("demo", [f"model.name={model}"]))


def variant_lr(rows: list[dict[str, Any]]) -> float | None:
    """The one lr every diagnostic variant was trained at (the shipped lr of its day), or None: the variants of the
    64-video record trained at 3e-4, DMAFNet's shipped lr before the per-model defaults."""
    lrs = {r["lr"] for r in rows if r["model"].startswith("dmafnet@") and "@lr=" not in r["model"] and "lr" in r}
    return lrs.pop() if len(lrs) == 1 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", nargs="+", default=["split", "text_rich", "weak_text"], choices=list(GRIDS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--models", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="diagnostic DMAFNet variants, scored on val only")
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=24, help="epoch budget of every model (the same for all)")
    ap.add_argument("--patience", type=int, default=6,
                    help="train.early_stopping_patience for every model (epochs without a better val F_sco); 0 = off")
    ap.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 3e-3],
                    help="train.optim.lr candidates of the models in --lr-grid-models, chosen per corpus on val")
    ap.add_argument("--lr-grid-models", nargs="*", default=list(SINGLE), choices=list(SIZES),
                    help="models whose lr is chosen on val from --lrs (default: the single-modality baselines, so "
                         "the fusion margin is measured against baselines at their best val lr)")
    ap.add_argument("--cache", default=None,
                    help="folder for embedded corpora, reused by later chunks (same layout, seed, videos)")
    ap.add_argument("--out", default="docs/generalization")
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs already in OUT/results.json (other layouts/seeds/models) and add these: run a "
                         "big benchmark in chunks on a shared host, then the table covers all of them")
    ap.add_argument("--reuse", action="store_true",
                    help="with --merge: an lr candidate that an earlier chunk already ran on the same corpus under the "
                         "same protocol (epochs, patience) is taken from results.json, not retrained")
    ap.add_argument("--summarise-only", action="store_true", help="train nothing; rewrite the table and PNG from OUT/results.json")
    args = ap.parse_args()
    if args.reuse and not args.merge:
        ap.error("--reuse needs --merge (the runs to reuse are those already in OUT/results.json)")
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
    grid = any(r["model"] == "dmafnet" and r.get("lr_candidates") for r in rows)
    base = shipped_lr("dmafnet") if grid else None
    diagnostic = val_table(rows, (variant_lr(rows) or base) if grid else None)
    lrs, lr_val = lr_table(rows), lr_val_table(rows)
    ship = shipped_vs_chosen(rows, base) if base is not None else ""
    (out / "table.md").write_text(table + "\n\nPer corpus, test F_sco (val F_sco in brackets):\n\n"
                                  + per_seed_table(rows) + "\n"
                                  + (f"\nValidation-only diagnostic:\n\n{diagnostic}\n" if diagnostic else "")
                                  + (f"\nlr chosen on val per corpus:\n\n{lrs}\n" if lrs else "")
                                  + (f"\nVal F_sco per lr candidate (mean +- std over seeds):\n\n{lr_val}\n" if lr_val else "")
                                  + (f"\nDMAFNet at its val-chosen lr vs at the shipped lr, test (val) F_sco:\n\n{ship}\n"
                                     if ship else ""))
    plot(rows, out / "generalization.png")
    print(table + (f"\n\n{diagnostic}" if diagnostic else ""))
    total = sum(c["seconds"] for c in chunks)
    print(f"\n{len(rows)} runs in {len(chunks)} invocation(s), {total:.0f} s of wall time in all; written to {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
