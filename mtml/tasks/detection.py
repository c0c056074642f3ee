"""The detection task for `mtml.core.step.cohort_step`: batches of frames with boxes, a detector's
dense outputs from one forward, FCOS's own losses, dense distillation (`mtml.dense_distill`), the
students' mean ensemble and FCOS's postprocess. Detectors live in `mtml.detectors`, their
evaluation in `mtml.detection_eval`, pictures in `mtml.plots.draw_detections`.

The student ensemble averages the students' sigmoid probabilities, box regressions and
centerness at each location and runs FCOS's postprocess (score threshold, NMS) once; weighted box
fusion of the students' final boxes is the alternative (`ensemble="wbf"`).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from . import register
from .dense_distill import DenseDistillation
from .detection_eval import detection_units, evaluate_detection


def resize_item(image: torch.Tensor, boxes: torch.Tensor, size: int):
    """Resizes a (3, H, W) image to (3, size, size) and scales its (k, 4) xyxy boxes to match."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image, boxes
    image = F.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)[0]
    return image, boxes * torch.tensor([size / w, size / h, size / w, size / h])


@register
class DetectionTask:
    """Batches: `image` (B, 3, S, S) float in [0, 1], `targets` a list of {boxes (k, 4) xyxy pixels,
    labels (k,) = 1}, `index` (B,). Items are dicts with `image` (uint8 or float) and `boxes`."""

    name = "detection"
    metric = "map50"
    history_metrics = ("map50",)
    smoke_caps = {"EPOCHS": 1, "FRAME_SIZE": 96, "TRAIN_FRAMES": 24, "EVAL_FRAMES": 16}
    knob_types = {"SCORE_THRESHOLD": float, "W_DISTILL_CLS": float, "W_DISTILL_BOX": float, "W_DISTILL_CTR": float,
                  "SPLIT_SEED": int, "FRAME_SIZE": int, "TRAIN_FRAMES": int, "EVAL_FRAMES": int}
    item, bootstrap_unit = "frame", "frames"  # one test input; what a study's bootstrap resamples
    data_kind = "polyp frames (data_scripts/polyp.py)"
    notebooks = {"kd": "05_detection_kd_only", "ml": "06_detection_ml_only", "kd_ml": "07_detection_kd_plus_ml",
                 "independent": "07_detection_kd_plus_ml", "offline": "05_detection_kd_only",
                 "kd_ml_styles": "07_detection_kd_plus_ml"}

    @staticmethod
    def versions() -> tuple:
        from .detectors import VERSIONS

        return tuple(VERSIONS)

    @staticmethod
    def reads_manifest(columns: set) -> bool:
        return "boxes" in columns

    @staticmethod
    def folder_fingerprint(folder: Path, size: int) -> str:
        """The content hash of a prepared (or unprepared Kvasir-SEG) folder, without decoding images."""
        from .polyp import polyp_fingerprint

        return polyp_fingerprint(folder, size)["manifest_sha256"]

    @staticmethod
    def load_folder(folder: Path, size: int):
        """Every frame of a prepared (or unprepared Kvasir-SEG) folder, at `size` pixels: an external test set."""
        from .polyp import load_polyp_dataset

        return load_polyp_dataset(folder, split=None, size=size)
    PARAMETERS = {"size": "FRAME_SIZE", "box_loss": "BOX_LOSS", "ensemble": "ENSEMBLE", "score_threshold": "SCORE_THRESHOLD"}
    DISTILL_PARAMETERS = {"weighting": "DISTILL_WEIGHTING", "w_cls": "W_DISTILL_CLS", "w_box": "W_DISTILL_BOX",
                          "w_ctr": "W_DISTILL_CTR"}  # the fields of DenseDistillation

    @classmethod
    def from_parameters(cls, params: dict) -> "DetectionTask":
        own = {k: params[p] for k, p in cls.PARAMETERS.items() if p in params}
        distill = {k: params[p] for k, p in cls.DISTILL_PARAMETERS.items() if p in params}
        return cls(**own, distill=DenseDistillation(**distill, box_loss=own.get("box_loss", "giou")))

    size_parameter = "FRAME_SIZE"

    @staticmethod
    def generated(n: int, size: int, seed: int = 0, split: int = 0):
        """`n` SYNTHETIC polyp frames (`split` 1: validation frames)."""
        from .polyp import make_synthetic_polyps

        return make_synthetic_polyps(n, size, seed=seed, split=split)
    stackable = False

    @staticmethod
    def load_splits(params: dict, data: str | None = None, who: str = "this run", with_test: bool = True):
        """(train, val, test, description, flip augmentation) of the parameters' frames; with
        `data="real"`, real Kvasir-SEG frames are required; without `with_test`, test is None
        and no test frame is read."""
        from .polyp import flip_augment, polyp_splits

        limits = (params.get("TRAIN_FRAMES"), params.get("EVAL_FRAMES"), params.get("EVAL_FRAMES"))
        extra = {"split_by": params["SPLIT_BY"]} if "SPLIT_BY" in params else {}
        *splits, label = polyp_splits(params.get("DATA_DIR"), params.get("FRAME_SIZE", 160), limits,
                                      seed=params.get("SPLIT_SEED", 0), with_test=with_test, **extra)
        if data == "real" and label.startswith("SYNTHETIC"):
            raise FileNotFoundError(f"{who} needs real Kvasir-SEG frames: python data_scripts/polyp.py kvasir")
        return (*splits, label, flip_augment)

    def study_record(self, result, val, test) -> tuple[dict, pd.DataFrame]:
        """What a study keeps of a finished run besides its metrics: each network's operating point
        (the score threshold of best F1 on the validation frames, applied to the test frames), the
        students' diversity at their thresholds, and the ensemble's test units."""
        import numpy as np

        from ..names import students_in
        from .detection_eval import operating_point, predict_detections
        from .diversity import detection_diversity

        nets, row = result.cohort.networks, {}
        students = students_in(nets)
        preds, targets = predict_detections(nets, val, self)  # the units need no metric
        val_units = self.test_units(preds, targets, data=val)
        for who in [*nets, "ensemble"]:
            for k, v in operating_point(val_units, result.units, who).items():
                row[f"{who}/{k}"] = v
        for k in ("op_precision", "op_recall", "op_f1"):
            row[f"students_mean/{k}"] = float(np.mean([row[f"{s}/{k}"] for s in students]))
        diversity = detection_diversity(nets, test, self, {s: row[f"{s}/op_threshold"] for s in students})
        row.update({f"diversity/{k}": v for k, v in diversity.items()})
        return row, result.units[result.units["network"] == "ensemble"].round({"score": 7})

    @staticmethod
    def split_hygiene(params: dict) -> dict:
        """How the split keeps near-duplicate frames apart (`mtml.polyp.split_hygiene`)."""
        from .polyp import default_polyp_root, split_hygiene

        root = Path(params["DATA_DIR"]) if params.get("DATA_DIR") else default_polyp_root()[0]
        return split_hygiene(root, seed=params.get("SPLIT_SEED", 0))

    @staticmethod
    def cost_networks(version: str, n_students: int, size: int | None):
        """(teacher, students, input size, combine) for `mtml.runs.costs`, built as a run builds them."""
        from .detectors import FRAME_SIZE, build_detection_networks

        size = size or FRAME_SIZE[version]
        teacher, students = build_detection_networks(version, n_students, 2, pretrained=False, size=size)
        return teacher, students, size, DetectionTask(size=size).ensemble

    @staticmethod
    def data_fingerprint(params: dict) -> dict:
        """The prepared frames' manifest hash, the frame size, the split and its caps."""
        from .polyp import polyp_fingerprint

        limits = (params.get("TRAIN_FRAMES"), params.get("EVAL_FRAMES"), params.get("EVAL_FRAMES"))
        return polyp_fingerprint(params.get("DATA_DIR"), params.get("FRAME_SIZE", 160), limits,
                                 seed=params.get("SPLIT_SEED", 0), split_by=params.get("SPLIT_BY", "near_duplicates"))
    config_defaults = {"epochs": 6, "batch_size": 8, "lr": 0.01,  # ours (the notebooks; the studies: 8), size 160
                       "feature_levels": 3}  # features matched on P3-P5 (mtml.features)
    # settings() the teacher's training and its validation map50 never read: runs that differ only
    # in them share one teacher tape (mtml.teacher_tape)
    student_only_settings = ("ensemble", "score_threshold", "wbf_iou", "weighting", "box_loss",
                             "w_cls", "w_box", "w_ctr")

    def __init__(self, size: int = 160, box_loss: str = "giou", ensemble: str = "mean", score_threshold: float = 0.3,
                 wbf_iou: float = 0.55, distill: DenseDistillation | None = None):
        """`distill`: how a student learns a teacher's or a peer's dense maps (weighting and each
        term's weight; by default `DenseDistillation(box_loss=box_loss)`); one box loss per task."""
        if ensemble not in ("mean", "wbf"):
            raise ValueError(f"ensemble must be 'mean' or 'wbf', got {ensemble!r}")
        if size < 32 or size % 32:
            raise ValueError(f"size must be a multiple of 32 (the FPN's coarsest stride), got {size}")
        if distill is not None and not isinstance(distill, DenseDistillation):
            raise TypeError(f"distill must be a mtml.tasks.dense_distill.DenseDistillation, got {type(distill).__name__}")
        if distill is not None and distill.box_loss != box_loss:
            raise ValueError(f"box_loss {box_loss!r} and distill.box_loss {distill.box_loss!r} differ: a task has one box "
                             "loss; give DenseDistillation the same box_loss")
        self.distill = distill or DenseDistillation(box_loss=box_loss)
        self.size, self.box_loss, self.ensemble_kind = size, box_loss, ensemble
        self.score_threshold, self.wbf_iou = score_threshold, wbf_iou

    def networks(self, version, n_students, num_classes=2, pretrained=False, with_teacher=True):
        """The version's detectors at this task's frame size."""
        from .detectors import build_detection_networks

        return build_detection_networks(version, n_students, num_classes, pretrained, with_teacher, size=self.size)

    def is_own_network(self, model):
        from .detectors import is_detector

        return is_detector(model)

    def check_networks(self, networks: dict) -> None:
        from .task import check_networks

        check_networks(self, networks)

    def test_units(self, preds, targets, data=None) -> pd.DataFrame:
        return detection_units(preds, targets, frames=getattr(data, "frames", None))

    def settings(self):
        return {"size": self.size, "ensemble": self.ensemble_kind, "score_threshold": self.score_threshold,
                "wbf_iou": self.wbf_iou, **self.distill.settings()}

    @classmethod
    def from_settings(cls, s: dict) -> "DetectionTask":
        """The task whose `settings()` are `s` (a run spec's task settings)."""
        distill = DenseDistillation(s["weighting"], s["box_loss"], s["w_cls"], s["w_box"], s["w_ctr"])
        return cls(size=s["size"], box_loss=s["box_loss"], ensemble=s["ensemble"], score_threshold=s["score_threshold"],
                   wbf_iou=s["wbf_iou"], distill=distill)

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

    def augment(self, batch, generator=None):
        """The training augmentation: random horizontal and vertical flips of frames and boxes."""
        from .polyp import flip_augment

        return flip_augment(batch, generator=generator)

    def to_device(self, batch, device):
        return {"image": batch["image"].to(device, non_blocking=True), "index": batch["index"],
                "targets": [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch["targets"]]}

    # training -----------------------------------------------------------------------------
    def outputs(self, model, batch):
        """One forward of a `DenseFCOS` (or of its DDP / compiled wrapper): the dense maps, plus
        the detector itself (its losses, box coder and postprocess) and the batch's boxes."""
        return {**model(batch["image"]), "model": getattr(model, "module", model),
                "targets": batch["targets"]}

    def outputs_and_features(self, model, batch, levels: int = 1):
        """(outputs, the first `levels` FPN maps) of one forward (`mtml.features`)."""
        out = self.outputs(model, batch)
        if levels > len(out["features"]):
            raise ValueError(f"feature_levels={levels}, but the detector has {len(out['features'])} FPN levels")
        return out, out["features"][:levels]

    def supervised_loss(self, out, batch):
        """FCOS's own losses: focal classification + GIoU boxes + centerness BCE, summed."""
        losses = out["model"].compute_loss(batch["targets"], out, out["anchors"], out["per_level"])
        return sum(losses.values())

    def distill_target(self, out):
        """The part of a teacher's output that `distill_loss` reads (what a teacher tape keeps)."""
        return {k: out[k] for k in ("cls_logits", "bbox_regression", "bbox_ctrness")}

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
