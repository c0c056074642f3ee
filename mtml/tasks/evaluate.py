"""Metrics for each network and for the student ensemble (classification).

The ensemble's probabilities are the mean of the students' softmax probabilities (the teacher
is not part of it: the point of the method is a compressed deployable model). For MSI vs MSS
the positive class is 1 (MSI). Tile probabilities are aggregated to patients by their mean.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from torchmetrics import functional as tmf

from ..names import ENSEMBLE, students_in


def eval_batches(networks: dict, data, task, batch_size: int):
    """Sequential batches of `data` on the networks' device, the networks in eval mode meanwhile
    (their modes are restored afterwards). Shared by classification and detection."""
    if len(data) == 0:
        raise ValueError("the evaluation dataset is empty")
    device = next(next(iter(networks.values())).parameters()).device
    modes = {k: m.training for k, m in networks.items()}
    for m in networks.values():
        m.eval()
    try:
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=task.collate):
            yield task.to_device(batch, device)
    finally:
        for k, m in networks.items():
            m.train(modes[k])


@torch.no_grad()
def predict(networks: dict, data, task, batch_size: int = 128):
    """Runs every network once over `data`. Returns ({name: probs (n, C)}, labels (n,))."""
    probs = {k: [] for k in networks}
    labels = []
    for batch in eval_batches(networks, data, task, batch_size):
        for k, m in networks.items():
            probs[k].append(task.probabilities(task.outputs(m, batch)).cpu())
        labels.append(batch["label"].cpu())
    return {k: torch.cat(v).numpy() for k, v in probs.items()}, torch.cat(labels).numpy()


def student_ensemble(probs: dict) -> np.ndarray:
    students = [probs[k] for k in students_in(probs)]
    if not students:
        raise ValueError("no students to ensemble")
    return np.mean(students, axis=0)


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """accuracy, balanced accuracy, AUROC, F1 (of class 1 when binary, else macro), confusion.
    Balanced accuracy and multiclass AUROC average over the classes present in `labels`."""
    p = torch.tensor(np.asarray(probs), dtype=torch.float32)
    y = torch.tensor(np.asarray(labels), dtype=torch.long)
    c = p.shape[1]
    one_class = len(torch.unique(y)) < 2
    if c == 2:
        auroc = float("nan") if one_class else float(tmf.auroc(p[:, 1], y, task="binary"))
        f1 = float(tmf.f1_score(p.argmax(1), y, task="binary"))
    else:
        present = torch.bincount(y, minlength=c) > 0
        auroc = float("nan") if one_class else float(
            tmf.auroc(p, y, task="multiclass", num_classes=c, average="none")[present].mean())
        f1 = float(tmf.f1_score(p, y, task="multiclass", num_classes=c, average="macro"))
    confusion = tmf.confusion_matrix(p, y, task="multiclass", num_classes=c)  # rows: true class
    support = confusion.sum(1)
    return {
        "accuracy": float(tmf.accuracy(p, y, task="multiclass", num_classes=c, average="micro")),
        "balanced_accuracy": float((confusion.diag()[support > 0] / support[support > 0]).mean()),
        "auroc": auroc,
        "f1": f1,
        "confusion": confusion.tolist(),
    }


def patient_level(probs: np.ndarray, labels: np.ndarray, patients) -> pd.DataFrame:
    """One row per patient: mean probability of each class over its tiles, its label."""
    frame = pd.DataFrame(probs, columns=[f"p{k}" for k in range(probs.shape[1])])
    frame["label"], frame["patient"] = labels, np.asarray(patients)
    if frame.groupby("patient")["label"].nunique().max() > 1:
        raise ValueError("a patient has tiles with different labels; check the manifest")
    return frame.groupby("patient").mean()


def classification_units(probs: dict, labels: np.ndarray, patients=None) -> pd.DataFrame:
    """One row per test tile: its unit of resampling (`patient`, or the tile itself), label, and
    each network's probability of class 1 (binary tasks; bootstrap intervals use it)."""
    n = len(labels)
    frame = pd.DataFrame({"unit": np.asarray(patients) if patients is not None else np.arange(n),
                          "label": np.asarray(labels), "item": np.arange(n)})
    for name, p in probs.items():
        frame[name] = np.asarray(p)[:, -1]
    return frame


def evaluate_classification(networks: dict, data, task, batch_size: int = 128,
                            return_predictions: bool = False, metrics=None):
    """DataFrame indexed by network (and `ensemble`) with tile-level metrics, plus
    `patient_auroc` and `patient_accuracy` when `data.patients` lists a patient per item;
    only the columns `metrics` when given (the per-epoch validation)."""
    probs, labels = predict(networks, data, task, batch_size)
    if students_in(probs):
        probs[ENSEMBLE] = student_ensemble(probs)
    patients = getattr(data, "patients", None)
    if metrics is not None and not any(m.startswith("patient_") for m in metrics):
        patients = None
    rows = {}
    for name, p in probs.items():
        row = classification_metrics(p, labels)
        if patients is not None:
            per_patient = patient_level(p, labels, patients)
            pp = per_patient.filter(like="p").to_numpy()
            pm = classification_metrics(pp, per_patient["label"].to_numpy().astype(int))
            row["patient_auroc"], row["patient_accuracy"] = pm["auroc"], pm["accuracy"]
        rows[name] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "network"
    if metrics is not None:
        frame = frame[list(metrics)]
    return (frame, probs, labels) if return_predictions else frame
