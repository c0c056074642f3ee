"""`make demo`: every notebook once with its defaults, in order, then an offline handout.

    python -m mtml.teach.demo            # into runs/demo
    MTML_SMOKE=1 python -m mtml.teach.demo   # tiny runs, into runs/demo-smoke
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

from ..cli import Parser
from ..runs.reproduce import NOTEBOOKS, REPO, execute


DEMO_ORDER = ("00_setup_and_data_tour", "01_kd_only", "02_ml_only", "03_kd_plus_ml",
              "04_classification_comparison", "05_detection_kd_only", "06_detection_ml_only",
              "07_detection_kd_plus_ml", "08_detection_comparison", "09_learning_styles")


def demo(runs_dir: Path, smoke: bool) -> None:
    """Every notebook once with its defaults, in order, into runs/demo (runs/demo-smoke when smoke).
    A notebook finished by an earlier demo (its executed copy ran clean and wrote metrics.json)
    is skipped; an unfinished one runs again and resumes from its checkpoints. A failed or stuck
    notebook stops the demo with a message naming its cell, and exit status 1."""
    from ..runs.execution import NotebookRunError, cell_limit, ran_clean

    out = runs_dir / ("demo-smoke" if smoke else "demo")
    names = [name for name in DEMO_ORDER if (NOTEBOOKS / f"{name}.ipynb").exists()]
    resume = "make demo" if not smoke else "MTML_SMOKE=1 make demo"
    print(f"demo: {len(names)} notebooks, {'smoke' if smoke else 'default'} runs, into {out}", flush=True)
    for k, name in enumerate(names, 1):
        folder, step = out / name, f"[{k}/{len(names)}] {name}"
        if ran_clean(folder / f"{name}.ipynb") and (folder / "metrics.json").is_file():
            print(f"{step}: finished by an earlier demo, skipped", flush=True)
            continue
        print(f"{step}: started (per-cell limit {cell_limit(name, smoke)} s)", flush=True)
        start = time.perf_counter()
        try:
            execute(name, folder, {}, smoke, resume_hint=resume)
        except NotebookRunError as err:
            _handout(out)  # what ran so far, readable offline
            print(f"{step}: STOPPED after {time.perf_counter() - start:.0f} s\n{err}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        print(f"{step}: done in {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\nexecuted notebooks: {out}/<notebook>/<notebook>.ipynb (open them in JupyterLab)")
    for name, title in (("04_classification_comparison", "classification"), ("08_detection_comparison", "detection")):
        table = out / name / "paper_table.csv"
        if table.is_file():
            print(f"\n{title} comparison ({table}):\n{pd.read_csv(table).to_string(index=False)}")
    for kind, pattern in (("tables", "*/*.csv"), ("figures", "*/*.png")):
        paths = sorted(out.glob(pattern))
        print(f"\n{kind}:" if paths else f"\n{kind}: none written", *paths, sep="\n  ")
    _handout(out)


def _handout(out: Path) -> None:
    """Writes the demo's offline handout (`mtml.handout`); a failure is reported, never raised."""
    from .handout import write_handout

    try:
        print(f"\nhandout (static HTML copies, open offline): {write_handout(out)}", flush=True)
    except Exception as err:  # the notebooks ran; only their HTML copies are missing
        print(f"\nhandout not written ({type(err).__name__}: {err}); retry: python -m mtml.teach.handout {out}",
              file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = Parser(prog="python -m mtml.teach.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default=str(REPO / "runs"))
    p.add_argument("--smoke", action="store_true", help="MTML_SMOKE=1: tiny, fast runs")
    args = p.parse_args(argv)
    demo(Path(args.runs_dir), args.smoke or os.environ.get("MTML_SMOKE") == "1")
    return 0


if __name__ == "__main__":
    from ..cli import run_main

    sys.exit(run_main(main, prog="python -m mtml.teach.demo"))
