"""How different the students of one cohort are on the test set: the mechanism behind an
ensemble's gain (mutual learning is meant to pull students together, distillation from one
teacher towards the teacher; whether it does is measured here, not assumed).

- classification: `disagreement` is the share of tiles where two students' predicted classes
  differ; `kl` the mean KL(p_i || p_j) between their class probabilities;
- detection: `disagreement` is 1 - F1 of one student's boxes against the other's (IoU >= 0.5,
  each student's boxes above its own operating threshold; two empty frames agree), per frame;
  `kl` the mean binary KL between their polyp-probability maps over all locations.
Both are averaged over frames or tiles and over every ordered pair of students.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from .detection_eval import match_flags_all
from .evaluate import eval_batches
from ..names import students_in

EPS = 1e-6


def classification_diversity(probs: dict) -> dict:
    """`probs`: {student name: (n, C) probabilities}."""
    students = [np.clip(np.asarray(probs[k], float), EPS, 1) for k in students_in(probs)]
    assert all(p.ndim == 2 for p in students), "probabilities must be (n, C)"
    pairs = list(itertools.permutations(range(len(students)), 2))
    if not pairs:
        return {"disagreement": float("nan"), "kl": float("nan")}
    disagree = [np.mean(students[i].argmax(1) != students[j].argmax(1)) for i, j in pairs]
    kl = [np.mean((students[i] * np.log(students[i] / students[j])).sum(1)) for i, j in pairs]
    return {"disagreement": float(np.mean(disagree)), "kl": float(np.mean(kl))}


def _box_disagreements(a: list[dict], b: list[dict]) -> list[float]:
    """Per frame: 1 - 2 x (a's boxes matching one of b's at IoU 0.5) / (boxes of both); 0 for none."""
    out = []
    for da, db, flags in zip(a, b, match_flags_all(a, b)):
        both = len(da["scores"]) + len(db["scores"])
        out.append(1.0 - 2 * int(flags.sum()) / both if both else 0.0)
    return out


@torch.no_grad()
def detection_diversity(networks: dict, data, task, thresholds: dict, batch_size: int = 16) -> dict:
    """`thresholds`: {student name: its operating score threshold (chosen on validation)}."""
    names = students_in(networks)
    pairs = list(itertools.permutations(range(len(names)), 2))
    if not pairs:
        return {"disagreement": float("nan"), "kl": float("nan")}
    disagree, kl, locations = [], 0.0, 0
    boxes_known = all(np.isfinite(thresholds[k]) for k in names)  # else "both empty" is no agreement
    for batch in eval_batches({k: networks[k] for k in names}, data, task, batch_size):
        outs = [task.outputs(networks[k], batch) for k in names]
        probs = [torch.sigmoid(o["cls_logits"][..., 1].float()).clamp(EPS, 1 - EPS) for o in outs]
        dets = [[{key: v[d["scores"] >= thresholds[k]] for key, v in d.items()} for d in task.detections(o)]
                for k, o in zip(names, outs)]
        for i, j in pairs:
            p, q = probs[i], probs[j]
            kl += float((p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum())
            disagree += _box_disagreements(dets[i], dets[j])
        locations += probs[0].numel()
    return {"disagreement": float(np.mean(disagree)) if boxes_known else float("nan"),
            "kl": kl / (locations * len(pairs))}
