"""Reports a person reads: the plots, tables and CSVs every stage writes (one module, no Ray, no MLflow).

Each stage decides *what* to report; how a confusion matrix, a training curve, a per-class table, the label
distribution, the promotion decision or a sweep's trial table is drawn or laid out lives here, so the look of the
reports is changed in one place. matplotlib runs with the Agg backend (no display on workers or cluster nodes).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------ training / eval


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | Path, *, metric: str) -> None:
    """Loss terms and the selection metric per epoch (matplotlib Agg: no display needed on workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    losses = sorted({k for h in history for k in h if k.startswith(("train/", "val/")) and k.endswith("loss")}
                    | {k for h in history for k in h if k.startswith("train/loss_")})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key in losses:
        axes[0].plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    axes[0].set_xlabel("epoch")
    axes[0].set_title("losses")
    axes[0].legend(fontsize=7)
    axes[1].plot(epochs, [h.get(metric, np.nan) for h in history], marker="o", color="C3")
    axes[1].set_xlabel("epoch")
    axes[1].set_title(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    if n <= 60:
        ax.set_xticks(range(n), [str(c) for c in classes], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [str(c) for c in classes], fontsize=7)
        if n <= 30:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report_csv(report: Mapping[str, Sequence[Any]], path: str | Path) -> None:
    import csv

    keys = list(report)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for row in zip(*(report[k] for k in keys), strict=True):
            w.writerow(row)


def evaluation_artifacts(
    out_dir: str | Path, *, scores: np.ndarray, targets: np.ndarray, classes: Sequence[str], task: str, title: str
) -> list[Path]:
    """Confusion matrix PNG + per-class report CSV (single label) or per-class AP CSV (multi label)."""
    from raypipe import metrics as M

    out = Path(out_dir)
    paths = []
    if task == "single_label":
        pred = scores.argmax(axis=1)
        cm = M.confusion_matrix(targets, pred, len(classes))
        plot_confusion_matrix(cm, classes, out / "confusion_matrix.png", title=title)
        write_report_csv(M.per_class_report(targets, pred, classes), out / "per_class_report.csv")
        paths += [out / "confusion_matrix.png", out / "per_class_report.csv"]
    else:
        ap = M.average_precision_per_class(scores, targets)
        write_report_csv(
            {"class": list(classes), "ap": ap.tolist(), "support": np.asarray(targets).sum(axis=0).tolist()},
            out / "per_class_report.csv",
        )
        paths.append(out / "per_class_report.csv")
    return paths


# ------------------------------------------------------------------------------------------ label


def label_summary_table(summary: dict[str, Any]) -> str:
    """A few lines a person reads in the job log or in summary.txt."""
    s = summary
    names = s.get("class_names") or {}
    lines = [
        f"raypipe label run {s['run_id']}: model {s['model']['name']} version {s['model']['version']} ({s['mode']})",
        f"{'videos seen':<24}{s['videos_seen']:>8}",
        f"{'skipped (already done)':<24}{s['skipped']:>8}",
        f"{'labelled':<24}{s['labelled']:>8}",
        f"{'failed':<24}{s['failed']:>8}   ({s['failure_rate']:.1%}, threshold {s['max_failure_rate']:.1%})",
    ]
    for reason, n in sorted(s["failed_by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason:<22}{n:>8}")
    if s["label_distribution"]:
        lines.append("label distribution (top-1):")
        for label, n in sorted(s["label_distribution"].items(), key=lambda kv: (-kv[1], kv[0])):
            name = names.get(label, "")
            lines.append(f"  {label:<10}{name[:28]:<30}{n:>6}")
    lines.append(f"status: {s['status']}")
    return "\n".join(lines)


def plot_label_distribution(counts: dict[str, int], names: dict[str, str], title: str) -> bytes:
    """A horizontal bar chart of the top-1 labels as PNG bytes (Agg: no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    labels = [f"{k} {names.get(k, '')}".strip() for k, _ in items] or ["(none)"]
    values = [v for _, v in items] or [0]
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.35 * len(labels) + 1)))
    try:
        ax.barh(range(len(values)), values, color="#4C72B0")
        ax.set_yticks(range(len(labels)), labels=labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("videos")
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------ promote


def promotion_table(report: dict[str, Any]) -> str:
    """Both models' metrics side by side, then the decision and why."""
    champ, chall = report["champion"], report["challenger"]
    lines = [f"raypipe promote {report['model']} ({report['mode']}): champion v{champ['version']} vs "
             f"{'target' if report['mode'] == 'rollback' else 'challenger'} v{chall['version']}"]
    if "evaluation" in report:
        ev = report["evaluation"]
        lines.append(f"evaluation set: {ev['rows']} rows, split {ev['split']} of {ev['data']}, "
                     f"fingerprint {ev['fingerprint'][:16]}")
        a, b = champ.get("metrics", {}), chall.get("metrics", {})
        lines.append(f"{'metric':<12}{'champion':>10}{'challenger':>12}{'delta':>9}")
        for key in sorted(set(a) | set(b), key=lambda k: (k != report["metric"], k)):
            if key == "n":
                continue
            x, y = a.get(key, float("nan")), b.get(key, float("nan"))
            lines.append(f"{key:<12}{x:>10.4f}{y:>12.4f}{y - x:>+9.4f}" + ("  *" if key == report["metric"] else ""))
    lines.extend(f"  {r}" for r in report["reasons"])
    lines.append(f"decision: {report['decision']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ tune


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def trials_table(trials: Sequence[Any], *, metric: str, best_id: str | None) -> str:
    """A plain-text table a person reads at the end of a sweep (also logged to MLflow)."""
    keys = sorted({k for t in trials for k in t.params})
    header = ["trial", *keys, f"best {metric}", "epochs", "early stop", "status"]
    body = []
    for t in trials:
        mark = " *" if t.trial_id == best_id else ""
        body.append(
            [
                t.trial_id + mark,
                *(_fmt(t.params.get(k, "")) for k in keys),
                _fmt(t.best_metric) if t.best_metric is not None else "-",
                str(t.epochs_run),
                "yes" if t.stopped_early else "no",
                t.status if not t.error else f"{t.status}: {t.error[:60]}",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def trials_csv(trials: Sequence[Any], *, metric: str) -> str:
    keys = sorted({k for t in trials for k in t.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", *keys, f"best_{metric}", "epochs_run", "stopped_early", "status", "error", "mlflow_run_id"])
    for t in trials:
        w.writerow(
            [t.trial_id, *(t.params.get(k, "") for k in keys), t.best_metric, t.epochs_run, t.stopped_early,
             t.status, t.error or "", t.mlflow_run_id or ""]
        )
    return buf.getvalue()


def plot_trials(trials: Sequence[Any], *, metric: str, path: str | Path, best_id: str | None) -> None:
    """Metric vs epoch, one line per trial; early-stopped trials end in an x, errored ones are dashed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for t in trials:
        if not t.history:
            continue
        xs = [e for e, _ in t.history]
        ys = [v for _, v in t.history]
        style = "--" if t.status == "ERROR" else "-"
        width = 2.5 if t.trial_id == best_id else 1.2
        (line,) = ax.plot(xs, ys, style, marker="o", linewidth=width, markersize=3, label=t.trial_id)
        if t.stopped_early:
            ax.plot(xs[-1:], ys[-1:], "x", color=line.get_color(), markersize=10)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch (x: stopped early, bold: best)")
    ax.grid(True, alpha=0.3)
    if any(t.history for t in trials):
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(str(path))

