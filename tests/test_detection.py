"""Detection task: aligned detectors, dense distillation, gradient isolation, one forward per
network per step, ensembles, metrics, and a short fit on real Kvasir-SEG frames."""
from __future__ import annotations

import copy

import pytest
import torch

from mtml import Cohort, CohortConfig, cohort_step, fit
from mtml.detection import (DetectionTask, build_detection_networks, detection_metrics, draw_detections,
                            weighted_box_fusion)
from mtml.polyp import flip_augment, load_polyp_dataset, make_synthetic_polyps

SIZE = 64


def networks(*args, **kw):
    return build_detection_networks(*args, size=SIZE, **kw)


@pytest.fixture(scope="module")
def batch():
    task = DetectionTask(size=SIZE)
    return task.collate([make_synthetic_polyps(4, size=SIZE, seed=1)[i] for i in range(4)])


def cohort(mode, lr=0.01, teacher=None, n_students=2):
    cfg = CohortConfig(mode=mode, version="tiny", n_students=n_students, batch_size=4, lr=lr,
                       momentum=0.0 if lr == 0 else 0.9, weight_decay=0.0 if lr == 0 else 5e-4,
                       clip_grad_norm=0.0)  # raw gradients, for the isolation checks
    return Cohort.build(cfg, teacher=teacher, networks=networks)


@pytest.mark.parametrize("version", ["tiny", "v1", "v2", "v3"])
def test_teacher_and_student_dense_outputs_line_up(version):
    task = DetectionTask(size=SIZE)
    teacher, (student,) = build_detection_networks(version, 1, size=SIZE)
    assert sum(p.numel() for p in teacher.parameters()) > sum(p.numel() for p in student.parameters())
    b = task.collate([{"image": torch.rand(3, 50, 70), "boxes": torch.tensor([[5.0, 5, 40, 30]])}])
    with torch.no_grad():
        t, s = task.outputs(teacher.eval(), b), task.outputs(student.eval(), b)
    for key in ("cls_logits", "bbox_regression", "bbox_ctrness"):
        assert t[key].shape == s[key].shape
    assert all(torch.equal(a, c) for a, c in zip(t["anchors"], s["anchors"]))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="no pretrained"):
        build_detection_networks("tiny", 1, pretrained=True)
    with pytest.raises(ValueError, match="unknown version"):
        build_detection_networks("v9", 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        DetectionTask(size=100)
    task = DetectionTask(size=SIZE)
    (_, (a,)), (_, (b,)) = build_detection_networks("tiny", 1, size=64), build_detection_networks("tiny", 1, size=96)
    x = {"image": torch.rand(3, 64, 64), "boxes": torch.zeros(0, 4)}
    with pytest.raises(ValueError, match="do not line up"):
        task.distill_loss(task.outputs(a, task.collate([x])), task.outputs(b, DetectionTask(96).collate([x])), 2.0)


def test_collate_resizes_frames_and_scales_boxes():
    task = DetectionTask(size=SIZE)
    b = task.collate([{"image": torch.full((3, 100, 200), 255, dtype=torch.uint8),
                       "boxes": torch.tensor([[20.0, 10, 60, 50]]), "index": 7},
                      {"image": torch.rand(3, 64, 64), "boxes": torch.zeros(0, 4), "index": 8}])
    assert b["image"].shape == (2, 3, SIZE, SIZE) and torch.allclose(b["image"][0], torch.ones(3, SIZE, SIZE))
    assert torch.allclose(b["targets"][0]["boxes"], torch.tensor([[6.4, 6.4, 19.2, 32.0]]))
    assert b["targets"][1]["boxes"].shape == (0, 4) and b["index"].tolist() == [7, 8]


@pytest.mark.parametrize("box_loss", ["giou", "l1"])
def test_distill_loss_zero_on_itself_positive_otherwise(batch, box_loss):
    task = DetectionTask(size=SIZE, box_loss=box_loss)
    _, (a, b) = networks("tiny", 2)
    out_a, out_b = task.outputs(a, batch), task.outputs(b, batch)
    assert float(task.distill_loss(out_a, out_a, 4.0).detach()) < 1e-5
    assert float(task.distill_loss(out_a, out_b, 4.0).detach()) > 1e-3


def grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_distillation_sends_no_gradient_to_its_target(batch):
    task = DetectionTask(size=SIZE)
    teacher, (s1, s2) = networks("tiny", 2)
    t_out, o1, o2 = (task.outputs(m, batch) for m in (teacher, s1, s2))
    (task.distill_loss(o1, t_out, 4.0) + task.distill_loss(o1, o2, 4.0)).backward()
    assert all(p.grad is None for p in teacher.parameters())   # kd: the teacher gets nothing
    assert all(p.grad is None for p in s2.parameters())        # ml: the peer gets nothing
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s1.parameters())


@pytest.mark.parametrize("mode", ["kd", "kd_ml"])
def test_teacher_gradient_comes_only_from_its_own_loss(batch, mode):
    task = DetectionTask(size=SIZE)
    c = cohort(mode, lr=0.0)
    alone = copy.deepcopy(c.teacher)
    task.supervised_loss(task.outputs(alone, batch), batch).backward()
    cohort_step(c, batch, task)
    expected, got = grads(alone), grads(c.teacher)
    assert all(torch.allclose(got[n], expected[n], atol=1e-6) for n in expected if expected[n] is not None)


def test_student_gradient_is_its_own_objective_in_ml(batch):
    """In `ml`, student_1's gradient equals that of sup_1 + w_ml * KL(peer || student_1) alone."""
    task = DetectionTask(size=SIZE)
    c = cohort("ml", lr=0.0)
    s1, s2 = copy.deepcopy(c.students[0]), copy.deepcopy(c.students[1])
    o1, o2 = task.outputs(s1, batch), task.outputs(s2, batch)
    (task.supervised_loss(o1, batch) + task.distill_loss(o1, o2, c.cfg.temperature)).backward()
    cohort_step(c, batch, task)
    expected, got = grads(s1), grads(c.students[0])
    assert all(torch.allclose(got[n], expected[n], atol=1e-6) for n in expected if expected[n] is not None)


@pytest.mark.parametrize("mode", ["independent", "kd", "ml", "kd_ml", "offline"])
def test_one_forward_per_network_per_step(batch, mode):
    task = DetectionTask(size=SIZE)
    teacher = networks("tiny", 0)[0] if mode == "offline" else None
    c = cohort(mode, teacher=teacher)
    calls = {}
    for name, net in c.networks.items():
        for part in (net.backbone, net.head):
            part.register_forward_hook(lambda *_, key=(name, part is net.head): calls.__setitem__(key, calls.get(key, 0) + 1))
    terms = cohort_step(c, batch, task)
    expected = {"teacher"} if mode in ("kd", "kd_ml", "offline") else set()
    expected |= {"student_1", "student_2"}
    assert set(c.networks) == expected and set(calls.values()) == {1} and len(calls) == 2 * len(expected)
    assert ("student_1/kd" in terms) == (mode in ("kd", "kd_ml", "offline"))
    assert ("student_1/ml" in terms) == (mode in ("ml", "kd_ml"))
    assert ("teacher/sup" in terms) == (mode in ("kd", "kd_ml"))


def test_mean_ensemble_of_identical_students_is_each_student(batch):
    task = DetectionTask(size=SIZE)
    _, (s,) = networks("tiny", 1)
    with torch.no_grad():
        out = task.outputs(s.eval(), batch)
        solo, ens = task.detections(out), task.detections(task.ensemble([out, out]))
    for a, b in zip(solo, ens):
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4) and torch.allclose(a["scores"], b["scores"], atol=1e-5)


def test_weighted_box_fusion():
    a = {"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]), "scores": torch.tensor([0.9, 0.6]),
         "labels": torch.ones(2, dtype=torch.int64)}
    b = {"boxes": torch.tensor([[2.0, 0, 12, 10]]), "scores": torch.tensor([0.3]), "labels": torch.ones(1, dtype=torch.int64)}
    fused = weighted_box_fusion([a, b], iou=0.55)
    order = fused["scores"].argsort(descending=True)
    assert torch.allclose(fused["boxes"][order[0]], torch.tensor([0.5, 0, 10.5, 10]))  # (0.9*0 + 0.3*2) / 1.2
    assert torch.allclose(fused["scores"], torch.tensor([0.6, 0.3]))  # mean score * members / models
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    assert len(weighted_box_fusion([empty, empty])["boxes"]) == 0


def test_detection_metrics_perfect_and_empty():
    targets = [{"boxes": torch.tensor([[10.0, 10, 40, 40]]), "labels": torch.ones(1, dtype=torch.int64)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    perfect = [{"boxes": torch.tensor([[10.0, 10, 40, 40]]), "scores": torch.tensor([0.9]),
                "labels": torch.ones(1, dtype=torch.int64)},
               {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
    m = detection_metrics(perfect, targets)
    assert m["map50"] == pytest.approx(1.0) and m["precision"] == m["recall"] == m["f1"] == 1.0
    wrong = [{**p, "boxes": p["boxes"] + 25} for p in perfect]
    m = detection_metrics(wrong, targets)
    assert m["map50"] == 0.0 and m["recall"] == 0.0 and m["precision"] == 0.0


@pytest.mark.parametrize("ensemble", ["mean", "wbf"])
def test_evaluate_indexes_networks_and_draws(ensemble):
    task = DetectionTask(size=SIZE, ensemble=ensemble)
    data = make_synthetic_polyps(6, size=SIZE, seed=2)
    c = cohort("kd_ml")
    frame, preds, targets = task.evaluate(c.networks, data, batch_size=4, return_predictions=True)
    assert list(frame.index) == ["teacher", "student_1", "student_2", "ensemble"]
    assert {"map50", "map", "precision", "recall", "f1"} <= set(frame.columns)
    assert len(preds["ensemble"]) == len(targets) == 6
    fig = draw_detections(data, preds, targets, frames=(0, 1), task=task)
    assert len(fig.axes) == 2 * 4


def test_short_fit_on_real_kvasir_frames(shared_data):
    """48 real frames at 128 px, tiny version, kd_ml: the teacher's training loss falls and mAP@0.5
    is computed for every network and the student ensemble."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    root = shared_data / "kvasir-seg"
    train = load_polyp_dataset(root, "train", size=128, limit=48)
    val = load_polyp_dataset(root, "val", size=128, limit=16)
    task = DetectionTask(size=128)
    cfg = CohortConfig(mode="kd_ml", version="tiny", n_students=2, batch_size=8, epochs=3, lr=0.01)
    c = Cohort.build(cfg, networks=lambda *a, **k: build_detection_networks(*a, size=128, **k))
    history = fit(c, task, train, val, augment=flip_augment, progress=False, eval_batch_size=16)
    loss = history["train/teacher/sup"]
    assert loss.iloc[-1] < 0.8 * loss.iloc[0]
    for net in ("teacher", "student_1", "student_2", "ensemble"):
        values = history[f"val/{net}/map50"]
        assert values.notna().all() and ((values >= 0) & (values <= 1)).all()


def test_box_head_cannot_die(batch):
    """Distillation once pushed torchvision's ReLU box output below zero for good (all-zero
    boxes, no gradient); the softplus head keeps boxes positive and gradients flowing."""
    task = DetectionTask(size=SIZE)
    _, (s,) = networks("tiny", 1)
    torch.nn.init.constant_(s.head.regression_head.bbox_reg.bias, -10.0)
    out = task.outputs(s, batch)
    assert (out["bbox_regression"] > 0).all()
    out["bbox_regression"].sum().backward()
    assert s.head.regression_head.bbox_reg.bias.grad.abs().min() > 0
