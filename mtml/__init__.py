"""mtml: knowledge distillation plus peer-to-peer mutual learning, for teaching and reproduction.

A reproduction kit for Niyaz & Bathula, "Augmenting Knowledge Distillation With Peer-To-Peer
Mutual Learning For Model Compression" (ISBI 2022). Loss weights, temperature and networks are
the kit's own choices (the paper does not publish them) and are all parameters.

The folders show the design:
    core/   the method: loss terms, the cohort, its training step and loop
    tasks/  what differs per task: data, networks, metrics, distillation terms
    runs/   bookkeeping: run identity, run store, teacher tape, studies, notebook execution, statistics
    teach/  the teaching surface: widgets, plots, generated readings, the offline handout
`mtml.plots`, `mtml.experiment` and the other modules are also reachable by their short names.
"""
from .core.losses import kd_loss, mutual_loss, soft_kl
from .core.cohort import MODES, Cohort, CohortConfig, seed_everything
from .core.loop import fit, pretrain_teacher
from .core.step import NonFiniteLossError, cohort_step
from .tasks.task import ClassificationTask

_FOLDERS = {
    "core": ("losses", "terms", "cohort", "step", "loop", "sampling", "stacking", "features"),
    "tasks": ("task", "models", "detectors", "detection", "detection_eval", "dense_distill", "evaluate", "tiles",
              "synthetic", "polyp", "near_duplicates", "data", "download", "diversity"),
    "runs": ("spec", "checkpoint", "teacher_tape", "experiment", "parameters", "study", "reproduce", "execution", "external",
             "stats", "report", "figures", "costs", "distributed"),
    "teach": ("widgets", "plots", "reading", "handout", "demo"),
}
_SHORT = {name: f"{folder}.{name}" for folder, names in _FOLDERS.items() for name in names}


def __getattr__(name):  # `mtml.plots` etc. import on first use, keeping `import mtml` light
    if name in _SHORT or name in ("io", "names", "cli"):
        import importlib

        return importlib.import_module(f".{_SHORT.get(name, name)}", __name__)
    raise AttributeError(f"module 'mtml' has no attribute {name!r}")

__version__ = "0.1.0"
__all__ = ["kd_loss", "mutual_loss", "soft_kl", "MODES", "Cohort",
           "CohortConfig", "NonFiniteLossError", "cohort_step", "fit", "pretrain_teacher",
           "seed_everything", "ClassificationTask"]
