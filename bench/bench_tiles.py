"""Tile loading speed: TileDataset through a DataLoader, with and without the decoded-tile cache.

Also the synthetic default's generation time and size on disk. Prints markdown tables.
    python bench/bench_tiles.py [--size 224 --patients 16 --tiles 20]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mtml.tasks.synthetic import SyntheticConfig, ensure_synthetic_default  # noqa: E402
from mtml.tasks.tiles import TileDataset  # noqa: E402


def disk_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def epoch_rate(data, workers: int, batch_size: int = 64, repeats: int = 2) -> float:
    """Best tiles/s over `repeats` full passes; workers start anew each pass, as in mtml.fit."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(len(b["label"]) for b in DataLoader(data, batch_size=batch_size, num_workers=workers,
                                                    shuffle=True))
        best = max(best, n / (time.perf_counter() - start))
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=SyntheticConfig.size, help="tile size in pixels")
    parser.add_argument("--patients", type=int, default=SyntheticConfig.n_patients)
    parser.add_argument("--tiles", type=int, default=SyntheticConfig.tiles_per_patient, help="per patient")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = SyntheticConfig(n_patients=args.patients, tiles_per_patient=args.tiles, size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        manifest = ensure_synthetic_default(tmp, cfg)
        gen_s, gen_cpu = time.perf_counter() - start, time.process_time() - cpu
        n_tiles = args.patients * args.tiles
        print(f"## Synthetic data ({args.patients} patients x {args.tiles} tiles, {args.size} px)\n")
        print("| tiles | generation + manifest, wall (s) | CPU (s) | size on disk (MB) |\n|---|---|---|---|")
        print(f"| {n_tiles} | {gen_s:.2f} | {gen_cpu:.2f} | {disk_size(manifest.parent) / 1e6:.1f} |\n")

        start = time.perf_counter()
        plain = TileDataset(manifest, "train", args.size)
        check_s = time.perf_counter() - start
        start = time.perf_counter()
        cached = TileDataset(manifest, "train", args.size, cache=Path(tmp) / "cache")
        build_s = time.perf_counter() - start
        cache_mb = sum(p.stat().st_size for p in (Path(tmp) / "cache").glob("*")) / 1e6
        print(f"## TileDataset, train split ({len(plain)} tiles), batch 64\n")
        print(f"validation pass without cache: {check_s:.2f} s; cache build (whole manifest, "
              f"{cache_mb:.1f} MB): {build_s:.2f} s\n")
        print("| workers | no cache (tiles/s) | cache (tiles/s) | ratio |\n|---|---|---|---|")
        for workers in (0, 2):
            a, b = epoch_rate(plain, workers), epoch_rate(cached, workers)
            print(f"| {workers} | {a:.0f} | {b:.0f} | {b / a:.1f}x |")


if __name__ == "__main__":
    main()
