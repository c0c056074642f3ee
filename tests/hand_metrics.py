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
    """accuracy, balanced accuracy (mean recall of the classes in `labels`), AUROC (binary: of
    class 1; else the mean one-vs-rest AUROC of the classes in `labels`), F1 (binary: of class 1;
    else the mean over classes labelled or predicted), confusion; predictions by argmax."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, int)
    c = probs.shape[1]
    pred = probs.argmax(1)
    m = confusion(pred, labels, c)
    present = m.sum(1) > 0
    recall = np.diag(m)[present] / m.sum(1)[present]
    one_class = present.sum() < 2
    if c == 2:
        auroc = np.nan if one_class else binary_auroc(probs[:, 1], labels == 1)
        f1 = f1_per_class(m)[1]
    else:
        auroc = np.nan if one_class else np.mean(
            [binary_auroc(probs[:, k], labels == k) for k in range(c) if present[k]])
        f1 = f1_per_class(m)[present | (m.sum(0) > 0)].mean()
    return {"accuracy": (pred == labels).mean(), "balanced_accuracy": recall.mean(),
            "auroc": auroc, "f1": f1, "confusion": m.tolist()}


def assert_metrics_match(row, expected: dict, tol: float = 1e-5) -> None:
    """`row`: a row of `evaluate_classification`'s frame (or a dict) against `hand_metrics`."""
    for key in ("accuracy", "balanced_accuracy", "auroc", "f1"):
        got, want = float(row[key]), float(expected[key])
        assert (np.isnan(got) and np.isnan(want)) or abs(got - want) <= tol, (key, got, want)
    assert np.array_equal(np.asarray(row["confusion"]), np.asarray(expected["confusion"]))


def coco_greedy_flags(boxes, scores, gt, iou: float = 0.5) -> np.ndarray:
    """One frame's true-positive flags by pycocotools' loop, transcribed: boxes as torchmetrics
    hands them over (x, y, width, height; widths in float32), IoU in float64 as its C code computes
    it; detections by decreasing score (stable); each takes the unmatched ground truth of highest
    IoU >= `iou`, a later box winning a tie."""
    def xywh(b):
        b = np.asarray(b, np.float32).reshape(-1, 4)
        return np.c_[b[:, :2], b[:, 2:] - b[:, :2]].astype(float)

    boxes, gt = xywh(boxes), xywh(gt)
    flags, used = np.zeros(len(boxes), bool), np.zeros(len(gt), bool)
    for d in np.argsort(-np.asarray(scores, float), kind="mergesort"):
        best, match = iou, -1
        for g in range(len(gt)):
            if used[g]:
                continue
            w = min(boxes[d, 0] + boxes[d, 2], gt[g, 0] + gt[g, 2]) - max(boxes[d, 0], gt[g, 0])
            h = min(boxes[d, 1] + boxes[d, 3], gt[g, 1] + gt[g, 3]) - max(boxes[d, 1], gt[g, 1])
            if w <= 0 or h <= 0:
                continue
            overlap = w * h / (boxes[d, 2] * boxes[d, 3] + gt[g, 2] * gt[g, 3] - w * h)
            if overlap >= best:
                best, match = overlap, g
        if match >= 0:
            used[match], flags[d] = True, True
    return flags
