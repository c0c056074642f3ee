"""Ablation of the detection distillation on real Kvasir-SEG VALIDATION frames (never the test split).

It uses the frame-by-frame split (`SPLIT_BY = "frame"`, kept so these runs keep their hashes); the
studies split by near-duplicate groups, and 6 of their 99 test frames are validation frames here
(`python studies/check_results.py overlap`).

    python studies/ablate_detection_distillation.py [--workers 2] [--seeds 0 1 2]   # run (resumable)
    python studies/ablate_detection_distillation.py --report                        # tables only

Budget of the notebooks' default run until 2026-12-04 (tiny detectors, 400 training frames, 8 epochs, 160 px,
batch 8, lr 0.01); metric: mAP@0.5 of the student ensemble on the 100 validation frames. One factor
at a time around a base (foreground weighting, no warm-up, tau = 4, every term on), for kd, ml and
kd_ml, paired by seed, plus the independent baseline. Every finished run is appended to
`docs/results/ablation_detection_distillation/runs.csv` with its spec hash: that CSV is the resume
state (a run whose hash is in it is never re-run). RESULTS.md is generated from it.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "ablation_detection_distillation"
BASE = {"EPOCHS": 8, "BATCH_SIZE": 8, "LR": 0.01, "FRAME_SIZE": 160, "TRAIN_FRAMES": 400, "EVAL_FRAMES": 100,
        "SPLIT_SEED": 0, "SPLIT_BY": "frame", "N_STUDENTS": 2, "VERSION": "tiny", "TEMPERATURE": 4.0, "W_CE": 1.0, "W_KD": 1.0,
        "W_ML": 1.0, "BOX_LOSS": "giou", "DISTILL_WEIGHTING": "foreground", "DISTILL_WARMUP_EPOCHS": 0.0,
        "W_DISTILL_CLS": 1.0, "W_DISTILL_BOX": 1.0, "W_DISTILL_CTR": 1.0, "DATA_DIR": None}
VARIANTS = {  # name -> changes to BASE, in the order they run (most informative first)
    "base": {},
    "old weighting": {"DISTILL_WEIGHTING": "confidence"},
    "warm-up 2 ep": {"DISTILL_WARMUP_EPOCHS": 2.0},
    "tau 2": {"TEMPERATURE": 2.0},
    "no boxes": {"W_DISTILL_BOX": 0.0},
    "no class maps": {"W_DISTILL_CLS": 0.0},
    "no centerness": {"W_DISTILL_CTR": 0.0},
    "tau 1": {"TEMPERATURE": 1.0},
    "warm-up 4 ep": {"DISTILL_WARMUP_EPOCHS": 4.0},
}
MODES = ("kd", "ml", "kd_ml")


def planned(seeds) -> list[tuple[str, dict]]:
    runs = [("independent", {**BASE, "MODE": "independent", "SEED": s}) for s in seeds]
    for name, change in VARIANTS.items():
        for seed in seeds:
            runs += [(name, {**BASE, **change, "MODE": mode, "SEED": seed}) for mode in MODES]
    return runs


def done_hashes() -> set:
    csv = OUT / "runs.csv"
    return set(pd.read_csv(csv)["spec_hash"]) if csv.is_file() else set()


def append(row: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        csv = OUT / "runs.csv"
        table = pd.concat([pd.read_csv(csv), pd.DataFrame([row])]) if csv.is_file() else pd.DataFrame([row])
        tmp = csv.with_suffix(".tmp")
        table.to_csv(tmp, index=False)
        os.replace(tmp, csv)


def run_one(variant: str, params: dict) -> dict:
    import torch

    from mtml.runs.experiment import RunOptions, run_cohort
    from mtml.runs.parameters import config_from_parameters, spec_from_parameters, task_from_parameters
    from mtml.tasks.polyp import default_polyp_root, flip_augment, load_polyp_dataset
    from mtml.runs.study import current_commit, machine_label

    torch.set_num_threads(1)
    root, label = default_polyp_root()
    if root is None:
        sys.exit("real Kvasir-SEG frames are needed: python data_scripts/polyp.py kvasir")
    size = params["FRAME_SIZE"]
    split = {"seed": params["SPLIT_SEED"], "split_by": params["SPLIT_BY"]}  # it ran on the random frame split
    train = load_polyp_dataset(root, "train", size, limit=params["TRAIN_FRAMES"], **split)
    val = load_polyp_dataset(root, "val", size, limit=params["EVAL_FRAMES"], **split)
    spec = spec_from_parameters("detection", params)
    start = time.perf_counter()
    result = run_cohort(config_from_parameters(params, "detection"), task_from_parameters("detection", params), train, val,
                        None, spec=spec,  # test=None: evaluated on the validation frames
                        options=RunOptions(augment=flip_augment, progress=False))
    record = result.record(variant=variant, data=label, split_evaluated="val",
                           train_time_s=round(time.perf_counter() - start, 1), commit=current_commit(),
                           machine=machine_label(1))
    return {k: v for k, v in record.items() if not k.startswith(("data.", "task.wbf"))}


def _provenance(table: pd.DataFrame) -> str:
    """Commits and machines of the runs (rows before 2026-11-29 did not record them)."""
    said = []
    for column in ("commit", "machine"):
        known = table[column].dropna().astype(str) if column in table else pd.Series(dtype=str)
        unknown = len(table) - len(known)
        said.append(f"{column}: {', '.join(sorted(set(known))) or '-'}"
                    + (f" ({unknown} run(s) not recorded)" if unknown else ""))
    return "; ".join(said)


def report(seeds) -> Path:
    from mtml.runs.report import mean_ci

    table = pd.read_csv(OUT / "runs.csv")
    base = table[table["variant"] == "base"].set_index(["mode", "seed"])["ensemble/map50"]
    lines = ["# Ablation: detection distillation on Kvasir-SEG validation frames", "",
             "Generated by `python studies/ablate_detection_distillation.py --report`; do not edit.",
             f"Tiny detectors, {BASE['TRAIN_FRAMES']} training frames, {BASE['EPOCHS']} epochs, "
             f"{BASE['FRAME_SIZE']} px, batch {BASE['BATCH_SIZE']}, lr {BASE['LR']}; metric: mAP@0.5 of the "
             f"student ensemble on {BASE['EVAL_FRAMES']} VALIDATION frames of the {BASE['SPLIT_BY']} split (its test "
             "split is never loaded; the studies split by near-duplicate groups, and some of their test frames are "
             "validation frames here: docs/results/checks/overlap.md). "
             "Base: foreground weighting, no warm-up, tau 4, every term on. Intervals: Student-t 95% over "
             "seeds (half-width); paired differences by seed.", "",
             f"Runs: {len(table)}; seeds per cell: up to {len(seeds)}; {_provenance(table)}; total training "
             f"time {table['train_time_s'].sum() / 60:.0f} min.", "",
             "| variant | mode | seeds | ensemble mAP@0.5 | students' mean | ensemble - base (paired) |",
             "|---|---|---|---|---|---|"]
    for (variant, mode), g in table.groupby(["variant", "mode"], sort=False):
        m, h, n = mean_ci(g["ensemble/map50"])
        sm, sh, _ = mean_ci(g["students_mean/map50"])
        diff = "-"
        if variant != "base" and mode in MODES:
            d = (g.set_index(["mode", "seed"])["ensemble/map50"] - base).dropna()
            dm, dh, dn = mean_ci(d)
            diff = f"{dm:+.3f} ± {dh:.3f} (n={dn})"
        lines.append(f"| {variant} | {mode} | {n} | {m:.3f} ± {h:.3f} | {sm:.3f} ± {sh:.3f} | {diff} |")
    indep = table[table["variant"] == "independent"].set_index("seed")["ensemble/map50"]
    lines += ["", "Each mode against independent training (same seed), ensemble mAP@0.5:", "",
              "| variant | mode | mode - independent (paired) |", "|---|---|---|"]
    for (variant, mode), g in table[table["mode"].isin(MODES)].groupby(["variant", "mode"], sort=False):
        d = (g.set_index("seed")["ensemble/map50"] - indep).dropna()
        dm, dh, dn = mean_ci(d)
        lines.append(f"| {variant} | {mode} | {dm:+.3f} ± {dh:.3f} (n={dn}) |")
    lines += ["", "The paper's comparison within each variant (same seed), ensemble mAP@0.5:", "",
              "| variant | kd_ml - kd | kd_ml - ml |", "|---|---|---|"]
    for variant, g in table[table["mode"].isin(MODES)].groupby("variant", sort=False):
        wide = g.pivot(index="seed", columns="mode", values="ensemble/map50")
        cells = []
        for other in ("kd", "ml"):
            if {"kd_ml", other} <= set(wide):
                dm, dh, dn = mean_ci((wide["kd_ml"] - wide[other]).dropna())
                cells.append(f"{dm:+.3f} ± {dh:.3f} (n={dn})")
            else:
                cells.append("-")
        lines.append(f"| {variant} | {cells[0]} | {cells[1]} |")
    from mtml.runs.study import current_commit

    lines += ["", f"Code: commit {current_commit()} (at report time)."]
    (OUT / "RESULTS.md").write_text("\n".join(lines) + "\n")
    return OUT / "RESULTS.md"


def main(argv=None) -> int:
    from mtml.cli import Parser

    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.seeds))
        return 0
    if args.worker is None and args.workers > 1:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(k), "--workers", str(args.workers),
                                   "--seeds", *map(str, args.seeds)]) for k in range(args.workers)]
        codes = [proc.wait() for proc in procs]
        report(args.seeds)
        return max(codes)
    from mtml.runs.parameters import spec_from_parameters

    worker = args.worker or 0
    runs = planned(args.seeds)
    for i, (variant, params) in enumerate(runs):
        if i % args.workers != worker:
            continue
        spec_hash = spec_from_parameters("detection", params).hash
        if spec_hash in done_hashes():
            continue
        row = run_one(variant, params)
        append(row)
        print(f"[{worker}] {i + 1}/{len(runs)} {variant:14s} {params['MODE']:11s} seed {params['SEED']}: "
              f"ensemble {row['ensemble/map50']:.3f} ({row['train_time_s']:.0f} s)", flush=True)
    if args.worker is None:
        report(args.seeds)
    return 0


if __name__ == "__main__":
    from mtml.cli import run_main

    sys.exit(run_main(main))
