"""Evaluation metrics with the exact definitions of the reference sheet (section 3); numpy in, numpy/float out.

* :func:`f_sco` - WBDC 2022: mean of micro- and macro-F1 at level 1 and level 2, level 1 derived from the
  level-2 code (its first two digits), each F1 as ``sklearn.metrics.f1_score`` computes it.
* :func:`gap_at_k` - YouTube-8M Global Average Precision: top-k per video, pooled, sorted with ties broken by
  a fixed seeded shuffle, divided by *all* positives (also those no top-k reaches).
* :func:`hit_at_k` / :func:`topk_accuracy` - single-label hit rate; Hit@1 is top-1 accuracy.
* :func:`mean_average_precision` - multi-label mAP, per class non-interpolated AP exactly as sklearn's
  ``average_precision_score`` (tied scores form one threshold), averaged over classes that have positives.
* :func:`per_class_report` / :func:`confusion_matrix` - the tables training logs (plain arrays, no plotting).
* :func:`compute_metrics` - the dict the trainer reports for a task.

Nothing here imports torch or Ray, so the label job and notebooks can reuse it as is. scikit-learn (2 s to
import) is imported by the functions that use it: the driver only checks class codes here before each run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

GAP_SHUFFLE_SEED = 0
_WBDC_CODE = re.compile(r"^\d{4}$")


# ---------------------------------------------------------------------------------------------------- WBDC


def _as_code_strings(codes: Any) -> np.ndarray:
    """Level-2 codes as strings; integer codes are zero-padded to 4 digits (``101`` -> ``"0101"``).

    Converted element by element: ``np.asarray`` on a mixed list would turn ``101`` into ``"101"`` first.
    """
    items = codes.tolist() if isinstance(codes, np.ndarray) else list(codes)
    if any(isinstance(c, list | tuple | np.ndarray) for c in items):
        raise ValueError("codes must be a 1-d sequence of level-2 codes")
    return np.array(
        [f"{int(c):04d}" if isinstance(c, int | np.integer) and not isinstance(c, bool) else str(c) for c in items],
        dtype=object,
    )


def level1_codes(level2: Any) -> np.ndarray:
    """WBDC level-1 code of each level-2 code: its first two digits."""
    codes = _as_code_strings(level2)
    short = [c for c in codes if len(c) < 2]
    if short:
        raise ValueError(f"level-2 codes need at least two characters to derive level 1, got {short[:3]}")
    return np.array([c[:2] for c in codes], dtype=object)


def is_wbdc_code(label: Any) -> bool:
    """True for a 4-digit level-2 category code (``"0203"``), the form :func:`f_sco` expects."""
    return bool(_WBDC_CODE.match(str(label)))


def score_for_classes(classes: Any) -> str:
    """The default selection score for these class names: ``f_sco`` for WBDC level-2 codes, else ``f1_macro``.

    Why: the WBDC score derives level 1 from the code's first two digits, so it is undefined for class-folder or
    manifest labels ("cat", "dog"); macro-F1 is its level-2 half and weighs every class alike, as F_sco does.
    """
    return "f_sco" if all(is_wbdc_code(c) for c in classes) else "f1_macro"


def f_sco_parts(y_true_l2: Any, y_pred_l2: Any) -> dict[str, float]:
    """The four F1 numbers of the WBDC score plus their mean under ``"f_sco"``.

    The level-1 *prediction* is derived from the level-2 prediction (not predicted separately), as the
    competition's evaluation script does. Macro-F1 averages over the union of true and predicted classes,
    sklearn's default.
    """
    true2, pred2 = _as_code_strings(y_true_l2), _as_code_strings(y_pred_l2)
    if true2.shape != pred2.shape:
        raise ValueError(f"y_true ({true2.shape[0]}) and y_pred ({pred2.shape[0]}) differ in length")
    if true2.size == 0:
        raise ValueError("F_sco of an empty set is undefined")
    from sklearn.metrics import f1_score

    true1, pred1 = level1_codes(true2), level1_codes(pred2)
    parts = {
        "f1_micro_l1": float(f1_score(true1, pred1, average="micro")),
        "f1_macro_l1": float(f1_score(true1, pred1, average="macro", zero_division=0)),
        "f1_micro_l2": float(f1_score(true2, pred2, average="micro")),
        "f1_macro_l2": float(f1_score(true2, pred2, average="macro", zero_division=0)),
    }
    parts["f_sco"] = float(np.mean(list(parts.values())))
    return parts


def f_sco(y_true_l2: Any, y_pred_l2: Any) -> float:
    """WBDC 2022 F_sco of level-2 codes (strings like ``"0203"`` or ints); see :func:`f_sco_parts`."""
    return f_sco_parts(y_true_l2, y_pred_l2)["f_sco"]


# ------------------------------------------------------------------------------------------------ GAP@k


def _check_scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"scores (N, C) and multi-hot labels must have one shape; got {s.shape} and {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    return s, (y > 0).astype(np.float64)


def gap_at_k(scores: Any, labels: Any, k: int = 20, *, seed: int = GAP_SHUFFLE_SEED) -> float:
    """YouTube-8M GAP@k: non-interpolated AP of the pooled top-k (video, class) predictions.

    ``N_pos`` counts every ground-truth positive, so a positive outside every top-k lowers the score (it can
    never be recalled). Equal scores are ordered by a shuffle seeded with ``seed`` (as the reference shuffles
    before its stable sort), so the value is deterministic yet not biased toward any class or video order.
    """
    s, y = _check_scores_labels(scores, labels)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_pos = y.sum()
    if n_pos == 0:
        return 0.0
    k = min(k, s.shape[1])
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]  # (N, k) class indices
    pooled_scores = np.take_along_axis(s, top, axis=1).ravel()  # (N*k,)
    pooled_rel = np.take_along_axis(y, top, axis=1).ravel()  # (N*k,)
    perm = np.random.default_rng(seed).permutation(pooled_scores.size)
    pooled_scores, pooled_rel = pooled_scores[perm], pooled_rel[perm]
    order = np.argsort(-pooled_scores, kind="stable")
    rel = pooled_rel[order]
    precision_at_i = np.cumsum(rel) / np.arange(1, rel.size + 1)
    return float((precision_at_i * rel).sum() / n_pos)


# ---------------------------------------------------------------------------------------- single-label hits


def _check_single(scores: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(y)
    if s.ndim != 2 or t.ndim != 1 or s.shape[0] != t.shape[0]:
        raise ValueError(f"need scores (N, C) and class indices (N,); got {s.shape} and {t.shape}")
    if s.shape[0] == 0:
        raise ValueError("metrics of an empty set are undefined")
    if t.dtype.kind not in "iu" or (t < 0).any() or (t >= s.shape[1]).any():
        raise ValueError(f"targets must be integer class indices in [0, {s.shape[1]})")
    return s, t.astype(np.int64)


def hit_at_k(scores: Any, y: Any, k: int) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores (Hit@1 == top-1 accuracy).

    Tied scores rank the lower class index first (a stable sort), so the value never depends on luck; ``k``
    larger than the number of classes counts every sample as a hit.
    """
    s, t = _check_single(scores, y)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = np.argsort(-s, axis=1, kind="stable")[:, : min(k, s.shape[1])]  # (N, k)
    return float((top == t[:, None]).any(axis=1).mean())


def topk_accuracy(scores: Any, y: Any, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy for each ``k`` in ``ks`` (the same quantity as :func:`hit_at_k`)."""
    return {int(k): hit_at_k(scores, y, int(k)) for k in ks}


# ------------------------------------------------------------------------------------------------- mAP


def average_precision_per_class(scores: Any, labels: Any, *, chunk: int = 256) -> np.ndarray:
    """Per-class AP (``(C,)``, NaN for classes without positives), equal to sklearn's ``average_precision_score``.

    AP = sum over distinct score thresholds of (recall step) * precision; samples with tied scores enter at
    the same threshold. Vectorised over chunks of classes so 3862 YouTube-8M classes stay cheap in memory.
    """
    s, y = _check_scores_labels(scores, labels)
    n, c = s.shape
    out = np.full(c, np.nan)
    for lo in range(0, c, chunk):
        cs, cy = s[:, lo : lo + chunk], y[:, lo : lo + chunk]  # (N, c')
        order = np.argsort(-cs, axis=0, kind="stable")
        ss = np.take_along_axis(cs, order, axis=0)
        yy = np.take_along_axis(cy, order, axis=0)
        tps = np.cumsum(yy, axis=0)  # (N, c')
        ranks = np.arange(1, n + 1, dtype=np.float64)[:, None]
        is_end = np.ones_like(ss, dtype=bool)  # last row of each run of tied scores
        is_end[:-1] = ss[:-1] != ss[1:]
        tp_at_end = np.where(is_end, tps, 0.0)
        prev_end_tp = np.zeros_like(tps)
        prev_end_tp[1:] = np.maximum.accumulate(tp_at_end, axis=0)[:-1]
        gained = np.where(is_end, tps - prev_end_tp, 0.0)  # positives recalled at this threshold
        n_pos = tps[-1]  # (c',)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = (gained * (tps / ranks)).sum(axis=0) / n_pos
        out[lo : lo + chunk] = np.where(n_pos > 0, ap, np.nan)
    return out


def mean_average_precision(scores: Any, labels: Any) -> float:
    """Multi-label mAP: mean per-class AP over the classes that have at least one positive."""
    ap = average_precision_per_class(scores, labels)
    if np.isnan(ap).all():
        return 0.0
    return float(np.nanmean(ap))


# ---------------------------------------------------------------------------------------------- tables


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """``(C, C)`` int64 counts, rows = true class, columns = predicted class (sklearn's layout)."""
    t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-d of one length; got {t.shape} and {p.shape}")
    if ((t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)).any():
        raise ValueError(f"class indices must be in [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_report(y_true: Any, y_pred: Any, classes: Sequence[str]) -> dict[str, list[Any]]:
    """Column-wise table (like ``classification_report``): class, precision, recall, f1, support.

    Every class of ``classes`` gets a row, also one absent from this split (precision/recall 0 by
    ``zero_division=0``), so tables of different epochs line up row by row.
    """
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        np.asarray(y_true), np.asarray(y_pred), labels=labels, average=None, zero_division=0
    )
    return {
        "class": [str(c) for c in classes],
        "precision": precision.astype(float).tolist(),
        "recall": recall.astype(float).tolist(),
        "f1": f1.astype(float).tolist(),
        "support": support.astype(int).tolist(),
    }


# ----------------------------------------------------------------------------------------- trainer dict


def compute_metrics(
    scores: Any,
    targets: Any,
    *,
    task: Literal["single_label", "multi_label"],
    classes: Sequence[str],
    prefix: str = "val/",
) -> dict[str, float]:
    """The metrics the trainer reports, keyed ``{prefix}{name}``.

    single_label (``targets`` = class indices ``(N,)``): ``hit@1``, ``hit@2``, ``top1``, ``top5``, ``f1_micro``,
    ``f1_macro``, ``gap@20`` and ``map`` (of the one-hot targets, so MFB's GAP@20 column can be filled on a
    single-label corpus) and, when every class is a 4-digit WBDC code, ``f_sco``. multi_label (``targets``
    multi-hot ``(N, C)``): ``gap@20`` and ``map``. ``n`` is the number of samples scored.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != len(classes):
        raise ValueError(f"scores must be (N, {len(classes)}) for {len(classes)} classes, got {s.shape}")
    out: dict[str, float] = {"n": float(s.shape[0])}
    if task == "single_label":
        from sklearn.metrics import f1_score

        _, t = _check_single(s, targets)
        pred = s.argmax(axis=1)
        out["hit@1"] = hit_at_k(s, t, 1)
        out["hit@2"] = hit_at_k(s, t, 2)
        out.update({f"top{k}": v for k, v in topk_accuracy(s, t, (1, 5)).items()})
        out["f1_micro"] = float(f1_score(t, pred, average="micro"))
        out["f1_macro"] = float(f1_score(t, pred, average="macro", zero_division=0))
        onehot = np.eye(s.shape[1], dtype=np.float64)[t]  # (N, C)
        out["gap@20"] = gap_at_k(s, onehot, 20)
        out["map"] = mean_average_precision(s, onehot)
        if all(is_wbdc_code(c) for c in classes):
            names = np.array([str(c) for c in classes], dtype=object)
            out["f_sco"] = f_sco(names[t], names[pred])
    elif task == "multi_label":
        out["gap@20"] = gap_at_k(s, targets, 20)
        out["map"] = mean_average_precision(s, targets)
    else:
        raise ValueError(f"task must be 'single_label' or 'multi_label', got {task!r}")
    return {f"{prefix}{name}": value for name, value in out.items()}


# ------------------------------------------------------------------------------------- text read from video


def edit_distance(ref: Sequence[Any], hyp: Sequence[Any]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1) between two sequences."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def char_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """OCR metric: character edits / reference characters over a corpus (lower-cased, punctuation dropped)."""
    edits = sum(edit_distance(_norm(r), _norm(h)) for r, h in zip(refs, hyps, strict=True))
    return edits / max(1, sum(len(_norm(r)) for r in refs))


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """ASR metric: word edits / reference words over a corpus (lower-cased, punctuation dropped)."""
    edits = sum(edit_distance(_norm(r).split(), _norm(h).split()) for r, h in zip(refs, hyps, strict=True))
    return edits / max(1, sum(len(_norm(r).split()) for r in refs))
