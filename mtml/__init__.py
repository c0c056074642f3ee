"""mtml: knowledge distillation plus peer-to-peer mutual learning, for teaching and reproduction.

A reproduction kit for Niyaz & Bathula, "Augmenting Knowledge Distillation With Peer-To-Peer
Mutual Learning For Model Compression" (ISBI 2022). Loss weights, temperature and networks are
the kit's own choices (the paper does not publish them) and are all parameters.
"""
from .losses import kd_loss, mutual_loss, soft_kl, student_objective
from .train import MODES, Cohort, CohortConfig, NonFiniteLossError, cohort_step, fit, pretrain_teacher, seed_everything
from .task import ClassificationTask
from . import evaluate, experiment, models, plots, report  # noqa: E402  (mtml.plots etc. in notebooks)

__version__ = "0.1.0"
__all__ = ["kd_loss", "mutual_loss", "soft_kl", "student_objective", "MODES", "Cohort",
           "CohortConfig", "NonFiniteLossError", "cohort_step", "fit", "pretrain_teacher",
           "seed_everything", "ClassificationTask"]
