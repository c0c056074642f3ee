"""The teacher's tape (OURS): an online teacher trained once per seed, replayed by later runs.

An online teacher learns from the labels only, so its trajectory depends on the seed, the data,
the augmentation draws and its own training settings, never on its students: kd and kd_ml of
one seed train the same teacher, step for step. The first such run records what the students
take from it (its detached outputs and supervised loss at every step, its validation metrics
per epoch, its final weights); a later run whose teacher has the same `tape_key` replays them
instead of training the teacher again. Its students then see the same targets, so its results
equal those of a run that trains the teacher (tests/test_teacher_tape.py checks it exactly).

Not recorded or replayed: feature knowledge (a tape holds no feature maps), a teacher that draws
random numbers (dropout would shift its students' draws), sharded (DDP) runs, runs resumed from
a checkpoint that trained the teacher, and tapes over MAX_TAPE_BYTES. `resume=False` records
afresh, as it retrains the run itself.
"""
from __future__ import annotations

import hashlib
import platform
import uuid
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from ..core.cohort import CohortConfig
from ..core.features import uses
from ..core.loop import Callback
from ..io import load_checkpoint, map_tensors, save_checkpoint
from .spec import RunSpec, spec_of

TAPE_FORMAT = 1
TAPE_NAME = "teacher_tape.pt"
MAX_TAPE_BYTES = 1024**3  # recorded outputs held in memory at most; a larger run trains its teacher
# spec fields that change the students only (declared with the field, mtml.core.cohort.knob):
# runs differing in them share the teacher
STUDENT_ONLY = tuple(f.name for f in fields(CohortConfig) if not f.metadata.get("teacher", True))


def tape_key(spec: RunSpec, task=None) -> str:
    """The identity of a run's online teacher: its spec without the students-only fields (and
    without `task.student_only_settings`, the task settings its teacher never reads)."""
    config = {k: v for k, v in spec.config.items() if k not in STUDENT_ONLY}
    skip = getattr(task, "student_only_settings", ())
    settings = {k: v for k, v in spec.task_settings.items() if k not in skip}
    return RunSpec(spec.task, {**config, "role": "online teacher"}, settings, spec.data).hash


def tape_path(tape_dir, spec: RunSpec, task=None) -> Path:
    return Path(tape_dir) / f"teacher-{tape_key(spec, task)}" / TAPE_NAME


def _file_stamp(path: Path):
    """(inode, size, mtime) of the file at `path`, or None: tells a file written since from the one seen before."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _plain(x) -> bool:
    """True for tensors and numbers in dicts, lists and tuples: what a weights-only load reads back."""
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x) in (list, tuple) and all(_plain(v) for v in x)
    return torch.is_tensor(x) or x is None or isinstance(x, (bool, int, float, str))


def teacher_meta(teacher: torch.nn.Module, device: torch.device, **run) -> dict:
    """What a replay must share with the recording besides the key: the teacher's initial weights
    (a checksum), what the bits depend on (device, torch and CUDA versions, CPU threads, TF32,
    deterministic CUDA kernels),
    and `run`'s steps, epochs, validation items and evaluation batch size."""
    digest = hashlib.sha256()
    for name, value in teacher.state_dict().items():
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    device = torch.device(device)
    machine = {"device": device.type, "torch": str(torch.__version__), "cpu": platform.machine(),
               "threads": torch.get_num_threads()}
    if device.type == "cuda":
        machine.update(gpu=torch.cuda.get_device_name(device), cuda=str(torch.version.cuda),
                       cudnn=torch.backends.cudnn.version(), tf32=torch.backends.cuda.matmul.allow_tf32,
                       deterministic=torch.are_deterministic_algorithms_enabled())
    return {**run, "teacher_sha256": digest.hexdigest()[:16], **machine}


def _rng_states(device: torch.device) -> list:
    """The generators a teacher could draw from: the CPU's, and its CUDA device's."""
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    return [torch.get_rng_state(), *cuda]


class TapeRecorder:
    """Records an online teacher while it trains; `save` writes the tape unless something spoiled
    the recording (then it warns, and the next run trains its teacher)."""

    replaying = False

    def __init__(self, path: Path, key: str, meta: dict, keep=None):
        self.path, self.key, self.meta = Path(path), key, meta
        self.keep = keep or (lambda out: out)  # the part of an output that distillation reads
        self.outputs, self.sup, self.val = [], [], []
        self.bytes, self.spoiled = 0, ""
        self.found = _file_stamp(self.path)  # a tape there now is replaced (resume=False, other conditions)

    def step(self, step: int, train_teacher, device: torch.device):
        """Runs `train_teacher()` -> (detached outputs, feature maps, detached loss) and records it."""
        before = _rng_states(device)
        outputs, maps, sup = train_teacher()
        if not self.spoiled:
            self._record(step, outputs, sup, before, device)
        return outputs, maps, sup

    def _record(self, step, outputs, sup, rng_before, device) -> None:
        kept = self.keep(outputs)
        if any(not torch.equal(a, b) for a, b in zip(rng_before, _rng_states(device))):
            self.spoiled = "the teacher draws random numbers (dropout?), which would shift its students' draws"
        elif step != len(self.outputs):
            self.spoiled = f"step {step} came after {len(self.outputs)} recorded steps"
        elif not _plain(kept):
            self.spoiled = "its distillation targets hold objects other than tensors (give the task a distill_target)"
        else:
            kept = map_tensors(kept, lambda t: t.detach().to("cpu", copy=True))
            sizes = []
            map_tensors(kept, lambda t: sizes.append(t.numel() * t.element_size()))
            self.bytes += sum(sizes)
            self.outputs.append(kept)
            self.sup.append(sup.detach().to("cpu", copy=True))
            if self.bytes / len(self.outputs) * self.meta.get("steps", 0) > MAX_TAPE_BYTES:  # known at step 0
                self.spoiled = f"its outputs would exceed MAX_TAPE_BYTES ({MAX_TAPE_BYTES} bytes)"
        if self.spoiled:
            self.outputs, self.sup = [], []

    def epoch_end(self, row: dict, epoch: int) -> dict:
        """Notes the teacher's validation metrics of epoch `epoch`'s history `row`; returns the row."""
        if epoch != len(self.val) and not self.spoiled:
            self.spoiled = f"epoch {epoch} came after {len(self.val)} recorded epochs"
        self.val.append({k: v for k, v in row.items() if k.startswith("val/teacher/")})
        return row

    def save(self, teacher: torch.nn.Module) -> Path | None:
        if self.spoiled:
            warnings.warn(f"the teacher was not recorded ({self.spoiled}): runs with the same teacher train it again")
            return None
        now = _file_stamp(self.path)
        if now is not None and now != self.found:  # a run beside this one recorded the same teacher meanwhile
            return None  # its tape stays: a run replaying it may resume only with it
        state = {k: v.detach().to("cpu", copy=True) for k, v in teacher.state_dict().items()}
        return save_checkpoint(self.path, {"format": TAPE_FORMAT, "key": self.key, "id": uuid.uuid4().hex,
                                           "meta": self.meta, "outputs": self.outputs, "sup": self.sup,
                                           "val": self.val, "teacher": state})


class TapeReplay:
    """Plays a recorded teacher back: its outputs per step, its validation rows, its final weights.
    `id` names the recording; a resumed replay goes on only with the same one."""

    replaying = True

    def __init__(self, tape: dict):
        self.key, self.id = tape["key"], tape["id"]
        self.outputs, self.sup, self.val, self.teacher = tape["outputs"], tape["sup"], tape["val"], tape["teacher"]

    def step(self, step: int, train_teacher, device: torch.device):
        return map_tensors(self.outputs[step], lambda t: t.to(device)), None, self.sup[step]

    def epoch_end(self, row: dict, epoch: int) -> dict:
        """The epoch's history `row` with the teacher's recorded validation metrics, first as in a trained run."""
        return {**{k: v for k, v in row.items() if not k.startswith("val/")}, **self.val[epoch],
                **{k: v for k, v in row.items() if k.startswith("val/")}}


def read_tape(path: Path, key: str, meta: dict) -> tuple[TapeReplay | None, str]:
    """(a `TapeReplay` of the tape at `path`, "") if a run with this teacher `key` and `meta`
    (`teacher_meta`) can replay it, else (None, why not). The file is read once. A damaged or
    foreign file counts as absent."""
    path = Path(path)
    if not path.is_file():
        return None, "no tape"
    try:
        tape = load_checkpoint(path)
    except ValueError:
        return None, "not a readable tape"
    if not isinstance(tape, dict) or tape.get("format") != TAPE_FORMAT or tape.get("key") != key:
        return None, "a tape of another format or teacher"
    differ = [f"{k} {tape['meta'].get(k)!r} (tape) vs {v!r} (run)" for k, v in meta.items()
              if tape.get("meta", {}).get(k) != v]
    if differ or len(tape.get("outputs", ())) != meta["steps"] or len(tape.get("val", ())) != meta["epochs"]:
        return None, "recorded under other conditions: " + ("; ".join(differ) or "its length differs")
    return TapeReplay(tape), ""


class TeacherTape(Callback):
    """The fit loop's teacher tape: records the online teacher into `store` (the run store), or,
    with `resume`, replays a tape recorded there for the same teacher instead of training it. None
    of it happens without an online teacher, in a sharded run, in a finished run, in a resumed run
    whose teacher trained so far, or when the data is known by its size only (`spec.data`).
    `replayed` says afterwards whether the run's teacher came from a tape."""

    order = 1  # after the checkpoint has restored the run

    def __init__(self, store, spec: RunSpec | None = None, resume: bool = False):
        self.store, self.spec, self.resume = Path(store), spec, resume
        self.tape, self.replayed = None, False

    def on_fit_start(self, cohort, state, run) -> None:
        spec = self.spec if self.spec is not None else spec_of(cohort.cfg, run.task, {"train_items": run.train_items})
        self.tape = self._tape(cohort, state, run, spec)
        if self.tape is not None and self.tape.replaying:
            state.teacher_source, state.supplied = self.tape.id, state.supplied | {"teacher"}
        self.teacher_step = self.tape.step if self.tape is not None else None

    def _tape(self, cohort, state, run, spec: RunSpec):
        cfg = cohort.cfg
        if state.epoch >= cfg.epochs or cohort.teacher is None or cohort.frozen_teacher or run.shard is not None:
            return None  # finished: its checkpoint holds the teacher's final weights
        if not set(spec.data) - {"train_items"}:
            return None  # the data is known by its size only: a tape could be another dataset's
        path, key = tape_path(self.store, spec, run.task), tape_key(spec, run.task)
        meta = teacher_meta(cohort.teacher, cohort.device, steps=cfg.epochs * state.steps_per_epoch, epochs=cfg.epochs,
                            eval_batch_size=run.eval_batch_size, val_items=run.val_items)
        if state.resumed:  # go on as the checkpoint began
            if not state.teacher_source:
                return None
            replay, why = read_tape(path, key, meta)
            if replay is None or replay.id != state.teacher_source:
                raise ValueError(f"{state.checkpoint} replays the teacher tape {path}, which is gone or changed "
                                 f"({why or 'recorded again since'}): delete {state.checkpoint} to train the run again")
            return replay
        recorder = TapeRecorder(path, key, meta, getattr(run.task, "distill_target", None))  # notes the file as it is now
        replay, why = read_tape(path, key, meta) if self.resume else (None, "")  # resume=False retrains: records afresh
        if replay is None:
            if why and why != "no tape":  # e.g. recorded on another device: its teacher is another network
                warnings.warn(f"teacher tape {path} not replayed, {why}; this run trains its teacher and records "
                              "the tape again", stacklevel=2)
            return recorder
        needs_maps = any(uses(k, "features") for k in cfg.knowledge()[0])  # a tape holds no feature maps
        return None if needs_maps else replay  # with maps the teacher trains, and its tape is kept for others

    def on_validation_end(self, cohort, state, row: dict) -> dict:
        if self.tape is None:
            return row
        row = self.tape.epoch_end(row, state.epoch)
        if self.tape.replaying and state.epoch + 1 == cohort.cfg.epochs:
            cohort.teacher.load_state_dict(self.tape.teacher)  # the recorded teacher's final weights
        return row

    def on_fit_end(self, cohort, state) -> None:
        if self.tape is not None and not self.tape.replaying:
            self.tape.save(cohort.teacher)
        self.replayed = bool(state.teacher_source)
