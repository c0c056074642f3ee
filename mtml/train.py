"""One cohort training step and the fit loop, for a teacher and N students, any task.

Modes (which loss terms are on):
    independent  students alone, cross-entropy only (no teacher)
    kd           teacher -> students; the teacher trains at the same time on its own loss (online)
    ml           students <-> students (deep mutual learning), no teacher
    kd_ml        both (the method of Niyaz & Bathula 2022)
    offline      KD from a frozen, pre-trained teacher (classic Hinton KD baseline)
    kd_ml_styles kd_ml with learning styles (Niyaz, Sambyal & Bathula 2024): student 1 learns the
                 teacher's predictions, student 2 its feature maps, the students exchange both
                 (`teacher_knowledge`, `peer_knowledge`; see mtml.features)

In one step every network runs its forward exactly once; the teacher's outputs are shared by all
students; every distillation target is detached, so a student's loss never reaches the teacher
or a peer. The students' losses are summed and back-propagated once (an online teacher's right
after its forward, which frees its graph early); since the terms are isolated, this equals one
backward per network.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import random
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from .io import load_checkpoint, map_tensors, save_checkpoint
from .losses import student_objective
from .models import build_cohort_networks, check_version
from .names import student_name, students_in
from .sampling import epoch_order, shard_order
from .spec import RunSpec, differences, spec_of
from .features import uses
from .task import check_networks

MODES = ("independent", "kd", "ml", "kd_ml", "offline", "kd_ml_styles")
USES_TEACHER = ("kd", "kd_ml", "offline", "kd_ml_styles")
USES_ML = ("ml", "kd_ml", "kd_ml_styles")
AUTO = "auto"  # knowledge fields: what the mode says (see CohortConfig.knowledge)


@dataclass
class CohortConfig:
    """Every knob of a cohort run. Defaults are our choices, not the paper's (it does not give them)."""

    mode: str = "kd_ml"
    version: str = "tiny"
    n_students: int = 2
    num_classes: int = 2
    temperature: float = 4.0   # one temperature for the KD and the ML terms
    w_ce: float = 1.0          # student cross-entropy
    w_kd: float = 1.0          # teacher -> student
    w_ml: float = 1.0          # student <-> student, averaged over peers
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.05           # SGD, Nesterov momentum, cosine schedule over all steps
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    pretrained: bool = False   # ImageNet weights for torchvision networks
    num_workers: int = 0
    clip_grad_norm: float = 5.0  # per network, OURS: tames the early tau-scaled KD/ML spikes; 0 = off
    distill_warmup_epochs: float = 0.0  # ramp w_kd and w_ml up over these epochs (see distill_ramp); 0 = off
    # what each student takes from the teacher and from its peers: predictions | features | both,
    # or one per student joined by '|' ("predictions|features"); auto: the mode's (see knowledge())
    teacher_knowledge: str = AUTO
    peer_knowledge: str = AUTO
    w_feat: float = 1.0        # weight of a feature term relative to a prediction term (OURS)
    feature_levels: int = 1    # maps matched: the last stages (classification) / first FPN levels
    # speed options (OURS); the results do not depend on them beyond float rounding
    channels_last: bool = False  # NHWC networks; pair with ClassificationTask(channels_last=True)
    amp: bool = False          # bf16 autocast of the forwards, float32 losses (CPU and GPU)
    compile: bool = False      # torch.compile each network on CUDA; ignored (with a warning) on CPU
    stack_students: bool = False  # tiny classification students in one grouped network (mtml.stacking)

    def validate(self) -> "CohortConfig":
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        check_version(self.version)
        for name, low in (("n_students", 1), ("num_classes", 2), ("epochs", 1), ("batch_size", 1),
                          ("num_workers", 0), ("feature_levels", 1)):
            value = getattr(self, name)  # NaN, 2.5 or True would pass a plain comparison
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be >= {low} (an integer), got {value!r}")
        if self.mode in USES_ML and self.n_students < 2:
            raise ValueError(f"mode {self.mode!r} needs n_students >= 2 (mutual learning needs "
                             f"peers), got {self.n_students}")
        if not self.temperature > 0 or math.isinf(self.temperature):  # also catches NaN
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.knowledge()  # names a bad knowledge value
        if self.stack_students and self.compile:
            raise ValueError("stack_students=True cannot be combined with compile=True (the stacked forward "
                             "would bypass the compiled students): turn one of them off")
        if self.stack_students and self.uses_features:
            raise ValueError("stack_students=True cannot be combined with feature knowledge (a stacked "
                             "network has no per-student feature maps): turn stack_students off")
        if self.compile and self.uses_features:
            raise ValueError("compile=True cannot be combined with feature knowledge (the feature hooks "
                             "would not fire in a compiled network): turn compile off")
        for name in ("w_ce", "w_kd", "w_ml", "w_feat", "lr", "momentum", "weight_decay", "clip_grad_norm",
                     "distill_warmup_epochs"):
            value = getattr(self, name)
            if not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        return self

    @property
    def uses_teacher(self) -> bool:
        return self.mode in USES_TEACHER

    def knowledge(self) -> tuple[list[str], str]:
        """(what each student takes from the teacher, what students take from peers); [] and ""
        when the mode has no teacher or no peers. `auto`: kd_ml_styles alternates predictions and
        features over the students and exchanges both; every other mode uses predictions."""
        from .features import parse_knowledge

        styles = self.mode == "kd_ml_styles"
        if self.teacher_knowledge != AUTO and not self.uses_teacher:
            raise ValueError(f"teacher_knowledge={self.teacher_knowledge!r} needs a teacher; mode "
                             f"{self.mode!r} has none (use one of {USES_TEACHER})")
        if self.peer_knowledge != AUTO and self.mode not in USES_ML:
            raise ValueError(f"peer_knowledge={self.peer_knowledge!r} needs peers; mode {self.mode!r} "
                             f"has none (use one of {USES_ML})")
        teacher = []
        if self.uses_teacher:
            auto = "|".join(("predictions", "features")[i % 2] for i in range(self.n_students)) if styles else "predictions"
            value = auto if self.teacher_knowledge == AUTO else self.teacher_knowledge
            teacher = parse_knowledge(value, self.n_students, "teacher_knowledge")
        peer = ""
        if self.mode in USES_ML:
            value = ("both" if styles else "predictions") if self.peer_knowledge == AUTO else self.peer_knowledge
            peer = parse_knowledge(value, 1, "peer_knowledge")[0]
        return teacher, peer

    @property
    def uses_features(self) -> bool:
        teacher, peer = self.knowledge()
        return any(k in ("features", "both") for k in [*teacher, peer])

    @classmethod
    def for_task(cls, task, **overrides) -> "CohortConfig":
        """A validated config with `task`'s defaults (`task.config_defaults`) under `overrides`."""
        return cls(**{**task.config_defaults, **overrides}).validate()

    @classmethod
    def from_dict(cls, d: dict) -> "CohortConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


class NonFiniteLossError(RuntimeError):
    """A loss term (or, checked before each checkpoint, a network's weights) is NaN or infinite."""

    def __init__(self, network: str, term: str, step: int, value: float):
        self.network, self.term, self.step = network, term, step
        what = "weights after the update" if term == "weights" else "loss"
        super().__init__(f"non-finite {what} at step {step}: {network} {term} = {value}. Lower the "
                         "learning rate or the loss weights; the last good checkpoint is kept")


def distill_ramp(epochs_done: float, warmup_epochs: float) -> float:
    """The factor on w_kd and w_ml after `epochs_done` epochs (fractional): the sigmoid-shaped
    ramp exp(-5 (1 - t/T)^2) of Laine & Aila (2017), used by ONE (Lan et al. 2018) and OKDDip
    (Chen et al. 2020) for online distillation, shifted and rescaled (OURS) so that it is exactly
    0 at the first step (random teacher and peers teach nothing) and 1 from T on. T = 0: always 1."""
    if warmup_epochs <= 0 or epochs_done >= warmup_epochs:
        return 1.0
    floor = math.exp(-5.0)
    return (math.exp(-5.0 * (1.0 - epochs_done / warmup_epochs) ** 2) - floor) / (1.0 - floor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Paired runs (OURS): for one seed every mode starts from the same students and sees the same data
# order and augmentation draws. Students and teacher are built from their own seeded streams, so
# whether a teacher exists (or was pre-trained) never shifts the students' initial weights.
def students_seed(seed: int) -> int:
    return seed * 7_919 + 1


def teacher_seed(seed: int) -> int:
    return seed * 7_919 + 2


def augmentation_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's augmentation draws: a function of (seed, global step) only,
    so it is equal across modes and a resumed run repeats an uninterrupted one exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _speed_up(networks, cfg: CohortConfig, device: torch.device) -> None:
    """Applies the speed options of `cfg` to the networks, in place (state_dict keys unchanged)."""
    if cfg.compile and device.type != "cuda":
        warnings.warn("compile=True is ignored on CPU (compiling costs more than it saves here)")
    for m in networks:
        if m is not None and cfg.channels_last:
            m.to(memory_format=torch.channels_last)
        if m is not None and cfg.compile and device.type == "cuda":
            m.compile()


class Cohort:
    """A teacher (or None) and N students, with one optimizer holding a parameter group per
    trainable network. `networks` maps names (teacher, student_1, ...) to modules."""

    def __init__(self, cfg: CohortConfig, teacher: nn.Module | None, students: list[nn.Module],
                 device="cpu"):
        self.cfg = cfg.validate()
        if (teacher is not None) != cfg.uses_teacher or len(students) != cfg.n_students:
            raise ValueError(f"mode {cfg.mode!r} with n_students={cfg.n_students} needs "
                             f"{'a' if cfg.uses_teacher else 'no'} teacher and {cfg.n_students} "
                             f"students, got teacher={teacher is not None}, {len(students)} students")
        _check_stackable(cfg, students)
        self.device = torch.device(device)
        self.teacher = teacher.to(self.device) if teacher is not None else None
        self.students = [s.to(self.device) for s in students]
        _speed_up([self.teacher, *self.students], cfg, self.device)
        self.frozen_teacher = cfg.mode == "offline"
        if self.frozen_teacher:
            self.teacher.requires_grad_(False).eval()  # BN buffers stay as pre-trained
        self.networks = {}
        if self.teacher is not None:
            self.networks["teacher"] = self.teacher
        self.networks.update({student_name(i): s for i, s in enumerate(self.students)})
        self.adapters = _build_adapters(cfg, self.networks).to(self.device)
        trainable = {name: m for name, m in self.networks.items()
                     if not (name == "teacher" and self.frozen_teacher)}
        self.optimizer = torch.optim.SGD(  # a student's adapters train (and are clipped) with it
            [{"params": [*m.parameters(), *(self.adapters[n].parameters() if n in self.adapters else ())]}
             for n, m in trainable.items()], lr=cfg.lr,
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0,
            foreach=True)
        self.scheduler = None
        self.steps_per_epoch: int | None = None  # set by fit; the distillation warm-up needs it
        self.sync_adapter_grads = None  # set by mtml.distributed.wrap_cohort

    @classmethod
    def build(cls, cfg: CohortConfig, device="cpu", teacher: nn.Module | None = None,
              networks=None, task=None) -> "Cohort":
        """Builds the version's networks: students from `students_seed(cfg.seed)`, the teacher
        from `teacher_seed(cfg.seed)`, so a seed gives the same students in every mode. In
        `offline` mode pass the trained `teacher` (see `pretrain_teacher`). The networks come
        from `networks`, else `task.networks`, else the classification builder; with `task`,
        networks of another task's kind raise at once, naming both."""
        cfg.validate()
        networks = networks or getattr(task, "networks", None) or build_cohort_networks
        if cfg.mode == "offline" and teacher is None:
            raise ValueError("mode 'offline' needs a trained teacher: "
                             "Cohort.build(cfg, teacher=pretrain_teacher(...))")
        seed_everything(students_seed(cfg.seed))
        _, students = networks(cfg.version, cfg.n_students, cfg.num_classes,
                               pretrained=cfg.pretrained, with_teacher=False)
        if cfg.uses_teacher and teacher is None:
            teacher = build_teacher(cfg, networks)
        seed_everything(cfg.seed)  # dropout etc. draw the same stream in every mode
        if task is not None:
            named = {student_name(i): s for i, s in enumerate(students)}
            check_networks(task, {"teacher": teacher, **named} if teacher is not None else named)
            _check_stackable(cfg, None, task)
        return cls(cfg, teacher, students, device)

    def train(self):
        for name, m in self.networks.items():
            m.train(not (name == "teacher" and self.frozen_teacher))

    def state_dict(self) -> dict:
        state = {"networks": {k: m.state_dict() for k, m in self.networks.items()},
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler else None}
        if len(self.adapters):
            state["adapters"] = self.adapters.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.networks.items():
            m.load_state_dict(state["networks"][k])
        if len(self.adapters):
            self.adapters.load_state_dict(state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])


def _build_adapters(cfg: CohortConfig, networks: dict) -> nn.ModuleDict:
    """Each student's feature adapters (`mtml.features.Adapters`) towards the networks whose
    maps it matches; none without feature knowledge. Initialised from their own generator, so no
    global random stream (CPU or GPU, and thus every other draw of the run) differs from a run
    without them."""
    from .features import Adapters, feature_channels, uses

    adapters = nn.ModuleDict()
    if not cfg.uses_features:
        return adapters
    teacher_k, peer_k = cfg.knowledge()
    students = students_in(networks)
    channels = {n: feature_channels(m, cfg.feature_levels) for n, m in networks.items()}
    with torch.random.fork_rng(devices=[]):  # the modules' default init draws from the CPU stream: restored
        for i, name in enumerate(students):
            targets = {}
            if teacher_k and uses(teacher_k[i], "features"):
                targets["teacher"] = channels["teacher"]
            if uses(peer_k, "features"):
                targets.update({peer: channels[peer] for peer in students if peer != name})
            if targets:
                adapters[name] = Adapters(channels[name], targets)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + 991)  # the adapters' own stream
    for module in adapters.modules():
        if isinstance(module, nn.Conv2d):  # PyTorch's default Conv2d init, drawn from `generator`
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(module.weight[0].numel())
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    return adapters


def _check_stackable(cfg: CohortConfig, students, task=None) -> None:
    """ValueError (one line) when `cfg.stack_students` cannot apply to these students (and task)."""
    from .stacking import why_not_stackable

    if not cfg.stack_students:
        return
    reason = None if students is None else why_not_stackable(students)
    if reason is None and task is not None and getattr(task, "name", None) != "classification":
        reason = f"it runs classifiers only, not the {getattr(task, 'name', type(task).__name__)} task"
    if reason:
        raise ValueError(f"stack_students=True cannot stack these students: {reason}; turn stack_students off")


def _student_forwards(cohort: Cohort, batch, task, with_maps):
    """[(outputs, feature maps or None)] per student: one forward each, or one stacked forward."""
    if cohort.cfg.stack_students:
        from .stacking import stacked_forward

        _check_stackable(cohort.cfg, None, task)  # the students were checked when the cohort was built
        context = (torch.autocast(cohort.device.type, dtype=torch.bfloat16) if cohort.cfg.amp
                   else contextlib.nullcontext())
        with context:
            outs = stacked_forward(cohort.students, batch["image"])
        return [(_float32(out), None) for out in outs]
    return [with_maps(i, s) for i, s in enumerate(cohort.students)]


def _cohort_losses(cohort: Cohort, batch, task, step: int, teacher_tape=None):
    """The forwards and loss terms of one cohort step: (summed loss, {name: term}). An online
    teacher's loss is back-propagated at once (OURS, for speed): its graph is freed before the
    students run, which lowers peak memory; the gradients are the same."""
    cfg = cohort.cfg
    terms: dict[str, torch.Tensor] = {}
    total = 0.0
    teacher_out = None
    ramp = 1.0
    if cfg.distill_warmup_epochs > 0:
        if not cohort.steps_per_epoch:
            raise ValueError("distill_warmup_epochs > 0 needs cohort.steps_per_epoch (fit sets it)")
        ramp = distill_ramp(step / cohort.steps_per_epoch, cfg.distill_warmup_epochs)
        terms["cohort/distill_ramp"] = torch.tensor(ramp)
    teacher_k, peer_k = cfg.knowledge()
    levels = cfg.feature_levels

    def forward(model, with_maps: bool):
        if with_maps:
            return task.outputs_and_features(model, batch, levels)
        return task.outputs(model, batch), None

    teacher_maps = None
    if cohort.teacher is not None:
        teacher_maps_needed = any(uses(k, "features") for k in teacher_k)
        if cohort.frozen_teacher:
            with torch.no_grad():
                teacher_out, teacher_maps = forward(cohort.teacher, teacher_maps_needed)
        else:
            def train_teacher():
                out, maps = forward(cohort.teacher, teacher_maps_needed)
                sup = terms["teacher/sup"] = task.supervised_loss(out, batch)
                _check_finite(sup, terms, step)
                sup.backward()
                return map_tensors(out, torch.Tensor.detach), maps, sup.detach()

            teacher_out, teacher_maps, terms["teacher/sup"] = (  # a tape records it, or replays a recorded one
                teacher_tape.step(step, train_teacher, cohort.device) if teacher_tape is not None else train_teacher())
        teacher_maps = map_tensors(teacher_maps, torch.Tensor.detach)
    peer_maps_needed = uses(peer_k, "features")
    forwards = _student_forwards(cohort, batch, task, lambda i, s: forward(
        s, peer_maps_needed or bool(teacher_k) and uses(teacher_k[i], "features")))
    student_outs = [out for out, _ in forwards]
    for i, (out, maps) in enumerate(forwards):
        name = student_name(i)
        peers = [j for j in range(len(forwards)) if j != i]
        sup = terms[f"{name}/sup"] = task.supervised_loss(out, batch)  # first: a NaN is named by its first term
        kd = ml = None
        if teacher_out is not None:
            kd = _knowledge_terms(terms, f"{name}/kd", teacher_k[i], cfg.w_feat,
                                  lambda: task.distill_loss(out, teacher_out, cfg.temperature),
                                  lambda: cohort.adapters[name].loss("teacher", maps, teacher_maps))
        if cfg.mode in USES_ML:
            ml = _knowledge_terms(
                terms, f"{name}/ml", peer_k, cfg.w_feat,
                lambda: torch.stack([task.distill_loss(out, student_outs[j], cfg.temperature) for j in peers]).mean(),
                lambda: torch.stack([cohort.adapters[name].loss(student_name(j), maps, forwards[j][1])
                                     for j in peers]).mean())
        loss = student_objective(sup, kd, ml, cfg.w_ce, ramp * cfg.w_kd, ramp * cfg.w_ml)
        terms[f"{name}/loss"] = loss
        total = total + loss
    return total, terms


def _knowledge_terms(terms: dict, key: str, knowledge: str, w_feat: float, predictions, features):
    """One source's distillation term: the prediction term, plus w_feat x the feature term, as the
    knowledge says; each part is logged (`key`, `key_feat`)."""
    total = None
    if uses(knowledge, "predictions"):
        total = terms[key] = predictions()
    if uses(knowledge, "features"):
        terms[f"{key}_feat"] = features()
        total = w_feat * terms[f"{key}_feat"] + (total if total is not None else 0)
    return total


def _float32(x):
    return map_tensors(x, lambda t: t.float() if t.is_floating_point() else t)


class _AmpTask:
    """`task` with its forwards under bf16 autocast; the losses get float32 outputs (a KL in
    bf16 is too coarse)."""

    def __init__(self, task, device: torch.device):
        self.task, self.device = task, device

    def __getattr__(self, name):
        return getattr(self.task, name)

    def outputs(self, model, batch):
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return _float32(self.task.outputs(model, batch))

    def outputs_and_features(self, model, batch, levels):
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return _float32(self.task.outputs_and_features(model, batch, levels))


def _check_finite(total: torch.Tensor, terms: dict, step: int) -> None:
    """NonFiniteLossError naming the first non-finite term, before `total` is back-propagated."""
    if not torch.isfinite(total):
        for key, value in terms.items():
            if not torch.isfinite(value):
                network, term = key.split("/")
                raise NonFiniteLossError(network, term, step, float(value.detach()))
        raise NonFiniteLossError("cohort", "total", step, float(total.detach()))  # finite terms overflowed


def cohort_step(cohort: Cohort, batch, task, step: int = 0, teacher_tape=None) -> dict[str, torch.Tensor]:
    """One optimisation step of the whole cohort on one batch. Returns detached loss terms.
    `teacher_tape` (`mtml.teacher_tape`, from fit) records the online teacher or replays it."""
    cohort.optimizer.zero_grad(set_to_none=True)
    task = _AmpTask(task, cohort.device) if cohort.cfg.amp else task
    total, terms = _cohort_losses(cohort, batch, task, step, teacher_tape)
    _check_finite(total, terms, step)
    total.backward()
    if cohort.sync_adapter_grads is not None:  # under DDP (mtml.distributed): the adapters' share
        cohort.sync_adapter_grads()
    if cohort.cfg.clip_grad_norm > 0:  # one param group per network
        for group in cohort.optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], cohort.cfg.clip_grad_norm, foreach=True)
    cohort.optimizer.step()
    if cohort.scheduler is not None:
        cohort.scheduler.step()
    return {k: v.detach() for k, v in terms.items()}


def _rng_state() -> dict:
    """Every global RNG (torch CPU and CUDA, numpy, python), as plain data for weights_only loads."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(), "python": list(py_state[1]), "python_gauss": py_state[2],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "numpy_gauss": (int(np_state[3]), float(np_state[4])),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_gauss"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"],
                         *s["numpy_gauss"]))
    if s["cuda"] and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def _check_finite_weights(cohort: Cohort, step: int) -> None:
    """Called before each checkpoint, so that a checkpoint never holds NaN or infinite weights."""
    modules = {**cohort.networks, **{f"{name}/adapters": m for name, m in cohort.adapters.items()}}
    for name, m in modules.items():
        for value in m.state_dict().values():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise NonFiniteLossError(name, "weights", step, float(value[~torch.isfinite(value)][0]))


def _check_checkpoint(state, spec: RunSpec, path: Path) -> None:
    """ValueError unless `state` is a checkpoint of this format for the run `spec` identifies."""
    hint = "use another checkpoint_dir or resume=False"
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


CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 2  # bump when the checkpoint layout changes


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
        _check_checkpoint(state, spec, ckpt)
        cohort.load_state_dict(state["cohort"])
        _set_rng_state(state["rng"])
        epoch, skip, history = state["epoch"], state["step_in_epoch"], state["history"]
        sums = {k: v for k, v in state["sums"].items()}
    tape = _teacher_tape(cohort, task, tape_dir, spec, state, ckpt, resume, shard, steps=cfg.epochs * steps_per_epoch,
                         epochs=cfg.epochs, eval_batch_size=eval_batch_size,
                         val_items=len(val_data) if val_data is not None else 0)
    replaying = tape is not None and tape.replaying

    def save(epoch_, step_in_epoch, sums_):
        if ckpt is None or (shard is not None and shard[0] != 0):
            return
        _check_finite_weights(cohort, epoch_ * steps_per_epoch + step_in_epoch - 1)
        save_checkpoint(ckpt, {"format": CHECKPOINT_FORMAT, "spec": spec.as_dict(), "spec_hash": spec.hash,
                               "config": asdict(cfg), "cohort": cohort.state_dict(), "rng": _rng_state(),
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
    from .teacher_tape import TapeRecorder, read_tape, tape_key, tape_path, teacher_meta

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


def build_teacher(cfg: CohortConfig, networks=build_cohort_networks) -> nn.Module:
    """The version's teacher, initialised from `teacher_seed(cfg.seed)` (the same in every mode)."""
    seed_everything(teacher_seed(cfg.seed))
    teacher, _ = networks(cfg.version, 0, cfg.num_classes, pretrained=cfg.pretrained,
                          with_teacher=True)
    return teacher


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
