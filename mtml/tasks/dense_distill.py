"""Dense distillation between two detectors' aligned head outputs (FCOS), one place (OURS).

The outputs of a student (s) and a target (t: the teacher or a peer, detached) line up location by
location (same strides and frame size). With c = max over the polyp channels of sigmoid(logit),
the confidence at a location, and tau the temperature, three terms are distilled:

    classification  tau^2 KL_bin(sigma(z_t / tau) || sigma(z_s / tau))   per location and channel
    boxes           GIoU loss between the decoded boxes (or L1 on the regressions)
    centerness      KL_bin(sigma(ctr_t) || sigma(ctr_s)) at tau = 1

    L = w_cls * classification + w_box * boxes + w_ctr * centerness        (each weight >= 0)

Two weightings of the locations (each term a weighted mean sum(w * l) / sum(w)):

* `foreground` (default; set before the validation ablation in docs/choices.md, which could not tell
  it apart from `confidence`, so it stayed): class maps over the polyp
  channel only (torchvision's background slot 0 is never a positive class, so it carries no
  knowledge), with w = max(c_t, c_s), normalised per image then averaged over images; boxes and
  centerness only at locations inside a ground-truth box, with w = c_t. The box and centerness
  targets of a detector are meaningless away from objects, and with near-uniform early
  confidences most of their weight used to sit on background.
* `confidence` (the kit's first weighting, kept for the ablation): every channel, w = max(c_t, c_s)
  over all locations of the batch for class maps; w = c_t at every location for boxes and
  centerness.

In both, a target box of zero area has no GIoU and does not count. Under DDP the normalisers
sum(w) of the batch-wide means are summed over the ranks (`_global_share`), so K processes
compute what one process computes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..core.losses import soft_kl
from .detectors import giou_loss, padded_targets

WEIGHTINGS = ("foreground", "confidence")
BOX_LOSSES = ("giou", "l1")


@dataclass(frozen=True)
class DenseDistillation:
    weighting: str = "foreground"
    box_loss: str = "giou"
    w_cls: float = 1.0
    w_box: float = 1.0
    w_ctr: float = 1.0

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"distillation weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be 'giou' or 'l1', got {self.box_loss!r}")
        for name in ("w_cls", "w_box", "w_ctr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def settings(self) -> dict:
        return asdict(self)

    def __call__(self, out: dict, target: dict, temperature: float) -> torch.Tensor:
        s_cls, t_cls = out["cls_logits"], target["cls_logits"].detach()
        if s_cls.shape != t_cls.shape:
            raise ValueError(f"dense outputs do not line up: {tuple(s_cls.shape)} vs {tuple(t_cls.shape)}; "
                             "teacher and students need the same version (strides) and frame size")
        focused = self.weighting == "foreground"
        if focused:
            s_cls, t_cls = s_cls[..., 1:], t_cls[..., 1:]
        conf_t = torch.sigmoid(t_cls).amax(-1)          # (B, L)
        conf_s = torch.sigmoid(s_cls.detach()).amax(-1)
        where = foreground(out) if focused else torch.ones_like(conf_t, dtype=torch.bool)
        total = s_cls.new_zeros(())
        if self.w_cls > 0:
            total = total + self.w_cls * self._class_maps(s_cls, t_cls, torch.maximum(conf_t, conf_s),
                                                          temperature, per_image=focused)
        if self.w_box > 0:
            total = total + self.w_box * self._boxes(out, target, conf_t * where)
        if self.w_ctr > 0:
            w = (conf_t * where).flatten()
            total = total + self.w_ctr * _global_share(w.sum()) * soft_kl(
                out["bbox_ctrness"].reshape(-1, 1), target["bbox_ctrness"].reshape(-1, 1), 1.0,
                kind="sigmoid", weight=w)
        return total

    @staticmethod
    def _class_maps(s_cls, t_cls, weight, temperature, per_image: bool):
        classes = s_cls.shape[-1]
        if not per_image:
            return _global_share(weight.sum()) * soft_kl(s_cls.reshape(-1, classes), t_cls.reshape(-1, classes),
                                                         temperature, kind="sigmoid", weight=weight.flatten())
        return torch.stack([soft_kl(s, t, temperature, kind="sigmoid", weight=w)
                            for s, t, w in zip(s_cls, t_cls, weight)]).mean()

    def _boxes(self, out, target, weight):
        s_reg, t_reg = out["bbox_regression"], target["bbox_regression"].detach()
        weight = weight.flatten()
        if self.box_loss == "l1":
            per_loc = (s_reg - t_reg).abs().sum(-1).flatten()
        else:
            anchors = torch.stack(out["anchors"])
            coder = out["model"].box_coder
            t_box = coder.decode(t_reg, anchors).reshape(-1, 4)
            per_loc = giou_loss(coder.decode(s_reg, anchors).reshape(-1, 4), t_box)
            weight = weight * ((t_box[:, 2] > t_box[:, 0]) & (t_box[:, 3] > t_box[:, 1]))
        return _global_share(weight.sum()) * (weight * per_loc).sum() / weight.sum().clamp_min(1e-6)


def _global_share(local_weight: torch.Tensor) -> float:
    """The factor that turns a mean normalised by this rank's sum of weights into its share of the
    mean normalised by the sum over all ranks (times the number of ranks, since DDP averages
    gradients); 1 without a process group of several ranks."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return 1.0
    local = float(local_weight.detach().clamp_min(1e-6))
    total = local_weight.detach().reshape(1).clone()
    dist.all_reduce(total)
    return local * dist.get_world_size() / max(float(total), 1e-6)


def foreground(out: dict) -> torch.Tensor:
    """(B, L) True at locations whose centre lies inside (or on the edge of) a ground-truth box of
    their image, for the whole batch at once."""
    anchors = torch.stack(list(out["anchors"]))
    centres = (anchors[..., :2] + anchors[..., 2:]) / 2
    boxes, labels = padded_targets(out["targets"])
    x, y = centres[..., 0, None], centres[..., 1, None]                              # (B, L, 1)
    x0, y0, x1, y1 = boxes.to(centres.dtype)[:, None].unbind(-1)                     # (B, 1, M)
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1) & (labels[:, None] >= 0)  # padding is outside
    return inside.any(2)
