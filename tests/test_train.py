"""Tests of mtml.core (cohort, step, loop): gradient isolation inside `cohort_step`, one forward per network, the
terms each mode switches on, tiny fits in every mode, determinism, and bad parameters."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from hand_metrics import assert_metrics_match, hand_metrics
from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step, fit, pretrain_teacher
from mtml.tasks.data import TensorImageDataset, make_separable
from mtml.tasks.evaluate import evaluate_classification
from mtml.core.losses import soft_kl
from mtml.runs.checkpoint import Checkpoint
from mtml.tasks.models import build_cohort_networks, build_network

TASK = ClassificationTask(2)
ALL_MODES = ("independent", "kd", "ml", "kd_ml", "offline")
# which terms each mode switches on: (teacher/sup, student_i/kd, student_i/ml)
TERMS_ON = {"independent": (False, False, False), "kd": (True, True, False),
            "ml": (False, False, True), "kd_ml": (True, True, True), "offline": (False, True, False)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # steadier on a shared 2-core machine


def make_batch(n: int = 16, seed: int = 0) -> dict:
    data = make_separable(n, 16, seed=seed)
    return TASK.collate([data[i] for i in range(n)])


def build(mode: str, **kw) -> Cohort:
    """A tiny cohort; `offline` gets a freshly built teacher left in training mode on purpose."""
    cfg = CohortConfig(mode=mode, **kw)
    teacher = None
    if mode == "offline":
        torch.manual_seed(123)
        teacher = build_network("tiny_teacher", cfg.num_classes)
    return Cohort.build(cfg, teacher=teacher, task=ClassificationTask())


def state_copy(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- gradient isolation ----
def reference_grads(cohort: Cohort, batch, task) -> dict[str, list[torch.Tensor]]:
    """Each trainable network's gradient from its own objective alone, computed on copies with
    every other network's output explicitly detached, then clipped per network like the step."""
    cfg = cohort.cfg
    nets = {k: copy.deepcopy(m) for k, m in cohort.networks.items()}
    outs = {k: task.outputs(m, batch) for k, m in nets.items()}
    students = [k for k in nets if k.startswith("student")]
    grads = {}
    for name, net in nets.items():
        if name == "teacher":
            if cohort.frozen_teacher:
                continue
            loss = task.supervised_loss(outs[name], batch)
        else:
            loss = cfg.w_ce * task.supervised_loss(outs[name], batch)
            if "teacher" in outs:
                loss = loss + cfg.w_kd * task.distill_loss(outs[name], outs["teacher"].detach(),
                                                           cfg.temperature)
            if cfg.mode in ("ml", "kd_ml"):
                loss = loss + cfg.w_ml * torch.stack([
                    task.distill_loss(outs[name], outs[peer].detach(), cfg.temperature)
                    for peer in students if peer != name]).mean()
        g = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
        if cfg.clip_grad_norm > 0:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g]))
            g = [x * min(1.0, cfg.clip_grad_norm / (float(norm) + 1e-6)) for x in g]
        grads[name] = g
    return grads


def largest_grad_gap(cohort: Cohort, batch, task) -> float:
    """Runs one `cohort_step` and returns the largest |grad - reference grad| over all networks."""
    cohort.train()
    expected = reference_grads(cohort, batch, task)
    cohort_step(cohort, batch, task)
    gap = 0.0
    for name, net in cohort.networks.items():
        if name not in expected:  # the frozen teacher gets no gradient at all
            assert all(p.grad is None for p in net.parameters())
            continue
        for p, ref in zip(net.parameters(), expected[name]):
            gap = max(gap, float((p.grad - ref).abs().max()))
    return gap


@pytest.mark.parametrize("clip", [0.0, 0.5])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_each_network_gets_gradient_from_its_own_objective_only(mode, clip):
    """kd: the teacher's gradient is its cross-entropy's alone; ml: a student's loss gives no
    gradient to a peer; with clip > 0 the clipping is per network."""
    cohort = build(mode, n_students=3, w_ce=0.7, w_kd=1.5, w_ml=2.0, clip_grad_norm=clip)
    assert largest_grad_gap(cohort, make_batch(), TASK) < 1e-6


class LeakyTask(ClassificationTask):
    """A broken task whose distillation target is NOT detached (negative control)."""

    def distill_loss(self, out, target, temperature):
        log_p = (out / temperature).log_softmax(-1)
        log_q = (target / temperature).log_softmax(-1)
        return temperature ** 2 * (log_q.exp() * (log_q - log_p)).sum(-1).mean()


def test_online_teacher_is_isolated_even_from_a_task_that_leaks():
    """The step back-propagates the teacher's own loss first and hands the students detached
    teacher outputs, so even a task whose distillation forgets to detach cannot reach it."""
    cohort = build("kd", n_students=2, clip_grad_norm=0.0)
    assert largest_grad_gap(cohort, make_batch(), LeakyTask(2)) < 1e-6


@pytest.mark.parametrize("mode", ["ml", "kd_ml"])
def test_gradient_check_detects_a_leaking_target(mode):
    leaky = LeakyTask(2)
    batch = make_batch()
    cohort = build(mode, n_students=2, clip_grad_norm=0.0)
    out, target = torch.randn(4, 2), torch.randn(4, 2)  # same value as the real loss ...
    assert float(leaky.distill_loss(out, target, 2.0)) == pytest.approx(float(soft_kl(out, target, 2.0)), rel=1e-5)
    assert largest_grad_gap(cohort, batch, leaky) > 1e-4


def test_independent_student_update_equals_training_it_alone():
    batch = make_batch()
    pair = build("independent", n_students=2, clip_grad_norm=0.5)
    alone = Cohort(CohortConfig(mode="independent", n_students=1, clip_grad_norm=0.5), None,
                   [copy.deepcopy(pair.students[1])])
    assert not torch.equal(pair.students[0].fc.weight, pair.students[1].fc.weight)
    for step in range(3):
        cohort_step(pair, batch, TASK, step)
        cohort_step(alone, batch, TASK, step)
        clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in alone.students[0].parameters()]))
        assert float(clipped) == pytest.approx(0.5, rel=1e-4)  # the clipping was active
    for (k, a), b in zip(pair.students[1].state_dict().items(), alone.students[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)


def test_offline_never_changes_the_teacher():
    cohort = build("offline")
    teacher_params = {id(p) for p in cohort.teacher.parameters()}
    assert not teacher_params & {id(p) for g in cohort.optimizer.param_groups for p in g["params"]}
    before, student_before = state_copy(cohort.teacher), state_copy(cohort.students[0])
    batch = make_batch()
    cohort_step(cohort, batch, TASK)  # straight after build, before fit sets any mode
    fit(cohort, TASK, make_separable(64, 16), make_separable(32, 16, split=1), progress=False)
    after = cohort.teacher.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # weights and BatchNorm buffers (running stats, batch counter)
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(student_before["fc.weight"], cohort.students[0].state_dict()["fc.weight"])


# ---- one forward per network, terms per mode ----
@pytest.mark.parametrize("mode", ALL_MODES)
def test_one_forward_per_network_per_step(mode):
    cohort = build(mode, n_students=3)
    calls = dict.fromkeys(cohort.networks, 0)
    for name, net in cohort.networks.items():
        net.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    cohort_step(cohort, make_batch(), TASK)
    expected = ["student_1", "student_2", "student_3"]
    if TERMS_ON[mode][1]:
        expected = ["teacher", *expected]
    assert calls == dict.fromkeys(expected, 1)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_modes_switch_terms_on_and_off(mode):
    w_ce, w_kd, w_ml = 0.5, 2.0, 3.0
    cohort = build(mode, n_students=2, w_ce=w_ce, w_kd=w_kd, w_ml=w_ml)
    terms = cohort_step(cohort, make_batch(), TASK)
    teacher_sup, kd, ml = TERMS_ON[mode]
    expected = {"teacher/sup"} if teacher_sup else set()
    for s in ("student_1", "student_2"):
        expected |= {f"{s}/sup", f"{s}/loss"} | ({f"{s}/kd"} if kd else set()) | ({f"{s}/ml"} if ml else set())
        total = w_ce * terms[f"{s}/sup"] + w_kd * terms.get(f"{s}/kd", 0.0) + w_ml * terms.get(f"{s}/ml", 0.0)
        assert float(terms[f"{s}/loss"]) == pytest.approx(float(total), rel=1e-6)
    assert set(terms) == expected
    assert all(not v.requires_grad for v in terms.values())


@pytest.mark.parametrize("mode, zero", [("kd", dict(w_kd=0.0)), ("ml", dict(w_ml=0.0)),
                                        ("kd_ml", dict(w_kd=0.0, w_ml=0.0)), ("offline", dict(w_kd=0.0))])
def test_zero_weights_reduce_students_to_independent_training(mode, zero):
    batch = make_batch()

    def students_after_two_steps(**kw):
        cohort, solo = build(mode, n_students=2, **kw), build("independent", n_students=2)
        for a, b in zip(cohort.students, solo.students):
            b.load_state_dict(a.state_dict())  # same start
        for step in range(2):
            cohort_step(cohort, batch, TASK, step)
            cohort_step(solo, batch, TASK, step)
        return cohort.students, solo.students

    students, alone = students_after_two_steps(**zero)
    for a, b in zip(students, alone):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=k)
    # ... while with the default weights the distillation terms change the update
    students, alone = students_after_two_steps()
    assert not torch.allclose(students[0].fc.weight, alone[0].fc.weight, atol=1e-5)


# ---- tiny fits ----
@pytest.mark.parametrize("mode", ALL_MODES)
def test_tiny_fit_learns_and_the_ensemble_is_the_mean_of_students(mode):
    train, val = make_separable(256, 16, seed=0, split=0), make_separable(128, 16, seed=0, split=1)
    cfg = CohortConfig(mode=mode, epochs=4, batch_size=32, seed=0)
    teacher = pretrain_teacher(TASK, train, cfg, progress=False) if mode == "offline" else None
    cohort = Cohort.build(cfg, teacher=teacher, task=ClassificationTask())
    history = fit(cohort, TASK, train, val, progress=False)
    names = [*cohort.networks, "ensemble"]
    assert len(history) == cfg.epochs
    for name in names:
        assert history[f"val/{name}/accuracy"].iloc[-1] >= 0.9, (name, history.iloc[-1].to_dict())

    # the ensemble against metrics by hand, on a noisier set with every 5th label flipped so
    # that the metrics are not all 1
    noisy = make_separable(300, 16, noise=1.0, seed=0, split=2)
    flipped = noisy.labels.clone()
    flipped[::5] = 1 - flipped[::5]
    hard = TensorImageDataset(noisy.images, flipped)
    frame, probs, labels = evaluate_classification(cohort.networks, hard, TASK, return_predictions=True)
    np.testing.assert_array_equal(labels, flipped.numpy())
    mean_of_students = np.mean([probs[k] for k in cohort.networks if k.startswith("student")], axis=0)
    np.testing.assert_allclose(probs["ensemble"], mean_of_students, rtol=1e-6, atol=1e-7)
    assert 0.55 < frame.loc["ensemble", "accuracy"] < 1.0  # a test set that can tell metrics apart
    for name in names:
        assert_metrics_match(frame.loc[name], hand_metrics(probs[name], labels))


def test_same_seed_same_run_other_seed_differs():
    def run(seed):
        cfg = CohortConfig(mode="kd_ml", epochs=2, batch_size=16, seed=seed)
        cohort = Cohort.build(cfg, task=ClassificationTask())
        history = fit(cohort, TASK, make_separable(64, 16), make_separable(32, 16, split=1),
                      progress=False)
        return history.drop(columns="time_s"), {k: state_copy(m) for k, m in cohort.networks.items()}

    (h1, w1), (h2, w2), (h3, w3) = run(0), run(0), run(1)
    pd.testing.assert_frame_equal(h1, h2, check_exact=True)
    for name in w1:
        for k in w1[name]:
            assert torch.equal(w1[name][k], w2[name][k]), (name, k)
    assert not h1.equals(h3)
    for name in w1:
        assert not torch.equal(w1[name]["fc.weight"], w3[name]["fc.weight"]), name


# ---- bad parameters ----
BAD_CONFIGS = [
    (dict(mode="distill"), "mode"), (dict(version="v9"), "version"),
    (dict(mode="ml", n_students=1), "n_students"), (dict(mode="kd_ml", n_students=1), "n_students"),
    (dict(n_students=0), "n_students"),
    (dict(w_ce=-1.0), "w_ce"), (dict(w_kd=-0.5), "w_kd"), (dict(w_ml=-1e-3), "w_ml"),
    (dict(w_kd=float("nan")), "w_kd"), (dict(w_ml=float("nan")), "w_ml"), (dict(w_ce=float("inf")), "w_ce"),
    (dict(temperature=0.0), "temperature"), (dict(temperature=-2.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(num_classes=1), "num_classes"), (dict(lr=-0.1), "lr"), (dict(epochs=0), "epochs"),
    (dict(batch_size=0), "batch_size"), (dict(clip_grad_norm=-1.0), "clip_grad_norm"),
]


@pytest.mark.parametrize("kw, name", BAD_CONFIGS, ids=[str(kw) for kw, _ in BAD_CONFIGS])
def test_bad_config_raises_before_any_network_is_built(kw, name):
    built = []

    def networks(*args, **kwargs):
        built.append(args)
        return build_cohort_networks(*args, **kwargs)

    with pytest.raises(ValueError, match=name):
        Cohort.build(CohortConfig(**kw), task=ClassificationTask(), networks=networks)
    assert built == []


def test_other_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="trained teacher"):
        Cohort.build(CohortConfig(mode="offline"), task=ClassificationTask())
    with pytest.raises(ValueError, match=r"needs the task \(task=ClassificationTask\(\)\) or a network builder"):
        Cohort.build(CohortConfig(mode="kd"))  # the core knows no task's networks
    with pytest.raises(ValueError, match=r"unknown version 'v9' for the classification task; choose one of \['tiny'"):
        CohortConfig.for_task(ClassificationTask(), version="v9")
    teacher, students = build_cohort_networks("tiny", 2, with_teacher=True)
    with pytest.raises(ValueError, match="no teacher"):
        Cohort(CohortConfig(mode="ml"), teacher, students)
    with pytest.raises(ValueError, match="3 students"):
        Cohort(CohortConfig(mode="kd", n_students=3), teacher, students)
    with pytest.raises(ValueError, match="unknown config keys"):
        CohortConfig.from_dict({"mode": "kd", "tau": 4})
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationTask(num_classes=1)


def test_empty_datasets_raise_before_any_training():
    cohort = build("kd_ml")
    before = {k: state_copy(m) for k, m in cohort.networks.items()}
    empty = TensorImageDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0))
    with pytest.raises(ValueError, match="training dataset is empty"):
        fit(cohort, TASK, empty, progress=False)
    with pytest.raises(ValueError, match="validation dataset is empty"):
        fit(cohort, TASK, make_separable(32, 16), empty, progress=False)
    for name, net in cohort.networks.items():
        for k, v in net.state_dict().items():
            assert torch.equal(before[name][k], v), (name, k)


def test_resume_refuses_a_checkpoint_trained_with_other_settings(tmp_path):
    data = make_separable(64, 16, seed=0)
    fit(build("kd", epochs=1, batch_size=32), ClassificationTask(), data, progress=False,
        callbacks=[Checkpoint(tmp_path)])
    with pytest.raises(ValueError, match="another run.*config.temperature"):
        fit(build("kd", epochs=1, batch_size=32, temperature=2.0), ClassificationTask(), data,
            progress=False, callbacks=[Checkpoint(tmp_path, resume=True)])
    # num_workers does not change what is computed: the finished run is simply reloaded
    history = fit(build("kd", epochs=1, batch_size=32, num_workers=1), ClassificationTask(), data,
                  progress=False, callbacks=[Checkpoint(tmp_path, resume=True)])
    assert len(history) == 1
