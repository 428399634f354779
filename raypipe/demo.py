"""``raypipe demo``: the whole product on one laptop, on embedded defaults.

    corpus (generated) -> embed -> train (2 DDP workers) -> register (MLflow, SQLite) -> label a new corpus

Every step is the same code a cluster runs; the demo only chains them and says where everything went. Each step
is incremental, so running the demo twice is safe and the second run does (almost) no work: corpora already
generated are kept, committed shards are skipped, a finished training run is not repeated, and videos already
labelled by the registered model version are skipped.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from raypipe.config import RaypipeConfig

log = logging.getLogger(__name__)


def _ensure_corpus(corpus_cfg: Any) -> Any:
    """Generate the corpus unless a batch with this id prefix is already there (generation replaces a batch)."""
    from raypipe.corpus import CorpusInfo, generate_corpus

    root = Path(corpus_cfg.out)
    if (root / "corpus.json").is_file():
        info = CorpusInfo.load(root)
        if any(v.video_id.startswith(corpus_cfg.id_prefix) for v in info.videos):
            log.info("corpus at %s already generated: kept", root)
            return info
    return generate_corpus(corpus_cfg)


def _train_once(cfg: RaypipeConfig) -> dict[str, Any]:
    """Train and register, or reuse the result of a finished earlier demo run with the same config."""
    from raypipe.train import fit

    marker = Path(cfg.train.storage_path) / f"{cfg.train.run_name}.result.json"
    fingerprint = cfg.model_dump_json(include={"model", "train", "embed"})
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("fingerprint") == fingerprint:
            log.info("training run %s already finished: reusing its registered model", cfg.train.run_name)
            return saved["result"]
    result = fit(cfg)
    summary = {
        "run_name": result.run_name,
        "metric": result.metric,
        "best_metrics": result.best_metrics,
        "test_metrics": result.test_metrics,
        "num_test": result.num_test,
        "best_checkpoint": result.best_checkpoint,
        "mlflow_run_id": result.mlflow_run_id,
        "registered_model_name": result.registered_model_name,
        "registered_model_version": result.registered_model_version,
    }
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fingerprint, "result": summary}, indent=1, default=str))
    return summary


def run_demo(cfg: RaypipeConfig) -> dict[str, Any]:
    from raypipe.embed.pipeline import embed_videos
    from raypipe.label import label_videos
    from raypipe.logs import log_file
    from raypipe.runtime import session_log_dir

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 1)

    t = time.perf_counter()
    corpus = _ensure_corpus(cfg.corpus)
    lap("corpus", t)

    t = time.perf_counter()
    train_cfg = cfg.model_copy(deep=True)
    train_cfg.embed.source.uri = str(corpus.videos_dir)
    train_cfg.embed.source.annotations = str(corpus.annotations_path)
    embed_summary = embed_videos(train_cfg)
    lap("embed", t)

    t = time.perf_counter()
    train_cfg.train.data = train_cfg.embed.output
    trained = _train_once(train_cfg)
    lap("train", t)

    t = time.perf_counter()
    new_corpus = _ensure_corpus(
        cfg.corpus.model_copy(
            update={
                "out": cfg.demo.label_corpus_out,
                "videos": cfg.demo.label_videos,
                "seed": cfg.demo.label_seed,
                "id_prefix": cfg.demo.label_id_prefix,
            }
        )
    )
    label_cfg = cfg.model_copy(deep=True)
    label_cfg.embed.source.uri = str(new_corpus.videos_dir)
    label_cfg.embed.source.annotations = str(new_corpus.annotations_path)
    label_cfg.label.model_uri = (
        f"models:/{cfg.tracking.registered_model_name}@{cfg.tracking.champion_alias}"
        if trained.get("registered_model_version")
        else str(trained["best_checkpoint"])
    )
    label_summary = label_videos(label_cfg)
    lap("label", t)
    timings["total"] = round(time.perf_counter() - t0, 1)
    return {
        "corpus": str(corpus.root),
        "label_corpus": str(new_corpus.root),
        "features": train_cfg.embed.output,
        "embed": embed_summary,
        "train": trained,
        "label": label_summary,
        "mlflow": cfg.tracking.tracking_uri,
        "timings_s": timings,
        "log_file": log_file(),
        "ray_logs": session_log_dir(),
    }


def format_report(report: dict[str, Any]) -> str:
    train = report["train"]
    metrics = train.get("best_metrics") or {}
    label = report["label"]
    headline = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val/"))
    test = train.get("test_metrics") or {}
    test_line = (f"{train.get('num_test')} rows: " + ", ".join(
        f"{k}={v:.4f}" for k, v in sorted(test.items()) if not k.endswith("/n"))) if test else "no test rows"
    lines = [
        "raypipe demo finished",
        f"  corpus            {report['corpus']}",
        f"  feature shards    {report['features']}",
        f"  training run      {train.get('run_name')} (MLflow run {train.get('mlflow_run_id')})",
        f"  validation        {headline or 'n/a'}  (the epoch was chosen on these)",
        f"  held-out test     {test_line}",
        f"  registered model  {train.get('registered_model_name')} v{train.get('registered_model_version')} "
        "(@challenger; a model's first version is also @champion, later ones wait for `raypipe promote`)",
        f"  labelled with     version {(label.get('model') or {}).get('version')} "
        f"({(label.get('model') or {}).get('requested_uri')})",
        f"  labelled corpus   {report['label_corpus']}",
        f"  predictions       {label.get('output')}",
        f"  labelling         {label.get('labelled', 0)} labelled, {label.get('skipped', 0)} skipped, "
        f"{label.get('failed', 0)} failed",
        f"  MLflow            {report['mlflow']}   (mlflow ui --backend-store-uri {report['mlflow']})",
        "  seconds           " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()),
    ]
    if report.get("log_file"):
        lines.append(f"  log file          {report['log_file']}   (Ray worker logs: {report.get('ray_logs')})")
    return "\n".join(lines)


def run(cfg: RaypipeConfig) -> int:
    report = run_demo(cfg)
    report_path = Path(cfg.demo.report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1, default=str))
    from raypipe.label import format_table

    sys.stdout.write(format_report(report) + "\n\n" + format_table(report["label"]) + "\n")
    failure_rate = report["label"].get("failure_rate", 0.0)
    return 0 if failure_rate <= cfg.label.max_failure_rate else cfg.label.failure_exit_code
