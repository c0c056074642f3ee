"""Tests of mtml.evaluate: tile metrics against plain-numpy definitions, the student ensemble,
and patient-level aggregation (mean probability per patient) on a hand-made example."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hand_metrics import assert_metrics_match, binary_auroc, hand_metrics
from mtml import ClassificationTask
from mtml.tasks.data import TensorImageDataset
from mtml.tasks.evaluate import classification_metrics, evaluate_classification, patient_level

TASK = ClassificationTask(2)


class FixedProbability(nn.Module):
    """Reads the class-1 probability of each image from its first pixel (a stand-in network)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale), requires_grad=False)  # also gives a device

    def forward(self, x):
        p = x[:, 0, 0, 0].clamp(1e-6, 1 - 1e-6)
        logit = torch.log(p / (1 - p)) * self.scale
        return torch.stack([torch.zeros_like(logit), logit], 1)


def images_with_probability(p1) -> torch.Tensor:
    images = torch.zeros(len(p1), 3, 4, 4)
    images[:, 0, 0, 0] = torch.tensor(p1, dtype=torch.float32)
    return images


# patient, label, class-1 probabilities of its tiles; per-patient means in the comments
TILES = [("A", 1, [0.9, 0.55]),        # 0.725
         ("B", 0, [0.8, 0.4]),         # 0.6   (predicted 1: wrong)
         ("C", 1, [0.65]),             # 0.65
         ("D", 0, [0.1, 0.3, 0.2]),    # 0.2
         ("E", 0, [0.7, 0.68])]        # 0.69  (predicted 1: wrong)


def hand_made(order=None):
    rows = [(pat, y, p) for pat, y, ps in TILES for p in ps]
    if order is not None:
        rows = [rows[i] for i in order]
    patients, labels, p1 = zip(*rows)
    return TensorImageDataset(images_with_probability(p1), torch.tensor(labels),
                              patients=list(patients)), np.array(p1), np.array(labels)


def test_patient_level_is_the_mean_probability_per_patient():
    data, p1, labels = hand_made()
    per_patient = patient_level(np.stack([1 - p1, p1], 1), labels, data.patients)
    assert list(per_patient.index) == ["A", "B", "C", "D", "E"]
    np.testing.assert_allclose(per_patient["p1"], [0.725, 0.6, 0.65, 0.2, 0.69], rtol=1e-12)
    np.testing.assert_allclose(per_patient["p0"], 1 - per_patient["p1"], rtol=1e-12)
    np.testing.assert_array_equal(per_patient["label"], [1, 0, 1, 0, 0])


def test_patient_auroc_and_accuracy_on_a_hand_made_example():
    """Positives A (0.725) and C (0.65) against negatives B (0.6), D (0.2), E (0.69): 5 of the
    6 pairs are ordered (C < E is not), so patient AUROC = 5/6; argmax is right for A, C, D:
    patient accuracy = 3/5. Tiles: 15 of 21 pairs ordered, 7 of 10 right.
    (Aggregating by the max instead of the mean would give AUROC 4/6.)"""
    data, p1, labels = hand_made()
    frame = evaluate_classification({"student_1": FixedProbability()}, data, TASK, batch_size=4)
    for name in ("student_1", "ensemble"):
        row = frame.loc[name]
        assert row["patient_auroc"] == pytest.approx(5 / 6, abs=1e-6)
        assert row["patient_accuracy"] == pytest.approx(3 / 5, abs=1e-6)
        assert row["auroc"] == pytest.approx(15 / 21, abs=1e-6)
        assert row["accuracy"] == pytest.approx(7 / 10, abs=1e-6)
    assert binary_auroc(p1, labels == 1) == pytest.approx(15 / 21)  # the reference agrees


def test_only_the_metrics_asked_for_are_returned_with_the_same_values():
    data = hand_made()[0]
    full = evaluate_classification({"student_1": FixedProbability()}, data, TASK)
    some = evaluate_classification({"student_1": FixedProbability()}, data, TASK, metrics=("auroc", "patient_auroc"))
    assert list(some.columns) == ["auroc", "patient_auroc"]
    pd.testing.assert_frame_equal(some, full[["auroc", "patient_auroc"]])
    tiles = evaluate_classification({"student_1": FixedProbability()}, data, TASK, metrics=("accuracy",))
    pd.testing.assert_frame_equal(tiles, full[["accuracy"]])


def test_patient_metrics_do_not_depend_on_tile_order():
    first = evaluate_classification({"student_1": FixedProbability()}, hand_made()[0], TASK)
    order = np.random.default_rng(0).permutation(10)
    shuffled = evaluate_classification({"student_1": FixedProbability()}, hand_made(order)[0], TASK)
    for key in ("patient_auroc", "patient_accuracy", "auroc", "accuracy"):
        assert shuffled.loc["student_1", key] == pytest.approx(first.loc["student_1", key])


def test_a_patient_with_two_labels_is_refused():
    probs = np.array([[0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(ValueError, match="different labels"):
        patient_level(probs, np.array([0, 1]), ["A", "A"])


def test_ensemble_is_the_mean_of_student_probabilities_without_the_teacher():
    data, p1, labels = hand_made()
    # scaling a logit changes the probability: three networks that disagree
    networks = {"teacher": FixedProbability(5.0), "student_1": FixedProbability(0.5),
                "student_2": FixedProbability(2.0)}
    frame, probs, got_labels = evaluate_classification(networks, data, TASK, return_predictions=True)
    np.testing.assert_array_equal(got_labels, labels)
    expected = {name: 1 / (1 + np.exp(-s * np.log(p1 / (1 - p1))))
                for name, s in (("teacher", 5.0), ("student_1", 0.5), ("student_2", 2.0))}
    for name, q in expected.items():
        np.testing.assert_allclose(probs[name][:, 1], q, rtol=1e-5)
    ensemble = (expected["student_1"] + expected["student_2"]) / 2
    np.testing.assert_allclose(probs["ensemble"][:, 1], ensemble, rtol=1e-5)
    for name in networks:
        assert_metrics_match(frame.loc[name], hand_metrics(probs[name], labels))
    assert_metrics_match(frame.loc["ensemble"], hand_metrics(np.stack([1 - ensemble, ensemble], 1), labels))
    assert set(frame.index) == {"teacher", "student_1", "student_2", "ensemble"}


def test_multiclass_metrics_match_their_definitions():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.2, 0.6, 0.2],
                      [0.5, 0.1, 0.4], [0.1, 0.1, 0.8], [0.4, 0.35, 0.25], [0.2, 0.2, 0.6]])
    labels = np.array([0, 2, 2, 1, 0, 2, 1, 1])
    got = classification_metrics(probs, labels)
    expected = hand_metrics(probs, labels)
    assert_metrics_match(got, expected)
    # the confusion matrix in words: rows are the true class, columns the predicted one
    assert got["confusion"] == [[2, 0, 0], [1, 1, 1], [0, 1, 2]]
    assert 0 < got["accuracy"] < 1 and 0 < got["auroc"] < 1


def test_binary_f1_is_of_class_1():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 1, 1])  # class 1: TP 2, FP 1, FN 1 -> F1 = 4 / 6
    got = classification_metrics(probs, labels)
    assert got["f1"] == pytest.approx(4 / 6, abs=1e-6)
    assert_metrics_match(got, hand_metrics(probs, labels))


@pytest.mark.filterwarnings("ignore:No positive samples in targets")  # torchmetrics, on class 2
def test_absent_classes_do_not_count_as_zero():
    """A class missing from the labels (a small split) is left out of the averages, even when
    it is predicted: balanced accuracy = mean recall of the classes present."""
    probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1]])
    labels = np.array([0, 0, 1, 0])  # class 2 absent but predicted once
    got = classification_metrics(probs, labels)
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert got["auroc"] == pytest.approx(1.0)  # class 0: 3 positives above 1 negative; class 1: 1.0
    assert_metrics_match(got, hand_metrics(probs, labels))
    binary = classification_metrics(np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([1, 1]))
    assert binary["balanced_accuracy"] == pytest.approx(0.5)  # recall of class 1 only


def test_one_class_labels_give_nan_auroc_and_empty_data_raises():
    got = classification_metrics(np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([1, 1]))
    assert math.isnan(got["auroc"]) and got["accuracy"] == pytest.approx(0.5)
    empty = TensorImageDataset(torch.zeros(0, 3, 4, 4), torch.zeros(0))
    with pytest.raises(ValueError, match="empty"):
        evaluate_classification({"student_1": FixedProbability()}, empty, TASK)


def test_evaluation_restores_training_mode():
    nets = {"student_1": FixedProbability(), "student_2": FixedProbability()}
    nets["student_2"].eval()
    evaluate_classification(nets, hand_made()[0], TASK)
    assert nets["student_1"].training and not nets["student_2"].training
