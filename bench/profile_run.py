"""Where one study run's time goes (issue 31, item 1): one run of a study file, profiled, split into
training steps and what is not training.

    python bench/profile_run.py studies/kvasir_tiny_cpu.yaml --mode kd_ml --seed 0 [--epochs N] [--smoke]

The run is the study's own (its parameters, its data loaded first, as a study worker has them
cached), trained and tested by `mtml.runs.study.run_one` under cProfile. The parts are disjoint:

- steps: `cohort_step` (forwards, backwards, updates), with, inside it, the detection loss's target
  assignment (torchvision's FCOS `compute_loss`) and the distillation terms (`task.distill_loss`);
- data: the rest of `fit` outside its steps and per-epoch rows (batches, augmentation, collation);
- per-epoch validation: `fit`'s epoch rows (validation metrics);
- test and external sets: `run_cohort` after `fit`;
- study extras: the task's `study_record` (operating point on validation, diversity);
- other: spec, record, bookkeeping.

Prints a table and writes it to bench/results/profile_<study>_<mode>.md. The wall times include
cProfile's overhead (a few percent); the shares are what the targets read. On a GPU, kernels run
asynchronously and cProfile would charge their time to wherever the host waits: the script sets
CUDA_LAUNCH_BLOCKING=1 (each kernel finishes before the next call returns), so the split is right
and the total a little longer than a normal run's.
"""
import argparse
import cProfile
import os
import platform
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")  # before torch starts CUDA: time lands where it is spent

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtml.runs import study as study_mod  # noqa: E402

# (file suffix, function name) of the functions whose cumulative time makes each part
FIT, STEP, EPOCH_ROW = ("core/loop.py", "fit"), ("core/step.py", "cohort_step"), ("core/loop.py", "_epoch_row")
RUN_COHORT, TRAIN_AND_RECORD = ("runs/experiment.py", "run_cohort"), ("runs/study.py", "_train_and_record")
STUDY_RECORD, DISTILL = ("tasks/detection.py", "study_record"), ("tasks/detection.py", "distill_loss")
TARGETS = ("models/detection/fcos.py", "compute_loss")  # torchvision: FCOS head and whole-model losses


def cumulative(stats: pstats.Stats, where: tuple) -> float:
    """Seconds spent in (and under) the outermost function named `where` (FCOS's model-level
    compute_loss calls its head's: the larger cumulative time holds the other)."""
    suffix, name = where
    return max((ct for (f, _, n), (_, _, _, ct, _) in stats.stats.items() if n == name and f.endswith(suffix)), default=0.0)


def parts(stats: pstats.Stats) -> dict:
    total, fit, steps = cumulative(stats, TRAIN_AND_RECORD), cumulative(stats, FIT), cumulative(stats, STEP)
    epoch_rows, run_cohort, extras = cumulative(stats, EPOCH_ROW), cumulative(stats, RUN_COHORT), cumulative(stats, STUDY_RECORD)
    return {"steps": steps, "  of which target assignment": cumulative(stats, TARGETS),
            "  of which distillation terms": cumulative(stats, DISTILL),
            "data": fit - steps - epoch_rows, "per-epoch validation": epoch_rows,
            "test and external sets": run_cohort - fit, "study extras": extras,
            "other": total - run_cohort - extras, "total": total}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA_LAUNCH_BLOCKING={os.environ.get('CUDA_LAUNCH_BLOCKING')})"
    return platform.processor() or platform.machine()


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
    profile, start = cProfile.Profile(), time.perf_counter()
    profile.enable()
    study_mod.run_one(study, params, threads=args.threads)
    profile.disable()
    wall, split = time.perf_counter() - start, parts(pstats.Stats(profile))
    rows = [f"| {name} | {seconds:.1f} | {100 * seconds / split['total']:.0f}% |" for name, seconds in split.items()]
    what = (f"{study.name}, {args.mode} seed {args.seed}, EPOCHS {params['EPOCHS']}{', smoke' if args.smoke else ''}; "
            f"{args.threads} torch threads, {device_name()}; wall {wall:.0f} s under cProfile")
    text = "\n".join(["# where one run's time goes (bench/profile_run.py)", "", what, "",
                      "| part | seconds | share |", "|---|---|---|", *rows, "",
                      f"not training (everything but the steps): {100 * (1 - split['steps'] / split['total']):.0f}%", ""])
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"profile_{study.name}_{args.mode}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text + f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
