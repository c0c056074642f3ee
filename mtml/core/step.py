"""One training step of the whole cohort on one batch, for any task.

Every network runs its forward exactly once; the teacher's outputs are shared by all students;
every distillation target is detached, so a student's loss never reaches the teacher or a peer.
The students' losses are summed and back-propagated once (an online teacher's right after its
forward, which frees its graph early); since the terms are isolated, this equals one backward
per network.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..io import map_tensors
from ..names import student_name
from .cohort import Cohort, _check_stackable
from .features import uses
from .terms import StudentView, student_loss


class NonFiniteLossError(RuntimeError):
    """A loss term (or, checked before each checkpoint, a network's weights) is NaN or infinite."""

    def __init__(self, network: str, term: str, step: int, value: float):
        self.network, self.term, self.step = network, term, step
        what = "weights after the update" if term == "weights" else "loss"
        super().__init__(f"non-finite {what} at step {step}: {network} {term} = {value}. Lower the "
                         "learning rate or the loss weights; the last good checkpoint is kept")


def distill_ramp(epochs_done: float, warmup_epochs: float) -> float:
    """The factor on w_kd and w_ml after `epochs_done` epochs (fractional): the sigmoid-shaped
    ramp exp(-5 (1 - t/T)^2) of Laine & Aila (2017), used by ONE (Lan et al. 2018) and OKDDip
    (Chen et al. 2020) for online distillation, shifted and rescaled (OURS) so that it is exactly
    0 at the first step (random teacher and peers teach nothing) and 1 from T on. T = 0: always 1."""
    if warmup_epochs <= 0 or epochs_done >= warmup_epochs:
        return 1.0
    floor = math.exp(-5.0)
    return (math.exp(-5.0 * (1.0 - epochs_done / warmup_epochs) ** 2) - floor) / (1.0 - floor)


def _student_forwards(cohort: Cohort, batch, task, with_maps):
    """[(outputs, feature maps or None)] per student: one forward each, or one stacked forward."""
    if cohort.cfg.stack_students:
        from .stacking import stacked_forward

        _check_stackable(cohort.cfg, None, task)  # the students were checked when the cohort was built
        context = (torch.autocast(cohort.device.type, dtype=torch.bfloat16) if cohort.cfg.amp
                   else contextlib.nullcontext())
        with context:
            outs = stacked_forward(cohort.students, batch["image"])
        return [(_float32(out), None) for out in outs]
    return [with_maps(i, s) for i, s in enumerate(cohort.students)]


def _cohort_losses(cohort: Cohort, batch, task, step: int, ramp: float, teacher_step=None):
    """The forwards and loss terms of one cohort step: (summed loss, {name: term}). An online
    teacher's loss is back-propagated at once (OURS, for speed): its graph is freed before the
    students run, which lowers peak memory; the gradients are the same."""
    cfg = cohort.cfg
    terms: dict[str, torch.Tensor] = {}
    total = 0.0
    teacher_out = None
    if cfg.distill_warmup_epochs > 0:
        terms["cohort/distill_ramp"] = torch.tensor(ramp)
    teacher_k, peer_k = cfg.knowledge()
    levels = cfg.feature_levels

    def forward(model, with_maps: bool):
        if with_maps:
            return task.outputs_and_features(model, batch, levels)
        return task.outputs(model, batch), None

    teacher_maps = None
    if cohort.teacher is not None:
        teacher_maps_needed = any(uses(k, "features") for k in teacher_k)
        if cohort.frozen_teacher:
            with torch.no_grad():
                teacher_out, teacher_maps = forward(cohort.teacher, teacher_maps_needed)
        else:
            def train_teacher():
                out, maps = forward(cohort.teacher, teacher_maps_needed)
                sup = terms["teacher/sup"] = task.supervised_loss(out, batch)
                _check_finite(sup, terms, step)
                sup.backward()
                return map_tensors(out, torch.Tensor.detach), maps, sup.detach()

            teacher_out, teacher_maps, terms["teacher/sup"] = (  # a tape records it, or replays a recorded one
                teacher_step(step, train_teacher, cohort.device) if teacher_step is not None else train_teacher())
        teacher_maps = map_tensors(teacher_maps, torch.Tensor.detach)
    peer_maps_needed = uses(peer_k, "features")
    forwards = _student_forwards(cohort, batch, task, lambda i, s: forward(
        s, peer_maps_needed or bool(teacher_k) and uses(teacher_k[i], "features")))
    teacher = (teacher_out, teacher_maps) if teacher_out is not None else None
    for i, (out, maps) in enumerate(forwards):
        peers = [(j, *forwards[j]) for j in range(len(forwards)) if j != i]
        view = StudentView(i, out, maps, teacher, peers, cohort, task, batch, terms)
        loss = terms[f"{student_name(i)}/loss"] = student_loss(view, ramp)  # mtml.core.terms
        total = total + loss
    return total, terms


def _float32(x):
    return map_tensors(x, lambda t: t.float() if t.is_floating_point() else t)


class _AmpTask:
    """`task` with its forwards under bf16 autocast; the losses get float32 outputs (a KL in
    bf16 is too coarse)."""

    def __init__(self, task, device: torch.device):
        self.task, self.device = task, device

    def __getattr__(self, name):
        return getattr(self.task, name)

    def outputs(self, model, batch):
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return _float32(self.task.outputs(model, batch))

    def outputs_and_features(self, model, batch, levels):
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return _float32(self.task.outputs_and_features(model, batch, levels))


def _check_finite(total: torch.Tensor, terms: dict, step: int) -> None:
    """NonFiniteLossError naming the first non-finite term, before `total` is back-propagated."""
    if not torch.isfinite(total):
        for key, value in terms.items():
            if not torch.isfinite(value):
                network, term = key.split("/")
                raise NonFiniteLossError(network, term, step, float(value.detach()))
        raise NonFiniteLossError("cohort", "total", step, float(total.detach()))  # finite terms overflowed


def cohort_step(cohort: Cohort, batch, task, step: int = 0, *, distill_scale: float | None = None, teacher_step=None,
                before_update=None) -> dict[str, torch.Tensor]:
    """One optimisation step of the whole cohort on one batch. Returns detached loss terms.
    `distill_scale` multiplies w_kd and w_ml: the warm-up's `distill_ramp`, which the loop passes
    (required when `distill_warmup_epochs > 0`; else 1).
    `teacher_step(step, train_teacher, device)`, if given, stands in for the online teacher's step
    (the teacher tape records or replays it); `before_update()` runs between the backward pass and
    the update (DDP averages the adapters' gradients there)."""
    if distill_scale is None and cohort.cfg.distill_warmup_epochs > 0:
        raise ValueError("distill_warmup_epochs > 0 needs distill_scale (fit passes distill_ramp(epochs done, warm-up))")
    distill_scale = 1.0 if distill_scale is None else distill_scale
    cohort.optimizer.zero_grad(set_to_none=True)
    task = _AmpTask(task, cohort.device) if cohort.cfg.amp else task
    total, terms = _cohort_losses(cohort, batch, task, step, distill_scale, teacher_step)
    _check_finite(total, terms, step)
    total.backward()
    if before_update is not None:
        before_update()
    if cohort.cfg.clip_grad_norm > 0:  # one param group per network
        for group in cohort.optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], cohort.cfg.clip_grad_norm, foreach=True)
    cohort.optimizer.step()
    if cohort.scheduler is not None:
        cohort.scheduler.step()
    return {k: v.detach() for k, v in terms.items()}
