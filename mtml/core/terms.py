"""The student objective as a list of named, weighted terms (the combination is OURS; Niyaz &
Bathula do not publish theirs):

    L_i = w_ce * sup_i + w_kd * kd_i + w_ml * ml_i

Each term is a function of what student i sees in one step (a `StudentView`) that returns a loss,
or None when the mode leaves it off; its weight is a function of the config and the warm-up
factor. `cohort_step` sums whatever is in STUDENT_TERMS, in order, so a new distillation loss is
one function and one `Term` appended there (tests/test_losses.py adds a toy term that way).
Every target a term reads (the teacher's or a peer's outputs and maps) is detached by the loss
functions, so a term never sends gradient into the teacher or a peer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..names import student_name
from .cohort import USES_ML
from .features import uses


@dataclass
class StudentView:
    """What student `index`'s terms may read in one step. `teacher` is (outputs, maps) or None;
    `peers` lists (j, outputs, maps) of the other students; `log` collects named values for the
    history (a term logs its parts as `<student>/<name>`)."""
    index: int
    out: Any
    maps: Any
    teacher: tuple | None
    peers: list
    cohort: Any
    task: Any
    batch: Any
    log: dict

    @property
    def name(self) -> str:
        return student_name(self.index)


@dataclass(frozen=True)
class Term:
    name: str  # unique; the run identity records the names of terms added to the kit's three
    weight: Callable[[Any, float], float]  # (CohortConfig, warm-up factor) -> weight
    loss: Callable[[StudentView], torch.Tensor | None]


def supervised(v: StudentView) -> torch.Tensor:
    """The task's own loss on the labels (cross-entropy; FCOS's loss for detection)."""
    v.log[f"{v.name}/sup"] = loss = v.task.supervised_loss(v.out, v.batch)
    return loss


def from_teacher(v: StudentView) -> torch.Tensor | None:
    """Knowledge distillation (Hinton et al. 2015): tau^2 KL(p_T || p_i), and feature maps when
    this student's teacher knowledge says so (notebook 09)."""
    if v.teacher is None:
        return None
    cfg, (teacher_out, teacher_maps) = v.cohort.cfg, v.teacher
    return _knowledge(v, "kd", cfg.knowledge()[0][v.index],
                      lambda: v.task.distill_loss(v.out, teacher_out, cfg.temperature),
                      lambda: v.cohort.adapters[v.name].loss("teacher", v.maps, teacher_maps))


def from_peers(v: StudentView) -> torch.Tensor | None:
    """Deep mutual learning (Zhang et al. 2018): the mean over peers j of tau^2 KL(p_j || p_i),
    and feature maps when the peer knowledge says so."""
    cfg = v.cohort.cfg
    if cfg.mode not in USES_ML:
        return None
    return _knowledge(
        v, "ml", cfg.knowledge()[1],
        lambda: torch.stack([v.task.distill_loss(v.out, out, cfg.temperature) for _, out, _ in v.peers]).mean(),
        lambda: torch.stack([v.cohort.adapters[v.name].loss(student_name(j), v.maps, maps)
                             for j, _, maps in v.peers]).mean())


def _knowledge(v: StudentView, key: str, knowledge: str, predictions, features) -> torch.Tensor | None:
    """One source's term: the prediction term, plus w_feat x the feature term, as the knowledge
    says; each part is logged (`<student>/<key>`, `<student>/<key>_feat`)."""
    total = None
    if uses(knowledge, "predictions"):
        total = v.log[f"{v.name}/{key}"] = predictions()
    if uses(knowledge, "features"):
        v.log[f"{v.name}/{key}_feat"] = feat = features()
        total = v.cohort.cfg.w_feat * feat + (total if total is not None else 0)
    return total


KIT_TERMS = ("sup", "kd", "ml")  # a term named otherwise enters the run's identity (mtml.runs.spec)
STUDENT_TERMS: list[Term] = [
    Term("sup", lambda cfg, ramp: cfg.w_ce, supervised),
    Term("kd", lambda cfg, ramp: ramp * cfg.w_kd, from_teacher),
    Term("ml", lambda cfg, ramp: ramp * cfg.w_ml, from_peers),
]


def student_loss(v: StudentView, ramp: float = 1.0) -> torch.Tensor:
    """The weighted sum of the terms that are on for this student, in STUDENT_TERMS' order."""
    total = None
    for term in STUDENT_TERMS:
        value = term.loss(v)
        if value is not None:
            weighted = term.weight(v.cohort.cfg, ramp) * value
            total = weighted if total is None else total + weighted
    return total
