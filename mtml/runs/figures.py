"""The figures of the generated reports (a study's, the notebook grid's), drawn from their tables."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def comparison_figure(runs: pd.DataFrame, metric: str = "auroc", title: str = ""):
    """The students' mean vs the student ensemble, per mode: mean and Student-t 95% interval over
    seeds (as in the tables; one value per run, n = seeds), one faint point per run (seaborn)."""
    import seaborn as sns

    from .report import long_metric

    long = long_metric(runs, metric)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    sns.pointplot(data=long, x="mode", y=metric, hue="who", errorbar=_t_interval, dodge=0.3,
                  linestyle="none", capsize=0.1, ax=ax)
    sns.stripplot(data=long, x="mode", y=metric, hue="who", dodge=True, alpha=0.35, legend=False,
                  ax=ax)
    ax.set_title(title or f"{metric}: students vs student ensemble (mean, 95% CI over seeds)")
    return fig


def _t_interval(values):
    """The Student-t 95% interval the tables use (seaborn's own "ci" would bootstrap)."""
    from .report import mean_ci

    mean, half, _ = mean_ci(values)
    half = 0.0 if not np.isfinite(half) else half
    return mean - half, mean + half


def plot_accuracy_vs_cost(summary: pd.DataFrame, costs: pd.DataFrame, metric: str, cost: str = "latency_ms",
                          ax=None):
    """What compression buys: per mode of `summary` (`mtml.report.summarise`, one version) the
    ensemble at the ensemble's cost and the students' mean at one student's cost, and the teacher
    at the teacher's cost where the mode has one; `costs` from `mtml.costs.network_costs`. Error
    bars: 95% t-interval over seeds. Colour = mode, marker = who; modes sit slightly apart along
    the log x axis (a few percent) so that their error bars do not hide each other."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogFormatter

    if "version" in summary and costs.attrs.get("version") is not None:
        summary = summary[summary["version"] == costs.attrs["version"]]
    if summary.empty:
        raise ValueError(f"summary has no rows for version {costs.attrs.get('version')!r}")
    if "version" in summary and summary["version"].nunique() > 1:
        raise ValueError(f"summary holds versions {sorted(summary['version'].unique())}; "
                         "pass the rows of the version the costs were measured for")
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    who = {"ensemble": ("ensemble", "ensemble", "o"), "students_mean": ("student", "student (mean)", "s"),
           "teacher": ("teacher", "teacher", "^")}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    modes, drawn = list(summary["mode"]), set()
    for i, (_, row) in enumerate(summary.iterrows()):
        shift = 1.04 ** (i - (len(modes) - 1) / 2)
        for prefix, (model, label, marker) in who.items():
            mean, half = row.get(f"{prefix}_mean", np.nan), row.get(f"{prefix}_ci95", np.nan)
            if not np.isfinite(mean):
                continue
            ax.errorbar(costs.loc[model, cost] * shift, mean, yerr=half if np.isfinite(half) else None,
                        marker=marker, ms=8 if prefix == "ensemble" else 6, capsize=3, linestyle="none",
                        color=colors[i % len(colors)], label=f"{row['mode']} {label}")
            drawn.add(prefix)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(LogFormatter())
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    what = {"latency_ms": "CPU latency per frame (ms, batch 1)", "flops": "FLOPs per frame (batch 1)",
            "params": "parameters"}.get(cost, cost)
    if cost == "latency_ms" and "threads" in costs:
        what = what.replace("batch 1", f"batch 1, {int(costs['threads'].iloc[0])} thread(s)")
    ax.set(xlabel=f"{what}, log scale", ylabel=metric,
           title=f"{metric} vs {cost} (mean, 95% CI over seeds)")
    handles = [Line2D([], [], color=colors[i % len(colors)], marker="o", linestyle="none", label=m)
               for i, m in enumerate(modes)]
    handles += [Line2D([], [], color="grey", marker=marker, linestyle="none", label=label)
                for prefix, (model, label, marker) in who.items() if prefix in drawn]
    ax.legend(handles=handles, fontsize=8)
    return ax
