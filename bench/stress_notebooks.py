"""Executes every notebook that builds a widget N times headlessly and counts hangs (issue 12).

    .venv/bin/python bench/stress_notebooks.py --repeat 50                 # smoke mode (MTML_SMOKE=1)
    .venv/bin/python bench/stress_notebooks.py --repeat 6 --full --notebooks 00_setup_and_data_tour
    .venv/bin/python bench/stress_notebooks.py --repeat 6 --without-fix    # shows the hang
    .venv/bin/python bench/stress_notebooks.py --repeat 50 --param EPOCHS=1 --param TILE_SIZE=16  # shorter fits

Each execution goes through `mtml.execution.run_notebook` into a fresh folder (nothing resumes).
A hang is an execution stopped by the per-cell limit (--cell-timeout, else the notebook's own
limit); a failure is any other error. The widget cells are the same in smoke and default runs;
smoke mode only shrinks the training around them. Writes bench/results/stress_notebooks.csv.
"""
from __future__ import annotations

import argparse
import ast
import csv
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nbclient.exceptions import CellTimeoutError

from mtml import execution
from mtml.parameters import parse_parameters

RESULTS = Path(__file__).resolve().parent / "results"
WIDGETS_MODULE = Path(execution.__file__).with_name("widgets.py")


def widget_builders() -> set[str]:
    """Names of the functions in mtml/widgets.py that build ipywidgets."""
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
    """The `parameters` that the notebook's parameters cell defines (00 takes no training ones)."""
    import nbformat

    nb = nbformat.read(execution.NOTEBOOKS / f"{notebook}.ipynb", as_version=4)
    cell = next((c.source for c in nb.cells if "parameters" in c.metadata.get("tags", [])), "")
    return {k: v for k, v in parameters.items() if re.search(rf"^{k}\s*=", cell, re.M)}


def stress(notebook: str, repeat: int, smoke: bool, parameters: dict) -> dict:
    limit = execution.cell_limit(notebook, smoke)
    times, hangs, failures = [], 0, 0
    for i in range(repeat):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="mtml-stress-") as tmp:
            try:
                execution.run_notebook(notebook, Path(tmp) / notebook, parameters, smoke)  # store: tmp/store
                times.append(time.perf_counter() - start)
                outcome = "ok"
            except execution.NotebookRunError as err:
                hang = isinstance(err.__cause__, CellTimeoutError)
                hangs, failures = hangs + hang, failures + (not hang)
                outcome = f"{'HANG' if hang else 'FAILED'}: {err}"
        print(f"{notebook} {i + 1}/{repeat}: {time.perf_counter() - start:.1f} s {outcome}", flush=True)
    mode = ("smoke" if smoke else "default") + "".join(f" {k}={v}" for k, v in parameters.items())
    return dict(notebook=notebook, mode=mode, cell_limit_s=limit, runs=repeat,
                hangs=hangs, failures=failures, median_s=round(statistics.median(times), 1) if times else None,
                max_s=round(max(times), 1) if times else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=10, help="executions per notebook (default 10)")
    p.add_argument("--notebooks", nargs="+", help="notebook names (default: every notebook that builds a widget)")
    p.add_argument("--full", action="store_true", help="default runs instead of smoke runs")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="notebook parameter (YAML value), given to the notebooks that define it")
    p.add_argument("--cell-timeout", type=int, help=f"per-cell limit in seconds (sets {execution.TIMEOUT_ENV})")
    p.add_argument("--without-fix", action="store_true", help="nbclient's own Output widget (the hang of issue 12)")
    p.add_argument("--out", default=str(RESULTS / "stress_notebooks.csv"))
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    try:
        params = parse_parameters(args.param)
    except ValueError as err:
        p.error(str(err))
    if args.cell_timeout:
        os.environ[execution.TIMEOUT_ENV] = str(args.cell_timeout)
    execution.FIX_OUTPUT_WIDGET = not args.without_fix
    notebooks = args.notebooks or widget_notebooks()
    print(f"stress: {notebooks} x {args.repeat}, {'default' if args.full else 'smoke'} runs, "
          f"widget fix {'off' if args.without_fix else 'on'}", flush=True)
    rows = [stress(name, args.repeat, not args.full, accepted(name, params)) for name in notebooks]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ["widget_fix"])
        writer.writeheader()
        writer.writerows({**r, "widget_fix": not args.without_fix} for r in rows)
    print(f"\n{'notebook':32} {'mode':28} {'runs':>5} {'hangs':>6} {'failures':>9} {'median s':>9} {'max s':>7}")
    for r in rows:
        print(f"{r['notebook']:32} {r['mode']:28} {r['runs']:5} {r['hangs']:6} {r['failures']:9} "
              f"{r['median_s'] if r['median_s'] is not None else '-':>9} {r['max_s'] if r['max_s'] is not None else '-':>7}")
    print(f"written: {out}")
    return 1 if any(r["hangs"] or r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
