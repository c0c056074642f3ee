"""Data against compute: tiles/s the cached TileDataset delivers vs images/s a cohort step eats.

The tiles are the synthetic H&E-like default (mtml.synthetic), cached as decoded uint8 tiles
(memmap), read through a DataLoader the way `fit` reads them (bench_tiles.epoch_rate). The
consumption is a kd_ml step with 2 students on batches of those tiles. Goal: ratio >= 3.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, parser, save, setup, timed  # noqa: E402
from bench_cohort import SHAPES  # noqa: E402
from bench_tiles import epoch_rate  # noqa: E402

from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step  # noqa: E402
from mtml.tasks.synthetic import SyntheticConfig, ensure_synthetic_default  # noqa: E402
from mtml.tasks.tiles import TileDataset  # noqa: E402


def consumption(version: str, data, batch: int, device: str, warmup: int, repeats: int) -> float:
    """Images/s of kd_ml cohort steps (2 students) on batches of `data`."""
    cohort = Cohort.build(CohortConfig(mode="kd_ml", version=version, lr=0.01), device, task=ClassificationTask())
    task = ClassificationTask(2)
    items = task.to_device(task.collate([data[i % len(data)] for i in range(batch)]), cohort.device)
    times = [timed(lambda: cohort_step(cohort, items, task)) for _ in range(warmup + repeats)]
    return batch / median(times[warmup:])


def main(argv=None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=16)
    p.add_argument("--tiles", type=int, default=40, help="tiles per patient")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (fit's default: 0)")
    args = p.parse_args(argv)
    env = setup(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    warmup, repeats = (1, 3) if args.quick else (2, 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for version in ("tiny", "v1"):
            size, batch = SHAPES[device][version]
            root = Path(tmp) / f"{size}px"
            manifest = ensure_synthetic_default(root, SyntheticConfig(
                n_patients=args.patients, tiles_per_patient=args.tiles, size=size))
            data = TileDataset(manifest, "train", size, cache=root / "cache")
            delivered = epoch_rate(data, args.workers, batch_size=batch, repeats=2 if args.quick else 3)
            eaten = consumption(version, data, batch, device, warmup, repeats)
            rows.append(dict(version=version, image_px=size, batch=batch, tiles=len(data),
                             loader_workers=args.workers, data_tiles_per_s=delivered,
                             cohort_step_images_per_s=eaten, ratio=delivered / eaten))
            print(rows[-1], flush=True)
    notes = (f"{env}. Tiles/s: best of full passes over the train split (cache built beforehand); "
             f"images/s: median of {repeats} kd_ml steps (2 students) after {warmup} warm-up. "
             "Goal: ratio >= 3 (the step never waits for data).")
    return save("data", "c. Data delivery vs cohort step consumption", notes, rows)


if __name__ == "__main__":
    main()
