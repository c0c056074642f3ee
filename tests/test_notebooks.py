"""The notebook contract, and the reproduction runner on a small grid (notebooks themselves run
under nbval: `MTML_SMOKE=1 pytest --nbval-lax notebooks/`, part of `make test`)."""
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from mtml import reproduce
from mtml.runs.parameters import notebook_defaults, parameter_cells

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_in_order():
    names = [p.stem for p in NOTEBOOKS]
    assert names[:5] == ["00_setup_and_data_tour", "01_kd_only", "02_ml_only", "03_kd_plus_ml",
                         "04_classification_comparison"]
    for task, runners in reproduce.RUNNERS.items():
        for notebook in runners.values():
            assert notebook in names, f"{task} runner {notebook} is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_contract(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), \
        f"{path.name} has stored outputs: strip them before committing"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert "Runtime" in nb.cells[0].source
    knobs = re.compile(r"^([A-Z_][A-Z0-9_]*)\s*=", re.M)
    cells = parameter_cells(nb)  # ValueError unless one `parameters` cell and at most one advanced cell
    assert len(cells) == 2, "a folded advanced-parameters cell sits before the parameters cell"
    advanced, core = cells
    a, p = nb.cells.index(advanced), nb.cells.index(core)
    assert a == p - 1 and advanced.metadata["jupyter"]["source_hidden"], \
        "the folded advanced knobs come right before the `parameters` cell (papermill injects after it)"
    assert 2 <= a <= 4 and not any(knobs.search(c.source) for c in nb.cells[1:a] if c.cell_type == "code"), \
        "the idea (two or three short cells) comes before any knob"
    core_lines = [line for line in core.source.splitlines() if knobs.match(line)]
    assert 1 <= len(core_lines) <= 8 and all("#" in line for line in core_lines), "at most 8 core knobs, each with a comment"
    assert 'SMOKE = os.environ.get("MTML_SMOKE") == "1"' in advanced.source
    assert "OUT_DIR" in advanced.source
    assert "if SMOKE" in nb.cells[p + 1].source, "the cell after the knobs shrinks the run when SMOKE"
    assert "metrics.json" in code[-1].source, "the last cell writes OUT_DIR/metrics.json"
    for c in code:
        assert "\ndef cohort_step" not in c.source and "class Cohort" not in c.source


SINGLE_RUNS = ("01_kd_only", "02_ml_only", "03_kd_plus_ml", "05_detection_kd_only", "06_detection_ml_only",
               "07_detection_kd_plus_ml")


BUILT_BY_HAND = ("01_kd_only", "02_ml_only", "03_kd_plus_ml")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_teaches(path):
    """Exercises with folded solutions and key takeaways everywhere; in the single-run notebooks
    the knowledge-flow diagram, the independent baseline and a generated reading of the results;
    in the comparisons a generated reading and the paper's claim against the committed study."""
    nb = nbformat.read(path, as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    exercises = next(c.source for c in nb.cells if c.source.startswith("## Exercises"))
    assert exercises.count("<details><summary>Solution</summary>") >= 3
    assert "** **Predict, then run" in exercises, "one exercise asks for a prediction before a run"
    assert nb.cells[-1].source.startswith("## Key takeaways")
    if path.stem in BUILT_BY_HAND:  # the method as code, checked against the package
        assert "by_hand(" in text and "torch.testing.assert_close(" in text
    if path.stem in ("03_kd_plus_ml", "07_detection_kd_plus_ml"):
        assert "## What the kit found" in text and "committed(study)" in text
    if path.stem in SINGLE_RUNS:
        mode = notebook_defaults(path)["MODE"]  # the idea's picture shows this notebook's mode
        assert f'knowledge_flows(highlight="{mode}")' in text and "independent_baseline(" in text
        assert text.count("train_run(") == 1, "one short call trains the run"
        assert "## Reading the results" in text and "mtml.reading.read_run(" in text
        assert "BASELINE = True" in parameter_cells(nb)[0].source
    if "comparison" in path.stem:
        assert "read_verdicts(verdict_table" in text and "## What the paper claims vs what we see" in text
        assert "**Budget.**" in nb.cells[0].source


def test_the_training_form_comes_after_the_data():
    """Pressing train before the data exist raised NameError inside the widget (notebook 03)."""
    nb = nbformat.read(next(p for p in NOTEBOOKS if p.stem == "03_kd_plus_ml"), as_version=4)
    order = [i for i, c in enumerate(nb.cells) for key in ("train, val, test = (", "cohort_form(short_run")
             if key in c.source]
    assert len(order) == 2 and order[0] < order[1]


def test_reproduce_grid_runs_once_and_collects(smoke_grid, monkeypatch):
    """A 3 x 2 grid (modes x seeds) in smoke mode: one finite row per run; a second call
    executes nothing."""
    argv, runs_dir = smoke_grid
    argv = [*argv, "--runs-dir", str(runs_dir)]
    table = pd.read_csv(runs_dir / "classification_results.csv")
    assert sorted(zip(table["mode"], table["seed"])) == [(m, s) for m in ("kd", "kd_ml", "ml") for s in (0, 1)]
    cohort_cols = [c for c in table if c.split("/")[0] in ("student_1", "student_2", "ensemble")]
    assert len(cohort_cols) >= 12 and np.isfinite(table[cohort_cols].to_numpy()).all()
    teacher_cols = [c for c in table if c.startswith("teacher/")]
    uses_teacher = table["mode"] != "ml"  # ml has no teacher: its teacher columns stay empty
    assert np.isfinite(table.loc[uses_teacher, teacher_cols].to_numpy()).all()
    assert table.loc[~uses_teacher, teacher_cols].isna().all().all()
    assert (runs_dir / "classification_comparison.png").stat().st_size > 0
    paired = pd.read_csv(runs_dir / "classification_paired.csv")  # seed and test-patient intervals per pair
    assert len(paired) == 3 and (paired["seeds"] == 2).all()
    assert (paired["boot_lo"] <= paired["mean(ensemble a-b)"]).all() and (paired["mean(ensemble a-b)"] <= paired["boot_hi"]).all()
    executed = sorted(runs_dir.rglob("*.ipynb"))
    assert len(executed) == 6
    stamps = {p: p.stat().st_mtime_ns for p in executed}

    calls = []
    monkeypatch.setattr(reproduce, "execute", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("MTML_SHARED_DATA", str(runs_dir / "none"))
    assert reproduce.main(argv) == 0
    assert calls == [], "finished runs must be skipped"
    assert {p: p.stat().st_mtime_ns for p in executed} == stamps
    assert len(pd.read_csv(runs_dir / "classification_results.csv")) == 6


def test_reproduce_rejects_bad_grid(tmp_path):
    with pytest.raises(ValueError, match="unknown mode"):
        reproduce.plan("classification", ["kdml"], ["tiny"], [0])
    with pytest.raises(ValueError, match="unknown task"):
        reproduce.plan("segmentation", ["kd"], ["tiny"], [0])
    with pytest.raises(ValueError):  # the command line shows it in one line (mtml.cli)
        reproduce.main(["--param", "epochs=3", "--runs-dir", str(tmp_path)])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_papermill_reads_every_core_parameter(path):
    """papermill infers the parameters cell's names line by line; a line it cannot parse (an '='
    in a comment, say) makes it warn "Passed unknown parameter" for a perfectly good parameter."""
    from papermill.translators import papermill_translators

    cell = parameter_cells(nbformat.read(path, as_version=4))[-1]
    inferred = {p.name for p in papermill_translators.find_translator("python", "python").inspect(cell)}
    written = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*=", cell.source, re.M)) - {"SMOKE"}  # SMOKE reads the env
    assert written - inferred == set()
