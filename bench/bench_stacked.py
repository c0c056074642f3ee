"""Students in one pass: what N tiny students cost in one cohort step, stacked (`stack_students`,
grouped convolutions, `mtml.stacking`) or one after another, against N times one student.

    cost ratio = step time with N students / (N x step time with 1 student)

A ratio of 1 means no saving; the goal for the stacked path is at most 0.7. Mode independent
(students only, so the ratio is about the students); also the whole kd_ml step (teacher included),
stacked against one after another. Medians of interleaved repeats after warm-up, in one run.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, parser, save, setup, timed  # noqa: E402
from bench_cohort import make_batch  # noqa: E402

from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step  # noqa: E402


def step_timer(mode: str, n: int, stack: bool, batch, task):
    cohort = Cohort.build(CohortConfig(mode=mode, n_students=n, stack_students=stack), task=task)
    cohort.train()
    return lambda: cohort_step(cohort, batch, task)


def main(argv=None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="tile size (px)")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    where = setup(args)
    task = ClassificationTask()
    batch = make_batch(task, args.size, args.batch, "cpu")
    repeats = 5 if args.quick else 20
    timers = {("independent", 1, False): step_timer("independent", 1, False, batch, task)}
    for n in (2, 4):
        for mode in ("independent", "kd_ml"):
            for stack in (False, True):
                timers[(mode, n, stack)] = step_timer(mode, n, stack, batch, task)
    for fn in timers.values():  # warm-up
        fn(), fn()
    times = {key: [] for key in timers}
    for _ in range(repeats):  # interleaved, so drift hits every variant alike
        for key, fn in timers.items():
            times[key].append(timed(fn))
    t = {key: median(v) for key, v in times.items()}
    one = t[("independent", 1, False)]
    rows = []
    for n in (2, 4):
        loop, stacked = t[("independent", n, False)], t[("independent", n, True)]
        rows.append({"students": n, "one student ms": one * 1e3, "one after another ms": loop * 1e3,
                     "stacked ms": stacked * 1e3, "ratio one after another": loop / (n * one),
                     "ratio stacked": stacked / (n * one), "kd_ml step speed-up": t[("kd_ml", n, False)]
                     / t[("kd_ml", n, True)]})
    notes = (f"tiny version, {args.size} px, batch {args.batch}, {where}; ratio = N students' step / "
             f"(N x one student's step), goal for stacked <= 0.7; kd_ml speed-up = one after another / "
             f"stacked, whole step with the teacher; medians of {repeats} interleaved repeats.")
    return save("stacked_students", "Students in one pass (stack_students)", notes, rows)


if __name__ == "__main__":
    main()
