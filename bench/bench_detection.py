"""Polyp detection on real Kvasir-SEG frames, tiny version, CPU: mAP@0.5 of the teacher, each
student and the student ensemble per mode, with the training time.

    python bench/bench_detection.py [--train 400 --val 100 --size 160 --epochs 6 --threads 2]

Frames come from $MTML_DATA_DIR/kvasir-seg (prepared) or ../shared/data/kvasir-seg. Prints one
table and writes bench/results/detection.csv. A measurement, not a test: numbers vary with load.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtml import Cohort, CohortConfig, fit  # noqa: E402
from mtml.tasks.detection import DetectionTask  # noqa: E402
from mtml.tasks.detectors import build_detection_networks  # noqa: E402
from mtml.io import write_csv  # noqa: E402
from mtml.tasks.polyp import default_polyp_root, flip_augment, load_polyp_dataset  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="independent,kd,ml,kd_ml")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root, label = default_polyp_root()
    if root is None:
        raise SystemExit("no Kvasir-SEG frames: run python data_scripts/polyp.py kvasir")
    print(label)
    train = load_polyp_dataset(root, "train", size=args.size, limit=args.train, seed=args.seed)
    val = load_polyp_dataset(root, "val", size=args.size, limit=args.val, seed=args.seed)
    task = DetectionTask(size=args.size)
    rows = []
    for mode in args.modes.split(","):
        cfg = CohortConfig(mode=mode, version="tiny", n_students=2, batch_size=args.batch_size,
                           epochs=args.epochs, lr=args.lr, seed=args.seed)
        cohort = Cohort.build(cfg, networks=lambda *a, **k: build_detection_networks(*a, size=args.size, **k))
        start = time.perf_counter()
        fit(cohort, task, train, None, augment=flip_augment, progress=False)
        train_s = time.perf_counter() - start
        metrics = task.evaluate(cohort.networks, val)
        for net, row in metrics.iterrows():
            rows.append({"mode": mode, "network": net, **row.to_dict(), "train_s": round(train_s, 1)})
        print(f"{mode}: {train_s:.0f} s; " + ", ".join(f"{n} {v:.3f}" for n, v in metrics["map50"].items()),
              flush=True)
    table = pd.DataFrame(rows)
    print(f"\n{len(train)} train / {len(val)} val frames, {args.size} px, {args.epochs} epochs, "
          f"{args.threads} threads")
    print(table.pivot(index="mode", columns="network", values="map50").round(3).to_string())
    write_csv(Path(__file__).parent / "results" / "detection.csv", table, index=False)


if __name__ == "__main__":
    main()
