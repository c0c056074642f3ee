"""Polyp detection: FCOS detectors per version, the detection task, evaluation and drawing.

Every network of a version is torchvision's FCOS (Tian et al. 2019, anchor-free, one point per
location) on a ResNet-style trunk with an FPN; the box distances go through softplus instead of
ReLU (ours, see `SoftplusRegressionHead`). Teacher and students share the strides and frame
size, so their dense head outputs (classification logits, box regressions, centerness) line up
location by location, which is what dense distillation and the mean ensemble need.

Versions (**ours**; the paper does not publish its detectors):

    version  teacher (FPN/head ch, head convs)   student                 levels  frames
    tiny     TinyTrunk 32-256 (64, 2)            TinyTrunk 16-128 (32, 1)  P3-P5   160 px
    v1       ResNet-50 (256, 4)                  ResNet-18 (256, 4)        P3-P7   512 px
    v2       ResNet-101 (256, 4)                 ResNet-34 (128, 4)        P3-P7   512 px
    v3       WideResNet-50-2 (256, 4)            ResNet-18 (128, 2)        P3-P7   512 px

Distillation between two networks' dense outputs (**ours**) is `mtml.dense_distill`: class maps,
boxes and centerness, each with its own weight, with a foreground-focused weighting by default.

The student ensemble averages the students' sigmoid probabilities, box regressions and
centerness at each location and runs FCOS's postprocess (score threshold, NMS) once; weighted box
fusion of the students' final boxes is the alternative (`ensemble="wbf"`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .dense_distill import DenseDistillation
from .models import build_network, check_version, count_parameters

ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class DetectorSpec:
    trunk: str          # torchvision ResNet name, or tiny_teacher / tiny_student
    channels: int       # FPN and head width
    head_convs: int     # conv layers in each head branch


VERSIONS = {
    "tiny": (DetectorSpec("tiny_teacher", 64, 2), DetectorSpec("tiny_student", 32, 1)),
    "v1": (DetectorSpec("resnet50", 256, 4), DetectorSpec("resnet18", 256, 4)),
    "v2": (DetectorSpec("resnet101", 256, 4), DetectorSpec("resnet34", 128, 4)),
    "v3": (DetectorSpec("wide_resnet50_2", 256, 4), DetectorSpec("resnet18", 128, 2)),
}
FRAME_SIZE = {"tiny": 160, "v1": 512, "v2": 512, "v3": 512}
TINY_WIDTHS = {"tiny_teacher": (32, 64, 128, 256), "tiny_student": (16, 32, 64, 128)}


def _conv(c_in, c_out, stride):
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class TinyTrunk(nn.Sequential):
    """Four stages of two 3x3 conv-BN-ReLU (the first with stride 2, after a stride-2 stem):
    `layer2..layer4` have strides 8, 16, 32 like a ResNet's, so an FPN sits on top unchanged."""

    def __init__(self, widths):
        layers, c = OrderedDict(stem=nn.Sequential(*_conv(3, widths[0], 2))), widths[0]
        for i, w in enumerate(widths):
            layers[f"layer{i + 1}"] = nn.Sequential(*_conv(c, w, 2), *_conv(w, w, 1))
            c = w
        super().__init__(layers)


class SoftplusRegressionHead(FCOSRegressionHead):
    """torchvision's FCOS regression head with softplus instead of ReLU on the box distances
    (**ours**). With ReLU, a distillation term that pushes the shared output bias below zero kills
    the head for good (all-zero boxes, no gradient): in our tiny runs whole students died in kd and
    ml modes while independent ones trained. Softplus is positive and never stops the gradient."""

    def forward(self, x):
        regressions, centerness = [], []
        for features in x:
            f = self.conv(features)
            reg, ctr = F.softplus(self.bbox_reg(f)), self.bbox_ctrness(f)
            n, _, h, w = reg.shape  # (N, 4, H, W) -> (N, HW, 4), one point per location
            regressions.append(reg.view(n, 4, h, w).permute(0, 2, 3, 1).reshape(n, -1, 4))
            centerness.append(ctr.view(n, 1, h, w).permute(0, 2, 3, 1).reshape(n, -1, 1))
        return torch.cat(regressions, dim=1), torch.cat(centerness, dim=1)


def _trunk(name: str, pretrained: bool):
    """A trunk with layer2..layer4 and their channel counts."""
    if name in TINY_WIDTHS:
        if pretrained:
            raise ValueError("the tiny version has no pretrained weights; use pretrained=False")
        w = TINY_WIDTHS[name]
        return TinyTrunk(w), list(w[1:])
    trunk = build_network(name, 2, pretrained)  # ImageNet weights, clear error when offline
    expansion = type(trunk.layer4[-1]).expansion
    return trunk, [128 * expansion, 256 * expansion, 512 * expansion]


def build_detector(spec: DetectorSpec, num_classes: int = 2, pretrained: bool = False,
                   size: int = 160, levels: int = 5) -> FCOS:
    """FCOS with one point per location, strides 8 .. 8 * 2^(levels-1), frames `size` px.
    `score_thresh` is 0.05 (torchvision's default 0.2) so that mAP sees the low-score tail."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + polyp), got {num_classes}")
    if levels not in (3, 5):
        raise ValueError(f"levels must be 3 (P3-P5) or 5 (P3-P7), got {levels}")
    trunk, in_channels = _trunk(spec.trunk, pretrained)
    extra = LastLevelP6P7(spec.channels, spec.channels) if levels == 5 else None
    backbone = BackboneWithFPN(trunk, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels,
                               spec.channels, extra_blocks=extra)
    if extra is None:
        backbone.fpn.extra_blocks = None  # BackboneWithFPN would add a max-pool level
    anchors = AnchorGenerator(tuple((8 * 2 ** i,) for i in range(levels)), ((1.0,),) * levels)
    head = FCOSHead(spec.channels, 1, num_classes, num_convs=spec.head_convs)
    head.regression_head = SoftplusRegressionHead(spec.channels, 1, num_convs=spec.head_convs)
    return FCOS(backbone, num_classes, min_size=size, max_size=size, anchor_generator=anchors,
                head=head, score_thresh=0.05)


def build_detection_networks(version: str, n_students: int, num_classes: int = 2,
                             pretrained: bool = False, with_teacher: bool = True, size: int | None = None):
    """(teacher or None, [students]) for a version; `Cohort.build(cfg, networks=...)` calls it."""
    check_version(version)
    t_spec, s_spec = VERSIONS[version]
    kw = dict(num_classes=num_classes, pretrained=pretrained, size=size or FRAME_SIZE[version],
              levels=3 if version == "tiny" else 5)
    teacher = build_detector(t_spec, **kw) if with_teacher else None
    return teacher, [build_detector(s_spec, **kw) for _ in range(n_students)]


def detection_version_table(num_classes: int = 2, versions=None) -> pd.DataFrame:
    """Parameters of teacher and student detectors per version, and the compression."""
    rows = []
    for version in versions or VERSIONS:
        t, s = VERSIONS[version]
        teacher, (student,) = build_detection_networks(version, 1, num_classes)
        tp, sp = count_parameters(teacher), count_parameters(student)
        rows.append(dict(version=version, teacher=t.trunk, student=s.trunk, frame=FRAME_SIZE[version],
                         teacher_params=tp, student_params=sp, compression=round(tp / sp, 1)))
    return pd.DataFrame(rows).set_index("version")


def resize_item(image: torch.Tensor, boxes: torch.Tensor, size: int):
    """Resizes a (3, H, W) image to (3, size, size) and scales its (k, 4) xyxy boxes to match."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image, boxes
    image = F.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)[0]
    return image, boxes * torch.tensor([size / w, size / h, size / w, size / h])


class DetectionTask:
    """Batches: `image` (B, 3, S, S) float in [0, 1], `targets` a list of {boxes (k, 4) xyxy pixels,
    labels (k,) = 1}, `index` (B,). Items are dicts with `image` (uint8 or float) and `boxes`."""

    name = "detection"
    history_metrics = ("map50",)

    def __init__(self, size: int = 160, box_loss: str = "giou", ensemble: str = "mean",
                 score_threshold: float = 0.3, wbf_iou: float = 0.55, distill_weighting: str = "foreground",
                 w_distill_cls: float = 1.0, w_distill_box: float = 1.0, w_distill_ctr: float = 1.0):
        if ensemble not in ("mean", "wbf"):
            raise ValueError(f"ensemble must be 'mean' or 'wbf', got {ensemble!r}")
        if size < 32 or size % 32:
            raise ValueError(f"size must be a multiple of 32 (the FPN's coarsest stride), got {size}")
        self.distill = DenseDistillation(distill_weighting, box_loss, w_distill_cls, w_distill_box, w_distill_ctr)
        self.size, self.box_loss, self.ensemble_kind = size, box_loss, ensemble
        self.score_threshold, self.wbf_iou = score_threshold, wbf_iou

    def test_units(self, preds, targets, data=None) -> pd.DataFrame:
        return detection_units(preds, targets)

    def settings(self):
        return {"size": self.size, "ensemble": self.ensemble_kind, "score_threshold": self.score_threshold,
                "wbf_iou": self.wbf_iou, **self.distill.settings()}

    # batches ------------------------------------------------------------------------------
    def collate(self, items):
        images, targets = [], []
        for item in items:
            image = item["image"]
            image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
            boxes = torch.as_tensor(item["boxes"], dtype=torch.float32).reshape(-1, 4)
            image, boxes = resize_item(image, boxes, self.size)
            images.append(image)
            targets.append({"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)})
        return {"image": torch.stack(images), "targets": targets,
                "index": torch.tensor([int(item.get("index", i)) for i, item in enumerate(items)])}

    def to_device(self, batch, device):
        return {"image": batch["image"].to(device, non_blocking=True), "index": batch["index"],
                "targets": [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]}

    # training -----------------------------------------------------------------------------
    def outputs(self, model: FCOS, batch):
        """Normalise, backbone and head once; returns the dense maps plus what the loss needs."""
        images = model.transform.normalize(batch["image"])
        features = list(model.backbone(images).values())
        head = model.head(features)
        image_list = ImageList(images, [tuple(images.shape[-2:])] * len(images))
        return {**head, "anchors": model.anchor_generator(image_list, features),
                "per_level": [f.shape[-2] * f.shape[-1] for f in features], "model": model,
                "image_sizes": image_list.image_sizes, "targets": batch["targets"]}

    def supervised_loss(self, out, batch):
        """FCOS's own losses: focal classification + GIoU boxes + centerness BCE, summed."""
        losses = out["model"].compute_loss(batch["targets"], out, out["anchors"], out["per_level"])
        return sum(losses.values())

    def distill_loss(self, out, target, temperature):
        """`mtml.dense_distill.DenseDistillation` with this task's settings; `target` is detached."""
        return self.distill(out, target, temperature)

    # inference ----------------------------------------------------------------------------
    def ensemble(self, outs):
        """Mean of the students' probabilities, regressions and centerness, as logits again."""
        def mean_prob(key):
            return torch.logit(torch.stack([torch.sigmoid(o[key]) for o in outs]).mean(0), eps=1e-6)

        return {**outs[0], "cls_logits": mean_prob("cls_logits"), "bbox_ctrness": mean_prob("bbox_ctrness"),
                "bbox_regression": torch.stack([o["bbox_regression"] for o in outs]).mean(0)}

    def detections(self, out):
        """FCOS postprocess (score threshold, top-k, NMS) -> [{boxes, scores, labels}] per image;
        class 0 (torchvision's background slot, never trained positive) is dropped."""
        split = {k: list(out[k].split(out["per_level"], dim=1))
                 for k in ("cls_logits", "bbox_regression", "bbox_ctrness")}
        anchors = [list(a.split(out["per_level"])) for a in out["anchors"]]
        dets = out["model"].postprocess_detections(split, anchors, out["image_sizes"])
        return [{k: v[d["labels"] > 0].cpu() for k, v in d.items()} for d in dets]

    def evaluate(self, networks, data, batch_size=16, return_predictions=False, **kw):
        return evaluate_detection(networks, data, self, batch_size=batch_size,
                                  return_predictions=return_predictions, **kw)


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


def detection_units(preds: dict, targets: list[dict], iou: float = 0.5) -> pd.DataFrame:
    """Per frame and network: one row with the frame's box count (`n_gt`, `score` NaN) and one
    row per detection with its score and true-positive flag at IoU `iou` (for bootstrap mAP)."""
    rows = []
    for network, frames in preds.items():
        for f, (pred, target) in enumerate(zip(frames, targets)):
            rows.append((f, network, np.nan, 0, len(target["boxes"])))
            flags = match_flags(pred, target, iou).tolist()
            rows.extend((f, network, float(sc), int(t), 0) for sc, t in zip(pred["scores"].tolist(), flags))
    return pd.DataFrame(rows, columns=["unit", "network", "score", "tp", "n_gt"])


@torch.no_grad()
def predict_detections(networks: dict, data, task: DetectionTask, batch_size: int = 16, ensemble=None):
    """Runs every network once over `data`. Returns ({name: [detections per frame]}, [targets])."""
    from .evaluate import eval_batches

    kind = ensemble or task.ensemble_kind
    preds = {k: [] for k in networks}
    students = [k for k in networks if k.startswith("student")]
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


def detection_metrics(preds: list[dict], targets: list[dict], score_threshold: float = 0.3) -> dict:
    """mAP@0.5 and mAP@[.5:.95] (torchmetrics, COCO protocol); precision, recall and F1 of boxes
    at IoU 0.5 and `score_threshold`, counted per frame and summed over frames."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    metric.update(preds, targets)
    result = metric.compute()
    tp, n_pred, n_gt = np.sum([match_counts(p, t, score_threshold) for p, t in zip(preds, targets)], axis=0)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gt if n_gt else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"map50": float(result["map_50"]), "map": float(result["map"]), "precision": float(precision),
            "recall": float(recall), "f1": float(f1)}


def evaluate_detection(networks: dict, data, task: DetectionTask, batch_size: int = 16,
                       return_predictions: bool = False, ensemble=None):
    """DataFrame indexed by network (teacher, student_i, ensemble) with map50, map, precision,
    recall, f1. With `return_predictions`, also the detections and targets (for drawing)."""
    preds, targets = predict_detections(networks, data, task, batch_size, ensemble)
    frame = pd.DataFrame.from_dict({k: detection_metrics(p, targets, task.score_threshold)
                                    for k, p in preds.items()}, orient="index")
    frame.index.name = "network"
    return (frame, preds, targets) if return_predictions else frame


def draw_detections(data, preds: dict, targets: list[dict], frames=(0, 1, 2), score_threshold=0.3,
                    task: DetectionTask | None = None):
    """A grid: one row per frame, one column per network; ground truth green, predictions red
    with their score. `preds`, `targets` come from `evaluate(..., return_predictions=True)`."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    task = task or DetectionTask()
    names = list(preds)
    fig, axes = plt.subplots(len(frames), len(names), figsize=(2.4 * len(names), 2.4 * len(frames)),
                             squeeze=False)
    for r, i in enumerate(frames):
        image = task.collate([data[i]])["image"][0].permute(1, 2, 0).clamp(0, 1).numpy()
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(image)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            for x0, y0, x1, y1 in targets[i]["boxes"].tolist():
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1.5))
            p = preds[name][i]
            for (x0, y0, x1, y1), s in zip(p["boxes"].tolist(), p["scores"].tolist()):
                if s >= score_threshold:
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=1.2))
                    ax.text(x0, y0, f"{s:.2f}", color="white", fontsize=6, backgroundcolor="red")
    fig.tight_layout()
    return fig
