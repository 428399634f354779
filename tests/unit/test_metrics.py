"""Metrics against hand-computed cases and direct sklearn computations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, classification_report, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from raypipe.metrics import (
    average_precision_per_class,
    compute_metrics,
    confusion_matrix,
    f_sco,
    f_sco_parts,
    gap_at_k,
    hit_at_k,
    level1_codes,
    mean_average_precision,
    per_class_report,
    topk_accuracy,
)

# --------------------------------------------------------------------------------------------------- F_sco


def test_f_sco_hand_computed() -> None:
    # Level 2: micro 2/3; macro over {0101: 1, 0102: 0, 0103: 0, 0201: 1} = 0.5. Level 1 all right: 1 and 1.
    true, pred = ["0101", "0102", "0201"], ["0101", "0103", "0201"]
    parts = f_sco_parts(true, pred)
    assert parts["f1_micro_l2"] == pytest.approx(2 / 3)
    assert parts["f1_macro_l2"] == pytest.approx(0.5)
    assert parts["f1_micro_l1"] == pytest.approx(1.0)
    assert parts["f1_macro_l1"] == pytest.approx(1.0)
    assert f_sco(true, pred) == pytest.approx((2 / 3 + 0.5 + 1 + 1) / 4)


def test_f_sco_matches_sklearn_directly() -> None:
    rng = np.random.default_rng(0)
    codes = np.array([l1 * 100 + l2 for l1 in range(1, 8) for l2 in range(1, 6)])  # ints like 101..705
    true = rng.choice(codes, 500)
    pred = np.where(rng.random(500) < 0.6, true, rng.choice(codes, 500))
    l1_true, l1_pred = true // 100, pred // 100  # level 1 by arithmetic, independent of the string path
    expected = np.mean(
        [
            f1_score(l1_true, l1_pred, average="micro"),
            f1_score(l1_true, l1_pred, average="macro"),
            f1_score(true, pred, average="micro"),
            f1_score(true, pred, average="macro"),
        ]
    )
    assert f_sco(true, pred) == pytest.approx(expected)  # int codes (zero-padded to "0101")
    as_str = [f"{c:04d}" for c in true], [f"{c:04d}" for c in pred]
    assert f_sco(*as_str) == pytest.approx(expected)  # string codes give the same


def test_level1_codes_and_errors() -> None:
    assert level1_codes(["2301", 101]).tolist() == ["23", "01"]
    with pytest.raises(ValueError, match="differ in length"):
        f_sco(["0101"], ["0101", "0102"])
    with pytest.raises(ValueError, match="empty"):
        f_sco([], [])


# ---------------------------------------------------------------------------------------------------- GAP


def test_gap_hand_computed_counts_positives_outside_top_k() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.7, 0.6]])
    labels = np.array([[1, 0, 1], [0, 0, 1]])  # video 0's class 2 is a positive no top-2 reaches
    # Pooled top-2: 0.9 (rel) 0.8 0.7 0.6 (rel) -> precisions 1 and 2/4 at the hits; N_pos = 3, not 2.
    assert gap_at_k(scores, labels, k=2) == pytest.approx((1 + 0.5) / 3)
    assert gap_at_k(scores, labels, k=3) == pytest.approx((1 + 2 / 4 + 3 / 6) / 3)


def test_gap_at_20_positive_at_rank_21_lowers_the_score() -> None:
    scores = np.linspace(1.0, 0.0, 25)[None, :]  # class c ranks c-th
    labels = np.zeros((1, 25))
    labels[0, 0] = labels[0, 20] = 1  # rank 1 and rank 21
    assert gap_at_k(scores, labels, k=20) == pytest.approx(0.5)  # 1.0 if N_pos ignored the unreachable one
    labels[0, 20] = 0
    labels[0, 19] = 1  # rank 20 is inside
    assert gap_at_k(scores, labels, k=20) == pytest.approx((1 + 2 / 20) / 2)


def test_gap_ties_broken_by_fixed_seeded_shuffle() -> None:
    scores = np.array([[0.5, 0.0], [0.5, 0.0]])
    labels = np.array([[1, 0], [0, 0]])
    values = {gap_at_k(scores, labels, k=1, seed=s) for s in range(30)}
    assert values == {1.0, 0.5}  # the relevant tie lands first or second depending on the shuffle
    assert all(gap_at_k(scores, labels, k=1, seed=3) == gap_at_k(scores, labels, k=1, seed=3) for _ in range(3))


def test_gap_without_ties_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random((30, 40))
    labels = (rng.random((30, 40)) < 0.1).astype(int)
    pairs = []
    for v in range(30):
        for c in sorted(range(40), key=lambda c, v=v: -scores[v, c])[:20]:
            pairs.append((scores[v, c], labels[v, c]))
    pairs.sort(key=lambda p: -p[0])
    hits, total = 0, 0.0
    for i, (_, rel) in enumerate(pairs, start=1):
        if rel:
            hits += 1
            total += hits / i
    assert gap_at_k(scores, labels, k=20) == pytest.approx(total / labels.sum())


# ------------------------------------------------------------------------------------------------ hit@k


def test_hit_at_k_and_topk_hand_cases() -> None:
    scores = np.array([[0.1, 0.5, 0.4], [0.3, 0.2, 0.5], [0.6, 0.3, 0.1]])
    y = np.array([2, 1, 0])  # row 1: the true class has the lowest score
    assert hit_at_k(scores, y, 1) == pytest.approx(1 / 3)
    assert hit_at_k(scores, y, 2) == pytest.approx(2 / 3)
    assert hit_at_k(scores, y, 3) == pytest.approx(1.0)
    assert hit_at_k(scores, y, 10) == pytest.approx(1.0)  # k beyond C: everything is a hit
    assert topk_accuracy(scores, y, (1, 2)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    assert hit_at_k(np.array([[0.5, 0.5]]), np.array([0]), 1) == 1.0  # ties go to the lower index
    with pytest.raises(ValueError, match="class indices"):
        hit_at_k(scores, np.array([0, 1, 3]), 1)


# -------------------------------------------------------------------------------------------------- mAP


def test_map_matches_sklearn_with_ties_and_empty_classes() -> None:
    rng = np.random.default_rng(2)
    scores = np.round(rng.random((120, 37)), 1)  # many ties
    labels = (rng.random((120, 37)) < 0.15).astype(int)
    labels[:, 5] = 0  # no positives: excluded from the mean
    ap = average_precision_per_class(scores, labels, chunk=8)  # chunk boundary inside the classes
    with_pos = [c for c in range(37) if labels[:, c].any()]
    expected = [average_precision_score(labels[:, c], scores[:, c]) for c in with_pos]
    np.testing.assert_allclose(ap[with_pos], expected, rtol=1e-12)
    assert np.isnan(ap[5])
    assert mean_average_precision(scores, labels) == pytest.approx(np.mean(expected))


# ----------------------------------------------------------------------------------------------- tables


def test_confusion_matrix_and_report_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 4, 80), rng.integers(0, 4, 80)
    y_pred[y_pred == 3] = 2  # class 3 never predicted
    np.testing.assert_array_equal(
        confusion_matrix(y_true, y_pred, 5), sk_confusion_matrix(y_true, y_pred, labels=range(5))
    )
    classes = ["a", "b", "c", "d", "e"]  # "e" never occurs: still gets a row
    report = per_class_report(y_true, y_pred, classes)
    ref = classification_report(
        y_true, y_pred, labels=range(5), target_names=classes, output_dict=True, zero_division=0
    )
    assert report["class"] == classes
    for i, name in enumerate(classes):
        assert report["precision"][i] == pytest.approx(ref[name]["precision"])
        assert report["recall"][i] == pytest.approx(ref[name]["recall"])
        assert report["f1"][i] == pytest.approx(ref[name]["f1-score"])
        assert report["support"][i] == ref[name]["support"]


# --------------------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_single_label_wbdc() -> None:
    classes = ["0101", "0102", "0201", "0305"]
    scores = np.array([[0.9, 0.1, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0], [0.0, 0.0, 0.1, 0.9], [0.4, 0.6, 0.0, 0.0]])
    y = np.array([0, 1, 3, 1])
    m = compute_metrics(scores, y, task="single_label", classes=classes)
    assert m["val/hit@1"] == pytest.approx(0.75) and m["val/top1"] == m["val/hit@1"]
    assert m["val/hit@2"] == pytest.approx(1.0) and m["val/top5"] == pytest.approx(1.0)
    assert m["val/f_sco"] == pytest.approx(f_sco(["0101", "0102", "0305", "0102"], ["0101", "0201", "0305", "0102"]))
    assert m["val/n"] == 4
    named = compute_metrics(scores, y, task="single_label", classes=["w", "x", "y", "z"], prefix="test/")
    assert "test/f_sco" not in named and named["test/hit@1"] == pytest.approx(0.75)


def test_compute_metrics_multi_label() -> None:
    rng = np.random.default_rng(4)
    scores, labels = rng.random((10, 30)), (rng.random((10, 30)) < 0.2).astype(int)
    m = compute_metrics(scores, labels, task="multi_label", classes=[str(i) for i in range(30)])
    assert m["val/gap@20"] == pytest.approx(gap_at_k(scores, labels, 20))
    assert m["val/map"] == pytest.approx(mean_average_precision(scores, labels))
    with pytest.raises(ValueError, match="30 classes"):
        compute_metrics(scores[:, :5], labels, task="multi_label", classes=[str(i) for i in range(30)])


def test_compute_metrics_single_label_gap_and_map_hand_computed() -> None:
    """Every metric column of the four papers' tables from one single-label scoring (MFB's GAP@20 included).

    Hand computation, 3 videos x 3 classes, truths 0, 2, 1. Pooled top-3 pairs by score: .7 (v0,c0 +), .6 (v1,c1),
    .5 (v2,c1 +), .3 (v1,c2 +), .2 (v0,c1), .2 (v2,c0), .1 (v0,c2), .1 (v1,c0), .1 (v2,c2); relevant at ranks 1, 3,
    4 -> GAP = (1/1 + 2/3 + 3/4) / 3 = 29/36. Per-class AP: c0 has one positive ranked first -> 1; c1: scores
    .6 (v1 -), .5 (v2 +), .2 (v0 -) -> 1/2; c2: .3 (v1 +) first -> 1; mAP = 2.5 / 3 = 5/6. Hit@1: v0, v2 -> 2/3.
    """
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.5, 0.1]])
    y = np.array([0, 2, 1])
    m = compute_metrics(scores, y, task="single_label", classes=["0101", "0102", "0201"], prefix="test/")
    assert m["test/gap@20"] == pytest.approx(29 / 36) and m["test/map"] == pytest.approx(5 / 6)
    assert m["test/hit@1"] == m["test/top1"] == pytest.approx(2 / 3)
    assert m["test/hit@2"] == pytest.approx(1.0) and m["test/top5"] == pytest.approx(1.0)
    assert set(m) >= {f"test/{k}" for k in ("f_sco", "hit@1", "hit@2", "top1", "top5", "gap@20", "map")}
