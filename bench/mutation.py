"""`make mutation`: mutation score of the core modules against their fast tests (mutmut 3).

    python bench/mutation.py [--modules losses stats ...] [--children N] [--keep]

mutmut writes mutated copies of the sources into `mutants/` beside its config, so each module runs in
its own scratch copy of mtml/, tests/ and pyproject.toml in a temporary folder: nothing lands in the
checkout. Each mutant runs only the selected tests that call the mutated function. Prints, and writes to
bench/results/mutation.md, a table per module and every surviving mutant as file:line and the change
("other": no selected test calls the function, suspicious, or a crash). ~4 minutes for `losses`.
"""
import argparse
import ast
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MUTMUT = "3.8.1"  # exact pin: the meta-file layout and mutant names read below are mutmut 3's
# name: (file, its fast tests, functions to mutate (None: all; "Class.method" for methods))
MODULES = {
    "losses": ("mtml/core/losses.py", ["tests/test_losses.py"], None),
    "step": ("mtml/core/step.py", ["tests/test_train.py", "tests/test_losses.py", "tests/test_stacking.py",  # + one pass,
             "tests/test_features.py", "tests/test_reliability.py", "tests/test_dense_distill.py",  # AMP, NaN,
             "tests/test_teacher_tape.py",  # the tape's teacher_step
             "-k", "not sigkill"], None),  # a killed child process finds no mutmut config in its folder
    "terms": ("mtml/core/terms.py", ["tests/test_losses.py", "tests/test_train.py", "tests/test_features.py"], None),
    "spec": ("mtml/runs/spec.py", ["tests/test_spec.py", "tests/test_task_registry.py", "-k",  # two trainings of a minute left out
                                   "not box_loss_change_trains and not same_data_order"], None),
    "stats": ("mtml/runs/stats.py", ["tests/test_stats.py", "tests/test_report.py"], None),
    "detection_eval": ("mtml/tasks/detection_eval.py", ["tests/test_detection.py", "tests/test_stats.py"],
                       ["_coco_iou", "ranked_matches", "Matches.flags", "average_precision", "map50", "detection_metrics"]),
    "detectors": ("mtml/tasks/detectors.py", ["tests/test_detection.py", "tests/test_dense_distill.py", "-k",
                                              "batched or giou or ddp or foreground"],
                  ["padded_targets", "_intersection_union", "giou_loss", "fcos_matches",
                   "GlobalCountFCOSHead.compute_loss", "DenseFCOS.compute_loss"]),
    # the smoke studies in test_study.py take minutes each: -k leaves them out
    "study": ("mtml/runs/study.py", ["tests/test_study.py", "tests/test_task_registry.py", "-k", "not smoke and not regenerates"],
              ["study_runs", "Study.planned", "done_hashes", "adopt"]),
}
COPIED = ("mtml", "tests", "notebooks", "studies", "docs")  # the tests read notebooks, studies and committed results
KILLED, SURVIVED = {1, 3, 24, -24, 36, 152, 255}, {0}  # mutmut/stats.py's exit codes: failing tests or a timeout kill


def function_starts(source: str) -> dict:
    """(class or None, name) -> first line of each function and method (decorators included)."""
    defs, tree = (ast.FunctionDef, ast.AsyncFunctionDef), ast.parse(source).body
    pairs = [(None, f) for f in tree] + [(c.name, f) for c in tree if isinstance(c, ast.ClassDef) for f in c.body]
    return {(c, f.name): min([f.lineno] + [d.lineno for d in f.decorator_list]) for c, f in pairs if isinstance(f, defs)}


def survivor_line(scratch: Path, key: str, path: str) -> tuple[int, str]:
    """(file line, `old` -> `new`) of one mutant. `mutmut show` diffs the mutated function alone,
    so its hunk's line counts from the def: add the def's line in the file."""
    diff = subprocess.run([BIN / "mutmut", "show", key], cwd=scratch, capture_output=True, text=True).stdout
    func = key.rpartition(".")[2].partition("__mutmut_")[0]  # x_name or xǁClassǁname
    cls, name = func.split("ǁ")[1:] if "ǁ" in func else (None, func[2:])
    hunk = re.search(r"^@@ -(\d+).*?\n(.*?)^-(.*?)$.*?^\+(.*?)$", diff, re.M | re.S)  # first hunk: one change
    assert hunk, f"mutmut show {key}: no diff"
    line = function_starts((REPO / path).read_text()).get((cls, name), 1) + int(hunk[1]) - 1 + hunk[2].count("\n")
    return line, f"`{hunk[3].strip()}` -> `{hunk[4].strip()}`"


def run_module(name: str, root: Path, children: int) -> tuple[list, list]:
    (path, tests, functions), scratch = MODULES[name], root / name
    print(f"mutating {path} ...", flush=True)
    for part in COPIED:  # a fresh copy: mutmut skips files it finds already copied
        shutil.copytree(REPO / part, scratch / part, ignore=shutil.ignore_patterns("__pycache__"))
    if (REPO.parent / "shared").is_dir():  # the tests run in scratch/mutants: their ../shared is scratch/shared
        (scratch / "shared").symlink_to(REPO.parent / "shared")
    config = {"source_paths": ["mtml"], "only_mutate": [path], "pytest_add_cli_args_test_selection": tests,
              "process_isolation": "forkserver",  # torch is not fork-safe after pytest has run in the parent
              "use_git_change_detection": False, "also_copy": list(COPIED[2:])}  # into mutants/, where tests run
    with open(scratch / "pyproject.toml", "w") as f:  # the checkout's pytest settings, plus mutmut's
        f.write((REPO / "pyproject.toml").read_text() + "\n[tool.mutmut]\n")
        f.writelines(f"{k} = {json.dumps(v)}\n" for k, v in config.items())
    module = path.removesuffix(".py").replace("/", ".")
    # mutant names: pkg.mod.x_func__mutmut_3, pkg.mod.xǁClassǁmethod__mutmut_3
    globs = [f"{module}.{'xǁ%sǁ' % f.split('.')[0] if '.' in f else 'x_'}{f.split('.')[-1]}__mutmut_*"
             for f in functions or []]
    start, env = time.perf_counter(), {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run([BIN / "mutmut", "run", "--max-children", str(children), *globs],
                         cwd=scratch, env=env, capture_output=True, text=True)
    meta = scratch / "mutants" / (path + ".meta")
    if run.returncode or not meta.exists():
        print(f"{name}: mutmut failed (exit {run.returncode}):\n{(run.stdout + run.stderr)[-3000:]}", file=sys.stderr)
        return [name, "failed", "", "", "", "", f"{time.perf_counter() - start:.0f}"], []
    codes = {k: v for k, v in json.loads(meta.read_text())["exit_code_by_key"].items()
             if not globs or any(fnmatch.fnmatchcase(k, g) for g in globs)}
    killed, survivors = sum(v in KILLED for v in codes.values()), [k for k, v in codes.items() if v in SURVIVED]
    found = sorted(((*survivor_line(scratch, k, path), k.rpartition(".")[2]) for k in survivors),
                   key=lambda f: (f[0], int(f[2].rpartition("_")[2])))  # by line, then mutmut's number
    score = f"{100 * killed / len(codes):.1f}%" if codes else "-"
    return ([name, len(codes), killed, len(survivors), len(codes) - killed - len(survivors), score,
             f"{time.perf_counter() - start:.0f}"], [f"- {path}:{line}: {change} ({key})" for line, change, key in found])


def _kept(table: Path, rerun: set) -> list[tuple[list, list]]:
    """The rows and surviving mutants of `table` (an earlier mutation.md) for the modules not in `rerun`."""
    lines = table.read_text().splitlines() if table.is_file() else []
    kept = []
    for name, (path, _, _) in MODULES.items():
        row = next((line for line in lines if line.startswith(f"| {name} |")), None)
        if name not in rerun and row:
            kept.append(([cell.strip() for cell in row.strip("|").split("|")],
                         [line for line in lines if line.startswith(f"- {path}:")]))
    return kept


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modules", nargs="+", choices=list(MODULES), default=list(MODULES))
    p.add_argument("--children", type=int, default=1, help="mutants tested at once (default 1: shared cores)")
    p.add_argument("--keep", action="store_true", help="keep the scratch copies (to run mutmut show/browse there)")
    args = p.parse_args(argv)
    if MUTMUT not in [d.version for d in metadata.distributions(name="mutmut")]:  # only this bench needs mutmut
        sys.exit(f"bench/mutation.py needs mutmut {MUTMUT}: {sys.executable} -m pip install mutmut=={MUTMUT}")
    root = Path(tempfile.mkdtemp(prefix="mtml-mutation-"))
    try:
        results = [run_module(name, root, args.children) for name in args.modules]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    out = REPO / "bench" / "results" / "mutation.md"
    results = _kept(out, set(args.modules)) + results  # the modules not run this time keep their last result
    results.sort(key=lambda r: list(MODULES).index(r[0][0]))
    text = "\n".join([f"# mutation score (mutmut {MUTMUT})", "", "| module | mutants | killed | survived | other | score"
                      " | seconds |", "|---" * 7 + "|",
                      *("| " + " | ".join(map(str, row)) + " |" for row, _ in results), "", "## surviving mutants", "",
                      *([line for _, lines in results for line in lines] or ["none"]), ""])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\n{text}\nwritten to bench/results/mutation.md" + (f"; scratch copies in {root}" if args.keep else ""))


if __name__ == "__main__":
    main()
