"""Cohort step efficiency: does one cohort step cost what its networks cost when trained alone?

    efficiency = sum over networks of (isolated forward + backward + SGD step on the same batch)
                 / (one cohort_step)

An efficiency near 1 means the cohort adds no redundant forwards and little overhead (the KD/ML
loss terms, one optimizer for all). Medians of interleaved repeats after warm-up. A second table
times the speed options (channels_last, bf16 amp) against the plain step.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, parser, save, setup, timed, timed2  # noqa: E402

from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step  # noqa: E402
from mtml.tasks.data import make_separable  # noqa: E402

# (image size, batch) per version. v1 (ResNet-50 / ResNet-18) at 224 px, batch 32 takes 8.7 s per
# ResNet-50 step on this 2-core CPU, so the CPU bench uses 64 px, batch 16 for it.
SHAPES = {"cpu": {"tiny": (64, 64), "v1": (64, 16)}, "cuda": {"tiny": (64, 256), "v1": (224, 64)}}


def make_batch(task, size: int, batch: int, device):
    data = make_separable(batch, size, seed=0)
    return task.to_device(task.collate([data[i] for i in range(batch)]), torch.device(device))


def isolated_steps(cohort: Cohort, task):
    """For each network of the cohort, a copy with its own SGD and a step on its supervised loss."""
    cfg, steps = cohort.cfg, []
    clip = getattr(cfg, "clip_grad_norm", 0)
    for name, net in cohort.networks.items():
        if name == "teacher" and cohort.frozen_teacher:
            continue
        net = copy.deepcopy(net)
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0, foreach=True)

        def step(net=net, opt=opt, batch=None):
            loss = task.supervised_loss(task.outputs(net, batch), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:  # as cohort_step does, per network
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip, foreach=True)
            opt.step()
        steps.append(step)
    return steps


def efficiency(version, mode, n, size, batch, device, warmup, repeats) -> dict:
    cohort = Cohort.build(CohortConfig(mode=mode, version=version, n_students=n, lr=0.01), device, task=ClassificationTask())
    cohort.train()
    task = ClassificationTask(2)
    data = make_batch(task, size, batch, device)
    alone = isolated_steps(cohort, task)
    t_cohort, t_alone = [], [[] for _ in alone]
    for r in range(warmup + repeats):  # interleaved, so that load changes hit both alike
        tc = timed2(lambda: cohort_step(cohort, data, task))
        ta = [timed2(lambda s=s: s(batch=data)) for s in alone]
        if r >= warmup:
            t_cohort.append(tc)
            for acc, t in zip(t_alone, ta):
                acc.append(t)

    def ratio(kind: int, stat) -> tuple[float, float]:  # kind 0: wall, 1: CPU time
        alone_s = sum(stat([t[kind] for t in ts]) for ts in t_alone)
        return alone_s, alone_s / stat([t[kind] for t in t_cohort])

    sum_alone, wall = ratio(0, median)
    row = dict(version=version, mode=mode, students=n, image_px=size, batch=batch,
               networks=len(alone), isolated_sum_s=sum_alone,
               cohort_step_s=median([t[0] for t in t_cohort]), efficiency=wall,
               efficiency_of_minimums=ratio(0, min)[1])
    if device == "cpu":
        row["efficiency_cpu_time"] = ratio(1, median)[1]
    return row


def options(version, size, batch, device, warmup, repeats) -> list[dict]:
    """kd_ml, 2 students: step time of each speed option relative to the plain step."""
    variants = {"plain": {}, "channels_last": dict(channels_last=True), "amp_bf16": dict(amp=True)}
    runs = {}
    for name, kw in variants.items():
        cohort = Cohort.build(CohortConfig(mode="kd_ml", version=version, lr=0.01, **kw), device, task=ClassificationTask())
        task = ClassificationTask(2, channels_last=kw.get("channels_last", False))
        runs[name] = (cohort, task, make_batch(task, size, batch, device))
    times = {k: [] for k in variants}
    for r in range(warmup + repeats):
        for name, (cohort, task, data) in runs.items():
            t = timed(lambda: cohort_step(cohort, data, task))
            if r >= warmup:
                times[name].append(t)
    plain = median(times["plain"])
    return [dict(version=version, option=k, image_px=size, batch=batch, step_s=median(v),
                 speedup_vs_plain=plain / median(v)) for k, v in times.items()]


def main(argv=None) -> str:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    env = setup(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    warmup, repeats = (1, 3) if args.quick else (2, 7)
    rows, opt_rows = [], []
    for version in ("tiny", "v1"):
        size, batch = SHAPES[device][version]
        for mode in ("kd", "ml", "kd_ml"):
            for n in (2, 4):
                rows.append(efficiency(version, mode, n, size, batch, device, warmup, repeats))
                print(rows[-1], flush=True)
        opt_rows += options(version, size, batch, device, warmup, repeats)
    notes = (f"{env}. Median of {repeats} interleaved repeats after {warmup} warm-up; less "
             "sensitive to other processes on a shared machine: the ratio of minimums and, on CPU, "
             "of process CPU times. Goal: efficiency >= 0.95. v1 on CPU at 64 px, batch 16 "
             "(224 px, batch 32 is 8.7 s per ResNet-50 step here).")
    return (save("cohort", "a. Cohort step efficiency", notes, rows)
            + "\n" + save("options", "a2. Speed options (kd_ml, 2 students)",
                          f"{env}. Step time relative to the plain float32 step (> 1: faster).", opt_rows))


if __name__ == "__main__":
    main()
