"""`make bench`: every benchmark in one run; writes bench/results/bench.md and prints it.

    python bench/run_all.py [--quick] [--threads N]
Ratios only mean something within one run: timings on a shared machine drift between runs.
"""
from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cohort  # noqa: E402
import bench_data  # noqa: E402
import bench_kdlib  # noqa: E402
from _common import RESULTS, parser  # noqa: E402


def main(argv=None) -> Path:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    passed = (["--quick"] if args.quick else []) + ["--threads", str(args.threads)]
    sections = [bench_cohort.main(passed), bench_kdlib.main(passed), bench_data.main(passed)]
    header = (f"# mtml benchmarks\n\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, "
              f"{platform.processor() or platform.machine()}, python {platform.python_version()}"
              f"{', quick run' if args.quick else ''}.\n")
    out = RESULTS / "bench.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([header, *sections]))
    print("\n" + out.read_text())
    print(f"written to {out}")
    return out


if __name__ == "__main__":
    main()
