"""Run records and comparisons over seeds, against numbers worked out by hand."""
import math

import numpy as np
import pandas as pd
import pytest

from mtml.runs.report import mean_ci, paired_differences, paper_table, run_record, summarise

T_975_DF2 = 4.302652729911275  # Student-t quantile 0.975, 2 degrees of freedom (tables)


def test_mean_ci_matches_the_t_formula():
    mean, half, n = mean_ci([0.7, 0.8, 0.9])
    assert (mean, n) == (pytest.approx(0.8), 3)
    assert half == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))
    assert math.isnan(mean_ci([0.5])[1]) and mean_ci([])[2] == 0
    assert mean_ci([0.5, float("nan"), 0.7])[2] == 2  # NaN runs are left out, not averaged in


def test_run_record_flattens_every_network_and_the_students_mean():
    metrics = pd.DataFrame({"auroc": [0.9, 0.7, 0.8, 0.85], "accuracy": [1.0, 0.5, 0.6, 0.7],
                            "confusion": [[[1]]] * 4},
                           index=["teacher", "student_1", "student_2", "ensemble"])
    record = run_record(metrics, mode="kd", seed=3)
    assert record["mode"] == "kd" and record["seed"] == 3
    assert record["teacher/auroc"] == 0.9 and record["ensemble/accuracy"] == 0.7
    assert record["students_mean/auroc"] == pytest.approx(0.75)
    assert not any("confusion" in k for k in record)


def runs_table():
    """Three seeds of two modes; kd_ml's ensemble is higher by 0.02, 0.04, 0.06."""
    rows = []
    for seed, base in zip((0, 1, 2), (0.70, 0.75, 0.80)):
        rows.append({"version": "tiny", "mode": "kd", "seed": seed, "teacher/auroc": 0.9,
                     "students_mean/auroc": base - 0.01, "ensemble/auroc": base})
        rows.append({"version": "tiny", "mode": "kd_ml", "seed": seed, "teacher/auroc": 0.9,
                     "students_mean/auroc": base, "ensemble/auroc": base + 0.02 * (seed + 1)})
    return pd.DataFrame(rows)


def test_paired_differences_use_same_seed_pairs():
    paired = paired_differences(runs_table(), "auroc")
    assert len(paired) == 1
    row = paired.iloc[0]
    a_minus_b = -1 if row["a"] == "kd" else 1
    assert row["mean(ensemble a-b)"] == pytest.approx(a_minus_b * 0.04)
    assert row["ci95"] == pytest.approx(T_975_DF2 * 0.02 / math.sqrt(3))
    # paired t-test of the differences (0.02, 0.04, 0.06), up to sign: mean 0.04, sample sd 0.02,
    # t = 0.04 / (0.02 / sqrt 3) = 2 sqrt 3 = 3.464, df = 2, two-sided p = 2 * P(T_2 > t).
    # For df = 2 the t CDF is closed-form, F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so
    # p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(12 / 14) = 1 - sqrt(6 / 7) = 0.0741799...
    from scipy import stats

    t_stat, df = 2 * math.sqrt(3), 2
    assert row["seeds"] == 3
    assert row["p_value"] == pytest.approx(2 * stats.t.sf(t_stat, df), abs=1e-9)
    assert row["p_value"] == pytest.approx(1 - math.sqrt(6 / 7), abs=1e-9)


def test_summary_and_paper_table():
    summary = summarise(runs_table(), "auroc").set_index("mode")
    assert summary.loc["kd", "ensemble_mean"] == pytest.approx(0.75)
    assert summary.loc["kd_ml", "ensemble_mean"] == pytest.approx(0.79)
    assert summary.loc["kd", "ensemble_ci95"] == pytest.approx(T_975_DF2 * 0.05 / math.sqrt(3))
    table = paper_table(runs_table(), "auroc")
    assert list(table.columns) == ["teacher", "student", "ensemble", "seeds"]
    assert table.loc[("tiny", "kd"), "ensemble"].startswith("0.750 ± ")
    assert table.loc[("tiny", "kd"), "teacher"] == "0.900 ± 0.000"
    no_teacher = runs_table().assign(**{"teacher/auroc": np.nan})
    assert paper_table(no_teacher, "auroc").loc[("tiny", "kd"), "teacher"] == "-"
