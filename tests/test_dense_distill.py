"""Dense detection distillation (mtml.dense_distill) and the distillation warm-up (mtml.core.step)."""
from __future__ import annotations

import math

import pytest
import torch

from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step
from mtml.tasks.data import make_separable
from mtml.tasks.dense_distill import DenseDistillation, foreground
from mtml.tasks.detection import DetectionTask
from mtml.tasks.detectors import build_detection_networks
from mtml.tasks.polyp import make_synthetic_polyps
from mtml.core.step import distill_ramp

SIZE = 64


@pytest.fixture(scope="module")
def outputs():
    """Dense outputs of a teacher and a student on 4 synthetic frames (one forward each)."""
    torch.manual_seed(0)
    teacher, (student,) = build_detection_networks("tiny", 1, size=SIZE)
    task = DetectionTask(size=SIZE)
    batch = task.collate([make_synthetic_polyps(4, size=SIZE, seed=3, empty_fraction=0.0)[i] for i in range(4)])
    return task.outputs(teacher, batch), task.outputs(student, batch)


def test_foreground_marks_locations_inside_the_boxes():
    anchors = torch.tensor([[-4, -4, 4, 4], [8, 8, 24, 24], [40, 40, 56, 56]], dtype=torch.float32)  # centres 0, 16, 48
    out = {"anchors": [anchors, anchors], "targets": [
        {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 4.0, 4.0]]), "labels": torch.ones(2, dtype=torch.int64)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]}  # padded with zero boxes, which hold centre 0
    assert foreground(out).tolist() == [[True, True, False], [False, False, False]]  # edges count


def test_foreground_weighting_puts_the_box_weight_inside_the_boxes(outputs):
    """The defect: with confidence weighting most of the box and centerness gradient sat on
    background. With foreground weighting a student's boxes and centerness outside every
    ground-truth box get no gradient at all; with confidence weighting most of it lands there."""
    teacher_out, student_out = outputs
    fg = foreground(student_out)
    assert 0 < fg.float().mean() < 0.3  # the polyps cover a minority of the locations
    background_share = {}
    for weighting in ("foreground", "confidence"):
        loss = DenseDistillation(weighting=weighting, w_cls=0.0)
        _, (_, box_grad, ctr_grad) = _grads(loss, student_out, teacher_out)
        size = box_grad.abs().sum(-1) + ctr_grad.abs().reshape(fg.shape)  # per location
        background_share[weighting] = float(size[~fg].sum() / size.sum())
    assert background_share["foreground"] == 0.0
    assert background_share["confidence"] > 0.5


def _grads(loss_fn, student_out, teacher_out):
    student_out = {k: (v.detach().requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v)
                   for k, v in student_out.items()}
    loss = loss_fn(student_out, teacher_out, 2.0)
    keys = ("cls_logits", "bbox_regression", "bbox_ctrness")
    grads = torch.autograd.grad(loss, [student_out[k] for k in keys], allow_unused=True)
    return loss, [torch.zeros_like(student_out[k]) if g is None else g for k, g in zip(keys, grads)]


@pytest.mark.parametrize("weighting", ["foreground", "confidence"])
@pytest.mark.parametrize("off", ["w_cls", "w_box", "w_ctr"])
def test_a_term_weight_of_zero_switches_that_term_off_exactly(outputs, weighting, off):
    teacher_out, student_out = outputs
    terms = {"w_cls": 1.0, "w_box": 1.0, "w_ctr": 1.0}
    without = DenseDistillation(weighting, **{**terms, off: 0.0})
    loss, grads = _grads(without, student_out, teacher_out)
    # the same loss assembled from the two remaining terms, each computed alone
    parts = [DenseDistillation(weighting, **{k: float(k == on) for k in terms}) for on in terms if on != off]
    results = [_grads(p, student_out, teacher_out) for p in parts]
    assert float(loss.detach()) == pytest.approx(sum(float(r[0].detach()) for r in results), rel=1e-6)
    for i, g in enumerate(grads):
        torch.testing.assert_close(g, results[0][1][i] + results[1][1][i], rtol=1e-5, atol=1e-9)
    everything = float(DenseDistillation(weighting)(student_out, teacher_out, 2.0).detach())
    assert everything > float(loss.detach())  # the switched-off term was not zero


def test_foreground_weighting_leaves_out_the_background_channel(outputs):
    teacher_out, student_out = outputs
    changed = {**student_out, "cls_logits": student_out["cls_logits"].clone()}
    changed["cls_logits"][..., 0] += 5.0  # only torchvision's background slot moves
    cls_only = DenseDistillation("foreground", w_box=0.0, w_ctr=0.0)
    assert cls_only(changed, teacher_out, 2.0).item() == cls_only(student_out, teacher_out, 2.0).item()
    old = DenseDistillation("confidence", w_box=0.0, w_ctr=0.0)
    assert old(changed, teacher_out, 2.0).item() != old(student_out, teacher_out, 2.0).item()


def test_bad_distillation_settings_are_refused():
    with pytest.raises(ValueError, match="weighting"):
        DetectionTask(distill=DenseDistillation(weighting="background"))
    with pytest.raises(ValueError, match="w_box"):
        DetectionTask(distill=DenseDistillation(w_box=-1.0))
    with pytest.raises(ValueError, match="w_cls"):
        DetectionTask(distill=DenseDistillation(w_cls=float("nan")))
    with pytest.raises(ValueError, match="box_loss"):
        DetectionTask(box_loss="l2")
    with pytest.raises(ValueError, match="one box"):
        DetectionTask(box_loss="giou", distill=DenseDistillation(box_loss="l1"))
    with pytest.raises(TypeError, match="DenseDistillation"):
        DetectionTask(distill={"weighting": "foreground"})
    from mtml.runs.parameters import task_from_parameters

    with pytest.raises(ValueError, match="weighting"):  # a notebook's parameters reach the same checks
        task_from_parameters("detection", {"DISTILL_WEIGHTING": "background"})
    task = task_from_parameters("detection", {"BOX_LOSS": "l1", "W_DISTILL_BOX": 0.5})
    assert (task.box_loss, task.distill.box_loss, task.distill.w_box) == ("l1", "l1", 0.5)


# -- warm-up -------------------------------------------------------------------------------------

def test_ramp_is_zero_at_the_start_full_after_and_increasing():
    assert distill_ramp(0.0, 3.0) == 0.0
    assert distill_ramp(3.0, 3.0) == distill_ramp(10.0, 3.0) == 1.0
    assert distill_ramp(0.0, 0.0) == 1.0  # off
    values = [distill_ramp(t / 10, 3.0) for t in range(31)]
    assert all(a < b for a, b in zip(values, values[1:]))
    floor = math.exp(-5)  # exp(-5 (1 - t/T)^2), rescaled to [0, 1]
    assert distill_ramp(1.5, 3.0) == pytest.approx((math.exp(-5 * 0.25) - floor) / (1 - floor))
    assert distill_ramp(0.5, 1.0) == pytest.approx((math.exp(-5 * 0.25) - floor) / (1 - floor))  # one epoch ramps too


def test_warmup_gives_distillation_no_weight_at_step_0_and_full_weight_after(one_torch_thread):
    data = make_separable(32, 8, seed=0)
    task = ClassificationTask()
    batch = task.collate([data[i] for i in range(16)])

    def student_grads(mode, warmup, step, steps_per_epoch=2):
        cfg = CohortConfig(mode=mode, seed=1, distill_warmup_epochs=warmup, clip_grad_norm=0.0)
        cohort = Cohort.build(cfg, task=ClassificationTask())
        params = list(cohort.students[0].parameters())
        before = [p.detach().clone() for p in params]
        terms = cohort_step(cohort, batch, task, step=step, distill_scale=distill_ramp(step / steps_per_epoch, warmup))
        return [b - p.detach() for b, p in zip(before, params)], terms

    plain, _ = student_grads("independent", 0.0, 0)
    ramped, terms = student_grads("kd_ml", 2.0, 0)
    assert float(terms["cohort/distill_ramp"]) == 0.0
    for a, b in zip(plain, ramped):  # at step 0 only the cross-entropy moves the student
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    full, _ = student_grads("kd_ml", 0.0, 4)
    after, terms = student_grads("kd_ml", 2.0, 4)  # step 4 = epoch 2 = the end of the ramp
    assert float(terms["cohort/distill_ramp"]) == 1.0
    for a, b in zip(full, after):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, full))  # distillation does act


def test_a_warm_up_of_one_epoch_needs_the_ramp_and_logs_it():
    """Any warm-up (here one epoch) needs the loop's ramp value, and the step logs the factor it was given."""
    task = ClassificationTask()
    data = make_separable(16, 8, seed=0)
    batch = task.collate([data[i] for i in range(16)])
    cohort = Cohort.build(CohortConfig(mode="kd_ml", seed=1, distill_warmup_epochs=1.0), task=task)
    with pytest.raises(ValueError, match=r"^distill_warmup_epochs > 0 needs distill_scale \(fit passes distill_ramp"):
        cohort_step(cohort, batch, task)
    terms = cohort_step(cohort, batch, task, distill_scale=distill_ramp(0.5, 1.0))
    assert float(terms["cohort/distill_ramp"]) == pytest.approx(distill_ramp(0.5, 1.0))


def test_warmup_is_logged_in_the_history(one_torch_thread):
    from mtml import fit

    cfg = CohortConfig(mode="kd", epochs=3, batch_size=16, seed=0, distill_warmup_epochs=2.0)
    history = fit(Cohort.build(cfg, task=ClassificationTask()), ClassificationTask(), make_separable(32, 8, seed=0), progress=False)
    ramp = history["train/cohort/distill_ramp"].tolist()
    assert ramp[0] < ramp[1] < ramp[2] == 1.0
