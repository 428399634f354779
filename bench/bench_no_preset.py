"""A run without a preset: the ``auto`` training schedule against the fixed one it replaced, side by side.

``raypipe train --data ... --set model.name=M`` with nothing else set: full-size models (no preset), the default
workers (2 on a small host), the default splits (val 0.2, test 0.2). Two protocols per model and corpus:

* ``auto``: the defaults (``train.epochs`` / ``batch_size`` / ``early_stopping_patience: auto``,
  :func:`raypipe.config.train.auto_schedule`);
* ``old``: the fixed defaults before them (5 epochs, batch 16 per worker, no early stopping).

The choice between them is read from ``val``; ``test`` is recorded beside it. Corpora are the generalisation
benchmark's embedded shards (``--cache`` of ``bench_generalization.py``, one folder per layout/seed/size).

    python bench/bench_no_preset.py --cache /tmp/gen160/cache --corpora split-s0-v160 weak_text-s0-v160 \
        --models dmafnet text_only frames_only --out bench/results/no_preset_schedule.jsonl

``--set KEY=VALUE`` (repeatable) runs a variant on top of the protocol and records it in the row's ``set`` field
(session 13: ``--set model.params.pool=mean`` against the default rows of the same corpora). ``--summary ROWS``
prints, per corpus kind, DMAFNet minus the best single-modality baseline (mean +- std over seeds) and runs nothing:

    python bench/bench_no_preset.py --summary bench/results/no_preset_12class.jsonl

Appends one JSON line per run to ``--out`` (take the machine-wide lock on a shared host: one local Ray per run).
The committed rows (session 12) came from this script's prototype, which set the same ``auto`` numbers explicitly
(their ``extra`` field) and ``train.num_workers=2``; the summary table is in docs/GENERALIZATION.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_sd  # noqa: E402

PROTOCOLS = {
    "auto": [],
    "old": ["train.epochs=5", "train.batch_size=16", "train.early_stopping_patience=null"],
}


def run_one(data: str, model: str, protocol: str, root: Path, extra: list[str]) -> dict:
    from raypipe.config import load_config
    from raypipe.train import fit

    cfg = load_config(None, [f"train.data={data}", f"train.storage_path={root}", f"model.name={model}",
                             "tracking.enabled=false", "train.register_model=false",
                             f"train.run_name={model}-{protocol}", *PROTOCOLS[protocol], *extra])
    t0 = time.perf_counter()
    res = fit(cfg)
    return {"model": model, "proto": protocol, "val": res.best_value, "test": res.test_metrics.get("test/f_sco"),
            "best_epoch": res.best_epoch, "epochs_run": len(res.history), "num_test": res.num_test,
            "s": round(time.perf_counter() - t0, 1)}


def margins_table(rows: list[dict], proto: str = "auto") -> str:
    """Markdown: per corpus kind (the corpus name without its ``-sSEED-...`` part), DMAFNet minus the better of
    text_only and frames_only on val and on test, mean +- std over the seeds that have all three (default rows
    only: a row with a ``set`` variant is left out)."""
    runs: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["proto"] == proto and not r.get("set"):
            runs.setdefault(r["corpus"], {})[r["model"]] = r
    kinds: dict[str, list[tuple[float, float]]] = {}
    for corpus, got in runs.items():
        if {"dmafnet", "text_only", "frames_only"} <= got.keys():
            margin = [got["dmafnet"][s] - max(got["text_only"][s], got["frames_only"][s]) for s in ("val", "test")]
            kinds.setdefault(corpus.split("-s")[0], []).append((margin[0], margin[1]))
    lines = ["| corpus kind | seeds | DMAFNet - best single, val | same, test |", "|---|---|---|---|"]
    for kind, ms in sorted(kinds.items()):
        cells = [mean_sd(list(v)) for v in zip(*ms, strict=True)]
        lines.append(f"| {kind} | {len(ms)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", metavar="JSONL", help="print the margins table of these rows and exit (no runs)")
    ap.add_argument("--cache", help="bench_generalization's --cache folder")
    ap.add_argument("--corpora", nargs="+", help="folders under --cache, e.g. split-s0-v160")
    ap.add_argument("--models", nargs="+", default=["dmafnet", "text_only", "frames_only"])
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override on top of the protocol (a variant under test; recorded in the row)")
    ap.add_argument("--out", default="bench/results/no_preset_schedule.jsonl")
    args = ap.parse_args()
    if args.summary:
        print(margins_table([json.loads(line) for line in Path(args.summary).read_text().splitlines() if line]))
        return 0
    if not (args.cache and args.corpora):
        ap.error("--cache and --corpora are required to run (or --summary to read rows)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for corpus in args.corpora:
        for model in args.models:
            for protocol in args.protocols:
                with tempfile.TemporaryDirectory(prefix="no_preset_") as tmp:
                    data = f"{args.cache}/{corpus}/features"
                    row = {"corpus": corpus, **run_one(data, model, protocol, Path(tmp), args.overrides)}
                if args.overrides:
                    row["set"] = args.overrides
                logging.info("%s", row)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
