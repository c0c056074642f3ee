"""Tests of mtml.costs (parameters, FLOPs and latency per deployable model) and of the
accuracy-vs-cost figure in mtml.plots."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import torch
from torch import nn

from mtml.runs.costs import TILE_SIZE, count_flops, network_costs
from mtml.tasks.detectors import build_detection_networks
from mtml.tasks.models import TINY_WIDTHS, build_cohort_networks

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_flops_of_a_linear_and_a_conv_layer_are_the_hand_counted_ones():
    assert count_flops(nn.Linear(10, 5), torch.rand(1, 10)) == 2 * 10 * 5  # the bias is not counted
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    assert count_flops(conv, torch.rand(1, 3, 8, 8)) == 2 * (3 * 3 * 3) * 4 * 8 * 8


def test_flops_of_the_tiny_student_are_its_convolutions_and_its_linear_layer():
    size, total, c = 32, 0, 3
    for w in TINY_WIDTHS["tiny_student"]:  # two 3x3 same-size convolutions per stage, then a 2x2 max-pool
        total += 2 * 9 * (c * w + w * w) * size * size
        c, size = w, size // 2
    total += 2 * c * 2  # the two-class linear layer
    costs = network_costs("classification", "tiny", 1, size=32, repeats=1)
    assert costs.loc["student", "flops"] == total


@pytest.mark.parametrize("task, size, build", [("classification", 32, build_cohort_networks),
                                               ("detection", 64, build_detection_networks)])
def test_params_and_flops_of_teacher_student_and_ensemble(task, size, build):
    n = 3
    torch.set_num_threads(2)  # the fixture puts 1 back afterwards
    costs = network_costs(task, "tiny", n, size=size, threads=1, repeats=3)
    assert list(costs.index) == ["teacher", "student", "ensemble"]
    assert torch.get_num_threads() == 2  # restored
    kw = {"size": size} if task == "detection" else {}
    teacher, (student,) = build("tiny", 1, **kw)
    assert costs.loc["teacher", "params"] == numel(teacher)
    assert costs.loc["student", "params"] == numel(student)
    assert costs.loc["ensemble", "params"] == n * numel(student)
    assert costs.loc["ensemble", "flops"] == n * costs.loc["student", "flops"]
    # the tiny teacher is the bigger network in both tasks (wider trunk; for detection also a wider head)
    assert costs.loc["teacher", "params"] > costs.loc["student", "params"]
    assert costs.loc["teacher", "flops"] > costs.loc["student", "flops"]
    assert (costs["latency_ms"] > 0).all() and (costs["latency_iqr_ms"] >= 0).all()
    assert (costs["threads"] == 1).all()
    assert costs.attrs == {"task": task, "version": "tiny", "n_students": n, "size": size}


def test_flops_grow_with_the_frame_size_and_defaults_are_the_runs_sizes():
    small = network_costs("detection", "tiny", 1, size=64, repeats=1)
    large = network_costs("detection", "tiny", 1, size=128, repeats=1)
    assert large.loc["student", "flops"] > 3 * small.loc["student", "flops"]  # about 4x the pixels
    assert (large["params"] == small["params"]).all()
    assert network_costs("classification", "tiny", 1, repeats=1).attrs["size"] == TILE_SIZE


def test_default_tile_size_is_the_classification_notebooks_one():
    from mtml.runs.parameters import notebook_defaults

    books = sorted(NOTEBOOKS.glob("0[1-3]_*.ipynb"))
    if not books:
        pytest.skip("notebooks not found")
    assert {notebook_defaults(b).get("TILE_SIZE") for b in books} == {TILE_SIZE}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown task"):
        network_costs("segmentation", "tiny", 1, repeats=1)
    with pytest.raises(ValueError, match="unknown version"):
        network_costs("classification", "v9", 1, repeats=1)
    with pytest.raises(ValueError, match="repeats"):
        network_costs("classification", "tiny", 1, repeats=0)


def fake_costs(version="tiny"):
    costs = pd.DataFrame({"params": [100, 10, 20], "flops": [1e9, 1e8, 2e8], "latency_ms": [8.0, 1.0, 2.0],
                          "latency_iqr_ms": [0.1] * 3, "threads": [1] * 3},
                         index=pd.Index(["teacher", "student", "ensemble"], name="model"))
    costs.attrs["version"] = version
    return costs


def fake_summary():
    rows = []
    for version in ("tiny", "v1"):
        for mode, teacher in (("independent", None), ("ml", None), ("kd_ml", 0.9)):
            row = {"version": version, "mode": mode, "ensemble_mean": 0.8, "ensemble_ci95": 0.02,
                   "students_mean_mean": 0.7, "students_mean_ci95": 0.03, "seeds": 3}
            if teacher is not None:
                row.update(teacher_mean=teacher, teacher_ci95=0.01)
            rows.append(row)
    return pd.DataFrame(rows)


def test_accuracy_vs_cost_draws_one_point_per_mode_and_who_at_its_cost():
    from mtml.teach.plots import plot_accuracy_vs_cost

    costs = fake_costs()
    ax = plot_accuracy_vs_cost(fake_summary(), costs, "auroc")
    labels = [c.get_label() for c in ax.containers]  # one errorbar container per point
    assert sorted(labels) == sorted(["independent ensemble", "independent student (mean)", "ml ensemble",
                                     "ml student (mean)", "kd_ml ensemble", "kd_ml student (mean)",
                                     "kd_ml teacher"])  # only the tiny rows; no teacher without one
    for c in ax.containers:
        (x,), (y,) = c.lines[0].get_data()
        model = {"ensemble": "ensemble", "(mean)": "student", "teacher": "teacher"}[c.get_label().split()[-1]]
        assert x == pytest.approx(costs.loc[model, "latency_ms"], rel=0.1)
        assert y == {"ensemble": 0.8, "student": 0.7, "teacher": 0.9}[model]
        assert c.has_yerr
    assert ax.get_xscale() == "log" and "latency" in ax.get_xlabel() and ax.get_ylabel() == "auroc"
    assert [t.get_text() for t in ax.get_legend().get_texts()][:3] == ["independent", "ml", "kd_ml"]
    flops = plot_accuracy_vs_cost(fake_summary(), costs, "auroc", cost="flops")
    xs = sorted(c.lines[0].get_data()[0][0] for c in flops.containers)
    assert xs[-1] == pytest.approx(1e9, rel=0.1) and "FLOPs" in flops.get_xlabel()


def test_accuracy_vs_cost_refuses_a_summary_without_the_costs_version():
    from mtml.teach.plots import plot_accuracy_vs_cost

    with pytest.raises(ValueError, match="no rows"):
        plot_accuracy_vs_cost(fake_summary(), fake_costs("v3"), "auroc")
    costs = fake_costs()
    costs.attrs.clear()
    with pytest.raises(ValueError, match="versions"):
        plot_accuracy_vs_cost(fake_summary(), costs, "auroc")
