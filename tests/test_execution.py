"""Headless notebook execution never hangs (issue 12): a stuck cell, a dead kernel and a silent
kernel end with a message naming the cell; the widget notebooks run repeatedly without a hang
under plain papermill."""
import sys
import time
from pathlib import Path

import nbformat
import pytest

from mtml import execution

STUCK_S = 600  # a cell that would sleep this long; every failure below must come far sooner
SHORT_FIT = {"EPOCHS": 1, "TILE_SIZE": 16}


def tiny_notebook(tmp_path: Path, *cells: str) -> Path:
    """A parameters cell (papermill injects OUT_DIR after it) and then `cells`."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("OUT_DIR = ''")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "tiny_case.ipynb"
    nbformat.write(nb, path)
    return path


def run_expecting_failure(path: Path, out: Path) -> tuple[execution.NotebookRunError, float]:
    start = time.monotonic()
    with pytest.raises(execution.NotebookRunError) as info:
        execution.run_notebook(str(path), out, {}, smoke=True, resume_hint="make demo")
    return info.value, time.monotonic() - start


def test_stuck_cell_stops_at_its_limit_and_names_the_cell(tmp_path, monkeypatch):
    monkeypatch.setenv(execution.TIMEOUT_ENV, "3")
    path = tiny_notebook(tmp_path, "import time", f"time.sleep({STUCK_S})  # stuck on purpose\n1", "print('never')")
    err, elapsed = run_expecting_failure(path, tmp_path / "out")
    message = str(err)
    executed = tmp_path / "out" / "tiny_case.ipynb"
    # cell 1 parameters, 2 injected parameters, 3 import, 4 the stuck one
    assert f"cell 4 (`time.sleep({STUCK_S})  # stuck on purpose`)" in message
    assert message.startswith("tiny_case: ") and "within 3 s" in message
    assert str(executed) in message and "Resume with: make demo" in message
    assert elapsed < STUCK_S / 5, f"took {elapsed:.0f} s: the limit did not stop the cell"
    assert err.cell_index == 3 and err.executed == executed
    assert not execution.ran_clean(executed), "a timed-out copy must never read as finished"
    cell = nbformat.read(executed, as_version=4).cells[3]
    assert cell.outputs[-1]["output_type"] == "error"


def test_dead_kernel_is_detected_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv(execution.TIMEOUT_ENV, str(STUCK_S))
    path = tiny_notebook(tmp_path, "x = 1", "import os\nos._exit(1)")
    err, elapsed = run_expecting_failure(path, tmp_path / "out")
    assert "cell 4 (`import os`) stopped: the kernel died" in str(err)
    assert elapsed < STUCK_S / 5, f"took {elapsed:.0f} s: the death was noticed by the limit, not at once"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP")
def test_silent_kernel_is_stopped_by_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv(execution.TIMEOUT_ENV, "3")
    path = tiny_notebook(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)")
    err, elapsed = run_expecting_failure(path, tmp_path / "out")
    assert "cell 3 (`import os, signal`)" in str(err) and "within 3 s" in str(err)
    assert elapsed < STUCK_S / 5


def test_cell_error_names_the_cell_and_the_error(tmp_path):
    path = tiny_notebook(tmp_path, "raise ValueError('impossible setting')")
    err, _ = run_expecting_failure(path, tmp_path / "out")
    assert "cell 3 (`raise ValueError('impossible setting')`) raised ValueError: impossible setting" in str(err)


def test_bad_inputs_say_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no notebook"):
        execution.run_notebook(str(tmp_path / "missing.ipynb"), tmp_path, {}, smoke=True)
    monkeypatch.setenv(execution.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="MTML_CELL_TIMEOUT must be a number of seconds"):
        execution.cell_limit("01_kd_only", smoke=True)


def test_cell_limit_follows_the_notebook_budget(monkeypatch):
    monkeypatch.delenv(execution.TIMEOUT_ENV, raising=False)
    for name, (full, small) in execution.BUDGET_S.items():
        assert execution.cell_limit(name, smoke=False) == execution.SAFETY * full
        assert execution.cell_limit(name, smoke=True) == execution.SAFETY * small
    notebooks = {p.stem for p in execution.NOTEBOOKS.glob("*.ipynb")}
    assert notebooks <= set(execution.BUDGET_S), f"no budget for {notebooks - set(execution.BUDGET_S)}"


def test_demo_resumes_and_stops_at_a_stuck_notebook(tmp_path, monkeypatch, capsys):
    """A second demo skips what the first finished (clean executed copy and metrics.json) and
    stops with exit status 1 at the first notebook that fails, naming it."""
    from mtml.teach import demo as demo_module

    calls = []

    def fake_execute(name, folder, parameters, smoke, resume_hint=""):
        calls.append(name)
        if name == "03_kd_plus_ml":
            raise execution.NotebookRunError(f"{name}: cell 9 (`x`) did not finish. Resume with: {resume_hint}",
                                             name, folder / f"{name}.ipynb", 8)
        folder.mkdir(parents=True, exist_ok=True)
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1", execution_count=1)])
        nbformat.write(nb, folder / f"{name}.ipynb")
        (folder / "metrics.json").write_text("{}")

    monkeypatch.setattr(demo_module, "execute", fake_execute)
    with pytest.raises(SystemExit) as stop:
        demo_module.demo(tmp_path, smoke=True)
    assert stop.value.code == 1
    assert calls == ["00_setup_and_data_tour", "01_kd_only", "02_ml_only", "03_kd_plus_ml"]
    assert "03_kd_plus_ml: cell 9" in capsys.readouterr().err
    (tmp_path / "demo-smoke" / "01_kd_only" / "metrics.json").unlink()  # 01 stopped before its end
    calls.clear()
    with pytest.raises(SystemExit):
        demo_module.demo(tmp_path, smoke=True)
    assert calls == ["01_kd_only", "03_kd_plus_ml"]
    total = len(demo_module.DEMO_ORDER)
    assert f"[1/{total}] 00_setup_and_data_tour: finished by an earlier demo, skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_widget_notebooks_never_hang_under_plain_papermill():
    """The short stress check (bench/stress_notebooks.py does it at length, under every runner):
    the widget notebooks in smoke mode under papermill's own command line (not the kit's runner),
    00 (where the hang showed most) three times, the others once with a one-epoch fit on 16 px
    tiles; an execution still running at its limit is killed and counted, never hangs the run."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from stress_notebooks import accepted, execute_once, widget_notebooks
    finally:
        sys.path.pop(0)

    notebooks = widget_notebooks()
    assert {"00_setup_and_data_tour", "01_kd_only", "03_kd_plus_ml"} <= set(notebooks)
    outcomes = {}
    for name in notebooks:
        limit = execution.cell_limit(name, smoke=True)
        outcomes[name] = [execute_once("papermill", name, accepted(name, SHORT_FIT), smoke=True, timeout=limit)
                          for _ in range(3 if name.startswith("00_") else 1)]
    assert all(o == "ok" for runs in outcomes.values() for o in runs), outcomes


def test_kit_runner_uses_private_ipc_sockets_and_prints_no_tcp_warning(tmp_path, capfd):
    """The kit's kernels talk over IPC sockets in a temporary folder: nothing is left beside the
    notebook, and ipykernel's unencrypted-TCP warning never reaches make demo's output."""
    path = tiny_notebook(tmp_path, "import os, json\nprint(json.load(open(os.environ.get('JPY_CONNECTION_FILE', '')"
                                   " or __import__('ipykernel').connect.get_connection_file()))['transport'])")
    executed = execution.run_notebook(str(path), tmp_path / "out", {}, smoke=True)
    printed = "".join(o.get("text", "") for o in nbformat.read(executed, as_version=4).cells[-1].outputs)
    assert printed.strip() == "ipc"
    assert "without encryption" not in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny_case.ipynb"], "socket files left beside it"


def test_papermill_keeps_quiet_about_advanced_knobs_only(caplog, tmp_path):
    """papermill calls every knob outside the `parameters` cell "unknown"; the kit's runner drops
    that message for the folded advanced knobs (and OUT_DIR) and keeps it for a real typo."""
    import logging

    import papermill

    from mtml.runs.execution import NOTEBOOKS, _quiet_about, advanced_knobs

    source = NOTEBOOKS / "01_kd_only.ipynb"
    assert {"LR", "OUT_DIR", "DATA_DIR"} <= advanced_knobs(source) and "TEMPERATURE" not in advanced_knobs(source)
    with caplog.at_level(logging.WARNING, logger="papermill"), _quiet_about(advanced_knobs(source)):
        papermill.execute_notebook(str(source), str(tmp_path / "prepared.ipynb"), prepare_only=True,
                                   parameters={"LR": 0.1, "OUT_DIR": "x", "TEMPERATURE": 2.0, "TEMPERTURE": 2.0},
                                   kernel_name="python3", progress_bar=False)
    unknown = [r.getMessage() for r in caplog.records if "unknown parameter" in r.getMessage()]
    assert unknown == ["Passed unknown parameter: TEMPERTURE"]
