"""Executes every notebook that builds a widget N times headlessly, under one runner, and counts hangs.

    .venv/bin/python bench/stress_notebooks.py --runner papermill --repeat 50   # smoke mode (MTML_SMOKE=1)
    .venv/bin/python bench/stress_notebooks.py --runner nbconvert --repeat 20
    .venv/bin/python bench/stress_notebooks.py --runner nbclient --repeat 20
    .venv/bin/python bench/stress_notebooks.py --runner mtml --repeat 6 --full --notebooks 00_setup_and_data_tour
    .venv/bin/python bench/stress_notebooks.py --repeat 50 --param EPOCHS=1 --param TILE_SIZE=16  # shorter fits

Runners: `papermill` (its command line, as a user types it: `papermill in.ipynb out.ipynb -y ...
--cwd notebooks`), `nbconvert` (`jupyter nbconvert --to notebook --execute`), `nbclient`
(`nbclient.NotebookClient(nb).execute()`), each with its own defaults (no cell limit), and `mtml`
(the kit's runner, `mtml.execution.run_notebook`, with its per-cell limits). nbconvert and nbclient
take no parameters, so they execute a copy that papermill's `parameterize_notebook` wrote (OUT_DIR
and --param injected, nothing executed). Every execution writes into a fresh temporary folder
(nothing resumes). A hang is an execution still running at --timeout (default: the notebook's
per-cell limit in mtml.execution, which is 4x its whole budget), killed with its kernel; a failure
is any other error. Rows go into bench/results/stress_notebooks.csv, one per runner, notebook and
mode (a later run replaces its own rows, keeps the others).
"""
from __future__ import annotations

import argparse
import ast
import csv
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mtml import execution
from mtml.runs.parameters import parse_parameters

RESULTS = Path(__file__).resolve().parent / "results"
WIDGETS_MODULE = Path(execution.__file__).parents[1] / "teach" / "widgets.py"
RUNNERS = ("papermill", "nbconvert", "nbclient", "mtml")
BIN = Path(sys.executable).parent
NBCLIENT = """import sys, nbformat, nbclient
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(nb, sys.argv[3])"""


def widget_builders() -> set[str]:
    """Names of the functions in mtml/teach/widgets.py that build ipywidgets."""
    tree = ast.parse(WIDGETS_MODULE.read_text())
    return {f.name for f in tree.body if isinstance(f, ast.FunctionDef) and "ipywidgets" in ast.unparse(f)}


def widget_notebooks() -> list[str]:
    """Notebooks whose code imports ipywidgets or calls a widget builder of mtml.widgets."""
    import nbformat

    pattern = re.compile(r"\bipywidgets\b|\b(" + "|".join(sorted(widget_builders())) + r")\s*\(")
    found = []
    for path in sorted(execution.NOTEBOOKS.glob("*.ipynb")):
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        if pattern.search(code):
            found.append(path.stem)
    return found


def accepted(notebook: str, parameters: dict) -> dict:
    """The `parameters` that the notebook's knob cells define (00 takes no training ones)."""
    import nbformat

    from mtml.runs.parameters import parameter_cells

    nb = nbformat.read(execution.NOTEBOOKS / f"{notebook}.ipynb", as_version=4)
    cell = "\n".join(c.source for c in parameter_cells(nb))
    return {k: v for k, v in parameters.items() if re.search(rf"^{k}\s*=", cell, re.M)}


def _command(runner: str, source: Path, tmp: Path, parameters: dict) -> list[str]:
    """The command line that executes `source` under `runner` into tmp/executed.ipynb."""
    import nbformat
    import yaml

    executed = tmp / "executed.ipynb"
    if runner == "papermill":
        return [str(BIN / "papermill"), str(source), str(executed), "-y", yaml.safe_dump(parameters),
                "--cwd", str(source.parent), "-k", "python3", "--no-progress-bar"]
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    copy = tmp / source.name
    nbformat.write(parameterize_notebook(load_notebook_node(str(source)), parameters), copy)
    if runner == "nbconvert":
        return [str(BIN / "jupyter"), "nbconvert", "--to", "notebook", "--execute", str(copy),
                "--output", executed.stem, "--output-dir", str(tmp)]
    return [sys.executable, "-c", NBCLIENT, str(copy), str(source.parent), str(executed)]


def execute_once(runner: str, notebook: str, parameters: dict, smoke: bool, timeout: float) -> str:
    """Executes `notebook` once under `runner` into a fresh temporary folder: 'ok', 'hang' (still
    running at `timeout` seconds, then killed with its kernel) or 'failed: <last line>'."""
    with tempfile.TemporaryDirectory(prefix="mtml-stress-") as tmp:
        tmp = Path(tmp)
        parameters = {**parameters, "OUT_DIR": str(tmp / "out" / notebook)}  # the run store: tmp/out/store
        if runner == "mtml":
            try:
                execution.run_notebook(notebook, tmp / "out" / notebook, parameters, smoke)
                return "ok"
            except execution.NotebookRunError as err:
                from nbclient.exceptions import CellTimeoutError

                return "hang" if isinstance(err.__cause__, CellTimeoutError) else f"failed: {err}"
        env = {**os.environ, "MTML_SMOKE": "1" if smoke else "0"}
        cmd = _command(runner, execution.NOTEBOOKS / f"{notebook}.ipynb", tmp, parameters)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own group: a hang is killed with its kernel
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.communicate(timeout=30)
            return "hang"
        if proc.returncode:
            return "failed: " + (out.strip().splitlines() or ["(no output)"])[-1][:300]
        return "ok"


def _kill_tree(pid: int) -> None:
    """SIGKILL for `pid`'s process group and for every descendant's (a kernel runs in its own session)."""
    import psutil

    try:
        groups = {pid} | {os.getpgid(c.pid) for c in psutil.Process(pid).children(recursive=True)}
    except (psutil.Error, ProcessLookupError):
        groups = {pid}
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stress(runner: str, notebook: str, repeat: int, smoke: bool, parameters: dict, timeout: float | None) -> dict:
    limit = timeout or execution.cell_limit(notebook, smoke)
    times, hangs, failures = [], 0, 0
    for i in range(repeat):
        start = time.perf_counter()
        outcome = execute_once(runner, notebook, parameters, smoke, limit)
        seconds = time.perf_counter() - start
        if outcome == "ok":
            times.append(seconds)
        hangs, failures = hangs + (outcome == "hang"), failures + outcome.startswith("failed")
        print(f"{runner} {notebook} {i + 1}/{repeat}: {seconds:.1f} s {outcome}", flush=True)
    mode = ("smoke" if smoke else "default") + "".join(f" {k}={v}" for k, v in parameters.items())
    return dict(runner=runner, notebook=notebook, mode=mode, limit_s=limit, runs=repeat, hangs=hangs,
                failures=failures, median_s=round(statistics.median(times), 1) if times else None,
                max_s=round(max(times), 1) if times else None)


def write_rows(out: Path, rows: list[dict]) -> None:
    """Writes `rows` into `out`, replacing earlier rows of the same runner, notebook and mode."""
    key = ("runner", "notebook", "mode")
    new = {tuple(r[k] for k in key) for r in rows}
    kept = []
    if out.is_file():
        with out.open(newline="") as f:
            kept = [r for r in csv.DictReader(f) if "runner" in r and tuple(r[k] for k in key) not in new]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(kept + rows, key=lambda r: (RUNNERS.index(r["runner"]), r["notebook"], r["mode"])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runner", choices=RUNNERS, default="papermill", help="what executes the notebooks (default papermill)")
    p.add_argument("--repeat", type=int, default=10, help="executions per notebook (default 10)")
    p.add_argument("--notebooks", nargs="+", help="notebook names (default: every notebook that builds a widget)")
    p.add_argument("--full", action="store_true", help="default runs instead of smoke runs")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="notebook parameter (YAML value), given to the notebooks that define it")
    p.add_argument("--timeout", type=float, help="seconds after which an execution counts as hung "
                   "(default: the notebook's per-cell limit in mtml.execution)")
    p.add_argument("--out", default=str(RESULTS / "stress_notebooks.csv"))
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    try:
        params = parse_parameters(args.param)
    except ValueError as err:
        p.error(str(err))
    notebooks = args.notebooks or widget_notebooks()
    print(f"stress: {notebooks} x {args.repeat} under {args.runner}, {'default' if args.full else 'smoke'} runs",
          flush=True)
    rows = [stress(args.runner, name, args.repeat, not args.full, accepted(name, params), args.timeout)
            for name in notebooks]
    write_rows(Path(args.out), rows)
    print(f"\n{'runner':10} {'notebook':30} {'mode':26} {'runs':>5} {'hangs':>6} {'failures':>9} {'median s':>9} {'max s':>7}")
    for r in rows:
        print(f"{r['runner']:10} {r['notebook']:30} {r['mode']:26} {r['runs']:5} {r['hangs']:6} {r['failures']:9} "
              f"{r['median_s'] if r['median_s'] is not None else '-':>9} {r['max_s'] if r['max_s'] is not None else '-':>7}")
    print(f"written: {args.out}")
    return 1 if any(r["hangs"] or r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
