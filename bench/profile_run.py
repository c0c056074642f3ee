"""Where one study run's time goes (issue 31, item 1): one run of a study file, timed part by part,
split into training steps and what is not training.

    python bench/profile_run.py studies/kvasir_tiny_cpu.yaml --mode kd_ml --seed 0 [--epochs N] [--smoke]

The run is the study's own (its parameters, its data loaded first, as a study worker has them
cached), trained and tested by `mtml.runs.study.run_one` with clocks around the functions below
(no profiler: cProfile's per-call overhead inflates Python-heavy parts, the loops the targets are
about). The parts are disjoint:

- steps: `cohort_step` (forwards, backwards, updates), with, inside it, the detection loss (target
  assignment and FCOS's losses, `DenseFCOS.compute_loss`) and the distillation terms (`task.distill_loss`);
- data: the rest of `fit` outside its steps and per-epoch rows (batches, augmentation, collation);
- per-epoch validation: `fit`'s epoch rows (validation metrics);
- test and external sets: `run_cohort` after `fit` (offline: the teacher's pre-training is a `fit`
  too, so its time lands in the parts above);
- study extras: the task's `study_record` (operating point on validation, diversity);
- other: spec, record, bookkeeping.

Prints a table and writes it to bench/results/profile_<study>_<mode>.md. On a GPU, kernels run
asynchronously: each clock waits for the GPU (`torch.cuda.synchronize`) when it starts and stops,
so a part's kernels count in that part.
"""
import argparse
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from _common import replaced, write_result  # noqa: E402
from mtml.runs import study as study_mod  # noqa: E402


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clocks:
    """Seconds spent inside each wrapped function (outermost calls only: a recursive or nested
    call of the same function is not counted twice)."""

    def __init__(self):
        self.seconds, self._depth = {}, {}

    def timed(self, inner, part: str):
        """`inner` with its time added to `part`."""
        self.seconds.setdefault(part, 0.0)

        def timed(*args, **kwargs):
            self._depth[part] = self._depth.get(part, 0) + 1
            sync()
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth[part] -= 1
                if not self._depth[part]:
                    sync()
                    self.seconds[part] += time.perf_counter() - start

        return timed


def clocked_run(study, params: dict, threads: int) -> dict:
    """{part: seconds} of one `run_one`, the functions wrapped while it runs and restored after."""
    from mtml.core import loop
    from mtml.runs import experiment
    from mtml.tasks import task_class as registered
    from mtml.tasks.detectors import DenseFCOS

    clocks, task_class = Clocks(), registered(study.task)
    parts = [(study_mod, "_train_and_record", "total"), (experiment, "run_cohort", "run_cohort"),
             (loop, "fit", "fit"), (experiment, "fit", "fit"), (loop, "cohort_step", "steps"),
             (loop, "_epoch_row", "epoch rows"), (DenseFCOS, "compute_loss", "targets"),
             (task_class, "distill_loss", "distill"), (task_class, "study_record", "extras")]
    with replaced([(owner, name, clocks.timed(getattr(owner, name), part))
                   for owner, name, part in parts if hasattr(owner, name)]):
        study_mod.run_one(study, params, threads=threads)
    return clocks.seconds


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def parts(t: dict) -> dict:
    return {"steps": t["steps"], "  of which FCOS targets and losses": t["targets"], "  of which distillation terms": t["distill"],
            "data": t["fit"] - t["steps"] - t["epoch rows"], "per-epoch validation": t["epoch rows"],
            "test and external sets": t["run_cohort"] - t["fit"], "study extras": t["extras"],
            "other": t["total"] - t["run_cohort"] - t["extras"], "total": t["total"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", help="a study file, e.g. studies/kvasir_tiny_cpu.yaml")
    p.add_argument("--mode", default="kd_ml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the study's EPOCHS (a shorter profile)")
    p.add_argument("--smoke", action="store_true", help="the study's smoke plan (tiny sizes)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="the table's file (default bench/results/profile_<study>_<mode>.md)")
    args = p.parse_args(argv)
    study = study_mod.Study.load(args.study)
    params = next((q for q in study.planned(smoke=args.smoke) if q["MODE"] == args.mode and q["SEED"] == args.seed), None)
    if params is None:
        raise SystemExit(f"{args.study} plans no {args.mode} run with seed {args.seed}")
    if args.epochs is not None:
        params = {**params, "EPOCHS": args.epochs}
    study_mod.load_data(study, params)  # cached, as in a study worker: loading is not part of a run
    start = time.perf_counter()
    split = parts(clocked_run(study, params, args.threads))
    wall = time.perf_counter() - start
    rows = [f"| {name} | {seconds:.1f} | {100 * seconds / split['total']:.0f}% |" for name, seconds in split.items()]
    what = (f"{study.name}, {args.mode} seed {args.seed}, EPOCHS {params['EPOCHS']}{', smoke' if args.smoke else ''}; "
            f"{args.threads} torch threads, {device_name()}; wall {wall:.0f} s")
    text = "\n".join(["# where one run's time goes (bench/profile_run.py)", "", what, "",
                      "| part | seconds | share |", "|---|---|---|", *rows, "",
                      f"not training (everything but the steps): {100 * (1 - split['steps'] / split['total']):.0f}%", ""])
    write_result(text, Path(args.out) if args.out else REPO / "bench" / "results" / f"profile_{study.name}_{args.mode}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
