"""mtml: knowledge distillation plus peer-to-peer mutual learning, for teaching and reproduction.

A reproduction kit for Niyaz & Bathula, "Augmenting Knowledge Distillation With Peer-To-Peer
Mutual Learning For Model Compression" (ISBI 2022). Loss weights, temperature and networks are
the kit's own choices (the paper does not publish them) and are all parameters.
"""
from .losses import kd_loss, mutual_loss, soft_kl, student_objective
from .train import MODES, Cohort, CohortConfig, NonFiniteLossError, cohort_step, fit, pretrain_teacher, seed_everything
from .task import ClassificationTask

_SUBMODULES = {"cli", "data", "detection", "detection_eval", "distributed", "download", "evaluate",
               "execution", "experiment", "external", "handout", "io", "models", "parameters",
               "plots", "polyp", "reading", "report", "reproduce", "spec", "stats", "synthetic",
               "tiles", "widgets"}


def __getattr__(name):  # `mtml.plots` etc. import on first use, keeping `import mtml` light
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mtml' has no attribute {name!r}")

__version__ = "0.1.0"
__all__ = ["kd_loss", "mutual_loss", "soft_kl", "student_objective", "MODES", "Cohort",
           "CohortConfig", "NonFiniteLossError", "cohort_step", "fit", "pretrain_teacher",
           "seed_everything", "ClassificationTask"]
