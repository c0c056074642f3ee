"""Reference metrics written from their definitions in plain numpy (no torchmetrics), so the
tests can check `mtml.evaluate` against an independent implementation."""
from __future__ import annotations

import numpy as np


def binary_auroc(scores, positive) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2)."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def confusion(pred, labels, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    m = np.zeros((num_classes, num_classes), int)
    np.add.at(m, (np.asarray(labels), np.asarray(pred)), 1)
    return m


def f1_per_class(m: np.ndarray) -> np.ndarray:
    tp = np.diag(m).astype(float)
    fp, fn = m.sum(0) - tp, m.sum(1) - tp
    return np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)


def hand_metrics(probs, labels) -> dict:
    """accuracy, balanced accuracy, AUROC (binary: of class 1; else macro one-vs-rest),
    F1 (binary: of class 1; else macro), confusion; predictions by argmax."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, int)
    c = probs.shape[1]
    pred = probs.argmax(1)
    m = confusion(pred, labels, c)
    recall = np.diag(m) / m.sum(1)
    if c == 2:
        auroc, f1 = binary_auroc(probs[:, 1], labels == 1), f1_per_class(m)[1]
    else:
        auroc = np.mean([binary_auroc(probs[:, k], labels == k) for k in range(c)])
        f1 = f1_per_class(m).mean()
    return {"accuracy": (pred == labels).mean(), "balanced_accuracy": recall.mean(),
            "auroc": auroc, "f1": f1, "confusion": m.tolist()}


def assert_metrics_match(row, expected: dict, tol: float = 1e-5) -> None:
    """`row`: a row of `evaluate_classification`'s frame (or a dict) against `hand_metrics`."""
    for key in ("accuracy", "balanced_accuracy", "auroc", "f1"):
        assert abs(float(row[key]) - expected[key]) <= tol, (key, float(row[key]), expected[key])
    assert np.array_equal(np.asarray(row["confusion"]), np.asarray(expected["confusion"]))
