"""Statistics over runs: Holm's adjustment and bootstrap intervals over test units.

A run's test predictions are kept per test unit (`test_units`: tiles grouped by patient for
classification, detections grouped by frame for detection). A bootstrap resample draws units with
replacement, the same draw for every run of a comparison, and recomputes each run's metric with
the units weighted by how often they were drawn. The resulting interval covers the uncertainty of
a finite test set given the trained networks; the t-interval over seeds covers training noise.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..names import students_in
from ..tasks.detection_eval import average_precision

N_BOOT = 2000
BOOTSTRAP_METRICS = ("auroc", "patient_auroc", "map50")


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted in the family)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def weighted_auroc(scores, labels, weights) -> np.ndarray:
    """AUROC of `scores` (n,) for binary `labels` (n,) with sample weights (B, n) or (n,): the
    weighted probability that a positive outscores a negative, ties counting one half."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    w = np.atleast_2d(np.asarray(weights, float))
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], labels[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    total = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (pos * (below + 0.5 * neg)).sum(1) / total, np.nan)


def unit_ids(units: pd.DataFrame) -> np.ndarray:
    return np.sort(units["unit"].unique())


def unit_metric(units: pd.DataFrame, metric: str, who: str, counts: np.ndarray, ids: np.ndarray,
                chunk: int = 200) -> np.ndarray:
    """`metric` of network `who` ('ensemble', 'teacher', 'students_mean', 'student_1', ...) for
    each row of `counts` (B, n_units): how often each unit of `ids` is drawn. Rows are computed
    `chunk` at a time (per-sample weights of a large test set would not fit in memory at once)."""
    if len(counts) > chunk:
        return np.concatenate([unit_metric(units, metric, who, counts[i:i + chunk], ids, chunk)
                               for i in range(0, len(counts), chunk)])
    if who == "students_mean":
        students = sorted(students_in(_networks(units)))
        if not students:
            return np.full(len(counts), np.nan)
        return np.mean([unit_metric(units, metric, s, counts, ids) for s in students], axis=0)
    if who not in _networks(units):
        return np.full(len(counts), np.nan)
    position = np.searchsorted(ids, units["unit"].to_numpy())
    if metric == "map50":
        mine = units[units["network"] == who]
        frames = mine[mine["score"].isna()]
        dets = mine[mine["score"].notna()]
        return average_precision(dets["score"], dets["tp"], frames["n_gt"],
                                 counts[:, np.searchsorted(ids, dets["unit"])],
                                 counts[:, np.searchsorted(ids, frames["unit"])])
    if metric == "auroc":
        return weighted_auroc(units[who], units["label"], counts[:, position])
    if metric == "patient_auroc":
        per_unit = units.groupby("unit").agg(score=(who, "mean"), label=("label", "first"))
        return weighted_auroc(per_unit["score"], per_unit["label"],
                              counts[:, np.searchsorted(ids, per_unit.index.to_numpy())])
    raise ValueError(f"no bootstrap for metric {metric!r}; use auroc, patient_auroc or map50")


def _networks(units: pd.DataFrame) -> set:
    if "network" in units:
        return set(units["network"].unique())
    return set(units.columns) - {"unit", "label", "item"}


def bootstrap_counts(n_units: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n_units) draw counts of units resampled with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=n_boot).astype(float)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) < 0.9 * len(values) or len(v) == 0:
        return np.nan, np.nan
    tail = (1 - level) / 2 * 100
    return float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))
