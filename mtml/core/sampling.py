"""Which items a training step sees: the seeded order of an epoch, and a rank's slice of it."""
from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n training items in `epoch`: a function of (seed, epoch) only, so every
    mode of a seed sees the same order and a resumed run the same as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def shard_order(order: list[int], batch_size: int, rank: int, world: int) -> tuple[list[int], int]:
    """This rank's items of each full global batch of `order`: the rank-th of `world` equal,
    contiguous slices. Returns (items, per-rank batch size). A last partial batch is dropped."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if batch_size % world:
        raise ValueError(f"the global batch size {batch_size} must be divisible by the number of "
                         f"processes {world}; pick a multiple of {world}")
    if 0 < len(order) < batch_size:
        raise ValueError(f"distributed training needs at least one full batch ({batch_size} items), "
                         f"got {len(order)}; lower --batch-size")
    per_rank = batch_size // world
    starts = range(0, len(order) - batch_size + 1, batch_size)
    return [i for b in starts for i in order[b + rank * per_rank: b + (rank + 1) * per_rank]], per_rank
