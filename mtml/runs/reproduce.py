"""Parameterised reproduction: run the notebooks over a grid with papermill, collect the results.

    python -m mtml.runs.reproduce --task classification --modes kd ml kd_ml --versions tiny --seeds 0 1 2
    python -m mtml.runs.reproduce --grid grid.yaml          # the same keys in YAML (lists or scalars)

A grid is planned as a study of each version (`mtml.runs.study.Study.planned`, over the task's
notebooks' defaults): every run gets its spec (`mtml.spec`: every setting that changes what it
computes, and a fingerprint of its data) before anything runs; it executes the mode's notebook into
`runs/<task>/<version>/<mode>-seed<k>-<spec hash>/`. A run whose metrics.json carries that hash
is skipped; an unfinished one resumes from its checkpoint; a changed parameter is a new run in its
own folder. The runs of one version share the run store beside them (`runs/<task>/<version>/store/`:
checkpoints, teacher tapes), so of kd and kd_ml of one seed, the later replays the teacher the
earlier recorded, if it recorded one in the same folder before the later began (`mtml.teacher_tape`;
the same results, less time); `--shard` and `--jobs` keep the two in one part, one after the other.
Runs finished in the layout before 2026-11-28 (`<version>/<mode>/seed<k>/<spec hash>/`) are still
found and skipped; unfinished ones start again.
The tables hold exactly the runs of the grid given (never stray records):
`runs/<task>_results.csv` (one row per run, with its spec hash and settings), `<task>_paired.csv`
(paired differences with seed and bootstrap intervals, Holm-adjusted p-values) and the figure
`runs/<task>_comparison.png`. A failed run does not stop the others; they are listed at the end
and the exit status is 1.

Many devices and machines (the grid's runs are independent):

    python -m mtml.runs.reproduce --grid grid.yaml --jobs 4         # 4 runs at once, one GPU each
    python -m mtml.runs.reproduce --grid grid.yaml --shard 2/8 --runs-dir runs/shard2   # part 2 of 8
    python -m mtml.runs.reproduce --grid grid.yaml --report --runs-dir runs --collect-from runs/shard*

`--jobs N` starts N worker processes on this machine, each pinned to one GPU
(`CUDA_VISIBLE_DEVICES`) or, on CPU, to its share of the cores (`OMP_NUM_THREADS`). `--shard K/M`
runs the K-th of M disjoint parts of the grid (the runs of one teacher in one part), for a
scheduler's job array (`docs/slurm_grid.sbatch`); `--report` then collects the
union of the shards' folders.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..cli import Parser
from ..io import save_figure, write_csv
from ..tasks import task_class, task_names
from .parameters import notebook_defaults, parse_parameters, spec_from_parameters
from .spec import RunSpec
from ..core.cohort import USES_TEACHER

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
# which notebook trains which mode, per task (each task class's `notebooks`)
RUNNERS = {name: task_class(name).notebooks for name in task_names() if hasattr(task_class(name), "notebooks")}
ONLINE_TEACHER = tuple(m for m in USES_TEACHER if m != "offline")  # the modes that record or replay a tape


@dataclass(frozen=True)
class PlannedRun:
    """One run of a grid: its notebook, every parameter it gets, and its spec."""
    notebook: str
    parameters: dict
    spec: RunSpec

    @property
    def cell(self) -> tuple:
        c = self.spec.config
        return c["version"], c["mode"], c["seed"]

    def out_dir(self, runs_dir: Path) -> Path:
        version, mode, seed = self.cell  # one folder per version: its runs share the store beside them
        return Path(runs_dir) / self.spec.task / version / f"{mode}-seed{seed}-{self.spec.hash}"

    def finished_dir(self, *roots) -> Path | None:
        """The folder under one of `roots` where this run finished (metrics.json with its hash), in
        this layout or the one before 2026-11-28 (<version>/<mode>/seed<k>/<hash>, still read)."""
        version, mode, seed = self.cell
        for root in roots:
            old = Path(root) / self.spec.task / version / mode / f"seed{seed}" / self.spec.hash
            for folder in (self.out_dir(root), old):
                if (_record(folder) or {}).get("spec_hash") == self.spec.hash:
                    return folder
        return None


def _unique(values) -> list:
    return list(dict.fromkeys(values))  # --seeds 0 1 0 is one grid of 2


def task_defaults(task: str) -> dict:
    """The parameters of the task's notebooks with their defaults. A mode's notebook gets only the
    knobs it declares; the others are at their defaults, which its run identity does not read
    (W_FEAT, TEACHER_KNOWLEDGE, ... in the kd notebook), so a grid refuses them in `params`."""
    defaults: dict = {}
    for notebook in dict.fromkeys(RUNNERS[task].values()):
        defaults.update(notebook_defaults(NOTEBOOKS / f"{notebook}.ipynb"))
    return {k: v for k, v in defaults.items() if k not in RUNNER_SET}


RUNNER_SET = {"MODE", "SMOKE", "OUT_DIR"}  # the runner sets the mode and the folder, --smoke the caps


def plan(task: str, modes, versions, seeds, params: dict | None = None, smoke: bool = False) -> list[PlannedRun]:
    """The grid's runs, planned as the study of each version (`Study.planned`: the notebooks'
    defaults, then `params`, then mode/version/seed, then the smoke caps), and their specs."""
    from .study import Study

    if task not in RUNNERS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(RUNNERS)}")
    unknown_modes = [m for m in modes if m not in RUNNERS[task]]
    if unknown_modes:
        raise ValueError(f"unknown mode {unknown_modes[0]!r}; choose one of {sorted(RUNNERS[task])}")
    defaults, params = task_defaults(task), dict(params or {})
    knobs = {nb: set(notebook_defaults(NOTEBOOKS / f"{nb}.ipynb")) - RUNNER_SET  # each grid notebook's, read once
             for nb in dict.fromkeys(RUNNERS[task][m] for m in modes)}
    for notebook, known in knobs.items():  # a knob every notebook of the grid reads
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for {notebook}; known: {sorted(known)}")
    if params.get("BASELINE") not in (None, False):
        raise ValueError("BASELINE: a grid has its own independent runs (add the mode 'independent'); "
                         "leave BASELINE out of the grid's parameters")
    grid_only = {"BASELINE": False} if "BASELINE" in defaults else {}  # the grid has its own independent runs
    base = {**defaults, **grid_only, **params, "RESUME": True}
    runs = []
    for version in _unique(versions):
        study = Study(name=f"{task}-{version}", task=task, data="notebook", version=version,
                      modes=tuple(_unique(modes)), seeds=tuple(_unique(int(s) for s in seeds)), params=base)
        for resolved in study.planned(smoke, smoke_seeds=None):  # a smoke grid keeps every seed
            notebook = RUNNERS[task][resolved["MODE"]]
            own = {k: v for k, v in resolved.items() if k in knobs[notebook] or k == "MODE"}  # papermill gets these
            runs.append(PlannedRun(notebook, own, spec_from_parameters(task, resolved)))
    return runs


def _record(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def execute(notebook: str, out_dir: Path, parameters: dict, smoke: bool, resume_hint: str = "") -> Path:
    """Executes one notebook headlessly into `out_dir` (`mtml.execution.run_notebook`: a per-cell
    time limit, dead-kernel detection); raises NotebookRunError naming the cell that stopped it."""
    from .execution import run_notebook

    return run_notebook(notebook, out_dir, parameters, smoke, resume_hint=resume_hint)


def run_grid(runs: list[PlannedRun], runs_dir: Path, smoke: bool = False,
             resume_command: str = "") -> list[tuple[PlannedRun, str]]:
    """Executes the runs not finished yet; returns the failed ones with their messages. A stuck
    cell's message ends with `resume_command` (the command that retries, skipping finished runs)."""
    failed = []
    for run in runs:
        out_dir = run.out_dir(runs_dir)
        finished = run.finished_dir(runs_dir)
        if finished is not None:
            print(f"skip (finished): {finished}")
            try:
                _add_external_sets(run, finished, _record(finished))
            except Exception as err:  # one failed run never stops the grid
                failed.append((run, f"external sets of {finished}: {err}"))
                print(f"FAILED external sets: {finished}\n  {err}", file=sys.stderr)
            continue
        start = time.perf_counter()
        try:
            execute(run.notebook, out_dir, run.parameters, smoke, resume_hint=resume_command)
            written = (_record(out_dir) or {}).get("spec_hash")
            if written != run.spec.hash:
                raise RuntimeError(f"{run.notebook} wrote spec {written}, the runner expected "
                                   f"{run.spec.hash}: notebook and runner disagree on its parameters")
        except Exception as err:  # one failed run never stops the grid
            failed.append((run, f"{type(err).__name__}: {err}"))
            print(f"FAILED after {time.perf_counter() - start:.0f} s: {out_dir}\n  {err}", file=sys.stderr)
            continue
        print(f"done in {time.perf_counter() - start:.0f} s: {out_dir}")
    return failed


def collect(runs: list[PlannedRun], runs_dir: Path, also=()) -> tuple[pd.DataFrame, dict]:
    """The records of exactly these runs (finished ones, found in `runs_dir` or in the folders
    `also`, e.g. the shards'), one row each with its folder, and their test units
    {(version, mode, seed): DataFrame} for bootstrap intervals."""
    from .experiment import UNITS_FILE
    from .report import check_one_run_per_cell

    records, units = [], {}
    for run in runs:
        out_dir = run.finished_dir(runs_dir, *also)  # one spec hash is one run, wherever it finished
        if out_dir is None:
            continue
        record = _record(out_dir)
        records.append({**record, "path": str(out_dir)})
        if (out_dir / UNITS_FILE).is_file():
            units[run.cell] = pd.read_csv(out_dir / UNITS_FILE)
    table = pd.DataFrame(records)
    if len(table):
        check_one_run_per_cell(table)
    return table, units


def _add_external_sets(run: PlannedRun, out_dir: Path, record: dict) -> None:
    """A finished run asked for external sets it was not tested on, or whose content changed
    since: test it on them from its final checkpoint (no training)."""
    import torch

    from .external import SEPARATOR, evaluate_run, set_fingerprint, set_name

    size = run.parameters.get("FRAME_SIZE", 160)
    stale = [f for f in run.parameters.get("EXTERNAL_DATA_DIRS") or []
             if record.get(f"{set_name(f)}{SEPARATOR}manifest_sha256") != set_fingerprint(run.spec.task, f, size)]
    if stale:
        evaluate_run(out_dir, stale, "cuda" if torch.cuda.is_available() else "cpu")
        print(f"  tested on external sets {[set_name(f) for f in stale]} from its checkpoint")


def report(runs: list[PlannedRun], runs_dir: Path, task: str, also=()) -> tuple[Path, Path | None]:
    """Writes the grid's tables and figure into `runs_dir` (from the runs finished there or in
    the folders `also`); prints the paper-shaped and the paired tables."""
    import matplotlib.pyplot as plt

    from .external import set_name
    from .figures import comparison_figure
    from .report import paired_differences, paper_table, sets_in, summarise_sets

    table, units = collect(runs, runs_dir, also)
    csv = write_csv(runs_dir / f"{task}_results.csv", table, index=False)
    figure = None
    for stale in (runs_dir / f"{task}_paired.csv", runs_dir / f"{task}_comparison.png"):
        stale.unlink(missing_ok=True)  # an earlier grid's outputs never pass for this one's
    if len(table):
        metric = task_class(task).metric
        fig = comparison_figure(table, metric, f"{task}: {metric} per mode (our runs; mean, 95% CI over seeds)")
        figure = save_figure(fig, runs_dir / f"{task}_comparison.png", dpi=120)
        plt.close(fig)  # written: one process may report many grids
        print(paper_table(table, metric).to_string())
        paired = paired_differences(table, metric, units=units or None)
        write_csv(runs_dir / f"{task}_paired.csv", paired, index=False)
        print("\npaired differences of the student ensemble (ci95: t over seeds, half-width; "
              "boot_lo/hi: bootstrap over test units; p_holm: Holm-adjusted over the pairs):")
        print(paired.round(4).to_string(index=False))
    external = runs_dir / f"{task}_external.csv"
    external.unlink(missing_ok=True)
    wanted = {set_name(f) for run in runs for f in run.parameters.get("EXTERNAL_DATA_DIRS") or []}
    if len(table) and wanted & set(sets_in(table.columns)):
        per_set = summarise_sets(table, task_class(task).metric, sets=wanted)
        write_csv(external, per_set, index=False)
        print(f"\nper evaluation set ({task_class(task).metric}; mean and 95% t-interval over seeds; {external}):")
        print(per_set.round(4).to_string(index=False))
    return csv, figure


def parse_part(text: str, what: str) -> tuple[int, int]:
    """'K/M' -> (K, M), 1 <= K <= M."""
    try:
        k, m = (int(x) for x in str(text).split("/"))
    except ValueError:
        k = m = 0
    if not 1 <= k <= m:
        raise ValueError(f"{what} takes K/M with 1 <= K <= M (e.g. 2/8), got {text!r}")
    return k, m


def _teacher_group(run: PlannedRun, index: int) -> tuple:
    """The runs that train one online teacher (kd, kd_ml, ... of one task, version and seed) share a key."""
    version, mode, seed = run.cell
    return ("teacher", run.spec.task, version, seed) if mode in ONLINE_TEACHER else ("run", index)


def shard(runs: list, k: int, m: int) -> list:
    """The K-th of M disjoint parts of `runs`; the parts cover the grid. The runs of one online
    teacher stay together, in grid order, so the later replays the tape of the earlier; each such
    group goes to the part with the fewest runs so far (the first of those on a tie)."""
    groups: dict = {}
    for i, run in enumerate(runs):
        groups.setdefault(_teacher_group(run, i), []).append(run)
    parts = [[] for _ in range(m)]
    for group in groups.values():
        min(parts, key=len).extend(group)
    return parts[k - 1]


def _without_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `name VALUE` or `name=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(f"{name}="):
            out.append(a)
    return out


RESUME_ENV = "MTML_RESUME_COMMAND"


def _run_jobs(argv: list[str], jobs: int, resume: str) -> int:
    """Runs the grid as `jobs` worker processes (`--job j/N`), each pinned to one GPU (one of
    those this process may use: CUDA_VISIBLE_DEVICES is respected) or to its share of the CPU
    cores; returns the number of workers that failed."""
    import torch

    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    gpus = visible or [str(i) for i in range(torch.cuda.device_count())]
    threads = max(1, len(os.sched_getaffinity(0)) // jobs)  # the cores this process may use (taskset)
    procs = []
    for j in range(1, jobs + 1):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), RESUME_ENV: resume}
        if gpus and torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = gpus[(j - 1) % len(gpus)]
        pinned = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env and torch.cuda.is_available() \
            else f"{threads} CPU thread(s)"
        print(f"job {j}/{jobs}: {pinned}", flush=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "mtml.runs.reproduce", *argv, "--job", f"{j}/{jobs}"], env=env))
    return sum(proc.wait() != 0 for proc in procs)


def _load_grid(path) -> dict:
    import yaml

    grid = yaml.safe_load(Path(path).read_text()) or {}
    return {k: v if isinstance(v, list) else [v] for k, v in grid.items()}


def _parser() -> Parser:
    p = Parser(prog="python -m mtml.runs.reproduce", description=__doc__,
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
    p.add_argument("--jobs", type=int, default=1, help="runs at once on this machine, one GPU (or CPU share) each")
    p.add_argument("--shard", default=None, metavar="K/M", help="run only the K-th of M disjoint parts of the grid")
    p.add_argument("--report", action="store_true", help="run nothing: collect and report the finished runs")
    p.add_argument("--collect-from", nargs="+", default=[], metavar="DIR",
                   help="other runs folders (e.g. the shards') whose finished runs join the report")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    runs_dir = Path(args.runs_dir)
    smoke = args.smoke or os.environ.get("MTML_SMOKE") == "1"
    extra = parse_parameters(args.param)  # a bad --param: one line, exit 2 (mtml.cli)
    part = parse_part(args.shard, "--shard") if args.shard else (1, 1)
    job = parse_part(args.job, "--job") if args.job else None
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    grid = _load_grid(args.grid) if args.grid else {}
    argv = sys.argv[1:] if argv is None else list(argv)
    # a worker's stuck-cell message names the command the user typed, not the worker's own
    resume = os.environ.get(RESUME_ENV) or " ".join(["python -m mtml.runs.reproduce", *map(shlex.quote, argv)])
    failed, workers_failed = [], 0
    grids = {task: plan(task, grid.get("modes", args.modes), grid.get("versions", args.versions),
                        grid.get("seeds", args.seeds), {**grid.get("params", [{}])[0], **extra}, smoke)
             for task in grid.get("task", [args.task])}  # planned once, before any worker starts (data too)
    if args.jobs > 1 and not args.report and job is None:
        workers_failed = _run_jobs(_without_option(argv, "--jobs"), args.jobs, resume)
    for task, runs in grids.items():
        mine = shard(runs, *part)
        if job is not None:
            mine = shard(mine, *job)
        if not args.report and (args.jobs == 1 or job is not None):
            failed += run_grid(mine, runs_dir, smoke, resume_command=resume)
        if job is not None:
            continue  # the parent process reports
        if part != (1, 1) and not args.report:
            print(f"shard {part[0]}/{part[1]}: {len(mine)} of {len(runs)} runs in {runs_dir}; collect every "
                  f"shard with: python -m mtml.runs.reproduce ... --report --collect-from <the shards' runs folders>")
            continue
        csv, figure = report(runs, runs_dir, task, [Path(d) for d in args.collect_from])
        print(f"results: {csv}\nfigure: {figure}")
    return _exit_status(failed, workers_failed, args.jobs, runs_dir)


def _exit_status(failed: list, workers_failed: int, jobs: int, runs_dir: Path) -> int:
    """0, or 1 after listing what failed and how to retry it."""
    if workers_failed:
        print(f"\n{workers_failed} of {jobs} job(s) had failed runs (listed above); run the same command "
              "again to retry them", file=sys.stderr)
        return 1
    if failed:
        print(f"\n{len(failed)} run(s) failed (the tables leave them out); run the same command "
              "again to retry them, finished runs are skipped:", file=sys.stderr)
        for run, message in failed:
            print(f"  {run.out_dir(runs_dir)}: {message.splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from ..cli import run_main

    sys.exit(run_main(main, prog="python -m mtml.runs.reproduce"))
