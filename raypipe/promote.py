"""``raypipe promote``: champion / challenger. No training run can silently change what the nightly job labels with.

Training (and a sweep's best trial) registers each new model version under the challenger alias
(``tracking.alias``); the nightly label job labels with the champion alias (``tracking.champion_alias``). Only
this module moves the champion, and only when the challenger has earned it:

1. **One evaluation set for both.** The rows come from :func:`raypipe.data.evaluation_rows` (the held-out split
   of the feature shards the challenger was trained on, or the named set ``promote.data``), are read once, and
   both models score that same in-memory batch. Its SHA-256 fingerprint (feature dims, embedders, every row's
   id, label and feature bytes) is recorded with the decision, so two decisions can be checked to have used the
   same rows.
2. **Compatible or refused.** A model trained on other feature dims or other embedders than the evaluation set
   cannot be compared (and could not label tonight's features): one clear error, nothing moved.
3. **The policy** (:func:`decide`): the challenger must beat the champion on ``promote.metric`` by at least
   ``promote.min_improvement``, and no guarded metric may drop by more than ``promote.max_drop``.
4. **Recorded.** Every decision (also ``--force`` and a rollback with ``--to-version``) is written to a JSON
   report and an MLflow run (params, both models' metrics, the fingerprint, the report) and printed as a table.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from raypipe.config import RaypipeConfig
from raypipe.data import DataError, EvaluationSet, evaluation_rows, held_out_split
from raypipe.io import fs as rfs
from raypipe.reports import promotion_table as format_table
from raypipe.schema import SHARD_DIMS

log = logging.getLogger(__name__)



class PromotionError(ValueError):
    """The promotion cannot be decided as asked (no challenger, incompatible model, unknown version ...)."""

    exit_code = 2  # the CLI's code for "cannot run as configured" (see raypipe.cli.run_stage)


@dataclass
class Decision:
    """What :func:`decide` concluded; ``reasons`` say why in a line each."""

    promote: bool
    reasons: list[str]


# --------------------------------------------------------------------------------------------- the policy


def decide(
    champion: dict[str, float], challenger: dict[str, float], *, metric: str, min_improvement: float,
    max_drop: float, guard_metrics: list[str] | None = None,
) -> Decision:
    """The promotion policy on two metric dicts (higher is better for every metric compared here).

    Promote when ``challenger[metric] - champion[metric] >= min_improvement`` and no guarded metric (default:
    every other metric both report, except the row count ``n``) is lower for the challenger by more than
    ``max_drop``. A small tolerance keeps float noise from flipping a decision at exactly the margin.
    """
    if metric not in champion or metric not in challenger:
        raise PromotionError(f"metric {metric!r} is not reported for both models (have: {sorted(challenger)})")
    eps = 1e-9
    gain = challenger[metric] - champion[metric]
    reasons = []
    ok = gain + eps >= min_improvement
    reasons.append(f"{metric}: {challenger[metric]:.4f} vs {champion[metric]:.4f} ({gain:+.4f}; needs "
                   f"{min_improvement:+.4f}) -> {'better' if ok else 'not better enough'}")
    guarded = guard_metrics if guard_metrics is not None else sorted(set(champion) & set(challenger) - {metric, "n"})
    for name in guarded:
        if name not in champion or name not in challenger:
            raise PromotionError(f"guard metric {name!r} is not reported for both models")
        drop = champion[name] - challenger[name]
        if drop > max_drop + eps:
            ok = False
            reasons.append(f"guard: {name} drops by {drop:.4f} ({champion[name]:.4f} -> {challenger[name]:.4f}), "
                           f"more than max_drop {max_drop:.4f}")
    return Decision(promote=ok, reasons=reasons)


# ------------------------------------------------------------------------------------------- the models


def _load(cfg: RaypipeConfig, version: str, role: str) -> Any:
    from raypipe.classifier import load_classifier
    from raypipe.config.paths import absolute_tracking_uri

    uri = f"models:/{cfg.tracking.registered_model_name}/{version}"
    try:
        return load_classifier(uri, cfg.storage, tracking_uri=absolute_tracking_uri(cfg.tracking.tracking_uri))
    except Exception as exc:  # a broken registry entry is a status line, not a traceback
        raise PromotionError(f"{role} {uri} cannot be loaded: {type(exc).__name__}: {exc}") from None


def _embedders(info: Any) -> dict[str, dict[str, Any]]:
    """Embedder settings that shape the features (library versions excluded, as the label job does)."""
    return {k: {a: v for a, v in (info.embedders.get(k) or {}).items() if a != "version"}
            for k in ("frames", "audio", "text")}


def feature_differences(model: Any, other: Any, other_name: str) -> list[str]:
    """How the features of ShardInfo ``model`` differ from ``other``'s (dims, then embedders), one item each."""
    bad = [f"{d} {getattr(model, d)} ({other_name}: {getattr(other, d)})" for d in SHARD_DIMS
           if getattr(model, d) != getattr(other, d)]
    if model.embedders and other.embedders:
        mine, theirs = _embedders(model), _embedders(other)
        bad += [f"{k} embedder {mine[k]} ({other_name}: {theirs[k]})" for k in mine if mine[k] != theirs[k]]
    return bad


def check_fits(clf: Any, role: str, data: EvaluationSet) -> None:
    """Refuse a model whose features differ from the evaluation set's (dims or embedders), in one line."""
    bad = feature_differences(clf.shard_info, data.info, "evaluation features")
    if bad:
        raise PromotionError(
            f"{role} version {clf.model_version} ({clf.arch}) was trained on other features than {data.uri}: "
            f"{'; '.join(bad)}; it cannot be scored on them"
        )


def _comparable(new: Any, old: Any, role: str, mode: str) -> str | None:
    """Why ``new`` cannot be compared with the champion ``old`` (other features or classes), or None.

    Comparing them is refused (compare mode): a challenger on other features could not label what the nightly
    job embeds with the champion's settings. ``--force`` / ``--to-version`` may still switch, e.g. together
    with a change of ``embed.*``; the difference is then recorded and only the new model is scored.
    """
    bad = feature_differences(new.shard_info, old.shard_info, f"champion v{old.model_version}")
    if list(new.classes) != list(old.classes):
        bad.append(f"{len(new.classes)} classes (champion v{old.model_version}: other {len(old.classes)} classes)")
    if not bad:
        return None
    msg = (f"{role} version {new.model_version} ({new.arch}) was trained on other features or classes than "
           f"champion version {old.model_version} ({old.arch}): {'; '.join(bad)}")
    if mode == "compare":
        raise PromotionError(msg + "; they cannot be compared (promote it with --force only together with the "
                                   "matching embed.* settings)")
    return msg


def score(clf: Any, data: EvaluationSet, batch_size: int) -> dict[str, float]:
    """Metrics (unprefixed: ``f_sco``, ``hit@1`` ...) of ``clf`` on every row of ``data``."""
    from raypipe.metrics import compute_metrics

    features = {k: v for k, v in data.arrays.items() if k not in ("video_id", "label", "labels")}
    proba = clf.predict_proba(features, chunk=batch_size)  # (N, C)
    return compute_metrics(proba, data.targets, task=data.task, classes=data.classes, prefix="")


def _evaluation_set(cfg: RaypipeConfig, challenger: Any) -> EvaluationSet:
    pc = cfg.promote
    uri = pc.data or (challenger.meta.get("config") or {}).get("train", {}).get("data") or cfg.train.data
    meta = challenger.meta
    val_fraction = float(meta.get("val_fraction", cfg.train.val_fraction))
    test_fraction = float(meta.get("test_fraction", 0.0))
    split = pc.split or held_out_split(test_fraction, bool(meta.get("has_split_column")))
    if split == "val" and not pc.split:
        log.warning("promote: the challenger was trained without a test split; comparing on its val rows, on "
                    "which it chose its best epoch (train with train.test_fraction > 0 for a fair comparison)")
    try:
        return evaluation_rows(uri, task=challenger.task, classes=challenger.classes, val_fraction=val_fraction,
                               test_fraction=test_fraction, split=split, storage=cfg.storage)  # type: ignore[arg-type]
    except DataError as exc:
        raise PromotionError(f"evaluation set: {exc}") from None


# ----------------------------------------------------------------------------------------------- driver


def _versions(cfg: RaypipeConfig) -> tuple[str | None, str, str]:
    """``(champion version or None, the version to make champion, mode)``; mode is compare, force or rollback."""
    from raypipe.tracking import alias_version, make_client

    tc, pc = cfg.tracking, cfg.promote
    client = make_client(tc)
    name = tc.registered_model_name
    champion_v = alias_version(client, name, tc.champion_alias)
    if pc.to_version is not None:
        try:
            client.get_model_version(name, str(pc.to_version))
        except Exception:
            raise PromotionError(f"--to-version {pc.to_version}: {name} has no version {pc.to_version}") from None
        return champion_v, str(pc.to_version), "rollback"
    target_v = alias_version(client, name, tc.alias)
    if target_v is None:
        raise PromotionError(f"{name}@{tc.alias}: no challenger registered (train a model first)")
    return champion_v, target_v, "force" if pc.force else "compare"


def _policy_metric(cfg: RaypipeConfig, classes: list[str]) -> str:
    """``promote.metric``, else what training selects by on these classes (:func:`raypipe.train.selection_metric`:
    the default f_sco becomes f1_macro unless they are WBDC codes), without its ``val/`` prefix."""
    from raypipe.train import selection_metric

    return cfg.promote.metric or selection_metric(cfg.train, classes).partition("/")[2]


def promote(cfg: RaypipeConfig) -> dict[str, Any]:
    """Compare champion and challenger (or roll back / force), move the champion alias when due, record it.

    Returns the report (also written as JSON and, when tracking is on, to an MLflow run).
    """
    from raypipe.tracking import set_alias

    tc, pc = cfg.tracking, cfg.promote
    name = tc.registered_model_name
    champion_v, target_v, mode = _versions(cfg)
    metric = pc.metric or cfg.train.metric.partition("/")[2]
    report: dict[str, Any] = {
        "model": name, "mode": mode, "metric": metric, "min_improvement": pc.min_improvement,
        "max_drop": pc.max_drop, "champion_alias": tc.champion_alias, "challenger_alias": tc.alias,
        "champion": {"version": champion_v}, "challenger": {"version": target_v},
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if champion_v == target_v:
        report.update(decision="unchanged", promoted=False,
                      reasons=[f"version {target_v} already is {tc.champion_alias}"])
        return _record(cfg, report)

    t0 = time.perf_counter()
    role = "rollback target" if mode == "rollback" else "challenger"
    new = _load(cfg, target_v, role)
    old = _load(cfg, champion_v, "champion") if champion_v is not None else None
    mismatch = _comparable(new, old, role, mode) if old is not None else None
    data = _evaluation_set(cfg, new)
    check_fits(new, role, data)
    metric = report["metric"] = _policy_metric(cfg, data.classes)
    report["evaluation"] = {"data": data.uri, "split": data.split, "rows": len(data.video_ids),
                            "fingerprint": data.fingerprint, "video_ids": data.video_ids}
    report["challenger"].update(arch=new.arch, metrics=score(new, data, pc.batch_size))
    if old is not None:
        report["champion"]["arch"] = old.arch
        if mismatch is None:
            report["champion"]["metrics"] = score(old, data, pc.batch_size)
    report["seconds"] = round(time.perf_counter() - t0, 3)

    if old is None:
        decision = Decision(True, [f"no {tc.champion_alias} yet: version {target_v} becomes it"])
    elif mode == "compare":
        decision = decide(report["champion"]["metrics"], report["challenger"]["metrics"], metric=metric,
                          min_improvement=pc.min_improvement, max_drop=pc.max_drop, guard_metrics=pc.guard_metrics)
    else:
        decision = Decision(True, [f"{mode}: version {target_v} made {tc.champion_alias} without the policy"]
                            + ([f"not compared: {mismatch}"] if mismatch else []))
    outcome = {"compare": "promoted", "force": "forced", "rollback": "rolled_back"}[mode]
    report.update(decision=outcome if decision.promote else "rejected", promoted=decision.promote,
                  reasons=decision.reasons)
    if decision.promote:
        set_alias(tc, tc.champion_alias, target_v)
        log.info("promote: %s@%s now points at version %s (was %s)", name, tc.champion_alias, target_v, champion_v)
    return _record(cfg, report)


# ---------------------------------------------------------------------------------------------- records


def _record(cfg: RaypipeConfig, report: dict[str, Any]) -> dict[str, Any]:
    """JSON report (<output>/<stamp>-...json and latest.json), MLflow run, table in the log."""
    pc = cfg.promote
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    name = f"{stamp}-v{report['champion']['version']}-v{report['challenger']['version']}-{report['decision']}.json"
    if cfg.tracking.enabled and pc.log_mlflow:
        report["mlflow_run_id"] = _log_to_mlflow(cfg, report)
    data = json.dumps(report, indent=1, sort_keys=True).encode()
    fs, root = rfs.resolve(pc.output, cfg.storage)
    paths = []
    for file_name in (name, "latest.json"):
        path = rfs.join(root, file_name)
        rfs.atomic_write_bytes(fs, path, data)
        paths.append(rfs.to_uri(fs, path))
    report["report_path"] = paths[0]
    log.info("promotion decided\n%s\nreport: %s", format_table(report), paths[0])
    return report


def _log_to_mlflow(cfg: RaypipeConfig, report: dict[str, Any]) -> str:
    """One MLflow run per decision: params, both models' metrics (champion/..., challenger/...), the report."""
    from raypipe.tracking import start_stage_run

    tags = {"raypipe.decision": report["decision"],
            "raypipe.evaluation_fingerprint": report.get("evaluation", {}).get("fingerprint", "")}
    run_logger = start_stage_run(
        cfg.tracking, stage="promote", run_name=f"promote-v{report['challenger']['version']}-{report['decision']}",
        tags=tags, params={
            "model": report["model"], "mode": report["mode"], "metric": report["metric"],
            "min_improvement": str(report["min_improvement"]), "max_drop": str(report["max_drop"]),
            "champion_version": str(report["champion"]["version"]),
            "challenger_version": str(report["challenger"]["version"]),
            "evaluation_data": str(report.get("evaluation", {}).get("data")),
            "evaluation_rows": str(report.get("evaluation", {}).get("rows")),
        },
    )
    metrics = {f"{role}/{k}": v for role in ("champion", "challenger")
               for k, v in report[role].get("metrics", {}).items()}
    metrics["promoted"] = float(report["promoted"])
    run_logger.log_metrics(metrics, step=0)
    run_logger.log_text(json.dumps(report, indent=1, sort_keys=True), "promotion_report.json")
    run_logger.finish("FINISHED")
    return run_logger.run_id


def run(cfg: RaypipeConfig) -> int:
    """``raypipe promote``: 0 when decided (promoted or not), 2 when it cannot be decided as configured."""
    promote(cfg)  # a PromotionError / ConfigError becomes exit code 2 in raypipe.cli.run_stage
    return 0


__all__ = ["Decision", "PromotionError", "check_fits", "decide", "format_table", "promote", "run", "score"]
