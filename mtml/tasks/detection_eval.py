"""Evaluation of detectors: predictions of each network and of the student ensemble, weighted
box fusion, COCO's greedy matching at IoU 0.5 for every frame at once, mAP@0.5 from it (equal to
torchmetrics'), mAP@[.5:.95] (torchmetrics, COCO protocol), precision / recall / F1
at a score threshold, and per-frame test units for bootstrap intervals."""
from __future__ import annotations

from typing import NamedTuple

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


# COCO's 101 recall thresholds as torchmetrics makes them (float32 steps: 0.6 is 0.6000000238, so a
# recall of exactly 3/5 does not reach it); the kit's map50 has always been torchmetrics'
RECALL_GRID = torch.linspace(0.0, 1.0, 101).double().numpy()
MAX_DETECTIONS = 100  # COCO's maxDets for mAP: each frame's best 100 detections count


def _coco_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU (F, D, G) of padded xyxy boxes a (F, D, 4) and b (F, G, 4) as COCO computes it through
    torchmetrics: widths and heights in float32 (its xyxy -> xywh), the rest in float64, so a
    match at exactly IoU 0.5 goes the same way."""
    def xywh(t):
        t = t.float()
        return torch.cat([t[..., :2], t[..., 2:] - t[..., :2]], -1).double()

    a, b = xywh(a)[:, :, None], xywh(b)[:, None]
    wh = (torch.minimum(a[..., :2] + a[..., 2:], b[..., :2] + b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2]))
    inter = wh.clamp(min=0).prod(-1)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return torch.where(inter > 0, inter / union.clamp(min=1e-300), 0.0)


class Matches(NamedTuple):
    """Every frame's predictions by rank (padded to the widest frame): `order` their positions in
    the frame, `scores` theirs, `tp` matched or not, `real` a prediction, not padding."""
    order: torch.Tensor
    scores: torch.Tensor
    tp: torch.Tensor
    real: torch.Tensor

    def flags(self) -> list[torch.Tensor]:
        """Each frame's true-positive flags in the frame's own order."""
        flags = torch.zeros_like(self.tp).scatter(1, self.order, self.tp)
        return [f[:n] for f, n in zip(flags, self.real.sum(1).tolist())]


def ranked_matches(preds: list[dict], targets: list[dict], iou: float) -> Matches:
    """COCO's greedy matching of every frame at once: by decreasing score (stable), each
    prediction takes the unmatched ground-truth box of highest IoU >= `iou` (of equal IoUs, the
    last). One step per score rank, all frames together."""
    if not preds:
        empty = torch.zeros(0, 0, dtype=torch.bool)
        return Matches(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0), empty, empty)
    pad = torch.nn.utils.rnn.pad_sequence
    scores = pad([p["scores"].detach().cpu().float() for p in preds], batch_first=True, padding_value=-float("inf"))
    counts = torch.tensor([len(p["scores"]) for p in preds])
    frames, width = scores.shape
    order = scores.argsort(dim=1, descending=True, stable=True)
    real = torch.arange(width)[None] < counts[:, None]
    tp = torch.zeros(frames, width, dtype=torch.bool)
    matches = Matches(order, scores.gather(1, order), tp, real)
    gt_counts = torch.tensor([len(t["boxes"]) for t in targets])
    if not width or not int(gt_counts.sum()):
        return matches
    boxes = pad([p["boxes"].detach().cpu().reshape(-1, 4) for p in preds], batch_first=True)
    gt = pad([t["boxes"].cpu().reshape(-1, 4) for t in targets], batch_first=True)
    overlaps = _coco_iou(boxes.gather(1, order[..., None].expand(-1, -1, 4)), gt)
    gt_real = torch.arange(gt.shape[1])[None] < gt_counts[:, None]
    overlaps = overlaps.masked_fill(~(real[:, :, None] & gt_real[:, None]), -1.0)
    candidates = (overlaps >= iou).any(2).any(0).nonzero()
    used = torch.zeros_like(gt_real)
    for rank in range(int(candidates.max()) + 1 if len(candidates) else 0):
        row = overlaps[:, rank].masked_fill(used, -1.0).flip(1)  # flipped: argmax finds the last best
        best, j = row.max(1)
        hit = best >= iou
        tp[:, rank] = hit
        used[hit, gt.shape[1] - 1 - j[hit]] = True
    return matches


def match_flags_all(preds: list[dict], targets: list[dict], iou: float = 0.5) -> list[torch.Tensor]:
    """True-positive flag of each prediction of every frame (in the given order), by `ranked_matches`."""
    return ranked_matches(preds, targets, iou).flags()


def match_flags(pred: dict, target: dict, iou: float = 0.5) -> torch.Tensor:
    """True-positive flag of each prediction of one frame (in the given order)."""
    return match_flags_all([pred], [target], iou)[0]


def average_precision(scores, tp, n_gt, weights=None, gt_weights=None) -> np.ndarray:
    """COCO-style AP (101-point interpolated precision) of detections with `scores` and true
    positive flags `tp`, against `n_gt` boxes per frame. Weights (B, n_detections) and
    (B, n_frames) repeat detections and frames (bootstrap); without them, one row of weight 1."""
    scores, tp = np.asarray(scores, float), np.asarray(tp, float)
    n_gt = np.asarray(n_gt, float)
    w = np.ones((1, len(scores))) if weights is None else np.atleast_2d(weights)
    gw = np.ones((1, len(n_gt))) if gt_weights is None else np.atleast_2d(gt_weights)
    total_gt = gw @ n_gt
    if len(scores) == 0:  # no detection at all: no recall reached
        return np.where(total_gt > 0, 0.0, np.nan)
    order = np.argsort(-scores, kind="mergesort")
    tp, w = tp[order], w[:, order]
    cum_tp, cum_fp = np.cumsum(w * tp, axis=1), np.cumsum(w * (1 - tp), axis=1)
    out = np.full(len(w), np.nan)
    for b in range(len(w)):
        if total_gt[b] <= 0:
            continue
        recall = cum_tp[b] / total_gt[b]
        seen = cum_tp[b] + cum_fp[b]
        precision = np.divide(cum_tp[b], seen, out=np.zeros_like(seen), where=seen > 0)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(recall, RECALL_GRID, side="left")
        reached = idx < len(recall)
        out[b] = np.where(reached, envelope[np.minimum(idx, len(recall) - 1)], 0.0).mean()
    return out


def map50(preds: list[dict], targets: list[dict], matches: Matches | None = None) -> float:
    """mAP@0.5 by COCO's protocol for one class (the polyps; labels are not read): each frame's
    best 100 detections, 101 recall points. The number torchmetrics gives, from `ranked_matches`
    (or `matches`, theirs at IoU 0.5) and `average_precision`; NaN without ground-truth boxes
    (torchmetrics: -1)."""
    m = matches if matches is not None else ranked_matches(preds, targets, 0.5)
    keep = m.real & (torch.arange(m.order.shape[1]) < MAX_DETECTIONS)[None]
    # frame by frame, each by rank: the order in which COCO concatenates before its stable sort
    ap = average_precision(m.scores[keep].numpy(), m.tp[keep].numpy(), [len(t["boxes"]) for t in targets])[0]
    return float(np.float32(ap))  # as torchmetrics reports it: records stay comparable with earlier ones


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
        for f, pred, target, flags in zip(ids, per_frame, targets, match_flags_all(per_frame, targets, iou)):
            rows.append((f, network, np.nan, 0, len(target["boxes"])))
            rows.extend((f, network, float(sc), int(t), 0) for sc, t in zip(pred["scores"].tolist(), flags.tolist()))
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
    """mAP@0.5 (`map50`, all frames matched at once), mAP@[.5:.95] (torchmetrics, COCO protocol);
    precision, recall and F1 of boxes at IoU 0.5 and `score_threshold`, summed over frames. Only
    `metrics` are computed (None: all): the per-epoch validation asks for map50 alone."""
    metrics = DETECTION_METRICS if metrics is None else tuple(metrics)
    unknown = set(metrics) - set(DETECTION_METRICS)
    if unknown:
        raise ValueError(f"unknown detection metrics {sorted(unknown)}; choose from {DETECTION_METRICS}")
    out = {}
    matched = {"map50", "precision", "recall", "f1"} & set(metrics)
    matches = ranked_matches(preds, targets, 0.5) if matched else None  # once, for all of them
    if "map50" in metrics:
        out["map50"] = map50(preds, targets, matches)
    if "map" in metrics:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        metric.update(preds, targets)
        out["map"] = float(metric.compute()["map"])
    if {"precision", "recall", "f1"} & set(metrics):
        kept = [p["scores"].cpu() >= score_threshold for p in preds]
        flags = matches.flags()
        tp, n_pred = sum(int(f[k].sum()) for f, k in zip(flags, kept)), sum(int(k.sum()) for k in kept)
        n_gt = sum(len(t["boxes"]) for t in targets)
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
