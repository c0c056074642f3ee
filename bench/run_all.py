"""`make bench`: every benchmark in one run; writes bench/results/bench.md and prints it.

    python bench/run_all.py [--quick] [--threads N] [--skip-others]
Ratios only mean something within one run: timings on a shared machine drift between runs.
The step/peer/data benches (a, b, c) run here; the other bench_*.py scripts (tile loading,
detection) run as they are, and their printed tables are appended.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_cohort  # noqa: E402
import bench_data  # noqa: E402
import bench_kdlib  # noqa: E402
from _common import RESULTS, parser  # noqa: E402

from mtml.io import write_text  # noqa: E402

OURS = {"bench_cohort.py", "bench_kdlib.py", "bench_data.py"}


def run_other(script: Path) -> str:
    """Runs another bench script; its stdout (or why it failed) as a markdown section."""
    print(f"running {script.name} ...", flush=True)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=HERE.parent)
    body = run.stdout.strip() if run.returncode == 0 else \
        f"FAILED (exit {run.returncode}):\n\n```\n{run.stderr.strip()[-2000:]}\n```"
    print(body, flush=True)
    return f"## {script.name}\n\n{body}\n"


def main(argv=None) -> Path:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--skip-others", action="store_true", help="only the a, b, c benches")
    args = p.parse_args(argv)
    passed = (["--quick"] if args.quick else []) + ["--threads", str(args.threads)]
    sections = [bench_cohort.main(passed), bench_kdlib.main(passed), bench_data.main(passed)]
    if not args.skip_others:
        sections += [run_other(s) for s in sorted(HERE.glob("bench_*.py")) if s.name not in OURS]
    header = (f"# mtml benchmarks\n\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, "
              f"{platform.processor() or platform.machine()}, python {platform.python_version()}"
              f"{', quick run' if args.quick else ''}.\n")
    out = RESULTS / "bench.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(out, "\n".join([header, *sections]))
    print("\n" + out.read_text())
    print(f"written to {out}")
    return out


if __name__ == "__main__":
    main()
