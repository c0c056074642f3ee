"""Scale-out: the same cohort step on K processes with DistributedDataParallel (DDP).

    torchrun --nproc_per_node=2 -m mtml.runs.distributed --version tiny --mode kd_ml --epochs 2
    python -m mtml.runs.distributed --help          (without torchrun: one process, plain `fit`)

Every process builds the same cohort (same seed), wraps the teacher and the students in DDP and
trains on its slice of every global batch (`fit(shard=(rank, world))`): `--batch-size` is the
global batch, split evenly over the ranks, so K processes take the same steps as one process.
DDP averages the gradients of the per-rank mean losses, which equals the gradient of the global
mean loss. BatchNorm (OURS): per-rank batch statistics would differ from one process's, so BN
layers are synchronised over the ranks (torch's SyncBatchNorm on GPUs, `GlobalBatchNorm2d` below
on CPUs, where torch has none); K processes then compute what one process computes, up to float
rounding (tests/test_distributed.py checks the final weights). Augmentation draws from each
rank's own RNG, so augmented runs are equivalent in distribution only.
Training losses in the history are averaged over the ranks; every rank evaluates the full
validation set (the networks are identical); only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..cli import Parser
from ..core.cohort import Cohort, CohortConfig, MODES
from ..core.loop import Callback, fit
from ..tasks import task_class, task_names
from .checkpoint import Checkpoint


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks, with
    gradients flowing through them (differentiable all-reduce): what SyncBatchNorm does on GPUs,
    for any backend. Without a process group (or in eval mode) it is plain BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        from torch.distributed._functional_collectives import all_reduce as funcol_all_reduce

        def all_reduce(t):  # a sum over the ranks that autograd differentiates (torch's advice)
            return funcol_all_reduce(t, "sum", dist.group.WORLD)

        dims, shape = [0, 2, 3], (1, -1, 1, 1)
        sums = all_reduce(torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.shape[1]])]))
        count = sums[-1].detach()
        mean = sums[:-1] / count                     # two passes (mean, then var): accurate
        var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), m)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Synchronises the BatchNorm2d layers of `model` over the ranks, in place (the parameters and
    buffers stay the same objects, so optimizers and state_dict keys are unaffected)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d  # a subclass with no state of its own: only forward differs
    return model


def wrap_cohort(cohort: Cohort) -> Cohort:
    """Wraps the trainable networks used by `cohort_step` in DDP, with BatchNorm synchronised.
    The students' feature adapters (`mtml.features`) live outside the networks: pass the callback
    `AverageAdapterGrads()` to `fit` (as `fit_distributed` does) to average their gradients over the
    ranks after each backward, as DDP does for the networks.
    `cohort.networks` keeps the unwrapped modules (evaluation and checkpoints see plain keys)."""
    if cohort.cfg.stack_students:  # a stacked forward would bypass DDP's gradient averaging
        raise ValueError("stack_students=True cannot run under DDP (the stacked forward bypasses the "
                         "wrapped students): turn stack_students off")
    ids = [cohort.device.index or 0] if cohort.device.type == "cuda" else None

    def wrap(m):  # synced BN keeps the buffers equal on all ranks: no buffer broadcasts needed
        return DistributedDataParallel(sync_batchnorm(m, cohort.device), device_ids=ids,
                                       forward_sync_buffers=False)

    if cohort.teacher is not None and not cohort.frozen_teacher:
        cohort.teacher = wrap(cohort.teacher)
    cohort.students = [wrap(s) for s in cohort.students]
    return cohort


class AverageAdapterGrads(Callback):
    """Averages the feature adapters' gradients over the ranks before each update (`fit_distributed`)."""

    def before_update(self, cohort) -> None:
        _average_grads(cohort.adapters.parameters())


def _average_grads(parameters) -> None:
    """All-reduce mean of the gradients (the ranks' shards are equal in size)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or not _distributed():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_history(history: pd.DataFrame) -> pd.DataFrame:
    """Training losses averaged over the ranks, epoch times as the slowest rank's."""
    if not _distributed():
        return history
    history = history.copy()
    for columns, op in (([c for c in history if c.startswith("train/")], dist.ReduceOp.SUM),
                        (["time_s"], dist.ReduceOp.MAX)):
        values = torch.tensor(history[columns].to_numpy(dtype="float64"))
        dist.all_reduce(values, op=op)
        if op == dist.ReduceOp.SUM:
            values /= dist.get_world_size()
        history[columns] = values.numpy()
    return history


def fit_distributed(cohort: Cohort, task, train_data, val_data=None, **fit_kw) -> pd.DataFrame:
    """`fit` on every rank of the current process group (plain `fit` without one): wraps the
    cohort in DDP, shards each global batch, reduces the history; rank 0 writes checkpoints."""
    if not _distributed():
        return fit(cohort, task, train_data, val_data, **fit_kw)
    rank = dist.get_rank()
    fit_kw["progress"] = fit_kw.get("progress", True) and rank == 0
    wrap_cohort(cohort)
    if len(cohort.adapters):
        fit_kw["callbacks"] = [*fit_kw.get("callbacks", ()), AverageAdapterGrads()]
    history = fit(cohort, task, train_data, val_data, shard=(rank, dist.get_world_size()), **fit_kw)
    return reduce_history(history)


# -- command line ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="torchrun --nproc_per_node=K -m mtml.runs.distributed",
        description="Train a cohort (teacher + N students) on K processes with DDP. Without "
                    "torchrun it runs in one process. Rank 0 writes OUT/checkpoint.pt, "
                    "OUT/history.csv and OUT/config.json.")
    p.add_argument("--task", default="classification", choices=task_names(),
                   help="detection trains FCOS detectors on SYNTHETIC polyps (--image-size: a multiple of 32)")
    p.add_argument("--version", default="tiny", help="tiny, v1, v2 or v3 (default tiny)")
    p.add_argument("--mode", default="kd_ml", choices=[m for m in MODES if m != "offline"],
                   help="offline needs a pre-trained teacher: use fit_distributed from Python")
    p.add_argument("--n-students", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split over processes")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (seeded separable problem) or a tile manifest CSV")
    p.add_argument("--image-size", type=int, default=16, help="synthetic image / tile size")
    p.add_argument("--n-train", type=int, default=256, help="synthetic training items")
    p.add_argument("--cache", default=None, help="tile cache folder (manifest data only)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile (CUDA only)")
    p.add_argument("--out", default="runs/distributed", help="output folder (rank 0)")
    return p


def _datasets(args):
    """(train, val): the task's generated items, or (classification) the tiles of a manifest."""
    if args.data == "synthetic":
        generated = task_class(args.task).generated
        return (generated(args.n_train, args.image_size, seed=args.seed),
                generated(max(args.n_train // 4, 8), args.image_size, seed=args.seed, split=1))
    if args.task != "classification":
        raise ValueError(f"--task {args.task} takes --data synthetic here; train on real data with "
                         "the notebooks or mtml.experiment.run_cohort")
    from ..tasks.tiles import TileDataset

    if not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data}: no such manifest CSV; pass 'synthetic' or a manifest "
                         "built by data_scripts/msi_mss.py")
    kw = dict(size=args.image_size, cache=args.cache)
    return TileDataset(args.data, "train", **kw), TileDataset(args.data, "val", **kw)


def main(argv=None) -> pd.DataFrame:
    args = _parser().parse_args(argv)
    from ..io import write_csv, write_json

    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    if torchrun and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    cfg = CohortConfig(mode=args.mode, version=args.version, n_students=args.n_students,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       num_workers=args.num_workers, amp=args.amp,
                       channels_last=args.channels_last, compile=args.compile)
    train_data, val_data = _datasets(args)
    task = task_class(args.task).from_parameters({task_class(args.task).size_parameter: args.image_size,
                                                  "CHANNELS_LAST": args.channels_last})
    cohort = Cohort.build(cfg, device, task=task)
    try:
        history = fit_distributed(cohort, task, train_data, val_data, callbacks=[Checkpoint(args.out)])
        if not _distributed() or dist.get_rank() == 0:
            write_csv(Path(args.out) / "history.csv", history, index=False)
            write_json(Path(args.out) / "config.json",
                       {**asdict(cfg), "task": args.task, "world_size": dist.get_world_size() if _distributed() else 1})
            print(history.to_string(index=False))
        if torchrun:  # a rank that leaves while rank 0 still writes can abort gloo ("terminate called")
            dist.barrier()
    finally:
        if torchrun and dist.is_initialized():
            dist.destroy_process_group()
    return history


if __name__ == "__main__":
    from ..cli import run_main

    import sys

    def _command(argv) -> int:
        main(argv)
        return 0

    sys.exit(run_main(_command, prog="python -m mtml.runs.distributed"))
