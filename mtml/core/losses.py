"""Distillation losses: teacher -> student (KD) and student <-> student (mutual learning).

Notation: z are logits, tau > 0 a temperature, p^tau = softmax(z / tau).

* Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
  Network", arXiv 1503.02531):  L_kd = tau^2 * KL(p_T^tau || p_S^tau).
  The tau^2 factor keeps the gradient roughly the same size as tau changes (exactly so only for
  large tau; Hinton et al., section 2).
* Deep mutual learning (Zhang, Xiang, Hospedales & Lu 2018, CVPR, arXiv 1706.00384): each student
  minimises KL(p_j || p_i) towards every peer j, the peer's distribution held fixed.
  Averaging over the N-1 peers is DML's own (its K-network loss has the factor 1/(K-1)); applying
  tau and tau^2 to the peer term is **our** choice (DML uses tau = 1), and so is updating every
  student at once (DML's Algorithm 1 updates the networks in turn).
* The combined student objective is **ours** (Niyaz & Bathula 2022 do not publish theirs):
      L_i = w_ce * CE(y, z_i) + w_kd * L_kd(z_T, z_i) + w_ml * mean_{j != i} L_kd(z_j, z_i)
  as a list of named, weighted terms in `mtml.core.terms`.

Every target distribution is detached here, so a distillation term never sends gradient into
the teacher or a peer.

`kind="sigmoid"` applies the same formulas to independent per-location binary distributions
(detection classification maps), summing the two-outcome KL over the last dimension.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

KINDS = ("softmax", "sigmoid")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def soft_kl(student: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
            kind: str = "softmax", weight: torch.Tensor | None = None) -> torch.Tensor:
    """tau^2 * KL(p_target^tau || p_student^tau), averaged over rows.

    `student`, `target`: logits of shape (rows, classes). `target` is detached.
    `weight` (rows,): optional per-row weights; the result is then sum(w * kl) / max(sum(w), 1e-6).
    """
    _check_temperature(temperature)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if student.shape != target.shape:
        raise ValueError(f"student {tuple(student.shape)} and target {tuple(target.shape)} differ")
    target = target.detach()
    s, t = student / temperature, target / temperature
    if kind == "softmax":
        log_ps, log_pt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    else:
        # two outcomes per entry: log p = logsigmoid(z), log (1 - p) = logsigmoid(-z)
        pt = torch.sigmoid(t)
        kl = (pt * (F.logsigmoid(t) - F.logsigmoid(s))
              + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))).sum(-1)
    kl = kl.clamp_min(0.0)  # rounding can give -1e-9 for identical inputs
    if weight is None:
        per_row = kl.mean() if kl.numel() else kl.sum()
    else:
        weight = weight.detach().to(kl.dtype)
        per_row = (weight * kl).sum() / weight.sum().clamp_min(1e-6)
    return temperature ** 2 * per_row


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. (2015): tau^2 * KL(p_T^tau || p_S^tau); the teacher is detached."""
    return soft_kl(student_logits, teacher_logits, temperature)


def mutual_loss(student_logits: torch.Tensor, peer_logits: Sequence[torch.Tensor],
                temperature: float = 1.0) -> torch.Tensor:
    """Deep mutual learning (Zhang et al. 2018), averaged over peers as DML does (tau is ours):
    (1 / (N - 1)) * sum_j tau^2 * KL(p_j^tau || p_i^tau), each peer detached."""
    if len(peer_logits) == 0:
        raise ValueError("mutual_loss needs at least one peer")
    return torch.stack([soft_kl(student_logits, p, temperature) for p in peer_logits]).mean()
