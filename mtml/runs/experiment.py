"""One cohort run end to end (build, train, evaluate), shared by notebooks and scripts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from .report import run_record
from ..io import run_store
from .spec import RunSpec, differences, spec_of
from ..core.cohort import Cohort, CohortConfig, cuda_mode, deterministic_cuda
from ..core.loop import Callback, fit, pretrain_teacher, solo_config
from .checkpoint import Checkpoint
from .teacher_tape import TeacherTape


@dataclass
class RunResult:
    cohort: Cohort
    history: pd.DataFrame
    metrics: pd.DataFrame  # index: teacher, student_1..N, ensemble
    spec: RunSpec
    units: pd.DataFrame    # per test unit (tile or frame) predictions, for bootstrap intervals
    external: dict = field(default_factory=dict)  # record keys of the external sets (mtml.external)
    teacher_replayed: bool = False  # its teacher came from a tape (mtml.teacher_tape): not in its time
    scalars: tuple = ()             # the task's own metric names, recorded beside SCALAR_METRICS
    run_fields: dict = field(default_factory=dict)  # how it ran, where that can differ (cuda_deterministic)

    def record(self, **fields) -> dict:
        """The run record for metrics.json: its spec hash, every setting of its spec, metrics (and
        the external sets' metrics)."""
        return run_record(self.metrics, self.scalars, **{"spec_hash": self.spec.hash, **self.spec.flat(),
                                           "teacher_replayed": self.teacher_replayed, **self.run_fields, **fields,
                                           **self.external})

    def save(self, out_dir, **fields) -> dict:
        """Writes `metrics.json` (the record) and `test_units.csv.gz` into `out_dir`."""
        from ..io import write_csv, write_json

        record = self.record(**fields)
        write_csv(Path(out_dir) / UNITS_FILE, self.units, index=False, compression="gzip")
        write_json(Path(out_dir) / "metrics.json", record)
        return record


UNITS_FILE = "test_units.csv.gz"


class EachEpoch(Callback):
    """A fit callback calling `function(history so far)` after each epoch."""

    def __init__(self, function):
        self.function = function

    def on_epoch_end(self, cohort, state) -> None:
        self.function(pd.DataFrame(state.history))


@dataclass(frozen=True)
class RunStore:
    """Where runs keep their checkpoints, one folder per run identity (`<folder>/<spec hash>`), and
    where online teachers are taped (`mtml.runs.teacher_tape`). Notebooks writing beside each other
    share one (`RunStore.beside(out_dir)`), so a run one of them finished is reloaded by the next.
    `resume=False` trains again over what is there; `tape=False` records no teacher (a tape holds
    the teacher's outputs for every step, up to `mtml.runs.teacher_tape.MAX_TAPE_BYTES`)."""
    folder: Path
    resume: bool = True
    tape: bool = True

    @classmethod
    def beside(cls, out_dir, resume: bool = True) -> "RunStore":
        return cls(run_store(out_dir), resume)

    def checkpoints(self, spec: RunSpec) -> Path:
        return Path(self.folder) / spec.hash


@dataclass
class RunOptions:
    """How a run is carried out. `augment` is part of what it computes: pass the task's own
    (`task.augment`), which the run identity assumes; None trains without augmentation."""
    device: str = "cpu"
    augment: Callable | None = None
    progress: bool = True
    callback: Callback | Callable | None = None  # a fit Callback, or a function of the history after each epoch
    external: dict | None = None  # sets of `mtml.external.load_sets`, evaluated too (never trained on)
    deterministic: bool = True  # on CUDA, deterministic kernels (`deterministic_cuda`): seeds stay paired


def run_cohort(cfg: CohortConfig, task, train, val, test=None, *, spec: RunSpec | None = None,
               store: RunStore | None = None, options: RunOptions | None = None) -> RunResult:
    """Trains a cohort in `cfg.mode` (pre-training the teacher first for `offline`), then
    evaluates every network and the student ensemble on `test` (or `val`). `spec` is the run's
    identity (default: the config, the task's settings and the training set's size). With a
    `store`, the run is checkpointed there under its spec hash (and resumed or reloaded), and an
    online teacher is recorded there, or replayed when a run with the same teacher recorded it
    (trained once per seed, same results; the record's `teacher_replayed` says which, since it
    shortens train_time_s)."""
    options = options or RunOptions()
    with deterministic_cuda(torch.device(options.device).type == "cuda" and options.deterministic):
        return _run_cohort(cfg, task, train, val, test, spec, store, options)


def _run_cohort(cfg: CohortConfig, task, train, val, test, spec: RunSpec | None, store: RunStore | None,
                options: RunOptions) -> RunResult:
    cfg.validate()
    networks = task.networks
    spec = spec if spec is not None else spec_of(cfg, task, {"train_items": len(train)})
    _check_run(cfg, task, spec, options)
    checkpoint_dir = store.checkpoints(spec) if store is not None else None
    teacher = None
    if cfg.mode == "offline":
        solo = [Checkpoint(checkpoint_dir / "teacher", spec_of(solo_config(cfg), task, {**spec.data, "role": "offline teacher"}),
                           store.resume)] if store is not None else []
        teacher = pretrain_teacher(task, train, cfg, options.device, networks=networks, augment=options.augment,
                                   progress=options.progress, callbacks=solo)
    cohort = Cohort.build(cfg, options.device, teacher=teacher, networks=networks, task=task)
    tape = TeacherTape(store.folder, spec, store.resume) if store is not None and store.tape else None
    callback = options.callback
    if callback is not None and not isinstance(callback, Callback):  # a function of the history so far
        callback = EachEpoch(callback)
    checkpoint = Checkpoint(checkpoint_dir, spec, store.resume) if store is not None else None
    callbacks = [cb for cb in (checkpoint, tape, callback) if cb is not None]
    history = fit(cohort, task, train, val, augment=options.augment, progress=options.progress, callbacks=callbacks)
    eval_data = test if test is not None else val
    metrics, *predictions = task.evaluate(cohort.networks, eval_data, return_predictions=True)
    result = RunResult(cohort, history, metrics, spec, task.test_units(*predictions, data=eval_data),
                       teacher_replayed=tape is not None and tape.replayed,
                       scalars=tuple(dict.fromkeys((*task.history_metrics, getattr(task, "metric", task.history_metrics[0])))))
    mode = checkpoint.cuda_mode if checkpoint is not None else cuda_mode(options.device)  # as it trained
    if mode is not None:  # the CPU has one mode only
        result.run_fields["cuda_deterministic"] = mode
    if options.external:
        from .external import external_record

        result.external = external_record(task, cohort.networks, options.external)
    return result


def _check_run(cfg: CohortConfig, task, spec: RunSpec, options: RunOptions) -> None:
    """ValueError before training when the spec is not this run's, the augmentation is not the
    one the task's identity promises, or an external set is the run's own data."""
    actual = spec_of(cfg, task)
    if spec.task != task.name or (spec.config, spec.task_settings) != (actual.config, actual.task_settings):
        diff = differences({"config": spec.config, "task": spec.task_settings},
                           {"config": actual.config, "task": actual.task_settings})
        raise ValueError(f"the spec ({spec.task}) is not this run's ({task.name}; spec vs run: {diff or 'task'}); "
                         "build both from the same parameters")
    if getattr(task, "stain_jitter", 0) and options.augment != task.augment:
        raise ValueError(f"the task's stain_jitter {task.stain_jitter} is part of this run's identity, but another "
                         "augmentation was passed: pass RunOptions(augment=task.augment)")
    for name, (_, info) in (options.external or {}).items():
        if info["manifest_sha256"] == spec.data.get("manifest_sha256"):
            raise ValueError(f"external set {name} holds the run's own data: an external set must be other data")


def train_run(knobs: dict, task_name: str, train, val, test=None, *, out_dir, callback=None,
              progress: bool = True) -> RunResult:
    """A notebook's run in one call, from its UPPER_CASE knobs (`knobs`): the config, the task
    and the run's identity are built from them; checkpoints go to the run store beside `out_dir`,
    so a finished run is reloaded (RESUME = False trains it again); an online teacher is recorded
    there or replayed (`mtml.teacher_tape`); the EXTERNAL_DATA_DIRS sets are evaluated too."""
    import torch

    from .external import load_sets
    from .parameters import config_from_parameters, spec_from_parameters, task_from_parameters

    task, spec = task_from_parameters(task_name, knobs), spec_from_parameters(task_name, knobs)
    external = load_sets(task, knobs.get("EXTERNAL_DATA_DIRS"), knobs.get("TILE_SIZE", 224))
    device = knobs.get("DEVICE", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    result = run_cohort(config_from_parameters(knobs, task_name), task, train, val, test, spec=spec,
                        store=RunStore.beside(out_dir, resume=knobs.get("RESUME", True)),
                        options=RunOptions(device=device, augment=task.augment, progress=progress,
                                           callback=callback, external=external))
    if progress and result.teacher_replayed:
        print("The teacher was replayed from the run store, not trained again: a run with the same teacher "
              "recorded it there (mtml.teacher_tape); the results are those of training it.")
    return result


def independent_baseline(knobs: dict, task_name: str, train, val, test=None, *, out_dir) -> RunResult:
    """The baseline of a notebook's run: the same students, seed, data and settings in mode
    `independent` (no teacher, no peers), kept in the run store beside `out_dir`, so the
    notebooks sharing it train it once and load it after that (RESUME = False trains it again)."""
    base = {**knobs, "MODE": "independent", "EXTERNAL_DATA_DIRS": []}
    for key in ("TEACHER_KNOWLEDGE", "PEER_KNOWLEDGE"):  # independent students have neither
        if key in base:
            base[key] = "auto"
    return train_run(base, task_name, train, val, test, out_dir=out_dir, progress=False)
