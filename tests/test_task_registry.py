"""A third task, registered here and nowhere in mtml/, runs through the registry, `fit`, the run
identity and a smoke study: what differs between tasks lives in the task class."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mtml import Cohort, CohortConfig, fit
from mtml.runs.parameters import spec_from_parameters, task_from_parameters
from mtml.runs.study import Study, run_study, study_runs, write_results
from mtml.tasks import register, task_class, task_names


class Points(Dataset):
    """Generated points x in R^4 with the target y = sum(x) + a seeded noise."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "index": i}


@register
class ToyRegression:
    """Regression of sum(x): an MLP teacher (wide) and MLP students (narrow); distillation is the
    squared distance to the detached target's output (the temperature plays no part)."""
    name = "toy_regression"
    metric = "neg_mse"
    history_metrics = ("neg_mse",)
    config_defaults = {"epochs": 2, "batch_size": 16, "lr": 0.01}
    smoke_caps = {"EPOCHS": 1}
    size_parameter = "POINTS"
    augment = None

    def __init__(self, width: int = 8):
        self.width = width

    @classmethod
    def from_parameters(cls, params):
        return cls(width=params.get("WIDTH", 8))

    @staticmethod
    def data_fingerprint(params):
        return {"kind": "generated points", "points": params.get("POINTS", 96)}

    test_loads = 0  # how often a test split was made (a validation study makes none)

    @classmethod
    def load_splits(cls, params, data=None, who="this run", with_test=True):
        n = params.get("POINTS", 96)
        cls.test_loads += with_test
        return Points(n, 0), Points(n // 3, 1), Points(n // 3, 2) if with_test else None, f"{n} generated points", None

    def networks(self, version, n_students, num_classes=2, pretrained=False, with_teacher=True):
        def mlp(width):
            return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))
        return (mlp(4 * self.width) if with_teacher else None), [mlp(self.width) for _ in range(n_students)]

    def settings(self):
        return {"width": self.width}

    def outputs(self, model, batch):
        return model(batch["x"])

    def supervised_loss(self, out, batch):
        return nn.functional.mse_loss(out, batch["y"])

    def distill_loss(self, out, target, temperature):
        return nn.functional.mse_loss(out, target.detach())

    def collate(self, items):
        return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}

    def to_device(self, batch, device):
        return {k: v.to(device) for k, v in batch.items()}

    def evaluate(self, networks, data, batch_size=64, metrics=None, return_predictions=False):
        batch = self.collate([data[i] for i in range(len(data))])
        preds = {}
        with torch.no_grad():
            for name, model in networks.items():
                model.eval()
                preds[name] = model(batch["x"])
                model.train()
        students = [p for n, p in preds.items() if n.startswith("student")]
        preds["ensemble"] = torch.stack(students).mean(0)
        table = pd.DataFrame({"neg_mse": {n: -float(((p - batch["y"]) ** 2).mean()) for n, p in preds.items()}})
        return (table, preds, batch["y"]) if return_predictions else table

    def test_units(self, preds, targets, data=None):
        return pd.DataFrame({"unit": range(len(targets)), "label": targets[:, 0].numpy(),
                             "item": range(len(targets)), "ensemble": preds["ensemble"][:, 0].numpy()})

    def study_record(self, result, val, test):
        return {}, result.units


def test_a_registered_task_is_found_by_name_and_unknown_names_are_refused():
    assert "toy_regression" in task_names() and task_class("toy_regression") is ToyRegression
    assert {"classification", "detection"} <= set(task_names())
    with pytest.raises(ValueError, match="unknown task 'segmentation'; registered tasks: .*toy_regression"):
        task_class("segmentation")


def test_the_third_task_trains_through_fit_and_the_students_learn():
    task = ToyRegression()
    cohort = Cohort.build(CohortConfig.for_task(task, mode="kd_ml", epochs=3, seed=0), task=task)
    train, val = Points(96, 0), Points(32, 1)
    before = task.evaluate(cohort.networks, val)["neg_mse"]
    history = fit(cohort, task, train, val, progress=False)
    after = task.evaluate(cohort.networks, val)["neg_mse"]
    assert list(history["epoch"]) == [1, 2, 3] and "train/student_1/kd" in history and "train/student_2/ml" in history
    assert (after > before).all(), f"every network fits better: {before.to_dict()} -> {after.to_dict()}"


def test_the_third_task_has_a_run_identity_from_its_parameters():
    params = {"MODE": "kd", "SEED": 0, "WIDTH": 8, "POINTS": 96}
    spec = spec_from_parameters("toy_regression", params)
    assert spec.task == "toy_regression" and spec.task_settings == {"width": 8}
    assert spec.data == {"kind": "generated points", "points": 96}
    assert spec_from_parameters("toy_regression", {**params, "WIDTH": 16}).hash != spec.hash
    assert spec_from_parameters("toy_regression", {**params, "POINTS": 48}).hash != spec.hash
    assert spec_from_parameters("toy_regression", dict(params)).hash == spec.hash
    assert isinstance(task_from_parameters("toy_regression", params), ToyRegression)


def test_the_third_task_runs_a_smoke_study_and_resumes_by_identity(tmp_path):
    (tmp_path / "toy_study.yaml").write_text(
        "name: toy_study\ntask: toy_regression\ndata: synthetic\nversion: tiny\nmodes: [independent, kd, kd_ml]\n"
        "seeds: [0, 1]\nparams:\n  POINTS: 96\n  WIDTH: 8\n")
    study = Study.load(tmp_path / "toy_study.yaml")
    assert study.metric == "neg_mse"
    out = tmp_path / "out"
    assert run_study(study, out, smoke=True) == 0
    runs, units, missing = study_runs(study, out, smoke=True)
    assert not missing and len(runs) == 6 and set(runs["mode"]) == {"independent", "kd", "kd_ml"}
    assert set(runs["epochs"]) == {1}, "the task's smoke caps apply"
    assert runs["ensemble/neg_mse"].notna().all() and runs["ensemble_gain"].notna().all()
    before = (out / "runs.csv").read_bytes()
    assert run_study(study, out, smoke=True) == 0
    assert (out / "runs.csv").read_bytes() == before, "finished runs are found by their identity, not run again"


def test_a_study_with_variants_on_validation_pairs_each_variant_with_the_base_and_never_loads_test(tmp_path):
    (tmp_path / "toy_ablation.yaml").write_text(
        "name: toy_ablation\ntask: toy_regression\ndata: synthetic\nversion: tiny\nmodes: [independent, kd, kd_ml]\n"
        "seeds: [0, 1, 2]\nevaluate_on: validation\nparams:\n  POINTS: 96\n  WIDTH: 8\n  W_KD: 1.0\n"
        "variants:\n  weak kd: {W_KD: 0.1}\n  wide: {WIDTH: 16}\n  feat: {W_FEAT: 0.5}\n")
    study = Study.load(tmp_path / "toy_ablation.yaml")
    planned = study.planned()
    assert len(planned) == 3 * 3 + 3 * 2 + 3 * 3 + 3 * 2, "base: every mode; weak kd, feat: all but independent; wide: every mode"
    plan = study.plan()  # feat changes nothing these modes compute (no feature knowledge): its runs are the base's
    assert len(plan) == 24 and all(p.get("variant") != "feat" for p in plan.values())
    out, loads = tmp_path / "out", ToyRegression.test_loads
    assert run_study(study, out) == 0
    assert ToyRegression.test_loads == loads, "a validation study never makes its test split"
    runs, _, missing = study_runs(study, out)
    assert not missing and set(runs["evaluated_on"]) == {"validation"}
    assert runs.groupby("variant").size().to_dict() == {"base": 9, "weak kd": 6, "wide": 9}
    write_results(study, out)
    table = pd.read_csv(out / "variants.csv")
    row = table[(table["variant"] == "weak kd") & (table["mode"] == "kd")].iloc[0]
    metric = "ensemble/neg_mse"
    pick = lambda v, m: runs[(runs["variant"] == v) & (runs["mode"] == m)].set_index("seed")[metric]  # noqa: E731
    difference = pick("weak kd", "kd") - pick("base", "kd")
    assert row["pairs"] == 3 and row["minus_base"] == pytest.approx(difference.mean(), abs=1e-6)
    assert row["minus_base_ci95"] == pytest.approx(4.302653 * difference.std(ddof=1) / 3 ** 0.5, rel=1e-4)
    text = (out / "RESULTS.md").read_text()
    assert "on the VALIDATION split" in text and "## Variants" in text and "| wide | WIDTH=16 | kd_ml | 3 |" in text
    verdicts = pd.read_csv(out / "verdicts.csv")  # the claims are the base runs' only
    kd = runs[runs["variant"] == "base"].pivot(index="seed", columns="mode", values=metric)
    assert verdicts.loc[0, "mean"] == pytest.approx((kd["kd_ml"] - kd["kd"]).mean(), abs=1e-6)


@pytest.mark.parametrize("variants, message", [("{base: {W_KD: 0.5}}", "named 'base'"), ("{low: {seed: 1}}", "UPPER_CASE"),
                                               ("{other: {SPLIT_SEED: 1}}", "the split's"), ("{low: {}}", "map a name")])
def test_bad_variants_are_refused_in_one_line(tmp_path, variants, message):
    (tmp_path / "s.yaml").write_text("name: s\ntask: toy_regression\ndata: synthetic\nversion: tiny\n"
                                     f"modes: [kd]\nseeds: [0]\nvariants: {variants}\n")
    with pytest.raises(ValueError, match=message):
        Study.load(tmp_path / "s.yaml")


def test_reuse_takes_runs_tested_on_the_same_split_only(tmp_path, monkeypatch):
    import mtml.runs.study as study_module

    monkeypatch.setattr(study_module, "RESULTS", tmp_path)
    head = "task: toy_regression\ndata: synthetic\nversion: tiny\nmodes: [kd]\nseeds: [0, 1]\nparams:\n  POINTS: 48\n"
    for name, extra in (("on_val", "evaluate_on: validation\n"), ("on_test", "")):
        (tmp_path / f"{name}.yaml").write_text(f"name: {name}\n{head}{extra}")
        assert run_study(Study.load(tmp_path / f"{name}.yaml"), tmp_path / name) == 0
    for source, taken in (("on_val", 0), ("on_test", 2)):
        (tmp_path / f"from_{source}.yaml").write_text(f"name: from_{source}\n{head}reuse: [{source}]\n")
        assert study_module.adopt(Study.load(tmp_path / f"from_{source}.yaml"), tmp_path / f"from_{source}") == taken
