"""Rendering of ``raypipe experiment`` results: the paper's table layout as Markdown and a PNG, from the JSON
document :mod:`raypipe.experiments.report` writes (that JSON is the source; these are views of it).

Every table shows, per row, our test-split mean +- std over seeds for each metric column and, beside it, the
paper's own number under a header that says it was measured on another dataset. A row or column that could not
run says ``not run: needs ...``; nothing is left out. Below each table, the ordering of the rows that the paper's
numbers imply is set against ours, pair by pair, so agreement or disagreement is stated, not implied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def fmt_cell(cell: Mapping[str, Any] | None) -> str:
    """``0.612 +- 0.031``; one seed says so (a std of 0 would read as "stable"); a gap says why."""
    if not cell:
        return "not run: trial failed (rerun to retry)"
    if "reason" in cell:
        return str(cell["reason"])
    if not cell.get("n"):
        return "not run: trial failed (rerun to retry)"
    if cell["n"] == 1:
        return f"{cell['mean']:.3f} (1 seed)"
    return f"{cell['mean']:.3f} +- {cell['std']:.3f}"


def _mean(row: Mapping[str, Any], key: str) -> float | None:
    cell = (row.get("ours") or {}).get(key) or {}
    value = cell.get("mean")
    return float(value) if value is not None and math.isfinite(value) else None


def ordering(table: Mapping[str, Any]) -> dict[str, Any] | None:
    """The paper's ascending order of the rows (by its numbers in the first column, or ``paper_order``) against
    ours (test means): ``{"column", "paper", "ours", "agree", "reversed"}``; None when fewer than 2 rows compare."""
    key = table["columns"][0]["key"]
    rows = [r for r in table["rows"] if _mean(r, key) is not None]
    if table.get("paper_order"):
        paper = [n for n in table["paper_order"] if any(r["name"] == n for r in rows)]
    else:
        with_paper = [r for r in rows if (r.get("paper") or {}).get(key) is not None]
        paper = [r["name"] for r in sorted(with_paper, key=lambda r: r["paper"][key])]
    if len(paper) < 2:
        return None
    ours_of = {r["name"]: _mean(r, key) for r in rows}
    ours = sorted(paper, key=lambda n: ours_of[n])
    reversed_pairs = [[a, b] for i, a in enumerate(paper) for b in paper[i + 1:] if ours_of[a] > ours_of[b]]
    ties = [[a, b] for i, a in enumerate(paper) for b in paper[i + 1:] if ours_of[a] == ours_of[b]]
    return {"column": key, "paper": paper, "ours": ours, "agree": not reversed_pairs and not ties,
            "reversed": reversed_pairs, "ties": ties}


def ordering_line(order: Mapping[str, Any] | None, labels: Mapping[str, str]) -> str:
    if order is None:
        return ""
    show = lambda names: " < ".join(labels.get(n, n) for n in names)  # noqa: E731
    if order["agree"]:
        return f"Ordering ({order['column']}): paper {show(order['paper'])}; ours the same. **Agrees.**"
    parts = [f"{labels.get(a, a)} above {labels.get(b, b)}" for a, b in order["reversed"]]
    parts += [f"{labels.get(a, a)} tied with {labels.get(b, b)}" for a, b in order["ties"]]
    return (f"Ordering ({order['column']}): paper {show(order['paper'])}; ours {show(order['ours'])}. "
            f"**Does not agree**: {'; '.join(parts)}.")


def table_markdown(table: Mapping[str, Any], doc: Mapping[str, Any]) -> str:
    cols = table["columns"]
    paper_cols = [c for c in cols if any((r.get("paper") or {}).get(c["key"]) is not None for r in table["rows"])]
    n = len(doc["seeds"])
    head = ["row", *[f"{c['label']} (ours, test, {n} seeds)" for c in cols],
            *[f"{c['label']} paper (other dataset)" for c in paper_cols]]
    lines = [f"### {table['title']}", ""]
    if table.get("note"):
        lines += [table["note"], ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        if r.get("status") == "pending":
            ours = [r["reason"]] * len(cols)
        else:
            ours = [fmt_cell(r["ours"].get(c["key"])) for c in cols]
        paper = [(f"{r['paper'][c['key']]:.4f}" if (r.get("paper") or {}).get(c["key"]) is not None else "-")
                 for c in paper_cols]
        lines.append("| " + " | ".join([r["label"], *ours, *paper]) + " |")
    line = ordering_line(table.get("ordering"), {r["name"]: r["label"] for r in table["rows"]})
    return "\n".join(lines + ([""] + [line] if line else []))


def markdown(doc: Mapping[str, Any]) -> str:
    """The whole experiment: a header saying what was run on what, then every table."""
    head = [
        f"## {doc['experiment']}: {doc['paper']}",
        "",
        f"Scale `{doc['scale']}`, seeds {doc['seeds']}, data `{doc['data']}` ({doc['num_test']} test rows). Ours: "
        "test split, mean +- std over seeds, the epoch chosen on val. Paper: its own numbers on "
        f"{doc['dataset']} (a different dataset: compare orderings, not values).",
    ]
    return "\n\n".join(["\n".join(head), *[table_markdown(t, doc) for t in doc["tables"]]]) + "\n"


def plot(doc: Mapping[str, Any], path: str | Path) -> None:
    """One panel per table: our test means (bars, +- std) per row and column, the paper's numbers as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tables: Sequence[Mapping[str, Any]] = doc["tables"]
    fig, axes = plt.subplots(len(tables), 1, figsize=(10, 3.2 * len(tables)), squeeze=False)
    for ax, table in zip(axes[:, 0], tables, strict=True):
        cols = [c for c in table["columns"] if not c.get("pending")]
        rows = table["rows"]
        width = 0.8 / max(1, len(cols))
        x = np.arange(len(rows))
        for k, c in enumerate(cols):
            means = [_mean(r, c["key"]) for r in rows]
            sds = [((r.get("ours") or {}).get(c["key"]) or {}).get("std") or 0.0 for r in rows]
            pos = x + k * width
            ax.bar(pos, [m if m is not None else 0.0 for m in means], width, yerr=sds, capsize=2, label=c["label"])
            paper = [(r.get("paper") or {}).get(c["key"]) for r in rows]
            pts = [(p, v) for p, v in zip(pos, paper, strict=True) if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "kx", markersize=7, label="paper (other dataset)" if k == 0 else None)
        ax.set_xticks(x + 0.4 - width / 2, [r["label"] if r.get("status") != "pending" else f"{r['label']}\n(not run)"
                                            for r in rows], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(table["title"], fontsize=9)
        ax.legend(fontsize=6, ncol=4)
    fig.suptitle(f"{doc['experiment']} ({doc['scale']}): test, mean +- std over {len(doc['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
