"""Polyp detectors: FCOS teacher and students per version, with one forward for dense outputs.

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

`DenseFCOS.forward(images)` returns the dense head outputs (normalise, backbone and head once),
so a detector can be wrapped by DistributedDataParallel or compiled like any module; FCOS's own
losses, box coder and postprocess stay available on the module.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .models import build_network, check_version, count_parameters


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


def padded_targets(targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every frame's boxes (B, M + 1, 4) and labels (B, M + 1) as one tensor each, M the most boxes
    of a frame: zero boxes with label -1 pad them (real labels, torchvision's classes, are >= 0),
    one column more than needed so that a frame without boxes still has a column 0 to gather
    (zeros, the targets torchvision gives it)."""
    boxes = pad_sequence([t["boxes"] for t in targets], batch_first=True)
    labels = pad_sequence([t["labels"] for t in targets], batch_first=True, padding_value=-1)
    return F.pad(boxes, (0, 0, 0, 1)), F.pad(labels, (0, 1), value=-1)


def _intersection_union(boxes: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x1, y1, x2, y2 = boxes.unbind(-1)
    x1g, y1g, x2g, y2g = targets.unbind(-1)
    left, top, right, bottom = torch.max(x1, x1g), torch.max(y1, y1g), torch.min(x2, x2g), torch.min(y2, y2g)
    overlap = (bottom > top) & (right > left)
    intersection = torch.where(overlap, (right - left) * (bottom - top), 0.0)
    return intersection, (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intersection


def giou_loss(boxes: torch.Tensor, targets: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - generalized IoU (Rezatofighi et al., CVPR 2019) of each row's xyxy boxes, (..., 4) ->
    (...): torchvision's `generalized_box_iou_loss(reduction="none")`, with the intersection kept
    where the boxes overlap by `torch.where` instead of boolean selections, each of which waits for
    a GPU. Bit-equal to torchvision's on the CPU, gradients included (`tests/test_detection.py`):
    the coordinates are unpacked twice, as torchvision does, so that a coordinate's gradient parts
    are added in the same order."""
    boxes, targets = (b if b.dtype in (torch.float32, torch.float64) else b.float() for b in (boxes, targets))
    intersection, union = _intersection_union(boxes, targets)
    x1, y1, x2, y2 = boxes.unbind(-1)
    x1g, y1g, x2g, y2g = targets.unbind(-1)
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (intersection / (union + eps) - (enclosing - union) / (enclosing + eps))


def fcos_matches(anchors: torch.Tensor, boxes: torch.Tensor, per_level: list[int], radius: float = 1.5) -> torch.Tensor:
    """(B, L) index of the box each location learns, -1 for background: torchvision FCOS's rule
    (centre sampling within `radius` strides, inside the box, the level's size range, the smallest
    box on ties) for the whole batch at once, from `anchors` (B, L, 4) and the boxes of `padded_targets`. The
    same float operations on the same values as torchvision's loop over frames, so the indices are
    the same; padding columns (zero boxes) never match: no centre lies strictly inside."""
    centres = (anchors[..., :2] + anchors[..., 2:]) / 2                              # (B, L, 2)
    sizes = anchors[..., 2] - anchors[..., 0]                                        # (B, L)
    box_centres = (boxes[..., :2] + boxes[..., 2:]) / 2                              # (B, M, 2)
    match = (centres[:, :, None] - box_centres[:, None]).abs_().amax(3) < radius * sizes[..., None]
    x, y = centres[..., 0, None], centres[..., 1, None]                              # (B, L, 1)
    x0, y0, x1, y1 = boxes[:, None].unbind(-1)                                       # (B, 1, M)
    sides = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=3)                     # (B, L, M, 4)
    lower, upper = sizes * 4, sizes * 8  # each level learns boxes of its own scale
    lower[:, :per_level[0]], upper[:, -per_level[-1]:] = 0, float("inf")
    farthest = sides.amax(3)
    match &= (sides.amin(3) > 0) & (farthest > lower[..., None]) & (farthest < upper[..., None])
    areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    best, index = (match.to(torch.float32) * (1e8 - areas[:, None])).max(2)  # first of equal areas
    return index.masked_fill(best < 1e-5, -1)


class GlobalCountFCOSHead(FCOSHead):
    """torchvision's FCOS head losses (focal classification, GIoU boxes, centerness BCE) computed
    for the whole batch at once: no loop over frames and no `.item()`, bit-equal to torchvision's on
    the CPU (`tests/test_detection.py`); the positive locations' box and centerness selections still
    wait for a GPU, as torchvision's do. Normalised by the number of positive locations of the
    GLOBAL batch: FCOS divides by the count of its batch, and under DDP each rank would divide by
    its own count, so K processes would not compute what one process computes. With a process group
    of K > 1 ranks the count is summed over the ranks and the loss scaled by K, since DDP averages
    gradients."""

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs, padded=None):
        """`matched_idxs`: (B, L) from `fcos_matches`, or torchvision's list of (L,) per frame;
        `padded`: `padded_targets(targets)` when the caller has them already."""
        matched = torch.stack(list(matched_idxs)) if isinstance(matched_idxs, (list, tuple)) else matched_idxs
        anchors = torch.stack(list(anchors)) if isinstance(anchors, (list, tuple)) else anchors
        boxes, labels = padded if padded is not None else padded_targets(targets)
        index = matched.clamp(min=0)
        gt_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))
        gt_classes = labels.gather(1, index).masked_fill(matched < 0, -1)
        positive = gt_classes >= 0
        cls_logits = head_outputs["cls_logits"]
        cls_targets = torch.zeros_like(cls_logits).scatter_(  # one-hot at positives, without a boolean selection
            2, gt_classes.clamp(min=0)[..., None], positive[..., None].to(cls_logits.dtype))
        pred_boxes = self.box_coder.decode(head_outputs["bbox_regression"], anchors)
        distances = self.box_coder.encode(anchors, gt_boxes)
        left_right, top_bottom = distances[..., 0::2], distances[..., 1::2]  # views: a list index copies to the device
        ctr_targets = torch.sqrt((left_right.amin(-1) / left_right.amax(-1)) * (top_bottom.amin(-1) / top_bottom.amax(-1)))
        sums = {"classification": sigmoid_focal_loss(cls_logits, cls_targets, reduction="sum"),
                "bbox_regression": giou_loss(pred_boxes[positive], gt_boxes[positive]).sum(),
                "bbox_ctrness": F.binary_cross_entropy_with_logits(head_outputs["bbox_ctrness"].squeeze(2)[positive],
                                                                   ctr_targets[positive], reduction="sum")}
        count = positive.sum()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = count.float().reshape(1)
            dist.all_reduce(total)
            normaliser = total[0].clamp(min=1) / dist.get_world_size()
        else:
            normaliser = count.clamp(min=1)
        return {k: v / normaliser for k, v in sums.items()}


def is_detector(model: nn.Module) -> bool:
    """Whether `model` is a detector (FCOS) rather than a classifier."""
    return isinstance(getattr(model, "module", model), FCOS)


class DenseFCOS(FCOS):
    """torchvision's FCOS whose `forward(images)` returns the dense outputs used for training,
    distillation and the mean ensemble: `cls_logits` (B, L, C), `bbox_regression` (B, L, 4),
    `bbox_ctrness` (B, L, 1), `anchors` (B x (L, 4)), `per_level` (locations per level),
    `image_sizes` and the FPN maps `features` (for feature distillation). Images are
    (B, 3, S, S) floats in [0, 1], already S x S (no resizing). Its parameters and state_dict keys are FCOS's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # torchvision's normalize builds mean and std from Python lists at every forward: a copy to
        # the device that waits for it. As float32 buffers (the kit's images are float32) they move
        # with the network, outside its state_dict, and are the constants used from here on.
        for name, values in (("pixel_mean", self.transform.image_mean), ("pixel_std", self.transform.image_std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32)[:, None, None], persistent=False)

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
        """FCOS's losses with the batch's targets assigned in one pass (`fcos_matches`)."""
        anchors, padded = torch.stack(list(anchors)), padded_targets(targets)
        matched = fcos_matches(anchors, padded[0], num_anchors_per_level, self.center_sampling_radius)
        return self.head.compute_loss(targets, head_outputs, anchors, matched, padded)

    def forward(self, images):
        if not images.is_floating_point():
            raise TypeError(f"images must be floats in [0, 1], got {images.dtype}")
        images = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)  # torchvision's normalize
        features = list(self.backbone(images).values())
        head = self.head(features)
        image_list = ImageList(images, [tuple(images.shape[-2:])] * len(images))
        return {**head, "anchors": self.anchor_generator(image_list, features),
                "per_level": [f.shape[-2] * f.shape[-1] for f in features],
                "image_sizes": image_list.image_sizes, "features": features}


def build_detector(spec: DetectorSpec, num_classes: int = 2, pretrained: bool = False,
                   size: int = 160, levels: int = 5) -> "DenseFCOS":
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
    head = GlobalCountFCOSHead(spec.channels, 1, num_classes, num_convs=spec.head_convs)
    head.regression_head = SoftplusRegressionHead(spec.channels, 1, num_convs=spec.head_convs)
    return DenseFCOS(backbone, num_classes, min_size=size, max_size=size, anchor_generator=anchors,
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
