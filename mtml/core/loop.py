"""The fit loop: epochs of `cohort_step` over a dataset and a validation pass after each epoch.

Everything else is a `Callback` passed in: checkpoints that resume exactly
(`mtml.runs.checkpoint.Checkpoint`), the teacher tape (`mtml.runs.teacher_tape.TeacherTape`),
live curves (`mtml.plots.LiveCurves`), DDP's gradient averaging (`mtml.runs.distributed`).
The sample order of an epoch depends only on (seed, epoch), and augmentation draws from a
generator of (seed, global step), so a run resumed from a checkpoint repeats an uninterrupted one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from .cohort import AUTO, Cohort, CohortConfig, augmentation_generator, build_teacher, check_networks, seed_everything
from .sampling import epoch_order, shard_order
from .step import cohort_step, distill_ramp


@dataclass
class LoopState:
    """Where the loop stands; a checkpoint saves it and a resumed run starts from it."""
    steps_per_epoch: int
    epoch: int = 0                # epochs finished
    step_in_epoch: int = 0        # steps of the current epoch finished
    history: list = field(default_factory=list)  # one row per finished epoch
    sums: dict = field(default_factory=dict)     # this epoch's loss terms summed so far ("_steps": count)
    resumed: bool = False         # started from a checkpoint
    checkpoint: str | None = None  # where the run's checkpoint lives (for messages)
    teacher_source: str | None = None  # id of what stands in for the teacher's steps (a tape), kept on resume
    supplied: set = field(default_factory=set)   # networks whose validation metrics a callback supplies

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step_in_epoch


@dataclass(frozen=True)
class FitRun:
    """What a callback may need to know of the run it joins."""
    task: object
    train_items: int
    val_items: int
    eval_batch_size: int
    shard: tuple[int, int] | None


class Callback:
    """Hooks of `fit`, each optional. `fit` calls callbacks in `order` (then as given): a checkpoint
    (0) restores the run before the teacher tape (1) decides what to do, and saves each epoch
    before the others (10) see it. `teacher_step`, when set, stands in for the online teacher's
    training step (see `cohort_step`); at most one callback sets it."""
    order = 10
    teacher_step = None

    def on_fit_start(self, cohort: Cohort, state: LoopState, run: FitRun) -> None: ...
    def before_update(self, cohort: Cohort) -> None: ...  # between backward and the optimiser step
    def on_step_end(self, cohort: Cohort, state: LoopState) -> None: ...
    def on_validation_end(self, cohort: Cohort, state: LoopState, row: dict) -> dict:
        return row  # the epoch's history row, before time_s is added

    def on_epoch_end(self, cohort: Cohort, state: LoopState) -> None: ...  # the row is in state.history
    def on_fit_end(self, cohort: Cohort, state: LoopState) -> None: ...


def fit(cohort: Cohort, task, train_data, val_data=None, *, augment=None, callbacks=(), progress: bool = True,
        shard: tuple[int, int] | None = None) -> pd.DataFrame:
    """Trains the cohort for `cfg.epochs` epochs; returns the per-epoch history (mean training loss
    terms, validation metrics of every network and the ensemble, seconds). `callbacks`: see
    `Callback`. `augment(batch, generator=g)` must draw only from `g`. `shard=(rank, world)`: this
    process trains on its slice of every global batch (`mtml.runs.distributed`)."""
    cfg = cohort.cfg
    callbacks = sorted(callbacks, key=lambda cb: cb.order)
    _check_data(cohort, task, train_data, val_data)
    drop_last = len(train_data) > cfg.batch_size  # BatchNorm needs > 1 sample per batch
    state = LoopState(steps_per_epoch=len(train_data) // cfg.batch_size if drop_last else 1)
    if cohort.scheduler is None:
        cohort.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            cohort.optimizer, T_max=cfg.epochs * state.steps_per_epoch)
    run = FitRun(task, len(train_data), len(val_data) if val_data is not None else 0, cfg.eval_batch_size, shard)
    for cb in callbacks:
        cb.on_fit_start(cohort, state, run)
    teacher_step = _teacher_step(callbacks, state, cfg)
    while state.epoch < cfg.epochs:
        start = time.perf_counter()
        cohort.train()
        for batch in _batches(train_data, task, cfg, state, drop_last, shard, progress):
            batch = task.to_device(batch, cohort.device)
            if augment is not None:
                batch = augment(batch, generator=augmentation_generator(cfg.seed, state.global_step))
            terms = cohort_step(cohort, batch, task, state.global_step, teacher_step=teacher_step,
                                distill_scale=distill_ramp(state.global_step / state.steps_per_epoch,
                                                           cfg.distill_warmup_epochs),
                                before_update=lambda: [cb.before_update(cohort) for cb in callbacks])
            for k, v in _host_values(terms).items():
                state.sums[k] = state.sums.get(k, 0.0) + v
            state.sums["_steps"] = state.sums.get("_steps", 0) + 1
            state.step_in_epoch += 1
            for cb in callbacks:
                cb.on_step_end(cohort, state)
        row = _epoch_row(cohort, task, state, val_data, cfg.eval_batch_size)
        for cb in callbacks:
            row = cb.on_validation_end(cohort, state, row)
        row["time_s"] = time.perf_counter() - start
        state.history.append(row)
        state.epoch, state.step_in_epoch, state.sums = state.epoch + 1, 0, {}
        for cb in callbacks:
            cb.on_epoch_end(cohort, state)
    for cb in callbacks:
        cb.on_fit_end(cohort, state)
    return pd.DataFrame(state.history)


def _host_values(terms: dict) -> dict:
    """{name: float} of a step's loss terms, one transfer per device they are on (a GPU's host waits
    at each transfer; most terms are on the cohort's device, a warm-up ramp or a replayed tape's on the CPU)."""
    out = {}
    for device in {v.device for v in terms.values()}:
        names = [k for k, v in terms.items() if v.device == device]
        out.update(zip(names, torch.stack([terms[k].double().reshape(()) for k in names]).tolist()))
    return {k: out[k] for k in terms}


def _check_data(cohort: Cohort, task, train_data, val_data) -> None:
    check_networks(task, cohort.networks)
    if len(train_data) == 0:
        raise ValueError("the training dataset is empty: check the data folder or manifest")
    if val_data is not None and len(val_data) == 0:
        raise ValueError("the validation dataset is empty: pass val_data=None or check its split")


def _teacher_step(callbacks, state: LoopState, cfg: CohortConfig):
    """The one callback's stand-in for the teacher's steps, or None; a resumed run whose teacher
    came from one goes on only with it."""
    found = [cb.teacher_step for cb in callbacks if cb.teacher_step is not None]
    if len(found) > 1:
        raise ValueError("two callbacks stand in for the teacher's steps: pass at most one teacher tape")
    if state.teacher_source and not found and state.epoch < cfg.epochs:
        raise ValueError(f"{state.checkpoint} replays a teacher tape: resume it with its tape (the run store) and "
                         f"unsharded, or delete {state.checkpoint} to train the run again")
    return found[0] if found else None


def _batches(train_data, task, cfg: CohortConfig, state: LoopState, drop_last: bool, shard, progress: bool):
    """The rest of this epoch's batches: its seeded order from the current step on (this rank's
    slice of each global batch when sharded), with a progress bar."""
    from tqdm.auto import tqdm

    order = epoch_order(len(train_data), cfg.seed, state.epoch)[state.step_in_epoch * cfg.batch_size:]
    batch_size = cfg.batch_size
    if shard is not None:
        order, batch_size = shard_order(order, cfg.batch_size, *shard)
    loader = DataLoader(train_data, batch_size=batch_size, sampler=order, collate_fn=task.collate,
                        num_workers=cfg.num_workers, drop_last=drop_last,
                        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False)
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1}/{cfg.epochs} [{cfg.mode}]", disable=not progress, leave=False)
    for batch in bar:
        yield batch
        bar.set_postfix({k: f"{v / max(state.sums.get('_steps', 1), 1):.3f}"
                         for k, v in state.sums.items() if k.endswith(("/loss", "teacher/sup"))})


def _epoch_row(cohort: Cohort, task, state: LoopState, val_data, eval_batch_size: int) -> dict:
    """The epoch's history row: mean training terms, learning rate, validation metrics (of the
    networks whose metrics no callback supplies)."""
    sums = dict(state.sums)
    steps = max(sums.pop("_steps", 1), 1)
    row = {"epoch": state.epoch + 1, "lr": cohort.optimizer.param_groups[0]["lr"],
           **{f"train/{k}": v / steps for k, v in sums.items()}}
    if val_data is not None:
        evaluated = {k: m for k, m in cohort.networks.items() if k not in state.supplied}
        metrics = task.evaluate(evaluated, val_data, batch_size=eval_batch_size, metrics=task.history_metrics)
        for net, values in metrics.iterrows():
            for m in task.history_metrics:
                row[f"val/{net}/{m}"] = float(values[m])
    return row


def solo_config(cfg: CohortConfig) -> CohortConfig:
    """The config that trains `cfg`'s teacher alone (the offline baseline's pre-training)."""
    return replace(cfg, mode="independent", n_students=1, teacher_knowledge=AUTO, peer_knowledge=AUTO)


def pretrain_teacher(task, train_data, cfg: CohortConfig, device="cpu", networks=None, **fit_kw) -> nn.Module:
    """Trains the version's teacher alone on its supervised loss, for the `offline` baseline
    (`solo_config(cfg)`). It starts from the same weights as the online teacher of kd and kd_ml."""
    teacher = build_teacher(cfg, networks or task.networks)
    seed_everything(cfg.seed)
    fit(Cohort(solo_config(cfg), None, [teacher], device), task, train_data, **fit_kw)
    return teacher.eval()
