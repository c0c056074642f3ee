"""Parameterised reproduction: run the notebooks over a grid with papermill, collect the results.

    python -m mtml.reproduce --task classification --modes kd ml kd_ml --versions tiny --seeds 0 1 2
    python -m mtml.reproduce --grid grid.yaml          # the same keys in YAML (lists or scalars)
    python -m mtml.reproduce --demo                    # every notebook once, as `make demo` does

Each run executes the mode's notebook into `runs/<task>/<version>/<mode>/seed<k>/` with its
`metrics.json`. A run whose metrics.json exists is skipped, and an unfinished run resumes from its
checkpoint, so running the same command again only does what is missing. All records go to
`runs/<task>_results.csv`, the comparison figure to `runs/<task>_comparison.png`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

from .io import save_figure, write_csv

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
# Which notebook trains which mode; modes without their own notebook reuse the KD+ML one,
# whose MODE parameter switches the loss terms.
RUNNERS = {
    "classification": {"kd": "01_kd_only", "ml": "02_ml_only", "kd_ml": "03_kd_plus_ml",
                       "independent": "03_kd_plus_ml", "offline": "01_kd_only"},
    "detection": {"kd": "05_detection_kd_only", "ml": "06_detection_ml_only",
                  "kd_ml": "07_detection_kd_plus_ml", "independent": "07_detection_kd_plus_ml",
                  "offline": "05_detection_kd_only"},
}
METRIC = {"classification": "auroc", "detection": "map50"}


def grid_runs(task: str, modes, versions, seeds):
    if task not in RUNNERS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(RUNNERS)}")
    for version in versions:
        for mode in modes:
            if mode not in RUNNERS[task]:
                raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(RUNNERS[task])}")
            for seed in seeds:
                yield dict(task=task, mode=mode, version=version, seed=int(seed))


def _finished(out_dir: Path) -> bool:
    try:
        return bool(json.loads((out_dir / "metrics.json").read_text()))
    except (OSError, ValueError):
        return False


def execute(notebook: str, out_dir: Path, parameters: dict, smoke: bool) -> Path:
    """Executes one notebook with papermill; the executed copy lands in `out_dir`."""
    import logging

    import papermill

    # papermill cannot infer a type for `SMOKE = ... == "1"`; harmless, so keep it quiet
    logging.getLogger("papermill.translators").setLevel(logging.ERROR)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["MTML_SMOKE"] = "1" if smoke else "0"
    target = out_dir / f"{notebook}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{notebook}.ipynb"), str(target),
                               parameters={**parameters, "OUT_DIR": str(out_dir)},
                               cwd=str(NOTEBOOKS), progress_bar=False, kernel_name="python3")
    return target


def run_grid(runs, runs_dir: Path, smoke: bool = False, extra: dict | None = None) -> list[Path]:
    done = []
    for run in runs:
        out_dir = runs_dir / run["task"] / run["version"] / run["mode"] / f"seed{run['seed']}"
        if _finished(out_dir):
            print(f"skip (finished): {out_dir}")
        else:
            start = time.perf_counter()
            params = {"MODE": run["mode"], "VERSION": run["version"], "SEED": run["seed"],
                      "RESUME": True, **(extra or {})}
            execute(RUNNERS[run["task"]][run["mode"]], out_dir, params, smoke)
            print(f"done in {time.perf_counter() - start:.0f} s: {out_dir}")
        done.append(out_dir)
    return done


def collect(runs_dir: Path, task: str) -> pd.DataFrame:
    """Every run record of `task` found under `runs_dir`, as one table."""
    records = []
    for path in sorted(runs_dir.rglob("metrics.json")):
        record = json.loads(path.read_text())
        if record.get("kind") == "run" and record.get("task") == task:
            records.append({**record, "path": str(path.parent)})
    return pd.DataFrame(records)


def report(runs_dir: Path, task: str) -> tuple[Path, Path | None]:
    from .plots import comparison_figure
    from .report import paper_table

    table = collect(runs_dir, task)
    csv = write_csv(runs_dir / f"{task}_results.csv", table, index=False)
    figure = None
    if len(table):
        metric = METRIC[task]
        fig = comparison_figure(table, metric, f"{task}: {metric} per mode (our runs)")
        figure = save_figure(fig, runs_dir / f"{task}_comparison.png", dpi=120)
        print(paper_table(table, metric).to_string())
    return csv, figure


DEMO_ORDER = ("00_setup_and_data_tour", "01_kd_only", "02_ml_only", "03_kd_plus_ml",
              "04_classification_comparison", "05_detection_kd_only", "06_detection_ml_only",
              "07_detection_kd_plus_ml", "08_detection_comparison")


def demo(runs_dir: Path, smoke: bool) -> None:
    """Every notebook once with its defaults, in order."""
    out = runs_dir / "demo"
    for name in DEMO_ORDER:
        if not (NOTEBOOKS / f"{name}.ipynb").exists():
            continue
        start = time.perf_counter()
        target = execute(name, out / name, {}, smoke)
        print(f"{name}: {time.perf_counter() - start:.0f} s -> {target}")
    for task in RUNNERS:
        csv, figure = report(out, task)
        print(f"{task}: results {csv}, figure {figure}")
    print(f"\nexecuted notebooks: {out}/*/*.ipynb")
    for name in ("04_classification_comparison", "08_detection_comparison"):
        for f in sorted((out / name).glob("*.csv")) + sorted((out / name).glob("*.png")):
            print(f"comparison output: {f}")


def _load_grid(path) -> dict:
    import yaml

    grid = yaml.safe_load(Path(path).read_text()) or {}
    return {k: v if isinstance(v, list) else [v] for k, v in grid.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mtml.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", help="YAML file with keys task, modes, versions, seeds, params")
    p.add_argument("--task", default="classification", choices=sorted(RUNNERS))
    p.add_argument("--modes", nargs="+", default=["independent", "kd", "ml", "kd_ml"])
    p.add_argument("--versions", nargs="+", default=["tiny"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra notebook parameter (YAML value), e.g. --param EPOCHS=20")
    p.add_argument("--runs-dir", default=str(REPO / "runs"))
    p.add_argument("--smoke", action="store_true", help="MTML_SMOKE=1: tiny, fast runs")
    p.add_argument("--demo", action="store_true", help="run every notebook once (make demo)")
    args = p.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    smoke = args.smoke or os.environ.get("MTML_SMOKE") == "1"
    if args.demo:
        demo(runs_dir, smoke)
        return 0
    import yaml

    extra = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key.isupper():
            p.error(f"--param expects KEY=VALUE with an UPPER_CASE key, got {item!r}")
        extra[key] = yaml.safe_load(value)
    grid = _load_grid(args.grid) if args.grid else {}
    tasks = grid.get("task", [args.task])
    for task in tasks:
        runs = list(grid_runs(task, grid.get("modes", args.modes),
                              grid.get("versions", args.versions), grid.get("seeds", args.seeds)))
        run_grid(runs, runs_dir, smoke, {**grid.get("params", [{}])[0], **extra})
        csv, figure = report(runs_dir, task)
        print(f"results: {csv}\nfigure: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
