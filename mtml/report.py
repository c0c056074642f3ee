"""Run records and comparisons across modes and seeds.

A run record is one flat dict: mode, version, seed, task, data, and `<network>/<metric>` for the
teacher, each student, the `students_mean` and the `ensemble`. The notebooks write it into
`metrics.json`; `mtml.reproduce` collects the records into one CSV.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

SCALAR_METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1", "patient_auroc",
                  "patient_accuracy", "map50", "map", "recall", "precision")


def run_record(metrics: pd.DataFrame, **fields) -> dict:
    """Flattens a metrics table (index = network) into one run record."""
    record = dict(fields)
    cols = [m for m in SCALAR_METRICS if m in metrics.columns]
    for net, row in metrics.iterrows():
        for m in cols:
            record[f"{net}/{m}"] = float(row[m])
    students = metrics.loc[[n for n in metrics.index if str(n).startswith("student_")], cols]
    for m in cols:
        record[f"students_mean/{m}"] = float(students[m].mean())
    return record


def mean_ci(values, level: float = 0.95) -> tuple[float, float, int]:
    """Mean and half-width of the Student-t confidence interval; half-width is NaN for n < 2."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    if n < 2:
        return float(v.mean()), math.nan, 1
    half = stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return float(v.mean()), float(half), n


def summarise(runs: pd.DataFrame, metric: str = "auroc") -> pd.DataFrame:
    """Per version and mode: mean and 95% CI over seeds of teacher, students, ensemble."""
    rows = []
    for (version, mode), g in runs.groupby(["version", "mode"], sort=False):
        row = {"version": version, "mode": mode}
        for who in ("teacher", "students_mean", "ensemble"):
            col = f"{who}/{metric}"
            if col in g and g[col].notna().any():
                row[f"{who}_mean"], row[f"{who}_ci95"], row["seeds"] = mean_ci(g[col])
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(runs: pd.DataFrame, metric: str = "auroc", who: str = "ensemble"
                       ) -> pd.DataFrame:
    """For each pair of modes (same version, same seed): mean difference a - b with 95% CI and a
    paired t-test p-value (NaN with fewer than two seeds)."""
    col = f"{who}/{metric}"
    rows = []
    for version, g in runs.groupby("version", sort=False):
        wide = g.pivot_table(index="seed", columns="mode", values=col)
        for a, b in itertools.combinations(wide.columns, 2):
            d = (wide[a] - wide[b]).dropna()
            mean, half, n = mean_ci(d)
            p = float(stats.ttest_1samp(d, 0.0).pvalue) if n >= 2 and d.std() > 0 else math.nan
            rows.append({"version": version, "a": a, "b": b, f"mean({who} a-b)": mean,
                         "ci95": half, "p_value": p, "seeds": n})
    return pd.DataFrame(rows)


def paper_table(runs: pd.DataFrame, metric: str = "auroc") -> pd.DataFrame:
    """The shape of the paper's table: rows version x mode, columns teacher / student / ensemble,
    as `mean ± 95% CI` over seeds (our numbers, not the paper's)."""
    s = summarise(runs, metric)

    def fmt(mean, half):
        if not np.isfinite(mean):
            return "-"
        return f"{mean:.3f}" + (f" ± {half:.3f}" if np.isfinite(half) else "")

    out = pd.DataFrame({
        "version": s["version"], "mode": s["mode"],
        "teacher": [fmt(*r) for r in zip(s.get("teacher_mean", np.nan), s.get("teacher_ci95", np.nan))]
        if "teacher_mean" in s else "-",
        "student": [fmt(*r) for r in zip(s["students_mean_mean"], s["students_mean_ci95"])],
        "ensemble": [fmt(*r) for r in zip(s["ensemble_mean"], s["ensemble_ci95"])],
        "seeds": s["seeds"],
    })
    return out.set_index(["version", "mode"])


def long_metric(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (run, who): who is `student` (each individual student) or `ensemble`."""
    rows = []
    for _, r in runs.iterrows():
        for col in r.index:
            if col.endswith(f"/{metric}") and col.split("/")[0].startswith(("student_", "ensemble")):
                who = "ensemble" if col.startswith("ensemble") else "student"
                rows.append({"mode": r["mode"], "version": r.get("version"), "seed": r["seed"],
                             "who": who, metric: r[col]})
    return pd.DataFrame(rows)
