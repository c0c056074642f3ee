"""Evaluation of detectors: predictions of each network and of the student ensemble, weighted
box fusion, greedy matching at IoU 0.5, mAP (torchmetrics, COCO protocol), precision / recall / F1
at a score threshold, and per-frame test units for bootstrap intervals."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torchvision.ops import box_iou

from .evaluate import eval_batches
from ..names import ENSEMBLE, students_in


def weighted_box_fusion(dets: list[dict], iou: float = 0.55, max_detections: int = 100) -> dict:
    """Weighted box fusion (Solovyev et al. 2021, arXiv 1910.13302) of one image's detections
    from several models: boxes sorted by score join the first cluster whose fused box overlaps
    them by >= `iou`; a cluster's box is the score-weighted mean of its boxes and its score the
    mean score times min(members, models) / models; the `max_detections` best are kept."""
    boxes = torch.cat([d["boxes"] for d in dets]).float()
    scores = torch.cat([d["scores"] for d in dets]).float()
    clusters, fused = [], []
    for i in scores.argsort(descending=True).tolist():
        if fused:
            overlap = box_iou(boxes[i:i + 1], torch.stack(fused))[0]
            j = int(overlap.argmax())
            if overlap[j] >= iou:
                clusters[j].append(i)
                w = scores[clusters[j]]
                fused[j] = (boxes[clusters[j]] * w[:, None]).sum(0) / w.sum()
                continue
        clusters.append([i])
        fused.append(boxes[i])
    n = len(dets)
    out_scores = torch.tensor([float(scores[c].mean()) * min(len(c), n) / n for c in clusters])
    keep = out_scores.argsort(descending=True)[:max_detections]
    return {"boxes": torch.stack(fused)[keep] if fused else torch.zeros(0, 4), "scores": out_scores[keep],
            "labels": torch.ones(len(keep), dtype=torch.int64)}


def match_flags(pred: dict, target: dict, iou: float = 0.5) -> torch.Tensor:
    """True-positive flag of each prediction of one frame (in the given order): by decreasing
    score, each prediction takes the best unmatched box with IoU >= `iou` (COCO's greedy rule)."""
    flags = torch.zeros(len(pred["scores"]), dtype=torch.bool)
    gt = target["boxes"].cpu()
    if len(flags) == 0 or len(gt) == 0:
        return flags
    order = pred["scores"].cpu().argsort(descending=True, stable=True)
    overlaps, used = box_iou(pred["boxes"].cpu()[order], gt), torch.zeros(len(gt), dtype=torch.bool)
    for k, row in zip(order.tolist(), overlaps):
        row = row.masked_fill(used, -1)
        j = int(row.argmax())
        if row[j] >= iou:
            used[j], flags[k] = True, True
    return flags


def match_counts(pred: dict, target: dict, score_threshold: float, iou: float = 0.5):
    """(true positives, predictions, ground-truth boxes) for one frame, counting predictions with
    score >= `score_threshold` (greedy matching by score, so a threshold never changes a match)."""
    keep = pred["scores"].cpu() >= score_threshold
    return int(match_flags(pred, target, iou)[keep].sum()), int(keep.sum()), len(target["boxes"])


def detection_units(preds: dict, targets: list[dict], iou: float = 0.5, frames=None) -> pd.DataFrame:
    """Per frame and network: one row with the frame's box count (`n_gt`, `score` NaN) and one
    row per detection with its score and true-positive flag at IoU `iou` (for bootstrap mAP).
    `unit` is the frame's id (`frames`, e.g. `DetectionDataset.frames`), else its position."""
    ids = list(frames) if frames is not None else list(range(len(targets)))
    rows = []
    for network, per_frame in preds.items():
        for f, pred, target in zip(ids, per_frame, targets):
            rows.append((f, network, np.nan, 0, len(target["boxes"])))
            flags = match_flags(pred, target, iou).tolist()
            rows.extend((f, network, float(sc), int(t), 0) for sc, t in zip(pred["scores"].tolist(), flags))
    return pd.DataFrame(rows, columns=["unit", "network", "score", "tp", "n_gt"])


@torch.no_grad()
def predict_detections(networks: dict, data, task, batch_size: int = 16, ensemble=None):
    """Runs every network once over `data` (`task`: a DetectionTask). Returns ({name: [detections
    per frame]}, [targets])."""
    kind = ensemble or task.ensemble_kind
    preds = {k: [] for k in networks}
    students = students_in(networks)
    if students:
        preds[ENSEMBLE] = []
    targets = []
    for batch in eval_batches(networks, data, task, batch_size):
        outs = {k: task.outputs(m, batch) for k, m in networks.items()}
        for k, out in outs.items():
            preds[k].extend(task.detections(out))
        if students and kind == "mean":
            preds[ENSEMBLE].extend(task.detections(task.ensemble([outs[k] for k in students])))
        elif students:
            per_student = [preds[k][-len(batch["index"]):] for k in students]
            preds[ENSEMBLE].extend(weighted_box_fusion(list(d), task.wbf_iou) for d in zip(*per_student))
        targets.extend({k: v.cpu() for k, v in t.items()} for t in batch["targets"])
    return preds, targets


DETECTION_METRICS = ("map50", "map", "precision", "recall", "f1")


def detection_metrics(preds: list[dict], targets: list[dict], score_threshold: float = 0.3,
                      metrics=None) -> dict:
    """mAP@0.5 and mAP@[.5:.95] (torchmetrics, COCO protocol); precision, recall and F1 of boxes
    at IoU 0.5 and `score_threshold`, counted per frame and summed over frames. Only `metrics` are
    computed (None: all): without "map", COCO's matching runs at IoU 0.5 alone (the same map50, 3x faster)."""
    from torchmetrics.detection import MeanAveragePrecision

    metrics = DETECTION_METRICS if metrics is None else tuple(metrics)
    unknown = set(metrics) - set(DETECTION_METRICS)
    if unknown:
        raise ValueError(f"unknown detection metrics {sorted(unknown)}; choose from {DETECTION_METRICS}")
    out = {}
    if {"map50", "map"} & set(metrics):
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox",
                                      iou_thresholds=None if "map" in metrics else [0.5])
        metric.update(preds, targets)
        result = metric.compute()
        out = {"map50": float(result["map_50"]), "map": float(result["map"])}
    if {"precision", "recall", "f1"} & set(metrics):
        tp, n_pred, n_gt = np.sum([match_counts(p, t, score_threshold) for p, t in zip(preds, targets)], axis=0)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gt if n_gt else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        out.update(precision=float(precision), recall=float(recall), f1=float(f1))
    return {k: out[k] for k in metrics}


def evaluate_detection(networks: dict, data, task, batch_size: int = 16,
                       return_predictions: bool = False, ensemble=None, metrics=None):
    """DataFrame indexed by network (teacher, student_i, ensemble) with `metrics` (default map50,
    map, precision, recall, f1). With `return_predictions`, also the detections and targets (for drawing)."""
    preds, targets = predict_detections(networks, data, task, batch_size, ensemble)
    frame = pd.DataFrame.from_dict({k: detection_metrics(p, targets, task.score_threshold, metrics)
                                    for k, p in preds.items()}, orient="index")
    frame.index.name = "network"
    return (frame, preds, targets) if return_predictions else frame


def f1_at_thresholds(units: pd.DataFrame, network: str) -> pd.DataFrame:
    """Precision, recall and F1 of `network`'s detections (test units of `detection_units`) at
    every threshold equal to one of its scores: keeping detections with score >= threshold."""
    u = units[units["network"] == network]
    n_gt = float(u["n_gt"].sum())
    det = u[u["score"].notna()].sort_values("score", ascending=False, kind="mergesort")
    tp, kept, s = np.cumsum(det["tp"].to_numpy()), np.arange(1, len(det) + 1), det["score"].to_numpy()
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)  # ties kept together
    precision, recall = tp / kept, tp / n_gt if n_gt else np.full(len(tp), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return pd.DataFrame({"threshold": det["score"].to_numpy(), "precision": precision,
                         "recall": recall, "f1": f1})[last].reset_index(drop=True)


def operating_point(val_units: pd.DataFrame, test_units: pd.DataFrame, network: str) -> dict:
    """The score threshold of maximum F1 on the validation frames, and test precision, recall
    and F1 at it (the threshold is never chosen on the test split)."""
    curve = f1_at_thresholds(val_units, network)
    if curve.empty:  # no validation detection: no operating point
        return {"op_threshold": float("nan"), "op_precision": float("nan"), "op_recall": 0.0, "op_f1": 0.0}
    threshold = float(curve.loc[curve["f1"].idxmax(), "threshold"])
    test = f1_at_thresholds(test_units, network)
    at = test[test["threshold"] >= threshold]
    # nothing kept on test: recall and F1 are 0, precision is undefined (NaN, skipped by means)
    row = at.iloc[-1] if len(at) else {"precision": float("nan"), "recall": 0.0, "f1": 0.0}
    return {"op_threshold": threshold, "op_precision": float(row["precision"]),
            "op_recall": float(row["recall"]), "op_f1": float(row["f1"])}


def operating_points(val_units: pd.DataFrame, test_units: pd.DataFrame) -> pd.DataFrame:
    """`operating_point` of every network in `test_units` (index: network)."""
    names = list(dict.fromkeys(test_units["network"]))
    return pd.DataFrame([operating_point(val_units, test_units, n) for n in names],
                        index=pd.Index(names, name="network"))
