"""The cohort: a teacher (or none) and N students, their config and how they are built.

Modes (which loss terms are on):
    independent  students alone, cross-entropy only (no teacher)
    kd           teacher -> students; the teacher trains at the same time on its own loss (online)
    ml           students <-> students (deep mutual learning), no teacher
    kd_ml        both (the method of Niyaz & Bathula 2022)
    offline      KD from a frozen, pre-trained teacher (classic Hinton KD baseline)
    kd_ml_styles kd_ml with learning styles (Niyaz, Sambyal & Bathula 2024): student 1 learns the
                 teacher's predictions, student 2 its feature maps, the students exchange both
                 (`teacher_knowledge`, `peer_knowledge`; see mtml.features)
"""
from __future__ import annotations

import math
import numbers
import os
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn

from ..names import student_name, students_in

MODES = ("independent", "kd", "ml", "kd_ml", "offline", "kd_ml_styles")
USES_TEACHER = ("kd", "kd_ml", "offline", "kd_ml_styles")
USES_ML = ("ml", "kd_ml", "kd_ml_styles")
AUTO = "auto"  # knowledge fields: what the mode says (see CohortConfig.knowledge)


def knob(default, notebook: str | None = None, *, teacher: bool = True, identity: bool = True):
    """A CohortConfig field and everything the kit needs to know about it, declared once:
    `notebook`, its UPPER_CASE name in the notebooks (mtml.runs.parameters maps one to the other);
    `teacher=False` when only the students read it (runs differing in it share one online teacher,
    mtml.runs.teacher_tape); `identity=False` leaves it out of the run identity (it changes speed only)."""
    return field(default=default, metadata={"notebook": notebook, "teacher": teacher, "identity": identity})


@dataclass
class CohortConfig:
    """Every knob of a cohort run. Defaults are our choices, not the paper's (it does not give them)."""

    mode: str = knob("kd_ml", "MODE", teacher=False)
    version: str = knob("tiny", "VERSION")
    n_students: int = knob(2, "N_STUDENTS", teacher=False)
    num_classes: int = knob(2)
    temperature: float = knob(4.0, "TEMPERATURE", teacher=False)  # one temperature for the KD and the ML terms
    w_ce: float = knob(1.0, "W_CE", teacher=False)  # student cross-entropy
    w_kd: float = knob(1.0, "W_KD", teacher=False)  # teacher -> student
    w_ml: float = knob(1.0, "W_ML", teacher=False)  # student <-> student, averaged over peers
    epochs: int = knob(5, "EPOCHS")
    batch_size: int = knob(64, "BATCH_SIZE")
    lr: float = knob(0.05, "LR")  # SGD, Nesterov momentum, cosine schedule over all steps
    momentum: float = knob(0.9)
    weight_decay: float = knob(5e-4)
    seed: int = knob(0, "SEED")
    pretrained: bool = knob(False, "PRETRAINED")  # ImageNet weights for torchvision networks
    num_workers: int = knob(0, identity=False)
    eval_batch_size: int = knob(128, identity=False)  # validation after each epoch
    clip_grad_norm: float = knob(5.0, "CLIP_GRAD_NORM")  # per network, OURS: tames the early tau-scaled KD/ML spikes; 0 = off
    # ramp w_kd and w_ml up over these epochs (see distill_ramp); 0 = off
    distill_warmup_epochs: float = knob(0.0, "DISTILL_WARMUP_EPOCHS", teacher=False)
    # what each student takes from the teacher and from its peers: predictions | features | both,
    # or one per student joined by '|' ("predictions|features"); auto: the mode's (see knowledge())
    teacher_knowledge: str = knob(AUTO, "TEACHER_KNOWLEDGE", teacher=False)
    peer_knowledge: str = knob(AUTO, "PEER_KNOWLEDGE", teacher=False)
    w_feat: float = knob(1.0, "W_FEAT", teacher=False)  # weight of a feature term relative to a prediction term (OURS)
    # maps matched: the last stages (classification) / first FPN levels
    feature_levels: int = knob(1, "FEATURE_LEVELS", teacher=False)
    # speed options (OURS); the results do not depend on them beyond float rounding, which is why
    # they stay in the run identity (runs made with them keep theirs)
    channels_last: bool = knob(False)  # NHWC networks; pair with ClassificationTask(channels_last=True)
    amp: bool = knob(False)            # bf16 autocast of the forwards, float32 losses (CPU and GPU)
    compile: bool = knob(False)        # torch.compile each network on CUDA; ignored (with a warning) on CPU
    stack_students: bool = knob(False, teacher=False)  # tiny classification students in one grouped network (mtml.stacking)

    def validate(self) -> "CohortConfig":
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        for name, low in (("n_students", 1), ("num_classes", 2), ("epochs", 1), ("batch_size", 1),
                          ("num_workers", 0), ("feature_levels", 1), ("eval_batch_size", 1)):
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
        """A validated config with `task`'s defaults (`task.config_defaults`) under `overrides`;
        the version must be one of the task's (`task.versions()`, when it lists them)."""
        return cls(**{**task.config_defaults, **overrides}).validate().check_version(task)

    def check_version(self, task) -> "CohortConfig":
        """ValueError unless the version is one of `task.versions()` (when the task lists them)."""
        versions = task.versions() if hasattr(task, "versions") else (self.version,)
        if self.version not in versions:
            raise ValueError(f"unknown version {self.version!r} for the {task.name} task; choose one of {list(versions)}")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "CohortConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def deterministic_cuda(on: bool = True):
    """Deterministic CUDA kernels inside (on): deterministic algorithms, cuBLAS's fixed workspace,
    no cuDNN autotuning; the previous settings come back after. Why: GPU kernels that add in
    arbitrary order make one seed's teacher a different network in kd and in kd_ml, and paired
    differences between modes would carry that noise. The CPU is deterministic already. An op
    without a deterministic CUDA kernel warns (warn_only) rather than stopping the run. cuBLAS
    reads its workspace setting once per process, at its first use: a process that used cuBLAS
    before keeps its own (studies and the GPU check set it at start)."""
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    workspace = os.environ.get(CUBLAS_WORKSPACE[0])
    os.environ.setdefault(*CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]
        if workspace is None:
            os.environ.pop(CUBLAS_WORKSPACE[0], None)


CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs; a study sets it at start


def cuda_mode(device) -> bool | None:
    """Whether a run on `device` trains with deterministic CUDA kernels now; None on the CPU."""
    return torch.are_deterministic_algorithms_enabled() if torch.device(device).type == "cuda" else None


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

    @classmethod
    def build(cls, cfg: CohortConfig, device="cpu", teacher: nn.Module | None = None,
              networks=None, task=None) -> "Cohort":
        """Builds the version's networks: students from `students_seed(cfg.seed)`, the teacher
        from `teacher_seed(cfg.seed)`, so a seed gives the same students in every mode. In
        `offline` mode pass the trained `teacher` (see `pretrain_teacher`). The networks come
        from `networks`, else `task.networks`; with `task`, networks of another task's kind
        raise at once, naming both."""
        cfg.validate()
        if task is not None:
            cfg.check_version(task)  # before any network is built
        networks = networks or getattr(task, "networks", None)
        if networks is None:
            raise ValueError("Cohort.build needs the task (task=ClassificationTask()) or a network builder (networks=...)")
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
    if reason is None and task is not None and not getattr(task, "stackable", False):
        reason = f"it runs classifiers only, not the {getattr(task, 'name', type(task).__name__)} task"
    if reason:
        raise ValueError(f"stack_students=True cannot stack these students: {reason}; turn stack_students off")


def build_teacher(cfg: CohortConfig, networks) -> nn.Module:
    """The version's teacher, initialised from `teacher_seed(cfg.seed)` (the same in every mode)."""
    seed_everything(teacher_seed(cfg.seed))
    teacher, _ = networks(cfg.version, 0, cfg.num_classes, pretrained=cfg.pretrained,
                          with_teacher=True)
    return teacher


def check_networks(task, networks: dict) -> None:
    """ValueError before any step when a network is not of `task`'s kind: the task's own
    `check_networks` (which names both kinds), else its `is_own_network`, else nothing."""
    if hasattr(task, "check_networks"):
        return task.check_networks(networks)
    for name, model in networks.items():
        if hasattr(task, "is_own_network") and not task.is_own_network(model):
            raise ValueError(f"the {task.name} task cannot train {name} ({type(model).__name__}): build the cohort "
                             "with the task's own networks (networks=task.networks)")
