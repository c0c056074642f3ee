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

from pathlib import Path

import torch

from .io import load_checkpoint, map_tensors, save_checkpoint
from .spec import RunSpec

TAPE_FORMAT = 1
TAPE_NAME = "teacher_tape.pt"
MAX_TAPE_BYTES = 2 * 1024**3  # recorded outputs held in memory at most; a larger run trains its teacher
# spec fields that change the students only: runs differing in them share the teacher
STUDENT_ONLY = ("mode", "n_students", "temperature", "w_ce", "w_kd", "w_ml", "distill_warmup_epochs",
                "teacher_knowledge", "peer_knowledge", "w_feat", "feature_levels", "stack_students")


def tape_key(spec: RunSpec) -> str:
    """The identity of a run's online teacher: its spec without the students-only fields."""
    config = {k: v for k, v in spec.config.items() if k not in STUDENT_ONLY}
    return RunSpec(spec.task, {**config, "role": "online teacher"}, spec.task_settings, spec.data).hash


def tape_path(tape_dir, spec: RunSpec) -> Path:
    return Path(tape_dir) / f"teacher-{tape_key(spec)}" / TAPE_NAME


def _plain(x) -> bool:
    """True for tensors and numbers in dicts, lists and tuples: what a weights-only load reads back."""
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x) in (list, tuple) and all(_plain(v) for v in x)
    return torch.is_tensor(x) or x is None or isinstance(x, (bool, int, float, str))


def _rng_states() -> list:
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])


class TapeRecorder:
    """Records an online teacher while it trains; `save` writes the tape if nothing spoiled it."""

    replaying = False

    def __init__(self, path: Path, key: str, meta: dict, keep=None):
        self.path, self.key, self.meta = Path(path), key, meta
        self.keep = keep or (lambda out: out)  # the part of an output that distillation reads
        self.outputs, self.sup, self.val = [], [], []
        self.bytes, self.spoiled = 0, ""

    def step(self, step: int, train_teacher, device=None):
        """Runs `train_teacher()` -> (detached outputs, feature maps, detached loss) and records it."""
        before = _rng_states()
        outputs, maps, sup = train_teacher()
        if not self.spoiled:
            if any(not torch.equal(a, b) for a, b in zip(before, _rng_states())):
                self.spoiled = "the teacher draws random numbers"
            elif step != len(self.outputs):
                self.spoiled = f"step {step} came after {len(self.outputs)} recorded steps"
            elif not _plain(self.keep(outputs)):
                self.spoiled = "its distillation targets hold objects other than tensors"
            else:
                kept = map_tensors(self.keep(outputs), lambda t: t.detach().to("cpu", copy=True))
                sizes = []
                map_tensors(kept, lambda t: sizes.append(t.numel() * t.element_size()))
                self.bytes += sum(sizes)
                self.outputs.append(kept)
                self.sup.append(sup.detach().to("cpu", copy=True))
                if self.bytes > MAX_TAPE_BYTES:
                    self.spoiled = f"its outputs exceed {MAX_TAPE_BYTES} bytes"
            if self.spoiled:
                self.outputs, self.sup = [], []
        return outputs, maps, sup

    def epoch_end(self, row: dict, epoch: int) -> dict:
        """Notes the teacher's validation metrics of epoch `epoch`'s history `row`; returns the row."""
        self.val.append({k: v for k, v in row.items() if k.startswith("val/teacher/")})
        return row

    def save(self, teacher: torch.nn.Module) -> Path | None:
        if self.spoiled:
            return None
        state = {k: v.detach().to("cpu", copy=True) for k, v in teacher.state_dict().items()}
        return save_checkpoint(self.path, {"format": TAPE_FORMAT, "key": self.key, "meta": self.meta,
                                           "outputs": self.outputs, "sup": self.sup, "val": self.val,
                                           "teacher": state})


class TapeReplay:
    """Plays a recorded teacher back: its outputs per step, its validation rows, its final weights."""

    replaying = True

    def __init__(self, path: Path, tape: dict):
        self.path, self.key = Path(path), tape["key"]
        self.outputs, self.sup, self.val, self.teacher = tape["outputs"], tape["sup"], tape["val"], tape["teacher"]

    def step(self, step: int, train_teacher=None, device=None):
        outputs = map_tensors(self.outputs[step], lambda t: t.to(device) if device is not None else t)
        return outputs, None, self.sup[step]

    def epoch_end(self, row: dict, epoch: int) -> dict:
        """The epoch's history `row` with the teacher's recorded validation metrics, first as in a trained run."""
        return {**{k: v for k, v in row.items() if not k.startswith("val/")}, **self.val[epoch],
                **{k: v for k, v in row.items() if k.startswith("val/")}}


def open_tape(path: Path, key: str, meta: dict):
    """A `TapeReplay` of the tape at `path` if it was recorded for this teacher (`key`) and this
    run's steps, validation set and evaluation (`meta`); else None. A damaged or foreign file is
    treated as absent and recorded over."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        tape = load_checkpoint(path)
    except ValueError:
        return None
    if not isinstance(tape, dict) or tape.get("format") != TAPE_FORMAT or tape.get("key") != key \
            or tape.get("meta") != meta or len(tape.get("outputs", ())) != meta["steps"] \
            or len(tape.get("val", ())) != meta["epochs"]:
        return None
    return TapeReplay(path, tape)
