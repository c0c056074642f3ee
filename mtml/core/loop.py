"""The fit loop: epochs of `cohort_step` over a dataset, per-epoch validation, checkpoints that
resume exactly, and the teacher tape; `pretrain_teacher` for the offline baseline."""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..io import load_checkpoint, save_checkpoint
from ..runs.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, check_checkpoint, check_finite_weights, rng_state,
                               set_rng_state)
from ..runs.spec import RunSpec, spec_of
from ..tasks.models import build_cohort_networks
from ..tasks.task import check_networks
from .cohort import AUTO, Cohort, CohortConfig, augmentation_generator, build_teacher, seed_everything
from .features import uses
from .sampling import epoch_order, shard_order
from .step import cohort_step


def fit(cohort: Cohort, task, train_data, val_data=None, *, augment=None, checkpoint_dir=None,
        resume: bool = False, checkpoint_every: int | None = None, progress: bool = True,
        callback=None, eval_batch_size: int = 128, shard: tuple[int, int] | None = None,
        spec: RunSpec | None = None, tape_dir=None) -> pd.DataFrame:
    """Trains the cohort for `cfg.epochs` epochs; returns the per-epoch history.

    The sample order of an epoch depends only on (seed, epoch) and augmentation draws from the
    global RNG, which checkpoints carry, so a resumed run repeats an uninterrupted one exactly.
    Checkpoints go to `checkpoint_dir/checkpoint.pt` at each epoch end and every
    `checkpoint_every` steps. `callback(history)` runs after each epoch (live plots).
    `shard=(rank, world)`: this process trains on its slice of every global batch and only rank 0
    writes checkpoints (used by `mtml.distributed`, which also syncs the networks).
    `spec` is the run's identity (`mtml.spec`); a checkpoint resumes only under the same spec
    hash. Without it the spec is the config, the task's settings and the training set's size.
    `augment(batch, generator=g)` draws only from `g`, a function of (seed, step).
    `tape_dir` (the run store): an online teacher is recorded there, or, with `resume`, replayed
    from a run that trained the same teacher (`mtml.teacher_tape`; the results are the same).
    """
    from tqdm.auto import tqdm

    cfg = cohort.cfg
    check_networks(task, cohort.networks)
    n = len(train_data)
    spec = spec if spec is not None else spec_of(cfg, task, {"train_items": n})
    if n == 0:
        raise ValueError("the training dataset is empty: check the data folder or manifest")
    if val_data is not None and len(val_data) == 0:
        raise ValueError("the validation dataset is empty: pass val_data=None or check its split")
    drop_last = n > cfg.batch_size  # BatchNorm needs > 1 sample per batch
    steps_per_epoch = n // cfg.batch_size if drop_last else 1
    cohort.steps_per_epoch = steps_per_epoch
    if cohort.scheduler is None:
        cohort.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            cohort.optimizer, T_max=cfg.epochs * steps_per_epoch)
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    epoch, skip, history, sums, state = 0, 0, [], {}, None
    if resume and ckpt is not None and ckpt.exists():
        state = load_checkpoint(ckpt)
        check_checkpoint(state, spec, ckpt)
        cohort.load_state_dict(state["cohort"])
        set_rng_state(state["rng"])
        epoch, skip, history = state["epoch"], state["step_in_epoch"], state["history"]
        sums = {k: v for k, v in state["sums"].items()}
    tape = _teacher_tape(cohort, task, tape_dir, spec, state, ckpt, resume, shard, steps=cfg.epochs * steps_per_epoch,
                         epochs=cfg.epochs, eval_batch_size=eval_batch_size,
                         val_items=len(val_data) if val_data is not None else 0)
    replaying = tape is not None and tape.replaying

    def save(epoch_, step_in_epoch, sums_):
        if ckpt is None or (shard is not None and shard[0] != 0):
            return
        check_finite_weights(cohort, epoch_ * steps_per_epoch + step_in_epoch - 1)
        save_checkpoint(ckpt, {"format": CHECKPOINT_FORMAT, "spec": spec.as_dict(), "spec_hash": spec.hash,
                               "config": asdict(cfg), "cohort": cohort.state_dict(), "rng": rng_state(),
                               "epoch": epoch_, "step_in_epoch": step_in_epoch,
                               "history": history, "sums": sums_, "teacher_tape": tape.id if replaying else None})

    while epoch < cfg.epochs:
        start = time.perf_counter()
        order = epoch_order(n, cfg.seed, epoch)[skip * cfg.batch_size:]
        batch_size = cfg.batch_size
        if shard is not None:
            order, batch_size = shard_order(order, cfg.batch_size, *shard)
        loader = DataLoader(train_data, batch_size=batch_size, sampler=order,
                            collate_fn=task.collate, num_workers=cfg.num_workers,
                            drop_last=drop_last, generator=torch.Generator().manual_seed(cfg.seed),
                            persistent_workers=False)
        cohort.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs} [{cfg.mode}]",
                   disable=not progress, leave=False)
        for step_in_epoch, batch in enumerate(bar, start=skip):
            batch = task.to_device(batch, cohort.device)
            global_step = epoch * steps_per_epoch + step_in_epoch
            if augment is not None:
                batch = augment(batch, generator=augmentation_generator(cfg.seed, global_step))
            terms = cohort_step(cohort, batch, task, step=global_step, teacher_tape=tape)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            sums["_steps"] = sums.get("_steps", 0) + 1
            bar.set_postfix({k: f"{float(v):.3f}" for k, v in terms.items() if k.endswith(("/loss", "teacher/sup"))})
            if checkpoint_every and (global_step + 1) % checkpoint_every == 0:
                save(epoch, step_in_epoch + 1, sums)
        steps = max(sums.pop("_steps", 1), 1)
        row = {"epoch": epoch + 1, "lr": cohort.optimizer.param_groups[0]["lr"],
               **{f"train/{k}": v / steps for k, v in sums.items()}}
        if val_data is not None:  # a replayed teacher's metrics come from its tape
            evaluated = {k: m for k, m in cohort.networks.items() if not (replaying and k == "teacher")}
            metrics = task.evaluate(evaluated, val_data, batch_size=eval_batch_size, metrics=task.history_metrics)
            for net, values in metrics.iterrows():
                for m in task.history_metrics:
                    row[f"val/{net}/{m}"] = float(values[m])
        if tape is not None:
            row = tape.epoch_end(row, epoch)
        if replaying and epoch + 1 == cfg.epochs:
            cohort.teacher.load_state_dict(tape.teacher)  # the recorded teacher's final weights
        row["time_s"] = time.perf_counter() - start
        history.append(row)
        epoch, skip, sums = epoch + 1, 0, {}
        save(epoch, 0, sums)
        if callback is not None:
            callback(pd.DataFrame(history))
    if tape is not None and not replaying:
        tape.save(cohort.teacher)
    history = pd.DataFrame(history)
    history.attrs["teacher_replayed"] = replaying or bool(state and state.get("teacher_tape"))
    return history


def _teacher_tape(cohort: Cohort, task, tape_dir, spec: RunSpec, state: dict | None, ckpt, resume: bool,
                  shard, **run):
    """The run's teacher tape (`mtml.teacher_tape`): with `resume`, a replay of a tape recorded for
    this teacher; else a recorder of the teacher trained from its first step; None without an
    online teacher, in a sharded run, in a finished run, or in a resumed run whose teacher trained so far.
    A resumed run that replayed goes on only with the same tape."""
    replayed = state is not None and state.get("teacher_tape")
    if state is not None and state["epoch"] >= cohort.cfg.epochs:
        return None  # finished: its checkpoint holds the teacher's final weights
    if replayed and (tape_dir is None or shard is not None):
        raise ValueError(f"{ckpt} replays a teacher tape: resume it with its tape_dir (the run store) and unsharded, "
                         f"or delete {Path(ckpt).parent} to train the run again")
    if tape_dir is None or cohort.teacher is None or cohort.frozen_teacher or shard is not None:
        return None
    if not set(spec.data) - {"train_items"}:
        return None  # the data is known by its size only: a tape could be another dataset's
    from ..runs.teacher_tape import TapeRecorder, read_tape, tape_key, tape_path, teacher_meta

    path, key, meta = tape_path(tape_dir, spec, task), tape_key(spec, task), teacher_meta(cohort.teacher, cohort.device, **run)
    if state is not None:  # resumed: go on as the checkpoint began
        if not replayed:
            return None
        replay, why = read_tape(path, key, meta)
        if replay is None or replay.id != replayed:
            raise ValueError(f"{ckpt} replays the teacher tape {path}, which is gone or changed "
                             f"({why or 'recorded again since'}): delete {Path(ckpt).parent} to train the run again")
        return replay
    recorder = TapeRecorder(path, key, meta, getattr(task, "distill_target", None))  # notes the file as it is now
    replay = read_tape(path, key, meta)[0] if resume else None  # resume=False retrains: records afresh
    if replay is None:
        return recorder
    needs_maps = any(uses(k, "features") for k in cohort.cfg.knowledge()[0])  # a tape holds no feature maps
    return None if needs_maps else replay  # with maps the teacher trains, and its tape is kept for others


def pretrain_teacher(task, train_data, cfg: CohortConfig, device="cpu",
                     networks=build_cohort_networks, data: dict | None = None, **fit_kw) -> nn.Module:
    """Trains the version's teacher alone on its supervised loss, for the `offline` baseline.
    It starts from the same weights as the online teacher of kd and kd_ml. `data` (the run
    spec's data fingerprint) makes its checkpoint resume only on the same data."""
    solo = replace(cfg, mode="independent", n_students=1, teacher_knowledge=AUTO, peer_knowledge=AUTO)
    teacher = build_teacher(cfg, networks)
    seed_everything(cfg.seed)
    cohort = Cohort(solo, None, [teacher], device)
    spec = spec_of(solo, task, {**data, "role": "offline teacher"}) if data is not None else None
    fit(cohort, task, train_data, spec=spec, **fit_kw)
    return teacher.eval()
