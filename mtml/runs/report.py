"""Run records and comparisons across modes and seeds.

A run record is one flat dict: mode, version, seed, task, data, and `<network>/<metric>` for the
teacher, each student, the `students_mean` and the `ensemble` (and `<set>:<network>/<metric>`
for external evaluation sets, `mtml.external`). The notebooks write it into
`metrics.json`; `mtml.reproduce` collects the records into one CSV.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from . import stats
from ..names import students_in

SCALAR_METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1", "patient_auroc",
                  "patient_accuracy", "map50", "map", "recall", "precision")


SEPARATOR = ":"  # `<external set>:<network>/<metric>` (mtml.external)


def run_record(metrics: pd.DataFrame, scalars: tuple = (), **fields) -> dict:
    """Flattens a metrics table (index = network) into one run record: the columns named in
    SCALAR_METRICS, then those in `scalars` (a task's own metrics)."""
    record = dict(fields)
    cols = [m for m in dict.fromkeys((*SCALAR_METRICS, *scalars)) if m in metrics.columns]
    for net, row in metrics.iterrows():
        for m in cols:
            record[f"{net}/{m}"] = float(row[m])
    students = metrics.loc[students_in(metrics.index), cols]
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
    half = scipy_stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return float(v.mean()), float(half), n


CELL = ["version", "mode", "seed"]


def check_one_run_per_cell(runs: pd.DataFrame) -> None:
    """ValueError naming both runs when two records share (version, mode, seed): two different
    runs must never be averaged into one cell."""
    cols = [c for c in CELL if c in runs]
    dup = runs[runs.duplicated(cols, keep=False)]
    if len(dup):
        where = "path" if "path" in dup else "spec_hash" if "spec_hash" in dup else None
        first = dup.groupby(cols, sort=False)
        key, group = next(iter(first))
        names = list(group[where]) if where else list(group.index)
        raise ValueError(f"{len(group)} runs for version/mode/seed {key}: {names}; a table holds one run "
                         "per cell: collect runs of one grid (one spec each), or remove the strays")


def summarise(runs: pd.DataFrame, metric: str = "auroc", units: dict | None = None,
              n_boot: int = stats.N_BOOT) -> pd.DataFrame:
    """Per version and mode: mean and 95% t-interval over seeds (`*_ci95`, half-width) of the
    teacher, the students' mean and the ensemble; with `units` ({(version, mode, seed): test
    units}) also the bootstrap interval over test units of the ensemble's seed mean
    (`ensemble_boot_lo/hi`)."""
    check_one_run_per_cell(runs)
    rows = []
    for (version, mode), g in runs.groupby(["version", "mode"], sort=False):
        row = {"version": version, "mode": mode}
        for who in ("teacher", "students_mean", "ensemble"):
            col = f"{who}/{metric}"
            if col in g and g[col].notna().any():
                row[f"{who}_mean"], row[f"{who}_ci95"], row["seeds"] = mean_ci(g[col])
        if units is not None:
            draws = _resampled(units, [(version, mode, s) for s in g["seed"]], metric, "ensemble", n_boot)
            row["ensemble_boot_lo"], row["ensemble_boot_hi"] = stats.percentile_interval(draws.mean(0))
        rows.append(row)
    return pd.DataFrame(rows)


def sets_in(record_or_columns) -> list[str]:
    """Names of the external sets in a record (or a table's columns), in order of appearance."""
    keys = record_or_columns.keys() if isinstance(record_or_columns, dict) else record_or_columns
    return list(dict.fromkeys(k.split(SEPARATOR)[0] for k in map(str, keys) if k.endswith(f"{SEPARATOR}items")))


def as_own_columns(runs: pd.DataFrame, name: str) -> pd.DataFrame:
    """`runs` with set `name`'s metrics in the places of the run's own (`ensemble/map50`...), so
    the usual summaries apply to it."""
    prefix = f"{name}{SEPARATOR}"
    own = [c for c in runs.columns if "/" in str(c) and SEPARATOR not in str(c)]
    renamed = {c: c[len(prefix):] for c in runs.columns if str(c).startswith(prefix)}
    return runs.drop(columns=own).rename(columns=renamed)


def summarise_sets(runs: pd.DataFrame, metric: str, sets=None) -> pd.DataFrame:
    """`summarise` per evaluation set: the runs' own test split (`test`), then each external set
    (`mtml.external`; only those in `sets` when given), as rows tagged `eval_set`. A run without
    a set is left out of its rows; runs tested on different contents under one name raise."""
    own = runs[[c for c in runs.columns if SEPARATOR not in str(c)]]
    parts = [summarise(own, metric).assign(eval_set="test")]
    for name in sets_in(runs.columns):
        if sets is not None and name not in sets:
            continue
        tested = runs[runs[f"{name}{SEPARATOR}items"].notna()]
        digest = f"{name}{SEPARATOR}manifest_sha256"
        if digest in tested and tested[digest].nunique() > 1:
            raise ValueError(f"the runs were tested on {tested[digest].nunique()} different contents of external "
                             f"set {name!r}: test them all on one (python -m mtml.runs.external, or run the grid again)")
        parts.append(summarise(as_own_columns(tested, name), metric).assign(eval_set=name))
    table = pd.concat(parts, ignore_index=True)
    return table[["eval_set", *[c for c in table.columns if c != "eval_set"]]]


def _resampled(units: dict, keys, metric: str, who: str, n_boot: int) -> np.ndarray:
    """(runs, n_boot) metric of `who` in each run of `keys` under one shared resampling of the
    test units (all runs must share one test set). Missing runs give NaN rows."""
    present = [units[k] for k in keys if k in units and units[k] is not None]
    if not present or metric not in stats.BOOTSTRAP_METRICS:
        return np.full((len(keys), n_boot), np.nan)
    ids = stats.unit_ids(present[0])
    for u in present[1:]:
        if not np.array_equal(stats.unit_ids(u), ids):
            raise ValueError("runs of one comparison were tested on different test units; "
                             "compare runs of one dataset and split")
    counts = stats.bootstrap_counts(len(ids), n_boot)
    return np.stack([_drawn(units[k], metric, who, counts, ids)
                     if k in units and units[k] is not None else np.full(n_boot, np.nan) for k in keys])


_DRAWN: dict = {}


def _drawn(units: pd.DataFrame, metric: str, who: str, counts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`stats.unit_metric`, remembered by content: a report resamples each run twice (the per-mode
    table and the paired claims), with the same draws, and a detection run's draws take seconds."""
    import hashlib

    key = tuple(hashlib.sha256(b).hexdigest() for b in (pd.util.hash_pandas_object(units).to_numpy().tobytes(),
                                                         counts.tobytes(), ids.tobytes())) + (metric, who)
    if key not in _DRAWN:
        if len(_DRAWN) > 256:  # bounded: a long session compares many studies
            _DRAWN.clear()
        _DRAWN[key] = stats.unit_metric(units, metric, who, counts, ids)
    return _DRAWN[key].copy()


def paired_differences(runs: pd.DataFrame, metric: str = "auroc", who: str = "ensemble",
                       units: dict | None = None, n_boot: int = stats.N_BOOT, pairs=None) -> pd.DataFrame:
    """For each pair of modes (same version, same seed): mean difference a - b, its 95%
    t-interval over seeds (`ci95`, half-width), the paired t-test p-value and its Holm adjustment
    over all pairs of the version (`p_holm`), and with `units` the 95% bootstrap interval over
    test units (`boot_lo`, `boot_hi`). `pairs` [(a, b), ...] limits the family to those pairs."""
    check_one_run_per_cell(runs)
    col = f"{who}/{metric}"
    rows = []
    for version, g in runs.groupby("version", sort=False):
        wide = g.pivot(index="seed", columns="mode", values=col)
        draws = {}  # per mode: (seeds, n_boot) metric under the shared resampling, computed once
        if units is not None:
            draws = {m: pd.DataFrame(_resampled(units, [(version, m, s) for s in wide.index], metric, who, n_boot),
                                     index=wide.index) for m in wide.columns}
        family = []
        chosen = itertools.combinations(wide.columns, 2) if pairs is None else \
            [(a, b) for a, b in pairs if a in wide and b in wide]
        for a, b in chosen:
            d = (wide[a] - wide[b]).dropna()
            mean, half, n = mean_ci(d)
            p = float(scipy_stats.ttest_1samp(d, 0.0).pvalue) if n >= 2 and d.std() > 0 else math.nan
            row = {"version": version, "a": a, "b": b, f"mean({who} a-b)": mean, "ci95": half,
                   "p_value": p, "seeds": n}
            if units is not None:
                diff = draws[a].loc[d.index].to_numpy() - draws[b].loc[d.index].to_numpy()
                row["boot_lo"], row["boot_hi"] = stats.percentile_interval(diff.mean(0))
            family.append(row)
        for row, adjusted in zip(family, stats.holm([r["p_value"] for r in family])):
            row["p_holm"] = adjusted
        rows.extend(family)
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
    """One row per (run, who), who being `students (mean)` or `ensemble`: one value per run, so
    an interval over these rows has n = seeds (students of one run are not independent)."""
    rows = []
    for _, r in runs.iterrows():
        for col, who in ((f"students_mean/{metric}", "students (mean)"), (f"ensemble/{metric}", "ensemble")):
            if col in r and np.isfinite(r[col]):
                rows.append({"mode": r["mode"], "version": r.get("version"), "seed": r["seed"],
                             "who": who, metric: r[col]})
    return pd.DataFrame(rows)
