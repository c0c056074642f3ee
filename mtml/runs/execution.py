"""Runs one notebook headlessly (papermill on nbclient) so that it can never hang.

Every cell gets a time limit sized from its notebook's budget (`cell_limit`; `MTML_CELL_TIMEOUT`
seconds overrides it), a dead kernel is noticed within about a second (nbclient polls the kernel
process), and any failure becomes one `NotebookRunError` that names the notebook, the cell and its
first line, the executed copy and the command that resumes.

The kit's widgets build no `Output` widget (see `mtml.widgets`), the one widget that nbclient-based
runners (this one, plain papermill, nbconvert, nbclient) can hang on (jupyter/nbclient#312). The
kernel talks over IPC sockets in a private temporary folder where the platform has them: a local kernel needs no TCP, and
ipykernel then prints no warning about unencrypted TCP into the progress lines.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
TIMEOUT_ENV = "MTML_CELL_TIMEOUT"
# Wall time of each whole notebook in seconds, (default run, smoke run), on 2 busy CPU cores, with
# headroom. Smoke: measured with `make demo` under MTML_SMOKE=1 (00 10 s, 01-03 about 60 s, 04 180 s
# at its old 1-epoch cap, now 2 epochs with seed 0 reloaded from 01-03; 05-07 20-45 s, 08 75 s).
# Default: measured by `make demo` on a fresh clone, 2026-11-28 (00 17 s, 01-03 28-100 s, 04 341 s,
# 05-07 81-201 s, 08 330 s, 09 196 s; a notebook alone that trains what the run store would reload
# takes up to 200 s more).
# One cell may take the whole notebook's time, so a cell's limit is SAFETY times the budget.
BUDGET_S = {
    "00_setup_and_data_tour": (60, 30),
    "01_kd_only": (240, 90),
    "02_ml_only": (240, 90),
    "03_kd_plus_ml": (240, 90),
    "04_classification_comparison": (900, 240),
    "05_detection_kd_only": (1200, 60),
    "06_detection_ml_only": (1200, 60),
    "07_detection_kd_plus_ml": (1200, 60),
    "08_detection_comparison": (900, 120),
    "09_learning_styles": (900, 240),  # one run, then 2 modes x 3 seeds, like 04
}
UNKNOWN_BUDGET_S = (600, 60)
SAFETY = 4


class NotebookRunError(RuntimeError):
    """A headless notebook run that stopped: a cell timed out or failed, or the kernel died."""

    def __init__(self, message: str, notebook: str, executed: Path, cell_index: int | None = None):
        super().__init__(message)
        self.notebook, self.executed, self.cell_index = notebook, executed, cell_index


def cell_limit(notebook: str, smoke: bool) -> int:
    """Seconds one cell of `notebook` may run: SAFETY x the notebook's budget, or $MTML_CELL_TIMEOUT."""
    override = os.environ.get(TIMEOUT_ENV, "").strip()
    if override:
        try:
            seconds = float(override)
        except ValueError:
            seconds = 0
        if not 1 <= seconds <= 10**7:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds >= 1, got {override!r}")
        return int(seconds)
    full, small = BUDGET_S.get(Path(notebook).stem, UNKNOWN_BUDGET_S)
    return SAFETY * (small if smoke else full)


@functools.cache
def _engine() -> str:
    """Registers a papermill engine whose kernel is local (IPC) and is shut down at once when a cell
    runs past its limit; built lazily (papermill is slow to import)."""
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import Engine, papermill_engines
    from traitlets.config import Config

    class _Client(PapermillNotebookClient):
        async def _async_handle_timeout(self, timeout, cell=None):
            self.shutdown_kernel = "immediate"  # a stuck kernel answers no shutdown request
            return await super()._async_handle_timeout(timeout, cell)

    class _Engine(Engine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            kwargs.pop("input_path", None)
            # IPC sockets in a private folder: their default names are relative to the notebook's folder,
            # where concurrent runs would pick the same names and a killed run would leave them behind
            with tempfile.TemporaryDirectory(prefix="mtml-kernel-") as sockets:
                transport = ({"transport": "ipc", "ip": os.path.join(sockets, "k")} if os.name != "nt"
                             else {"transport": "tcp"})
                client = _Client(nb_man, kernel_name=kernel_name, timeout=kwargs.pop("execution_timeout"),
                                 startup_timeout=kwargs.pop("start_timeout"), log=logging.getLogger("papermill"),
                                 config=Config(KernelManager=transport), **kwargs)
                return client.execute()

    papermill_engines.register("mtml", _Engine)
    return "mtml"


def _first_line(source: str) -> str:
    lines = [line.strip() for line in source.splitlines() if line.strip()]
    return lines[0][:100] if lines else "(empty)"


def _mark_failed(executed: Path, index: int, ename: str, evalue: str) -> None:
    """Records the failure in the executed copy, so that it never reads as a finished run."""
    try:
        nb = nbformat.read(executed, as_version=4)
        cell = nb.cells[index]
    except (OSError, ValueError, IndexError):
        return
    if not any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
        cell.setdefault("outputs", []).append(nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[]))
    cell.metadata.setdefault("papermill", {}).update(exception=True, status="failed")
    nb.metadata.setdefault("papermill", {})["exception"] = True
    nbformat.write(nb, executed)


def advanced_knobs(source: Path) -> set:
    """The knobs of a notebook's folded `advanced-parameters` cell (OUT_DIR among them)."""
    from .parameters import ADVANCED

    cells = [c for c in nbformat.read(source, as_version=4).cells if ADVANCED in c.metadata.get("tags", [])]
    return {m for c in cells for m in re.findall(r"^([A-Z_][A-Z0-9_]*)\s*=", c.source, re.M)}


def run_notebook(notebook: str, out_dir: Path, parameters: dict, smoke: bool, resume_hint: str = "") -> Path:
    """Executes `notebook` (a name under notebooks/ or a path to an .ipynb) into
    `out_dir/<name>.ipynb` with `parameters` (plus OUT_DIR) and MTML_SMOKE set for its kernel.
    Returns the executed copy; raises NotebookRunError when a cell fails, runs past its limit,
    or the kernel dies (cells numbered from 1 as in the executed copy, in which papermill's cell of
    injected parameters follows the `parameters` cell)."""
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    source = Path(notebook) if str(notebook).endswith(".ipynb") else NOTEBOOKS / f"{notebook}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"no notebook {source}")
    name, limit = source.stem, cell_limit(source.stem, smoke)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{name}.ipynb"
    current = {}  # the cell being executed: its index in the executed copy, its source, its start

    def cell_started(cell, cell_index, **_):
        current.update(index=cell_index, source=cell.source, start=time.monotonic())

    def cell_finished(cell, **_):
        # nbclient's wait for a reply ends at the limit even when the reply was there all along
        # (the timer re-polls the socket); a cell that needed its whole limit counts as stuck
        if time.monotonic() - current["start"] >= limit:
            raise CellTimeoutError(f"the cell's reply came only after the {limit} s limit")

    # papermill cannot infer a type for `SMOKE = ... == "1"`; harmless, so keep it quiet
    logging.getLogger("papermill.translators").setLevel(logging.ERROR)
    try:
        with _quiet_about(advanced_knobs(source)), _smoke_env(smoke):
            papermill.execute_notebook(str(source), str(executed), parameters={**parameters, "OUT_DIR": str(out_dir)},
                                       cwd=str(source.parent), progress_bar=False, kernel_name="python3",
                                       engine_name=_engine(), execution_timeout=limit, start_timeout=120,
                                       iopub_timeout=30, on_cell_start=cell_started, on_cell_executed=cell_finished)
    except (CellTimeoutError, DeadKernelError, PapermillExecutionError, RuntimeError) as err:
        if isinstance(err, PapermillExecutionError):
            current.update(index=err.cell_index, source=err.source)
        what, ename = _what_failed(err, limit)
        if "index" in current:
            where = f"cell {current['index'] + 1} (`{_first_line(current['source'])}`)"
            _mark_failed(executed, current["index"], ename, what)
        else:
            where = "before its first cell (kernel start)"
        message = f"{name}: {where} {what}. Executed copy: {executed}."
        if resume_hint:
            message += f" Resume with: {resume_hint}"
        raise NotebookRunError(message, name, executed, current.get("index")) from err
    return executed


class _KnownKnobs(logging.Filter):
    """Drops papermill's "Passed unknown parameter: X" for the knobs in `known`: papermill reads
    names from the `parameters` cell only, so it calls an advanced knob (in the folded cell above
    it) unknown, and uses the injected value all the same."""

    def __init__(self, known: set):
        super().__init__()
        self.known = known

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Passed unknown parameter: ")
                    and message.removeprefix("Passed unknown parameter: ") in self.known)


@contextlib.contextmanager
def _quiet_about(knobs: set):
    quiet = _KnownKnobs(knobs)
    logger = logging.getLogger("papermill")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@contextlib.contextmanager
def _smoke_env(smoke: bool):
    """MTML_SMOKE set for the kernel (it inherits the environment), restored afterwards."""
    previous = os.environ.get("MTML_SMOKE")
    os.environ["MTML_SMOKE"] = "1" if smoke else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MTML_SMOKE", None)
        else:
            os.environ["MTML_SMOKE"] = previous


def _what_failed(err: Exception, limit: float) -> tuple[str, str]:
    """(what happened, in words; a short error name) for a failed execution."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        return f"raised {err.ename}: {str(err.evalue).splitlines()[0] if err.evalue else ''}", err.ename
    if isinstance(err, CellTimeoutError) and "IOPub" not in str(err):
        return f"did not finish within {limit} s (the per-cell limit; {TIMEOUT_ENV}=seconds overrides it)", "CellTimeout"
    if isinstance(err, DeadKernelError):
        return "stopped: the kernel died while it ran", "DeadKernel"
    return f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", type(err).__name__


def ran_clean(executed: Path) -> bool:
    """Whether an executed copy ran every code cell to the end without an error."""
    try:
        nb = nbformat.read(executed, as_version=4)
    except (OSError, ValueError):
        return False
    if (nb.metadata.get("papermill") or {}).get("exception"):
        return False
    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        if cell.execution_count is None or any(o.get("output_type") == "error" for o in cell.outputs):
            return False
    return True
