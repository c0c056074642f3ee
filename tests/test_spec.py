"""One run identity: spec hashes, resume and skip decided by them, the runner's own grid only,
paired runs (same students, data order and augmentation in every mode of a seed)."""
from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from mtml import ClassificationTask, Cohort, CohortConfig, fit, reproduce
from mtml.tasks.data import make_separable
from mtml.tasks import task_class
from mtml.runs.parameters import notebook_defaults, parameter_cells, smoke_parameters, spec_from_parameters
from mtml.runs.report import check_one_run_per_cell, paired_differences
from mtml.runs.spec import spec_of
from mtml.runs.checkpoint import Checkpoint
from mtml.core.cohort import MODES, build_teacher

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
DETECTION_NOTEBOOK = NOTEBOOKS / "05_detection_kd_only.ipynb"


# -- the spec ------------------------------------------------------------------------------------

OTHER_VALUE = {"mode": "kd", "version": "v1", "teacher_knowledge": "features", "peer_knowledge": "features"}


def test_spec_hash_changes_with_every_config_field_that_changes_results():
    """Every CohortConfig field but the speed-only ones enters the identity, each on its own
    (kd_ml_styles, so that the feature-knowledge fields are part of it)."""
    task, data = ClassificationTask(), {"manifest_sha256": "abc"}
    base = CohortConfig(mode="kd_ml_styles")
    seen = set()
    for f in dataclasses.fields(CohortConfig):
        value = getattr(base, f.name)
        if f.name in OTHER_VALUE:
            other = OTHER_VALUE[f.name]
        else:
            other = (not value) if isinstance(value, bool) else value + 1 if isinstance(value, int) else value * 0.5 + 0.25
        changed = spec_of(dataclasses.replace(base, **{f.name: other}), task, data).hash
        assert (changed != spec_of(base, task, data).hash) == f.metadata.get("identity", True), f.name
        seen.add(f.name)
    assert {"temperature", "w_kd", "w_ml", "stack_students", "w_feat", "amp", "num_workers"} <= seen


def test_spec_hash_is_stable_and_changes_with_config_data_and_task():
    task = ClassificationTask()
    base = spec_of(CohortConfig(mode="kd"), task, {"manifest_sha256": "abc"})
    assert base.hash == spec_of(CohortConfig(mode="kd"), ClassificationTask(), {"manifest_sha256": "abc"}).hash
    assert base.hash != spec_of(CohortConfig(mode="kd", w_kd=0.5), task, {"manifest_sha256": "abc"}).hash
    assert base.hash != spec_of(CohortConfig(mode="kd"), task, {"manifest_sha256": "abd"}).hash
    assert base.hash != spec_of(CohortConfig(mode="kd"), ClassificationTask(num_classes=3),
                                {"manifest_sha256": "abc"}).hash
    # speed-only settings never change what a run computes
    assert base.hash == spec_of(CohortConfig(mode="kd", num_workers=2), task, {"manifest_sha256": "abc"}).hash
    assert base.hash == spec_of(CohortConfig(mode="kd", eval_batch_size=7), task, {"manifest_sha256": "abc"}).hash


def test_a_spec_holds_paths_as_text_and_names_each_students_teacher_knowledge():
    """A data description may carry a Path (a prepared folder): the spec stores its text, the same
    identity as the string. A run where students learn features names each student's teacher
    knowledge in order, joined by '|' (as the committed learning-styles studies' hashes have it)."""
    from mtml.runs.spec import RunSpec

    with_path = RunSpec("classification", {"mode": "kd"}, {}, {"folder": Path("/data/kvasir-seg")})
    assert with_path.data == {"folder": "/data/kvasir-seg"}
    assert with_path.hash == RunSpec("classification", {"mode": "kd"}, {}, {"folder": "/data/kvasir-seg"}).hash
    styles = spec_of(CohortConfig(mode="kd_ml_styles", n_students=3), ClassificationTask()).config
    assert (styles["teacher_knowledge"], styles["peer_knowledge"]) == ("predictions|features|predictions", "both")


@pytest.mark.parametrize("change", [{"BOX_LOSS": "l1"}, {"TRAIN_FRAMES": 12}, {"FRAME_SIZE": 64},
                                    {"SCORE_THRESHOLD": 0.5}, {"DATA_DIR": "synthetic"},
                                    {"DISTILL_WEIGHTING": "confidence"}, {"W_DISTILL_BOX": 0.0},
                                    {"DISTILL_WARMUP_EPOCHS": 2.0}, {"SPLIT_SEED": 1}],
                         ids=lambda c: next(iter(c)))
def test_detection_notebook_settings_and_data_change_the_spec(change, tmp_path, monkeypatch):
    """The defect of notebook 05: BOX_LOSS, TRAIN_FRAMES or DATA_DIR changes reused old weights."""
    monkeypatch.setenv("MTML_SHARED_DATA", str(tmp_path / "none"))  # synthetic default: fast
    params = smoke_parameters("detection", notebook_defaults(DETECTION_NOTEBOOK))
    if change.get("DATA_DIR") or "SPLIT_SEED" in change:  # a prepared folder (only its manifest is read)
        (tmp_path / "frames").mkdir()
        pd.DataFrame({"frame": ["a", "b"], "split": ["train", "test"], "image": ["a.jpg", "b.jpg"],
                      "boxes": ["[[1, 1, 9, 9]]", "[]"]}).to_csv(tmp_path / "frames" / "manifest.csv", index=False)
        params["DATA_DIR"] = None if change.get("DATA_DIR") else str(tmp_path / "frames")
        change = {**change, "DATA_DIR": str(tmp_path / "frames")}
    before, after = spec_from_parameters("detection", params), spec_from_parameters("detection", {**params, **change})
    assert before.hash != after.hash


def test_every_notebook_knob_is_in_the_spec_or_declared_speed_only(tmp_path, monkeypatch):
    """A knob that changes the run but not its spec would let two runs share one identity."""
    from mtml.runs.parameters import NOT_IDENTITY

    monkeypatch.setenv("MTML_SHARED_DATA", str(tmp_path / "none"))
    changed = {int: lambda v: v + 1, float: lambda v: v + 0.5, str: lambda v: v + "x", bool: lambda v: not v}
    alternatives = {"MODE": "ml", "VERSION": "v1", "BOX_LOSS": "l1", "ENSEMBLE": "wbf",
                    "DISTILL_WEIGHTING": "confidence", "FRAME_SIZE": 128, "TRAIN_FRAMES": 20, "EVAL_FRAMES": 12,
                    "TEACHER_KNOWLEDGE": "both", "PEER_KNOWLEDGE": "features", "FEATURE_LEVELS": 2}
    # the feature knobs belong to a run's identity when some student learns features (mtml.spec)
    features_on = {"TEACHER_KNOWLEDGE", "PEER_KNOWLEDGE", "W_FEAT", "FEATURE_LEVELS"}
    for task, runners in reproduce.RUNNERS.items():
        for name in set(runners.values()):
            defaults = notebook_defaults(NOTEBOOKS / f"{name}.ipynb")
            for key, value in defaults.items():
                params = {**defaults, "MODE": "kd_ml_styles"} if key in features_on else defaults
                base = spec_from_parameters(task, params).hash
                if key in NOT_IDENTITY or key in ("DATA_DIR", "SPLIT_SEED", "SPLIT_BY"):  # both: a prepared folder, above
                    continue
                other = alternatives.get(key, value if value is None else changed[type(value)](value))
                if other == value:
                    other = "kd_ml" if key == "MODE" else changed[type(value)](value)
                if key == "PRETRAINED":  # building ImageNet networks needs the internet: the spec alone
                    other = True
                assert spec_from_parameters(task, {**params, key: other}).hash != base, (name, key)


def test_equal_values_typed_differently_give_one_spec(tmp_path, monkeypatch):
    params = notebook_defaults(NOTEBOOKS / "01_kd_only.ipynb")
    base = spec_from_parameters("classification", params).hash
    for key, value in (("TEMPERATURE", 4), ("W_KD", "1.0"), ("EPOCHS", 5.0), ("LR", "5e-2"), ("PRETRAINED", 0)):
        assert spec_from_parameters("classification", {**params, key: value}).hash == base, key


def test_grid_repeats_are_one_run_and_unknown_parameters_are_refused(tmp_path, monkeypatch):
    runs = reproduce.plan("classification", ["kd", "kd"], ["tiny"], [0, 1, 0])
    assert [r.cell for r in runs] == [("tiny", "kd", 0), ("tiny", "kd", 1)]
    with pytest.raises(ValueError, match="unknown parameter.*EPOCH"):
        reproduce.plan("classification", ["kd"], ["tiny"], [0], {"EPOCH": 20})


@pytest.mark.parametrize("smoke", [False, True])
def test_a_grid_is_planned_as_a_study_and_each_notebook_gets_its_own_knobs(smoke):
    """`mtml.runs.reproduce` plans a grid with the study's planner (every seed, also in a smoke grid);
    each notebook gets only the parameters it declares, and from them computes the run identity the
    runner planned; a knob that one of the grid's notebooks does not declare is refused up front."""
    from mtml.runs.study import Study

    for task, runners in reproduce.RUNNERS.items():
        runs = reproduce.plan(task, list(runners), ["tiny"], [0, 1, 2], {"TEMPERATURE": 2.0}, smoke=smoke)
        study = Study(name="grid", task=task, data="notebook", version="tiny", modes=tuple(runners), seeds=(0, 1, 2),
                      params={**reproduce.task_defaults(task), "BASELINE": False, "TEMPERATURE": 2.0, "RESUME": True})
        assert len(runs) == 3 * len(runners)
        assert [r.spec.hash for r in runs] == [spec_from_parameters(task, p).hash
                                               for p in study.planned(smoke, smoke_seeds=None)], task
        for run in runs:
            own = notebook_defaults(NOTEBOOKS / f"{run.notebook}.ipynb")
            assert set(run.parameters) <= set(own), (run.notebook, set(run.parameters) - set(own))
            assert spec_from_parameters(task, run.parameters).hash == run.spec.hash, run.cell
            assert run.spec.config["temperature"] == 2.0
        for knob in ("W_FEAT", "TEACHER_KNOWLEDGE", "PEER_KNOWLEDGE"):  # read by 03/07 only: refused with kd or ml
            with pytest.raises(ValueError, match=f"unknown parameter.*{knob}.*for 0[1256]_"):
                reproduce.plan(task, list(runners), ["tiny"], [0], {knob: "features" if "KNOW" in knob else 0.5})
        styles = reproduce.plan(task, ["kd_ml", "kd_ml_styles"], ["tiny"], [0], {"W_FEAT": 0.5}, smoke=smoke)
        assert styles[1].spec.config["w_feat"] == 0.5, "the grid's params reach the spec"


def smoke_cell(nb):
    """The cell right after a notebook's `parameters` cell: it shrinks the run when SMOKE."""
    return nb.cells[nb.cells.index(parameter_cells(nb)[-1]) + 1]


def test_every_runner_notebook_shrinks_as_the_runner_expects():
    """The runner hashes the task's `smoke_caps`; each runner notebook's `if SMOKE:` cell
    must shrink to exactly those values, or the runner would never find its runs."""
    for task, runners in reproduce.RUNNERS.items():
        for name in set(runners.values()):
            nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
            namespace = dict(notebook_defaults(NOTEBOOKS / f"{name}.ipynb"), SMOKE=True)
            exec(smoke_cell(nb).source, namespace)  # the notebook's own smoke cell
            expected = smoke_parameters(task, notebook_defaults(NOTEBOOKS / f"{name}.ipynb"))
            caps = task_class(task).smoke_caps
            assert {k: namespace[k] for k in caps} == {k: expected[k] for k in caps}, name
            small = {k: 1 for k in caps if k not in ("FRAME_SIZE", "TILE_SIZE")}  # explicit small values stay
            namespace = dict(notebook_defaults(NOTEBOOKS / f"{name}.ipynb"), SMOKE=True, **small)
            exec(smoke_cell(nb).source, namespace)
            assert {k: namespace[k] for k in small} == small, name


def test_resume_refuses_another_spec_and_names_the_difference(tmp_path):
    data = make_separable(64, 16, seed=0)
    cfg = CohortConfig(mode="kd", epochs=1, batch_size=32)
    task = ClassificationTask()
    fit(Cohort.build(cfg, task=task), task, data, progress=False,
        callbacks=[Checkpoint(tmp_path, spec_of(cfg, task, {"box_loss": "giou"}))])
    with pytest.raises(ValueError, match=r"another run.*data\.box_loss"):
        fit(Cohort.build(cfg, task=ClassificationTask()), task, data, progress=False,
            callbacks=[Checkpoint(tmp_path, spec_of(cfg, task, {"box_loss": "l1"}), resume=True)])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["spec_hash"] == spec_of(cfg, task, {"box_loss": "giou"}).hash


def test_a_run_one_notebook_finished_is_reloaded_by_another_beside_it(tmp_path):
    """The run store: 04 writing beside 01 reloads 01's finished run of the same identity (its
    stored history, to the second, and its weights) instead of training it again."""
    from mtml.runs.experiment import RunOptions, RunStore, run_cohort

    data, val = make_separable(64, 16, seed=0), make_separable(32, 16, seed=1)
    cfg, task = CohortConfig(mode="kd", epochs=1, batch_size=32), ClassificationTask()
    spec = spec_of(cfg, task, {"train_items": len(data)})
    quiet = RunOptions(progress=False)
    first = run_cohort(cfg, task, data, val, spec=spec, store=RunStore.beside(tmp_path / "01_kd_only"), options=quiet)
    again = run_cohort(cfg, task, data, val, spec=spec, store=RunStore.beside(tmp_path / "04_classification_comparison"),
                       options=quiet)
    assert RunStore.beside(tmp_path / "01_kd_only").checkpoints(spec) == tmp_path / "store" / spec.hash
    assert (tmp_path / "store" / spec.hash / "checkpoint.pt").is_file()
    pd.testing.assert_frame_equal(first.history, again.history)  # time_s too: nothing trained again
    for name, net in first.cohort.networks.items():
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                     again.cohort.networks[name].state_dict().values()))


def test_the_comparison_notebooks_default_runs_are_the_single_run_notebooks_runs():
    """What the run store's reloads rest on: 04's runs at seed 0 are exactly 01-03's and 01's
    baseline, 09's kd_ml runs are 04's (at seed 0: 03's; same identity up to the data, which all read alike)."""
    from mtml.runs.parameters import config_from_parameters, task_from_parameters

    def identity(notebook, **change):
        knobs = {**notebook_defaults(NOTEBOOKS / f"{notebook}.ipynb"), **change}
        return spec_of(config_from_parameters(knobs, "classification"), task_from_parameters("classification", knobs)).hash

    for smoke in (False, True):
        cap = (lambda d: smoke_parameters("classification", d)) if smoke else (lambda d: d)
        def run(notebook, **change):
            return identity(notebook, **cap({**notebook_defaults(NOTEBOOKS / f"{notebook}.ipynb"), **change}))
        for notebook, mode in (("01_kd_only", "kd"), ("02_ml_only", "ml"), ("03_kd_plus_ml", "kd_ml"),
                               ("01_kd_only", "independent")):
            assert run("04_classification_comparison", MODE=mode, SEED=0) == run(notebook, MODE=mode), (notebook, mode, smoke)
        for seed in (0, 1, 2):
            assert run("09_learning_styles", MODE="kd_ml", SEED=seed) == run("04_classification_comparison", MODE="kd_ml", SEED=seed)



def test_the_detection_comparison_default_runs_are_05_to_07s_runs():
    """08 reloads seed 0 of every mode from 05-07 (their runs, 05's baseline): the same settings,
    the same data knobs, at the defaults and at the smoke caps."""
    from mtml.runs.parameters import config_from_parameters, task_from_parameters

    data_knobs = ("DATA_DIR", "FRAME_SIZE", "TRAIN_FRAMES", "EVAL_FRAMES", "SPLIT_SEED", "SPLIT_BY")
    for smoke in (False, True):
        def run(notebook, **change):
            knobs = {**notebook_defaults(NOTEBOOKS / f"{notebook}.ipynb"), **change}
            knobs = smoke_parameters("detection", knobs) if smoke else knobs
            cfg, task = config_from_parameters(knobs, "detection"), task_from_parameters("detection", knobs)
            return spec_of(cfg, task).hash, {k: knobs.get(k) for k in data_knobs}
        for notebook, mode in (("05_detection_kd_only", "kd"), ("06_detection_ml_only", "ml"),
                               ("07_detection_kd_plus_ml", "kd_ml"), ("05_detection_kd_only", "independent")):
            assert run("08_detection_comparison", MODE=mode, SEED=0) == run(notebook, MODE=mode), (notebook, mode, smoke)


# -- paired runs ----------------------------------------------------------------------------------

def _students(mode, networks=None, seed=4):
    from mtml.tasks.models import build_cohort_networks

    networks = networks or build_cohort_networks
    cfg = CohortConfig(mode=mode, seed=seed)
    teacher = build_teacher(cfg, networks) if mode == "offline" else None
    return [s.state_dict() for s in Cohort.build(cfg, teacher=teacher, networks=networks).students]


def _same_weights(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_a_seed_starts_every_mode_from_the_same_students(task):
    from functools import partial

    from mtml.tasks.detectors import build_detection_networks

    networks = partial(build_detection_networks, size=64) if task == "detection" else None
    first = _students("independent", networks)
    for mode in MODES[1:]:
        assert _same_weights(first, _students(mode, networks)), mode
    assert not _same_weights(first, _students("independent", networks, seed=5))


def test_every_mode_sees_the_same_data_order_and_augmentation_draws():
    data = make_separable(48, 8, seed=0)
    seen = {}
    for mode in ("independent", "kd", "ml", "kd_ml"):
        draws = []

        def augment(batch, generator=None):
            draws.append((batch["index"].tolist(), torch.rand(3, generator=generator).tolist()))
            return batch

        fit(Cohort.build(CohortConfig(mode=mode, epochs=2, batch_size=16, seed=2), task=ClassificationTask()), ClassificationTask(),
            data, augment=augment, progress=False)
        seen[mode] = draws
    assert all(draws == seen["independent"] for draws in seen.values())
    assert len({tuple(d[1]) for d in seen["kd"]}) == len(seen["kd"])  # a fresh draw every step


# -- tables hold one run per cell ---------------------------------------------------------------

def test_duplicate_cells_are_an_error_naming_both_runs():
    runs = pd.DataFrame({"version": ["tiny"] * 3, "mode": ["kd", "kd", "ml"], "seed": [0, 0, 0],
                         "ensemble/auroc": [0.7, 0.9, 0.8], "path": ["runs/a", "runs/b", "runs/c"]})
    with pytest.raises(ValueError, match=r"runs/a.*runs/b"):
        check_one_run_per_cell(runs)
    with pytest.raises(ValueError, match="one run per cell"):
        paired_differences(runs, "auroc")


# -- the runner ---------------------------------------------------------------------------------

KD_ML_MINUS_KD = {0: -0.015, 1: -0.025, 2: -0.020}  # a true mean difference of -0.020


def fake_execute(calls):
    """Stands in for papermill: writes the record the notebook would write for its parameters."""
    def execute(notebook, out_dir, parameters, smoke, resume_hint=""):
        calls.append((notebook, parameters))
        assert resume_hint.startswith("python -m mtml.runs.reproduce"), resume_hint
        spec = spec_from_parameters("classification", parameters)
        value = 0.80 + 0.01 * parameters["SEED"] + (KD_ML_MINUS_KD[parameters["SEED"]]
                                                     if parameters["MODE"] == "kd_ml" else 0.0)
        record = {"kind": "run", "spec_hash": spec.hash, **spec.flat(), "ensemble/auroc": value,
                  "students_mean/auroc": value - 0.01}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(record))
    return execute


def write_stray(folder: Path, mode: str, seed: int, value: float):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "kind": "run", "task": "classification", "mode": mode, "version": "tiny", "seed": seed,
        "smoke": True, "ensemble/auroc": value, "students_mean/auroc": value}))


def test_runner_reports_only_its_grid_and_reruns_a_changed_parameter(tmp_path, monkeypatch, capsys):
    """The defects: stray smoke/demo records entered the table and were averaged into cells; a
    changed --param was skipped by path and reported the old numbers."""
    calls = []
    monkeypatch.setattr(reproduce, "execute", fake_execute(calls))
    write_stray(tmp_path / "runs" / "notebooks" / "03_kd_plus_ml", "kd_ml", 0, 0.99)
    write_stray(tmp_path / "runs" / "classification" / "tiny" / "kd" / "seed0", "kd", 0, 0.50)
    argv = ["--modes", "kd", "kd_ml", "--seeds", "0", "1", "2", "--runs-dir", str(tmp_path / "runs"),
            "--param", "EPOCHS=1"]
    assert reproduce.main(argv) == 0
    assert len(calls) == 6
    table = pd.read_csv(tmp_path / "runs" / "classification_results.csv")
    assert len(table) == 6 and table["spec_hash"].nunique() == 6 and (table["epochs"] == 1).all()
    paired = pd.read_csv(tmp_path / "runs" / "classification_paired.csv")
    row = paired.iloc[0]
    sign = 1 if row["a"] == "kd_ml" else -1
    assert row["seeds"] == 3 and sign * row["mean(ensemble a-b)"] == pytest.approx(-0.020)

    assert reproduce.main(argv) == 0 and len(calls) == 6, "finished runs of the same spec are skipped"
    assert reproduce.main(argv[:-1] + ["EPOCHS=2"]) == 0
    assert len(calls) == 12, "a changed parameter is a new run"
    table = pd.read_csv(tmp_path / "runs" / "classification_results.csv")
    assert len(table) == 6 and (table["epochs"] == 2).all()


def test_runs_finished_in_the_old_layout_are_found_and_a_grid_baseline_is_refused(tmp_path, monkeypatch):
    """Runs went to <version>/<mode>/seed<k>/<hash>/ before 2026-11-28: a grid moved on to the new
    layout skips and reports them instead of training them again."""
    calls = []
    monkeypatch.setattr(reproduce, "execute", fake_execute(calls))
    runs = tmp_path / "runs"
    argv = ["--modes", "kd", "kd_ml", "--seeds", "0", "1", "--runs-dir", str(runs), "--param", "EPOCHS=1"]
    assert reproduce.main(argv) == 0 and len(calls) == 4
    first = pd.read_csv(runs / "classification_results.csv")
    for folder in sorted((runs / "classification" / "tiny").glob("*-seed*-*")):
        mode, seed, spec_hash = folder.name.rsplit("-", 2)
        old = runs / "classification" / "tiny" / mode / seed / spec_hash
        old.parent.mkdir(parents=True)
        folder.rename(old)
    assert reproduce.main(argv) == 0 and len(calls) == 4, "runs finished in the old layout are not run again"
    again = pd.read_csv(runs / "classification_results.csv")
    assert sorted(again["spec_hash"]) == sorted(first["spec_hash"])
    assert again["path"].str.contains("/seed[01]/", regex=True).all()
    with pytest.raises(ValueError, match="BASELINE"):
        reproduce.plan("classification", ["kd"], ["tiny"], [0], {"BASELINE": True})


def test_runner_keeps_going_after_a_failed_run_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    calls = []
    good = fake_execute(calls)

    def flaky(notebook, out_dir, parameters, smoke, resume_hint=""):
        if parameters["SEED"] == 1:
            raise RuntimeError(f"cell 12 timed out. Resume with: {resume_hint}")
        good(notebook, out_dir, parameters, smoke, resume_hint)

    monkeypatch.setattr(reproduce, "execute", flaky)
    argv = ["--modes", "kd", "--seeds", "0", "1", "2", "--runs-dir", str(tmp_path / "runs")]
    assert reproduce.main(argv) == 1
    err = capsys.readouterr().err
    assert "1 run(s) failed" in err and "seed1" in err and "cell 12 timed out" in err
    assert "Resume with: python -m mtml.runs.reproduce --modes kd --seeds 0 1 2" in err
    assert len(pd.read_csv(tmp_path / "runs" / "classification_results.csv")) == 2


def test_runner_refuses_a_notebook_that_disagrees_on_the_spec(tmp_path, monkeypatch, capsys):
    calls = []
    good = fake_execute(calls)

    def drifting(notebook, out_dir, parameters, smoke, resume_hint=""):
        good(notebook, out_dir, {**parameters, "EPOCHS": parameters["EPOCHS"] + 1}, smoke, resume_hint)

    monkeypatch.setattr(reproduce, "execute", drifting)
    assert reproduce.main(["--modes", "kd", "--seeds", "0", "--runs-dir", str(tmp_path / "runs")]) == 1
    assert "disagree" in capsys.readouterr().err


def test_detection_notebook_box_loss_change_trains_a_new_run(tmp_path, monkeypatch):
    """Notebook 05 executed twice into one folder, GIoU then L1 box distillation (its own "Things
    to try"): the second run must train new weights, not reload the first."""
    monkeypatch.setenv("MTML_SHARED_DATA", str(tmp_path / "none"))  # synthetic polyps: fast
    out = tmp_path / "nb05"
    records = []
    for box_loss in ("giou", "l1"):
        reproduce.execute("05_detection_kd_only", out, {"BOX_LOSS": box_loss, "EPOCHS": 1, "BASELINE": False}, smoke=True)
        records.append(json.loads((out / "metrics.json").read_text()))
    assert [r["task.box_loss"] for r in records] == ["giou", "l1"]
    assert records[0]["spec_hash"] != records[1]["spec_hash"]
    store = tmp_path / "store"  # the run store beside OUT_DIR: runs, and their teachers' tapes
    folders = sorted(p.name for p in store.iterdir() if not p.name.startswith("teacher-"))
    # box_loss is the students' (DetectionTask.student_only_settings): the second run replays the first's teacher
    assert len([p for p in store.iterdir() if p.name.startswith("teacher-")]) == 1
    assert [r["teacher_replayed"] for r in records] == [False, True]
    assert folders == sorted(r["spec_hash"] for r in records)
    weights = [torch.load(tmp_path / "store" / h / "checkpoint.pt", weights_only=True)["cohort"]["networks"]
               for h in folders]
    student = [w["student_1"] for w in weights]
    assert any(not torch.equal(student[0][k], student[1][k]) for k in student[0])
    assert np.isfinite(records[1]["ensemble/map50"])


# ---- tests added from a mutation run: a change that silently renames every run fails here ----
def test_one_spec_hash_is_pinned():
    """Every committed run is found by its hash: the format, the hashing and the rounding of the
    hash must not drift (a deliberate change bumps SPEC_FORMAT and migrates the committed CSVs)."""
    spec = spec_of(CohortConfig(mode="kd"), ClassificationTask(), {"manifest_sha256": "abc"})
    assert spec.hash == PINNED_HASH


PINNED_HASH = "5f74e43f6b9a4c9c"  # CohortConfig(mode="kd"), ClassificationTask(), manifest abc


def test_stacking_students_is_part_of_the_identity_and_a_spec_round_trips():
    from mtml.runs.spec import RunSpec
    from mtml.tasks.detection import DetectionTask

    task = DetectionTask(size=64)
    plain = spec_of(CohortConfig(mode="kd"), task, {"manifest_sha256": "abc"})
    assert plain.hash != spec_of(CohortConfig(mode="kd", stack_students=True), task, {"manifest_sha256": "abc"}).hash
    assert plain.task_settings and RunSpec.from_dict(plain.as_dict()) == plain
    assert RunSpec.from_dict(plain.as_dict()).hash == plain.hash


def test_a_spec_is_canonical_and_round_trips_from_a_stored_dict_without_optional_parts():
    """Whatever order a config was built in, a spec holds it sorted (one column order in every CSV);
    its flat form names the task `task`; a stored dict without task settings or data reads back as
    the same spec (same hash)."""
    from mtml.runs.spec import RunSpec

    spec = RunSpec("classification", {"b": 1, "a": {"y": 2, "x": 1}})
    assert list(spec.config) == ["a", "b"] and list(spec.config["a"]) == ["x", "y"]
    assert list(spec.flat()) == ["task", "a", "b"] and spec.flat()["task"] == "classification"
    stored = RunSpec.from_dict({"task": "classification", "config": {"a": 1}})
    assert stored == RunSpec("classification", {"a": 1}) and stored.hash == RunSpec("classification", {"a": 1}).hash


def test_differences_name_every_leaf_that_differs_on_either_side():
    from mtml.runs.spec import differences

    stored, wanted = {"a": 1, "n": {"x": 1, "y": 1}}, {"a": 1, "b": 2, "n": {"x": 2, "y": 1}}
    assert differences(stored, wanted) == {"b": (None, 2), "n.x": (1, 2)}
    assert differences({"n": {"x": 1}}, {"n": 3}) == {"n": ({"x": 1}, 3)}  # a dict against a value is one leaf
    assert differences(wanted, wanted) == {}


def test_a_registered_student_term_enters_the_spec_by_name(monkeypatch):
    from mtml.core import terms

    task = ClassificationTask(2)
    before = spec_of(CohortConfig(mode="kd"), task)
    monkeypatch.setattr(terms, "STUDENT_TERMS", [*terms.STUDENT_TERMS, terms.Term("l2", lambda cfg, ramp: 0.1, lambda v: 0)])
    after = spec_of(CohortConfig(mode="kd"), task)
    assert after.config["student_terms"] == ["l2"] and "student_terms" not in before.config and after.hash != before.hash
