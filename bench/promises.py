"""`make promises`: each promise the README makes, broken on purpose, and the test that must notice.

    python bench/promises.py

For every row, a scratch copy of the checkout gets one edit (the break), then the row's test runs
there: "caught" means it passed on the unbroken copy and fails on the broken one. Prints, and
writes to bench/results/promises.md, the table. About 2 minutes on 2 cores.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("mtml", "tests", "notebooks", "studies", "docs", "data_scripts", "bench", "pyproject.toml")
# (promise, the break, file, text, replacement, the test that must fail)
PROMISES = [
    ("exact resume", "numpy's RNG state not restored", "mtml/runs/checkpoint.py",
     "    np.random.set_state((", "    tuple((",
     "tests/test_reliability.py::test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run[mid-epoch-checkpoint]"),
    ("one run identity", "the split left out of the polyp fingerprint", "mtml/tasks/polyp.py",
     'content = frame[["frame", "split", "boxes"]]', 'content = frame[["frame", "boxes"]]',
     "tests/test_near_duplicates.py::test_fingerprint_is_the_split_itself_prepared_or_in_memory"),
    ("widgets never hang headless runners", "a kit widget builds an Output widget", "mtml/teach/widgets.py",
     "w.VBox([control, image, problem])", "w.VBox([control, image, problem, w.Output()])",
     "tests/test_widgets.py::test_widgets_build_no_output_widget"),
    ("one-line errors, exit 2", "run_main returns 1", "mtml/cli.py",
     "        return USAGE_ERROR\n", "        return 1\n",
     "tests/test_data_layouts.py::test_other_clis_fail_in_one_line_too"),
    ("DDP equals one process", "GlobalBatchNorm2d uses each rank's own statistics", "mtml/runs/distributed.py",
     'return funcol_all_reduce(t, "sum", dist.group.WORLD)', "return t",
     "tests/test_distributed.py::test_torchrun_two_processes_match_one_process[kd_ml]"),
]


def copy_checkout(root: Path) -> Path:
    """The checkout's code, tests and notebooks under root/repo, with ../shared beside it."""
    repo = root / "repo"
    for part in COPIED:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, repo / part)
    if (REPO.parent / "shared").is_dir():
        (root / "shared").symlink_to(REPO.parent / "shared")
    return repo


def pytest_status(repo: Path, test: str) -> int:
    """pytest's exit code: 0 passed, 1 a test failed, 2 and up: interrupted, or it did not collect."""
    env = {**os.environ, "PYTHONPATH": str(repo), "MTML_DATA_DIR": str(repo.parent / "data")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                          cwd=repo, env=env, capture_output=True, text=True).returncode


def check(promise: tuple, root: Path) -> list[str]:
    name, what, path, text, replacement, test = promise
    repo = copy_checkout(root)
    start = time.perf_counter()
    if pytest_status(repo, test) != 0:
        return [name, what, test, "test fails unbroken", f"{time.perf_counter() - start:.0f}"]
    source = (repo / path).read_text()
    if source.count(text) != 1:
        return [name, what, test, f"break not applied: {text!r} found {source.count(text)} times in {path}", "0"]
    (repo / path).write_text(source.replace(text, replacement))
    status = pytest_status(repo, test)  # caught: the test ran and failed (a break that stops collection is not)
    answer = {0: "**no**", 1: "yes"}.get(status, f"pytest exit {status}: the break did not let the test run")
    return [name, f"{what} (`{path}`)", f"`{test}`", answer, f"{time.perf_counter() - start:.0f}"]


def main() -> int:
    rows = []
    for promise in PROMISES:
        with tempfile.TemporaryDirectory(prefix="mtml-promise-") as tmp:
            rows.append(check(promise, Path(tmp)))
            print(" | ".join(rows[-1]), flush=True)
    text = "\n".join(["# promises broken on purpose (bench/promises.py)", "",
                      "| promise | break | test | caught? | seconds |", "|---" * 5 + "|",
                      *("| " + " | ".join(row) + " |" for row in rows), ""])
    out = REPO / "bench" / "results" / "promises.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\n{text}\nwritten to {out.relative_to(REPO)}")
    return 0 if all(row[3] == "yes" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
