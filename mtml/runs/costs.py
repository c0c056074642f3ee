"""What compression buys: parameters, FLOPs and CPU latency of the teacher, one student and the
student ensemble of a version, per frame (detection) or tile (classification) at batch 1.

The networks are built by the builders a run uses (`mtml.models.build_cohort_networks`,
`mtml.detectors.build_detection_networks`), with `pretrained=False` (weights do not change the
cost). FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts 2; only
matmuls and convolutions are counted, not BatchNorm, activations or pooling). The ensemble's
latency is the actual sequential run of its N students plus the combination the evaluation uses
(mean of softmax probabilities; for detection `DetectionTask.ensemble`, the mean of the dense
maps); FCOS's postprocess (NMS) is timed for no network.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..cli import Parser
from ..tasks.models import count_parameters
from ..core.cohort import CohortConfig

TILE_SIZE = 64  # the classification notebooks' TILE_SIZE default (tests/test_costs.py checks it)


def count_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward of `model` on `example` (matmuls and convolutions; multiply-add = 2)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(example)
    return int(counter.get_total_flops())


def _networks(task: str, version: str, n_students: int, size: int | None):
    """(teacher, students, input size, combine) built as `Cohort.build` builds them."""
    cfg = CohortConfig(mode="kd", version=version, n_students=n_students).validate()
    if task == "classification":
        from ..tasks.models import build_cohort_networks
        from ..tasks.task import ClassificationTask

        probs = ClassificationTask(cfg.num_classes).probabilities
        teacher, students = build_cohort_networks(version, n_students, cfg.num_classes, pretrained=False)
        return teacher, students, size or TILE_SIZE, lambda outs: torch.stack([probs(o) for o in outs]).mean(0)
    if task == "detection":
        from ..tasks.detection import DetectionTask
        from ..tasks.detectors import FRAME_SIZE, build_detection_networks

        size = size or FRAME_SIZE[version]
        teacher, students = build_detection_networks(version, n_students, cfg.num_classes,
                                                     pretrained=False, size=size)
        return teacher, students, size, DetectionTask(size=size).ensemble
    raise ValueError(f"unknown task {task!r}; choose classification or detection")


def network_costs(task: str, version: str, n_students: int, size: int | None = None, threads: int = 1,
                  repeats: int = 20) -> pd.DataFrame:
    """One row per deployable model (`teacher`, `student`, `ensemble` of `n_students`): `params`,
    `flops` per frame at batch 1, the median CPU latency `latency_ms` of `repeats` timed forwards
    (eval mode, inference mode, `threads` torch threads, after warm-up) and its interquartile
    range `latency_iqr_ms`. The three models are timed in turn within each repeat, so a load
    change on the machine hits all three alike. `size`: tile or frame size in pixels (default:
    the notebooks' TILE_SIZE for classification, the version's FRAME_SIZE for detection)."""
    if repeats < 1 or threads < 1:
        raise ValueError(f"repeats and threads must be >= 1, got {repeats}, {threads}")
    teacher, students, size, combine = _networks(task, version, n_students, size)
    for m in (teacher, *students):
        m.eval()
    x = torch.rand(1, 3, size, size)
    models = {"teacher": teacher, "student": students[0],
              "ensemble": lambda x: combine([s(x) for s in students])}
    student_flops = [count_flops(s, x) for s in students]
    rows = {"teacher": (count_parameters(teacher), count_flops(teacher, x)),
            "student": (count_parameters(students[0]), student_flops[0]),
            "ensemble": (sum(count_parameters(s) for s in students), sum(student_flops))}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = {name: [] for name in models}
    try:
        with torch.inference_mode():
            for step in range(2 + repeats):  # two warm-up rounds
                for name, run in models.items():
                    start = time.perf_counter()
                    run(x)
                    if step >= 2:
                        times[name].append(1e3 * (time.perf_counter() - start))
    finally:
        torch.set_num_threads(before)
    out = pd.DataFrame([{"model": name, "params": p, "flops": f,
                         "latency_ms": float(np.median(times[name])),
                         "latency_iqr_ms": float(np.subtract(*np.percentile(times[name], [75, 25]))),
                         "threads": threads} for name, (p, f) in rows.items()]).set_index("model")
    out.attrs.update(task=task, version=version, n_students=n_students, size=size)
    return out


def main(argv=None) -> int:
    """`python -m mtml.runs.costs`: the costs of every version of both tasks, as a Markdown table."""
    import platform
    from pathlib import Path

    p = Parser(prog="python -m mtml.runs.costs", description=main.__doc__)
    p.add_argument("--students", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", help="write the table to this Markdown file too")
    args = p.parse_args(argv)
    from ..tasks.detectors import VERSIONS as DETECTION_VERSIONS
    from ..tasks.models import VERSIONS as CLASSIFICATION_VERSIONS

    lines = [f"# What compression buys: every version, {args.students} students", "",
             f"Generated by `python -m mtml.runs.costs`; batch 1, CPU ({platform.machine()}), 1 torch thread, median "
             f"of {args.repeats} timed forwards (IQR); FLOPs of matmuls and convolutions; classification at "
             f"{TILE_SIZE} px tiles, detection at each version's frame size.", "",
             "| task | version | size | model | parameters | GFLOPs | latency ms (IQR) | x teacher latency |",
             "|---|---|---|---|---|---|---|---|"]
    for task, versions in (("classification", CLASSIFICATION_VERSIONS), ("detection", DETECTION_VERSIONS)):
        for version in versions:
            c = network_costs(task, version, args.students, repeats=args.repeats)
            for who, r in c.iterrows():
                lines.append(f"| {task} | {version} | {c.attrs['size']} | {who} | {int(r['params']):,} | "
                             f"{r['flops'] / 1e9:.3f} | {r['latency_ms']:.1f} ({r['latency_iqr_ms']:.1f}) | "
                             f"{r['latency_ms'] / c.loc['teacher', 'latency_ms']:.2f} |")
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    from ..cli import run_main

    sys.exit(run_main(main, prog="python -m mtml.runs.costs"))
