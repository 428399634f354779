"""An experiment's results as one JSON document (per table, row and column: our mean +- std over seeds, the
paper's number, the ordering check), written with its Markdown and PNG views (:mod:`raypipe.experiment_tables`)
and logged to MLflow as a parent run with one child run per row (set up by :mod:`raypipe.tracking`)."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from raypipe import experiment_tables
from raypipe.config import RaypipeConfig
from raypipe.experiments.spec import ExperimentSpec, RowSpec, TableSpec

log = logging.getLogger(__name__)


def _cell(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def row_doc(table: TableSpec, row: RowSpec, seeds: list[int], keys: dict[tuple[str, str, int], str],
            results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": row.name, "label": row.label or row.name, "set": row.set, "paper": row.paper}
    if row.pending is not None:
        return {**entry, "status": "pending", "reason": f"not run: {row.pending}"}
    done = {s: results[keys[(table.name, row.name, s)]] for s in seeds if keys[(table.name, row.name, s)] in results}
    ours: dict[str, Any] = {}
    for col in table.columns():
        if col.pending is not None:
            ours[col.key] = {"reason": f"not run: {col.pending}"}
            continue
        # a zero-shot row (eval.zero_shot) is its held-out classes' test rows scored against the class names
        part = [(res.get("zero_shot") or res["test"]) if col.corruption is None else res["corrupted"][col.corruption]
                for res in done.values()]
        ours[col.key] = _cell([float(p[col.metric]) for p in part if col.metric in p])
    status = "ok" if len(done) == len(seeds) else ("failed" if not done else "partial")
    return {**entry, "status": status, "ours": ours, "seeds": sorted(done),
            "keys": [keys[(table.name, row.name, s)] for s in seeds],
            "best_epochs": [res["best_epoch"] for res in done.values()],
            "trial_seconds": [round(res["seconds"], 1) for res in done.values()]}


def build_doc(exp: ExperimentSpec, *, scale: str, seeds: list[int], keys: dict[tuple[str, str, int], str],
              results: dict[str, dict[str, Any]], data: str, ran: list[str], seconds: float,
              tables: list[str] | None = None) -> dict[str, Any]:
    out_tables = []
    for table in exp.tables:
        if tables and table.name not in tables:
            continue
        tdoc = {"name": table.name, "title": table.title, "note": table.note, "metrics": table.metrics,
                "paper_order": table.paper_order,
                "columns": [{"key": c.key, "label": c.label, "metric": c.metric, "corruption": c.corruption,
                             "pending": c.pending} for c in table.columns()],
                "rows": [row_doc(table, r, seeds, keys, results) for r in table.rows]}
        tdoc["ordering"] = experiment_tables.ordering(tdoc)
        out_tables.append(tdoc)
    num_test = sorted({r["num_test"] for r in results.values()})
    return {"experiment": exp.name, "paper": exp.paper, "dataset": exp.dataset, "scale": scale, "seeds": seeds,
            "data": data, "num_test": num_test[0] if len(num_test) == 1 else num_test, "trials_run": len(ran),
            "trials_total": len(set(keys.values())), "seconds": round(seconds, 1),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tables": out_tables}


def write_outputs(cfg: RaypipeConfig, exp: ExperimentSpec, *, scale: str, seeds: list[int],
                  keys: dict[tuple[str, str, int], str], results: dict[str, dict[str, Any]], out: Path, data: str,
                  ran: list[str], seconds: float, tables: list[str] | None = None) -> list[Path]:
    """``<out>/<name>.json``, ``.md`` and ``.png``; the MLflow parent + child runs when tracking is on."""
    doc = build_doc(exp, scale=scale, seeds=seeds, keys=keys, results=results, data=data, ran=ran, seconds=seconds,
                    tables=tables)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{exp.name}.json", out / f"{exp.name}.md", out / f"{exp.name}.png"]
    paths[0].write_text(json.dumps(doc, indent=1))
    paths[1].write_text(experiment_tables.markdown(doc))
    experiment_tables.plot(doc, paths[2])
    for line in experiment_tables.markdown(doc).splitlines():
        log.info("%s", line)
    if cfg.tracking.enabled:
        doc["mlflow_run_id"] = log_mlflow(cfg, doc, paths)
        paths[0].write_text(json.dumps(doc, indent=1))
    return paths


def log_mlflow(cfg: RaypipeConfig, doc: dict[str, Any], paths: list[Path]) -> str:
    """A parent run for the experiment (tables as artifacts) and one child run per row (its config keys as
    params, per column the mean, std and every seed's value as metrics; a pending row says why it did not run)."""
    from raypipe.tracking import start_stage_run

    name, tags = doc["experiment"], {"raypipe.experiment": doc["experiment"], "raypipe.scale": doc["scale"]}
    parent = start_stage_run(cfg.tracking, stage="experiment", run_name=f"experiment-{name}-{doc['scale']}", tags=tags,
                             params={"experiment": name, "scale": doc["scale"], "seeds": json.dumps(doc["seeds"]),
                                     "data": doc["data"]})
    for table in doc["tables"]:
        for row in table["rows"]:
            child = start_stage_run(
                cfg.tracking, stage="experiment-row", run_name=f"{name}/{table['name']}/{row['name']}",
                tags={**tags, "mlflow.parentRunId": parent.run_id, "raypipe.table": table["name"]},
                params={"table": table["name"], "row": row["name"], "status": row["status"],
                        **({"reason": row["reason"]} if "reason" in row else {}),
                        **{f"set.{k}": json.dumps(v) for k, v in row["set"].items()}})
            metrics: dict[str, float] = {}
            for key, cell in (row.get("ours") or {}).items():
                if cell.get("n"):
                    metrics[f"test/{key}"] = cell["mean"]
                    metrics[f"test/{key}_std"] = cell["std"]
                    metrics.update({f"seed{s}/test/{key}": v for s, v in zip(row["seeds"], cell["values"], strict=True)})
            child.log_metrics({k.replace(":", "."): v for k, v in metrics.items()}, step=0)
            child.finish("FINISHED" if row["status"] in ("ok", "pending") else "FAILED")
    for p in paths:
        parent.log_file(p)
    parent.finish()
    return parent.run_id
