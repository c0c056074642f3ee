"""Screens stand-ins for the classification default on VALIDATION tiles only (issue: a default
where distillation visibly helps). One line per run is appended to
docs/results/teaching_premise/exploration.jsonl; the test split is never read.

    python studies/explore_teaching_premise.py NAME --gen '{"signal": 1.0}' --widths 4,8,16 \
        --params '{"EPOCHS": 5}' --seeds 0 1 2 --modes independent kd
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "teaching_premise" / "exploration.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--gen", default="{}", help="SyntheticConfig fields (JSON)")
    ap.add_argument("--widths", default=None, help="tiny student widths, e.g. 4,8,16")
    ap.add_argument("--params", default="{}", help="notebook parameters to change (JSON)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", nargs="+", default=["independent", "kd"])
    ap.add_argument("--lymph-amp", type=float, default=1.0,
                    help="scales the lymphocyte-like nuclei's darkness: below 1 they look more like tumour nuclei")
    args = ap.parse_args()

    import torch

    import mtml
    from mtml.runs.parameters import config_from_parameters, task_from_parameters
    from mtml.runs.study import current_commit
    from mtml.tasks import models
    from mtml.tasks.download import data_dir
    from mtml.tasks.synthetic import SyntheticConfig, ensure_synthetic_default
    from mtml.tasks.tiles import TileDataset

    torch.set_num_threads(1)
    gen = SyntheticConfig(**json.loads(args.gen))
    if args.lymph_amp != 1.0:  # a variant painter: the same random draws, fainter lymphocytes
        from mtml.tasks import synthetic

        blobs = synthetic._blobs

        def faint_lymphocytes(yx, centres, radii, amps):  # only lymphocytes are drawn darker than 1.05
            return blobs(yx, centres, radii, np.where(amps > 1.05, amps * args.lymph_amp, amps))
        synthetic._blobs = faint_lymphocytes
    if args.widths:
        models.TINY_WIDTHS["tiny_student"] = tuple(int(w) for w in args.widths.split(","))
    manifest = ensure_synthetic_default(data_dir() / "explore" / args.name, gen)
    params = {"MODE": "kd", "SEED": 0, "VERSION": "tiny", "N_STUDENTS": 2, "EPOCHS": 5, "BATCH_SIZE": 64,
              "TILE_SIZE": 64, "STAIN_JITTER": 0.3, "LR": 0.05, "TEMPERATURE": 4.0, "W_CE": 1.0, "W_KD": 1.0,
              "W_ML": 1.0, "DISTILL_WARMUP_EPOCHS": 0.0, "CLIP_GRAD_NORM": 5.0, **json.loads(args.params)}
    train, val = (TileDataset(manifest, s, size=params["TILE_SIZE"], cache=True) for s in ("train", "val"))
    for seed in args.seeds:
        for mode in args.modes:
            run_params = {**params, "MODE": mode, "SEED": seed}
            task = task_from_parameters("classification", run_params)
            mtml.seed_everything(seed)
            start = time.time()
            result = mtml.experiment.run_cohort(config_from_parameters(run_params, "classification"), task,
                                                train, val, augment=task.augment, progress=False)
            last = result.history.iloc[-1]
            row = {"name": args.name, "gen": json.loads(args.gen), "widths": models.TINY_WIDTHS["tiny_student"],
                   "params": json.loads(args.params), "lymph_amp": args.lymph_amp, "mode": mode, "seed": seed,
                   "train_tiles": len(train),
                   "val_tiles": len(val), "val_auroc": {n: round(float(last[f"val/{n}/auroc"]), 4)
                                                        for n in [*result.cohort.networks, "ensemble"]},
                   "s": round(time.time() - start), "commit": current_commit()}
            with OUT.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
