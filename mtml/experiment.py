"""One cohort run end to end (build, train, evaluate), shared by notebooks and scripts."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from .models import build_cohort_networks
from .report import run_record
from .train import Cohort, CohortConfig, fit, pretrain_teacher


@dataclass
class RunResult:
    cohort: Cohort
    history: pd.DataFrame
    metrics: pd.DataFrame  # index: teacher, student_1..N, ensemble

    def record(self, **fields) -> dict:
        cfg = self.cohort.cfg
        return run_record(self.metrics, mode=cfg.mode, version=cfg.version, seed=cfg.seed,
                          n_students=cfg.n_students, temperature=cfg.temperature, w_ce=cfg.w_ce,
                          w_kd=cfg.w_kd, w_ml=cfg.w_ml, epochs=cfg.epochs, **fields)


def run_cohort(cfg: CohortConfig, task, train, val, test=None, *, device="cpu", augment=None,
               checkpoint_dir=None, resume: bool = False, progress: bool = True, callback=None,
               networks=build_cohort_networks) -> RunResult:
    """Trains a cohort in `cfg.mode` (pre-training the teacher first for `offline`), then
    evaluates every network and the student ensemble on `test` (or `val`)."""
    cfg.validate()
    fit_kw = dict(augment=augment, resume=resume, progress=progress)
    teacher = None
    if cfg.mode == "offline":
        teacher_dir = Path(checkpoint_dir) / "teacher" if checkpoint_dir else None
        teacher = pretrain_teacher(task, train, cfg, device, networks=networks,
                                   checkpoint_dir=teacher_dir, **fit_kw)
    cohort = Cohort.build(cfg, device, teacher=teacher, networks=networks)
    history = fit(cohort, task, train, val, checkpoint_dir=checkpoint_dir, callback=callback,
                  **fit_kw)
    metrics = task.evaluate(cohort.networks, test if test is not None else val)
    return RunResult(cohort, history, metrics)


def run_key(cfg: CohortConfig, **data) -> str:
    """A folder name for one run's checkpoints: mode, version, seed and a hash of every setting
    (plus `data`, e.g. tile size and manifest), so a changed parameter never resumes an old run."""
    blob = json.dumps({**asdict(cfg), **data}, sort_keys=True, default=str)
    return f"{cfg.mode}-{cfg.version}-seed{cfg.seed}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"
