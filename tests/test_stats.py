"""Holm's adjustment, weighted AUROC and AP against independent computations, bootstrap intervals
over test units, and the figure's one-value-per-run rule."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hand_metrics import binary_auroc

from mtml import stats
from mtml.tasks.detection_eval import detection_units
from mtml.tasks.evaluate import classification_units
from mtml.runs.report import long_metric, paired_differences, summarise


def test_holm_matches_the_hand_computed_step_down():
    # sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1, but >= 0.06) ; NaN ignored
    adjusted = stats.holm([0.03, 0.01, np.nan, 0.04, 0.02])
    np.testing.assert_allclose(adjusted, [0.06, 0.04, np.nan, 0.06, 0.06])
    np.testing.assert_allclose(stats.holm([0.01, 0.6]), [0.02, 0.6])
    np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1, never decreasing


def test_weighted_auroc_equals_auroc_of_repeated_samples():
    rng = np.random.default_rng(0)
    scores, labels = rng.random(40).round(1), rng.random(40) < 0.4  # rounding makes ties
    counts = rng.integers(0, 4, size=40)
    expected = binary_auroc(np.repeat(scores, counts), np.repeat(labels, counts))
    assert stats.weighted_auroc(scores, labels, counts)[0] == pytest.approx(expected, abs=1e-12)
    assert stats.weighted_auroc(scores, labels, np.ones(40))[0] == pytest.approx(binary_auroc(scores, labels))


def random_detections(seed, frames=12):
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(frames):
        k = int(torch.randint(0, 3, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 60
        gt = torch.cat([xy, xy + 10 + torch.rand(k, 2, generator=g) * 20], 1)
        n = int(torch.randint(0, 6, (1,), generator=g))
        jitter = torch.randn(n, 4, generator=g) * 4
        base = gt[torch.randint(0, k, (n,), generator=g)] if k else torch.rand(n, 4, generator=g) * 40
        boxes = base + jitter
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        preds.append({"boxes": boxes, "scores": torch.rand(n, generator=g), "labels": torch.ones(n, dtype=torch.long)})
        targets.append({"boxes": gt, "labels": torch.ones(k, dtype=torch.long)})
    return preds, targets


def torchmetrics_map50(preds, targets) -> float:
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5])
    metric.update(preds, targets)
    return float(metric.compute()["map_50"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_from_units_equals_torchmetrics_map50(seed):
    preds, targets = random_detections(seed)
    units = detection_units({"ensemble": preds}, targets)
    ids = stats.unit_ids(units)
    ours = stats.unit_metric(units, "map50", "ensemble", np.ones((1, len(ids))), ids)[0]
    assert ours == pytest.approx(torchmetrics_map50(preds, targets), abs=1e-7)
    # drawing every frame twice changes nothing; dropping frames equals evaluating the rest
    assert stats.unit_metric(units, "map50", "ensemble", np.full((1, len(ids)), 2.0), ids)[0] == pytest.approx(ours)
    keep = np.arange(len(ids)) % 3 != 0
    subset = [i for i in range(len(ids)) if keep[i]]
    expected = torchmetrics_map50([preds[i] for i in subset], [targets[i] for i in subset])
    assert stats.unit_metric(units, "map50", "ensemble", keep[None].astype(float), ids)[0] == pytest.approx(expected, abs=1e-7)


def test_classification_units_give_the_tile_and_patient_auroc():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(10), 5)
    labels = np.repeat(rng.random(10) < 0.5, 5).astype(int)
    p1 = np.clip(labels * 0.3 + rng.random(50) * 0.7, 0, 1)
    units = classification_units({"ensemble": np.stack([1 - p1, p1], 1)}, labels, patients)
    ids = stats.unit_ids(units)
    ones = np.ones((1, len(ids)))
    assert stats.unit_metric(units, "auroc", "ensemble", ones, ids)[0] == pytest.approx(binary_auroc(p1, labels))
    per_patient = pd.DataFrame({"p": p1, "y": labels, "u": patients}).groupby("u").mean()
    assert stats.unit_metric(units, "patient_auroc", "ensemble", ones, ids)[0] == pytest.approx(
        binary_auroc(per_patient["p"], per_patient["y"]))


def _runs_and_units(effect: float, n_units: int = 60, seeds=(0, 1, 2)):
    """kd_ml better than kd by `effect` in score on every tile, on one fixed test set."""
    rng = np.random.default_rng(7)
    labels = rng.random(n_units) < 0.5
    rows, units = [], {}
    for seed in seeds:
        noise = rng.normal(0, 1, n_units)
        for mode, shift in (("kd", 0.0), ("kd_ml", effect)):
            score = labels * (1.0 + shift) + noise
            u = classification_units({"ensemble": np.stack([-score, score], 1)}, labels.astype(int))
            units[("tiny", mode, seed)] = u
            rows.append({"version": "tiny", "mode": mode, "seed": seed,
                         "ensemble/auroc": binary_auroc(score, labels)})
    return pd.DataFrame(rows), units


def test_bootstrap_interval_over_test_units_brackets_the_difference_and_shrinks_with_more_units():
    runs, units = _runs_and_units(effect=0.5)
    paired = paired_differences(runs, "auroc", units=units, n_boot=500).iloc[0]
    diff = paired["mean(ensemble a-b)"]
    assert paired["boot_lo"] <= diff <= paired["boot_hi"]
    wide = paired["boot_hi"] - paired["boot_lo"]
    runs2, units2 = _runs_and_units(effect=0.5, n_units=600)
    p2 = paired_differences(runs2, "auroc", units=units2, n_boot=500).iloc[0]
    assert p2["boot_hi"] - p2["boot_lo"] < wide
    summary = summarise(runs, "auroc", units=units, n_boot=500)
    assert (summary["ensemble_boot_lo"] <= summary["ensemble_mean"]).all()
    assert (summary["ensemble_mean"] <= summary["ensemble_boot_hi"]).all()


def test_bootstrap_refuses_runs_tested_on_different_units():
    runs, units = _runs_and_units(effect=0.2)
    units[("tiny", "kd", 0)] = units[("tiny", "kd", 0)].assign(unit=lambda f: f["unit"] + 1000)
    with pytest.raises(ValueError, match="different test units"):
        paired_differences(runs, "auroc", units=units, n_boot=50)


def test_paired_table_has_holm_column_over_the_family():
    rows = [{"version": "tiny", "mode": m, "seed": s, "ensemble/auroc": v + 0.01 * s + (0.002 * s * s if m == "b" else 0)}
            for s in range(4) for m, v in (("a", 0.7), ("b", 0.75), ("c", 0.8))]
    paired = paired_differences(pd.DataFrame(rows), "auroc")
    assert len(paired) == 3
    p = paired["p_value"].to_numpy()  # one pair has equal differences on every seed: no p, not in the family
    assert np.isnan(p).sum() == 1
    finite = np.flatnonzero(~np.isnan(p))  # Holm's step-down, written out: sorted p times (2, 1), running max
    order, expected = finite[np.argsort(p[finite])], np.full(3, np.nan)
    expected[order] = np.minimum(1, np.maximum.accumulate(p[order] * [2, 1]))
    np.testing.assert_allclose(paired["p_holm"], expected)


def test_the_figure_uses_one_value_per_run():
    runs = pd.DataFrame([{"version": "tiny", "mode": "kd", "seed": s, "student_1/auroc": 0.6, "student_2/auroc": 0.7,
                          "students_mean/auroc": 0.65, "ensemble/auroc": 0.7} for s in range(3)])
    long = long_metric(runs, "auroc")
    assert long.groupby("who").size().to_dict() == {"ensemble": 3, "students (mean)": 3}
    assert set(long.loc[long["who"] == "students (mean)", "auroc"]) == {0.65}


# -- gaps a mutation run of mtml/runs/stats.py found (bench/mutation.py) ---------------------------

def test_holm_caps_every_adjusted_p_at_one():
    np.testing.assert_allclose(stats.holm([0.6, 0.7]), [1.0, 1.0])  # 2 x 0.6 = 1.2 is capped


def test_percentile_interval_is_numpys_and_gives_up_when_over_a_tenth_is_missing():
    v = np.random.default_rng(0).normal(size=400)
    assert stats.percentile_interval(v) == pytest.approx(tuple(np.percentile(v, [2.5, 97.5])))
    assert stats.percentile_interval(v, 0.8) == pytest.approx(tuple(np.percentile(v, [10, 90])))
    some = v.copy()
    some[:30] = np.nan  # 7.5% missing: the rest decide
    assert stats.percentile_interval(some) == pytest.approx(tuple(np.percentile(v[30:], [2.5, 97.5])))
    many = v.copy()
    many[:50] = np.nan  # 12.5% missing: no interval
    assert np.isnan(stats.percentile_interval(many)).all() and np.isnan(stats.percentile_interval(v[:0])).all()


def test_bootstrap_counts_are_reproducible_draws_of_every_unit():
    a, b = stats.bootstrap_counts(30, 50, seed=3), stats.bootstrap_counts(30, 50, seed=3)
    assert a.shape == (50, 30) and (a == b).all() and (a.sum(1) == 30).all()
    assert not (a == stats.bootstrap_counts(30, 50, seed=4)).all()


def test_unit_metric_in_chunks_equals_one_pass_and_students_mean_is_their_mean():
    preds, targets = random_detections(0)
    units = detection_units({"student_1": preds, "student_2": random_detections(1)[0], "ensemble": preds}, targets)
    ids = stats.unit_ids(units)
    counts = stats.bootstrap_counts(len(ids), 25, seed=0)
    for who in ("ensemble", "students_mean"):
        whole = stats.unit_metric(units, "map50", who, counts, ids)
        np.testing.assert_allclose(stats.unit_metric(units, "map50", who, counts, ids, chunk=7), whole)
    mean = (stats.unit_metric(units, "map50", "student_1", counts, ids)
            + stats.unit_metric(units, "map50", "student_2", counts, ids)) / 2
    np.testing.assert_allclose(stats.unit_metric(units, "map50", "students_mean", counts, ids), mean)
    assert np.isnan(stats.unit_metric(units, "map50", "teacher", counts, ids)).all(), "a network not in the units"
    with pytest.raises(ValueError, match="no bootstrap for metric 'f1'"):
        stats.unit_metric(units, "f1", "ensemble", counts, ids)


def test_average_precision_without_boxes_is_undefined_and_a_weightless_detection_is_absent():
    assert np.isnan(stats.average_precision([0.9, 0.5], [0, 0], [0, 0])).all()
    assert stats.average_precision([], [], [1, 2]).tolist() == [0.0]  # boxes, no detection: nothing found
    assert stats.average_precision([], [], [1]).tolist() == [0.0]
    rows = stats.average_precision([0.9], [1], [1], weights=[[1], [1]], gt_weights=[[0], [1]])  # a row without boxes first
    assert np.isnan(rows[0]) and rows[1] == 1.0
    assert np.isnan(stats.average_precision([], [], [0, 0])).all()
    scores, tp, n_gt = [0.95, 0.9, 0.6, 0.3], [0, 1, 1, 0], [1, 1]
    dropped = stats.average_precision(scores[1:], tp[1:], n_gt)
    assert stats.average_precision(scores, tp, n_gt)[0] < dropped[0] == pytest.approx(1.0)
    np.testing.assert_allclose(stats.average_precision(scores, tp, n_gt, weights=[[0, 1, 1, 1]]), dropped)
