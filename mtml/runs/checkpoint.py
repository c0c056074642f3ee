"""Checkpoints of the fit loop (a `Callback`): the cohort, every global RNG and the loop's state
at each epoch end (and every N steps), so that a resumed run repeats an uninterrupted one exactly;
the weights are checked finite before a save, and a stored checkpoint against the run it resumes."""
from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..core.cohort import cuda_mode
from ..core.loop import Callback
from ..core.step import NonFiniteLossError
from ..io import load_checkpoint, save_checkpoint
from .spec import RunSpec, differences, spec_of


def rng_state() -> dict:
    """Every global RNG (torch CPU and CUDA, numpy, python), as plain data for weights_only loads."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(), "python": list(py_state[1]), "python_gauss": py_state[2],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "numpy_gauss": (int(np_state[3]), float(np_state[4])),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_gauss"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"],
                         *s["numpy_gauss"]))
    if s["cuda"] and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def check_finite_weights(cohort, step: int) -> None:
    """Called before each checkpoint, so that a checkpoint never holds NaN or infinite weights."""
    modules = {**cohort.networks, **{f"{name}/adapters": m for name, m in cohort.adapters.items()}}
    for name, m in modules.items():
        for value in m.state_dict().values():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise NonFiniteLossError(name, "weights", step, float(value[~torch.isfinite(value)][0]))


def check_checkpoint(state, spec: RunSpec, path: Path) -> None:
    """ValueError unless `state` is a checkpoint of this format for the run `spec` identifies."""
    hint = "use another checkpoint folder or resume=False"
    if not isinstance(state, dict) or not {"spec", "spec_hash", "cohort", "rng", "epoch"} <= set(state):
        raise ValueError(f"{path} is not an mtml fit checkpoint of this format (no spec, cohort, rng, "
                         f"epoch); {hint}")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {state.get('format')}, this mtml reads format "
                         f"{CHECKPOINT_FORMAT}; {hint}")
    if state["spec_hash"] != spec.hash:
        diff = differences(state["spec"], spec.as_dict())
        raise ValueError(f"{path} belongs to another run (spec {state['spec_hash']}, this run {spec.hash}; "
                         f"differences checkpoint vs now: {diff}); resuming would mix two runs; {hint}")


def check_cuda_mode(saved: bool | None, now: bool | None, path: Path) -> None:
    """ValueError when a checkpoint trained with deterministic CUDA kernels on (or off, or on
    another device: None is the CPU) and this run has them otherwise: one run, one mode."""
    if saved != now:
        def name(mode):
            return ("on the CPU (or before checkpoints recorded it)" if mode is None
                    else f"on a GPU with deterministic kernels {'on' if mode else 'off'}")

        raise ValueError(f"{path} trained {name(saved)}, this run trains {name(now)}; resuming would mix the two "
                         "in one run: run it as it began (RunOptions(device=..., deterministic=...)) or delete the checkpoint")


CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # bump when the checkpoint layout changes


class Checkpoint(Callback):
    """Writes `folder/checkpoint.pt` at each epoch end and every `every` steps (rank 0 only when
    sharded). With `resume`, a run starts from the checkpoint there, which must belong to the same
    run: `spec`, or, without one, the config, the task's settings and the training set's size."""

    order = 0  # restores before, and saves before, every other callback

    def __init__(self, folder, spec: RunSpec | None = None, resume: bool = False, every: int | None = None):
        self.path, self.given, self.resume, self.every = Path(folder) / CHECKPOINT_NAME, spec, resume, every
        self.spec, self.write = spec, True
        self.cuda_mode = None  # how the run trained: deterministic CUDA kernels on/off, None on the CPU

    def on_fit_start(self, cohort, state, run) -> None:
        self.spec = self.given if self.given is not None else spec_of(cohort.cfg, run.task, {"train_items": run.train_items})
        self.write = run.shard is None or run.shard[0] == 0
        state.checkpoint = str(self.path)
        self.cuda_mode = cuda_mode(cohort.device)
        if not (self.resume and self.path.exists()):
            return
        saved = load_checkpoint(self.path)
        check_checkpoint(saved, self.spec, self.path)
        if saved["epoch"] < cohort.cfg.epochs:  # a finished run only reloads: nothing trains in this mode
            check_cuda_mode(saved.get("cuda_deterministic"), self.cuda_mode, self.path)
        self.cuda_mode = saved.get("cuda_deterministic")
        cohort.load_state_dict(saved["cohort"])
        set_rng_state(saved["rng"])
        state.epoch, state.step_in_epoch, state.history = saved["epoch"], saved["step_in_epoch"], saved["history"]
        state.sums, state.resumed, state.teacher_source = dict(saved["sums"]), True, saved.get("teacher_tape")

    def on_step_end(self, cohort, state) -> None:
        if self.every and state.global_step % self.every == 0:
            self.save(cohort, state)

    def on_epoch_end(self, cohort, state) -> None:
        self.save(cohort, state)

    def save(self, cohort, state) -> None:
        if not self.write:
            return
        check_finite_weights(cohort, state.global_step - 1)
        save_checkpoint(self.path, {"format": CHECKPOINT_FORMAT, "spec": self.spec.as_dict(), "spec_hash": self.spec.hash,
                                    "config": asdict(cohort.cfg), "cohort": cohort.state_dict(), "rng": rng_state(),
                                    "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                                    "history": state.history, "sums": state.sums, "teacher_tape": state.teacher_source,
                                    "cuda_deterministic": self.cuda_mode})
