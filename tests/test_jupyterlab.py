"""The notebooks in a real JupyterLab, run by headless Chromium as a learner would run them.

Covers 00_setup_and_data_tour, every notebook with widgets, and one detection notebook: Run All Cells
must finish without an error, widgets must be live views (not their text repr), plots real images.
The server runs on COPIES of the notebooks in a temporary folder with MTML_SMOKE=1, shrunk further (SHRUNK); a screenshot of
each notebook goes to a folder outside the checkout (SCREENSHOTS, printed at the end). Without
/usr/bin/chromium (Debian's `chromium`) or the playwright package the test skips, except in CI (`CI` set), where it fails.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from lab_driver import CHROMIUM, CHROMIUM_ARGS, LabServer, move_first_slider, press_train, run_in_lab
from mtml.runs.parameters import parameter_cells

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SCREENSHOTS = Path(tempfile.gettempdir()) / "mtml-jupyterlab-screenshots"  # never the checkout's runs/
SETUP_NOTEBOOK = "00_setup_and_data_tour.ipynb"
WIDGET_MARKERS = ("ipywidgets", "mtml.widgets", "mtml.teach.widgets", "from mtml.teach import widgets")
PLOT_MARKERS = ("plt.", "mtml.plots", "matplotlib")
RUN_TIMEOUT_S = 900  # per notebook; a hang fails the test instead of blocking make test
# what a learner does after Run All Cells: move the temperature slider (01), train from the form (03)
INTERACT = {"01_kd_only": move_first_slider, "03_kd_plus_ml": press_train}


def _mentions(notebook: Path, markers) -> bool:
    text = notebook.read_text()
    return any(marker in text for marker in markers)


def notebooks_to_run() -> list[str]:
    """00, every notebook using widgets, and one detection notebook (one with widgets if any)."""
    numbered = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    chosen = {SETUP_NOTEBOOK} | {nb.name for nb in numbered if _mentions(nb, WIDGET_MARKERS)}
    detection = [nb.name for nb in numbered if "detection" in nb.name]
    if detection and not chosen & set(detection):
        chosen.add(detection[0])
    return sorted(chosen)


# smaller than the smoke caps: the browser test checks what the page shows (widgets live, images
# drawn, no error), which does not depend on the numbers; nbval runs every notebook at smoke size
SHRUNK = {"EPOCHS": 1, "TILE_SIZE": 16, "FRAME_SIZE": 64, "TRAIN_FRAMES": 8, "EVAL_FRAMES": 8}


def shrink(copy: Path) -> list[str]:
    """Sets the SHRUNK values a notebook copy's knob cells define, at the end of its `parameters`
    cell (where papermill would inject them); returns their names."""
    nb = nbformat.read(copy, as_version=4)
    cells = parameter_cells(nb)
    defined = [k for k in SHRUNK if any(re.search(rf"^{k}\s*=", c.source, re.M) for c in cells)]
    cells[-1].source += "".join(f"\n{k} = {SHRUNK[k]!r}  # tests/test_jupyterlab.py: shrunk" for k in defined)
    nbformat.write(nb, copy)
    return defined


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by playwright (never a downloaded browser)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright, missing = None, "the playwright package (requirements.txt)"
    else:
        missing = None if CHROMIUM.is_file() else f"{CHROMIUM} (apt-get install chromium)"
    if missing:
        message = f"JupyterLab browser test needs {missing}"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must have it (.ci/run installs it)")
        pytest.skip(message)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, pytestconfig):
    """JupyterLab serving copies of the notebooks; stopped (kernels too) whatever happens."""
    root = tmp_path_factory.mktemp("lab")
    state = tmp_path_factory.mktemp("lab-state")
    # notebooks/ inside root, so the notebooks' "../runs/..." outputs stay in the temporary folder.
    shutil.copytree(NOTEBOOKS, root / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for name in notebooks_to_run():  # 00 trains nothing; a knob renamed in another must not go unnoticed
        assert shrink(root / "notebooks" / name) or name == SETUP_NOTEBOOK, f"{name}: no SHRUNK knob found"
    # mtml finds ../shared/data and data/ from its own location in the repo, not from the cwd.
    env = {"MTML_SMOKE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    shots: list[str] = []
    with LabServer(root, state, env) as server:
        server.shots = shots
        yield server
    if shots:  # shown even when the tests pass
        plugins = pytestconfig.pluginmanager
        with plugins.getplugin("capturemanager").global_and_fixture_disabled():
            plugins.getplugin("terminalreporter").write_line(
                f"\nJupyterLab screenshots in {SCREENSHOTS}: {', '.join(shots)}")


def test_the_widget_notebooks_are_among_those_run():
    assert {"00_setup_and_data_tour.ipynb", "01_kd_only.ipynb", "03_kd_plus_ml.ipynb"} <= set(notebooks_to_run())


@pytest.mark.parametrize("name", notebooks_to_run())
def test_notebook_runs_in_jupyterlab(name, browser, lab):
    source = NOTEBOOKS / name
    assert source.is_file(), f"notebooks/{name} is missing"
    shot = SCREENSHOTS / f"{source.stem}.png"
    report = run_in_lab(browser, lab, f"notebooks/{name}", shot, RUN_TIMEOUT_S, INTERACT.get(source.stem))
    lab.shots.append(f"{shot.name} ({report.seconds:.0f} s)")
    where = (f"{name}: {report.seconds:.0f} s in the lab, kernel CPU {report.kernel_cpu_s:.0f} s; "
             f"screenshot {report.screenshot}; server log {lab.log}")
    print(where)

    assert not report.dialogs, f"JupyterLab showed a dialog: {report.dialogs}; {where}"
    # The kernel is this environment's interpreter (the .venv that `make test` uses).
    assert report.kernel_argv and Path(report.kernel_argv[0]) == Path(sys.executable), \
        f"kernel ran {report.kernel_argv[:1]}, expected {sys.executable}; {where}"
    assert report.prompts, f"no code cells seen; {where}"
    assert not report.unfinished, (
        f"code cells {report.unfinished} of {len(report.prompts)} never ran (prompts {report.prompts}); "
        f"errors {report.saved_errors}; dialogs {report.dialogs}; {where}")
    assert not report.saved_errors and not report.tracebacks, \
        f"errors: {report.saved_errors} {report.tracebacks}; {where}"
    if _mentions(source, WIDGET_MARKERS):
        assert report.widget_outputs, f"the kernel displayed no widget; {where}"
        assert not report.text_fallbacks, \
            f"widgets shown as text, not live views: {report.text_fallbacks}; {where}"
        assert not report.widget_failures, \
            f"widgets failed to render: {report.widget_failures}; console {report.console_errors}; {where}"
        assert report.live_widgets, f"no live widget view on the page; {where}"
    if source.stem == "01_kd_only":
        assert report.interactions.get("slider") == "figure redrawn", f"{report.interactions}; {where}"
    if source.stem == "03_kd_plus_ml":
        form = report.interactions.get("form", "")
        assert "ensemble" in form, f"the form's short run showed no metrics table: {form!r}; {where}"
    if _mentions(source, PLOT_MARKERS):
        assert report.image_outputs, f"the kernel sent no image; {where}"
        assert report.images >= report.image_outputs, \
            f"{report.images} of {report.image_outputs} images rendered; {where}"
