"""Unit tests of mtml.losses: golden values from float64 numpy formulas written here, and the
properties the training step relies on (KL >= 0, tau^2 scaling, detached targets)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtml.core.losses import kd_loss, mutual_loss, soft_kl

STUDENT = np.array([[1.0, -0.5, 2.0], [0.3, 0.0, -1.2]])
TEACHER = np.array([[0.5, 0.5, 3.0], [-1.0, 2.0, 0.0]])
PEERS = [np.array([[0.0, 1.0, 0.0], [2.0, -2.0, 0.5]]), np.array([[-1.0, 0.2, 0.4], [0.0, 0.0, 0.0]])]


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


# ---- reference formulas (numpy, float64), written from the definitions ----
def ref_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_softmax_kl(student, target, tau):
    """tau^2 * mean over rows of sum_k p_t log(p_t / p_s), p = softmax(z / tau)."""
    ps, pt = ref_softmax(student / tau), ref_softmax(target / tau)
    return tau ** 2 * (pt * np.log(pt / ps)).sum(-1).mean()


def ref_bernoulli_kl(student, target, tau, weight=None):
    """tau^2 * (weighted) mean over rows of the summed two-outcome KLs, p = sigmoid(z / tau)."""
    ps, pt = 1 / (1 + np.exp(-student / tau)), 1 / (1 + np.exp(-target / tau))
    kl = (pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))).sum(-1)
    per_row = kl.mean() if weight is None else (weight * kl).sum() / weight.sum()
    return tau ** 2 * per_row


# ---- golden values ----
def test_softmax_kl_closed_form():
    # p_T = (3/4, 1/4), p_S = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    got = soft_kl(t64([[0.0, 0.0]]), t64([[math.log(3.0), 0.0]]), temperature=1.0)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # at tau = 2 with doubled logits the distributions are the same, the value is tau^2 times it
    got2 = soft_kl(t64([[0.0, 0.0]]), t64([[2 * math.log(3.0), 0.0]]), temperature=2.0)
    assert float(got2) == pytest.approx(4 * expected, rel=1e-12)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_soft_kl_softmax_golden(tau):
    got = soft_kl(t64(STUDENT), t64(TEACHER), tau, kind="softmax")
    assert float(got) == pytest.approx(ref_softmax_kl(STUDENT, TEACHER, tau), rel=1e-10)
    got32 = soft_kl(torch.tensor(STUDENT, dtype=torch.float32), torch.tensor(TEACHER, dtype=torch.float32), tau)
    assert float(got32) == pytest.approx(ref_softmax_kl(STUDENT, TEACHER, tau), rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_soft_kl_sigmoid_golden(tau):
    got = soft_kl(t64(STUDENT), t64(TEACHER), tau, kind="sigmoid")
    assert float(got) == pytest.approx(ref_bernoulli_kl(STUDENT, TEACHER, tau), rel=1e-10)
    weight = np.array([0.25, 2.0])
    got_w = soft_kl(t64(STUDENT), t64(TEACHER), tau, kind="sigmoid", weight=t64(weight))
    assert float(got_w) == pytest.approx(ref_bernoulli_kl(STUDENT, TEACHER, tau, weight), rel=1e-10)
    # a zero weight removes its row entirely
    only_first = soft_kl(t64(STUDENT), t64(TEACHER), tau, kind="sigmoid", weight=t64([1.0, 0.0]))
    assert float(only_first) == pytest.approx(ref_bernoulli_kl(STUDENT[:1], TEACHER[:1], tau), rel=1e-10)


def test_kd_loss_golden_default_temperature_is_4():
    assert float(kd_loss(t64(STUDENT), t64(TEACHER))) == pytest.approx(
        ref_softmax_kl(STUDENT, TEACHER, 4.0), rel=1e-10)
    assert float(kd_loss(t64(STUDENT), t64(TEACHER), 2.0)) == pytest.approx(
        ref_softmax_kl(STUDENT, TEACHER, 2.0), rel=1e-10)


def test_mutual_loss_golden_is_mean_over_peers():
    tau = 2.0
    expected = np.mean([ref_softmax_kl(STUDENT, p, tau) for p in PEERS])
    got = mutual_loss(t64(STUDENT), [t64(p) for p in PEERS], tau)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    one = mutual_loss(t64(STUDENT), [t64(PEERS[0])], tau)
    assert float(one) == pytest.approx(ref_softmax_kl(STUDENT, PEERS[0], tau), rel=1e-10)


def test_student_loss_weights_each_term_and_skips_terms_that_are_off(monkeypatch):
    from mtml.core import terms

    fixed = lambda value: (lambda view: None if value is None else torch.tensor(value))  # noqa: E731
    monkeypatch.setattr(terms, "STUDENT_TERMS", [
        terms.Term("sup", lambda cfg, ramp: cfg.w_ce, fixed(0.7)),
        terms.Term("kd", lambda cfg, ramp: ramp * cfg.w_kd, fixed(2.0)),
        terms.Term("ml", lambda cfg, ramp: ramp * cfg.w_ml, fixed(None))])  # off, whatever its weight
    view = terms.StudentView(0, None, None, None, [], config_only(w_ce=0.5, w_kd=2.0, w_ml=100.0), None, None, {})
    assert float(terms.student_loss(view)) == pytest.approx(0.5 * 0.7 + 2.0 * 2.0)
    assert float(terms.student_loss(view, ramp=0.25)) == pytest.approx(0.5 * 0.7 + 0.25 * 2.0 * 2.0)  # warm-up


def config_only(**weights):
    from types import SimpleNamespace

    return SimpleNamespace(cfg=SimpleNamespace(**weights))


def test_a_new_loss_term_is_one_function_and_one_registration(monkeypatch):
    """A toy term (an L2 penalty on the student's logits) added to STUDENT_TERMS alone changes the
    trained objective by exactly its weight times its value, for every student."""
    import copy

    from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step
    from mtml.core import terms

    task, batch = ClassificationTask(2), {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(8) % 2}
    cohort = Cohort.build(CohortConfig(mode="kd_ml", n_students=2, clip_grad_norm=0.0), task=task)
    probe, plain, extended = (copy.deepcopy(cohort) for _ in range(3))
    with torch.no_grad():
        penalty = [task.outputs(s, batch).pow(2).mean() for s in probe.students]  # the same train-mode forward
    before = cohort_step(plain, batch, task)
    monkeypatch.setattr(terms, "STUDENT_TERMS",
                        [*terms.STUDENT_TERMS, terms.Term("l2", lambda cfg, ramp: 0.1, lambda v: v.out.pow(2).mean())])
    after = cohort_step(extended, batch, task)
    from mtml.runs.spec import spec_of

    with_term = spec_of(cohort.cfg, task).hash
    monkeypatch.undo()
    assert with_term != spec_of(cohort.cfg, task).hash, "an added term changes the run's identity"
    for i, name in enumerate(("student_1", "student_2")):
        assert float(after[f"{name}/loss"] - before[f"{name}/loss"]) == pytest.approx(0.1 * float(penalty[i]), rel=1e-5)
    assert float(after["teacher/sup"]) == pytest.approx(float(before["teacher/sup"]))  # the teacher's loss is its own


# ---- properties ----
def ref_kl_per_row(student, target, tau, kind):
    """Per-row KL(p_target || p_student) at tau, from the probabilities themselves (float64 numpy,
    no log-sum-exp tricks): softmax over the last axis, or one Bernoulli per entry (sigmoid) whose
    two-outcome KLs are summed over the last axis. Not yet tau^2-scaled, not averaged."""
    s, t = np.asarray(student, float) / tau, np.asarray(target, float) / tau
    if kind == "softmax":
        ps, pt = np.exp(s) / np.exp(s).sum(-1, keepdims=True), np.exp(t) / np.exp(t).sum(-1, keepdims=True)
        return (pt * np.log(pt / ps)).sum(-1)
    ps, pt = 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-t))
    return (pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))).sum(-1)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_kl_matches_a_float64_reference_and_is_zero_at_equality(kind):
    """Random logits (rows of different spread, also near-equal pairs): soft_kl equals the reference
    tau^2 * mean_rows KL, and each row's KL (isolated with a one-hot weight) equals the reference
    row: a sign error, a missing term (e.g. the (1 - p) outcome), KL(student || target), or a
    wrong negative row hidden by the clamp at 0 all fail. The reference rows are checked > 0
    first (that is what makes the clamp harmless for correct code)."""
    g = torch.Generator().manual_seed(0)
    tau, rows = 1.7, 6
    for trial in range(20):
        scale = torch.tensor([0.3, 1.0, 3.0, 5.0, 3.0, 3.0], dtype=torch.float64)[:, None]
        s = scale * torch.randn(rows, 4, generator=g, dtype=torch.float64)
        t = scale * torch.randn(rows, 4, generator=g, dtype=torch.float64)
        t[-1] = s[-1] + 1e-3 * torch.randn(4, generator=g, dtype=torch.float64)  # a tiny KL (~1e-7)
        ref_rows = ref_kl_per_row(s.numpy(), t.numpy(), tau, kind)
        assert (ref_rows > 0).all()
        got = float(soft_kl(s, t, tau, kind=kind))
        assert got == pytest.approx(tau ** 2 * ref_rows.mean(), rel=1e-9, abs=1e-15), trial
        for r in range(rows):
            one_hot = torch.zeros(rows, dtype=torch.float64)
            one_hot[r] = 1.0
            row = float(soft_kl(s, t, tau, kind=kind, weight=one_hot))
            assert row == pytest.approx(tau ** 2 * ref_rows[r], rel=1e-6, abs=1e-15), (trial, r)
        assert float(soft_kl(s, s.clone(), tau, kind=kind)) == 0.0


def test_softmax_kl_ignores_a_constant_shift_of_the_logits():
    s = t64(STUDENT)
    assert float(soft_kl(s, s + 5.0, 2.0)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_tau_squared_factor_is_exact(kind):
    # tau^2 KL(p_t^tau || p_s^tau) == tau^2 * [KL at tau = 1 of the logits divided by tau]
    s, t = t64(STUDENT), t64(TEACHER)
    for tau in (0.5, 2.0, 7.0):
        assert float(soft_kl(s, t, tau, kind=kind)) == pytest.approx(
            tau ** 2 * float(soft_kl(s / tau, t / tau, 1.0, kind=kind)), rel=1e-12)


def test_gradient_is_tau_times_probability_gap():
    """d/dz_s [tau^2 KL] = tau (p_s^tau - p_t^tau) / rows (Hinton et al. 2015, eq. 2 times tau^2)."""
    for tau in (1.0, 4.0):
        s = t64(STUDENT).requires_grad_(True)
        soft_kl(s, t64(TEACHER), tau).backward()
        expected = tau * (ref_softmax(STUDENT / tau) - ref_softmax(TEACHER / tau)) / len(STUDENT)
        np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-10, atol=1e-14)


def test_tau_squared_keeps_the_gradient_scale_at_high_temperature():
    """At high tau the gradient tends to (centred logit gap) / (classes * rows), whatever tau:
    the tau^2 factor is what keeps it from shrinking like 1/tau^2."""
    s0, t0 = STUDENT - STUDENT.mean(-1, keepdims=True), TEACHER - TEACHER.mean(-1, keepdims=True)
    limit = (s0 - t0) / (STUDENT.shape[1] * len(STUDENT))
    norms = {}
    for tau in (20.0, 200.0):
        s = t64(STUDENT).requires_grad_(True)
        soft_kl(s, t64(TEACHER), tau).backward()
        np.testing.assert_allclose(s.grad.numpy(), limit, atol=0.1 * np.abs(limit).max() * 20 / tau)
        norms[tau] = float(s.grad.norm())
    assert norms[200.0] / norms[20.0] == pytest.approx(1.0, abs=0.02)  # 1/100 without tau^2


@pytest.mark.parametrize("fn", [
    lambda s, t: soft_kl(s, t, 2.0),
    lambda s, t: soft_kl(s, t, 2.0, kind="sigmoid"),
    lambda s, t: kd_loss(s, t),
    lambda s, t: mutual_loss(s, [t, 2 * t], 3.0),
], ids=["soft_kl_softmax", "soft_kl_sigmoid", "kd_loss", "mutual_loss"])
def test_target_is_detached(fn):
    s = t64(STUDENT).requires_grad_(True)
    t = t64(TEACHER).requires_grad_(True)
    fn(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_bad_temperature_raises(tau):
    with pytest.raises(ValueError, match="temperature"):
        soft_kl(t64(STUDENT), t64(TEACHER), tau)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kind"):
        soft_kl(t64(STUDENT), t64(TEACHER), 1.0, kind="gaussian")
    with pytest.raises(ValueError, match="differ"):
        soft_kl(t64(STUDENT), t64(TEACHER[:, :2]), 1.0)
    with pytest.raises(ValueError, match="peer"):
        mutual_loss(t64(STUDENT), [], 1.0)


# ---- tests added from a mutation run (each kills a mutant that survived the suite) ----
def test_distill_ramp_golden():
    from mtml.core.step import distill_ramp

    floor = math.exp(-5.0)
    assert distill_ramp(0.0, 2.0) == 0.0  # random teacher and peers teach nothing at the first step
    assert distill_ramp(1.0, 2.0) == pytest.approx((math.exp(-5.0 * 0.25) - floor) / (1.0 - floor), rel=1e-12)
    assert distill_ramp(2.0, 2.0) == distill_ramp(5.0, 2.0) == distill_ramp(0.3, 0.0) == 1.0


def test_the_warm_up_scales_kd_and_ml_but_not_the_label_term():
    import copy

    from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step

    task, batch = ClassificationTask(2), {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(8) % 2}
    cohort = Cohort.build(CohortConfig(mode="kd_ml", w_ce=0.7, distill_warmup_epochs=2.0), task=task)
    off = cohort_step(copy.deepcopy(cohort), batch, task, distill_scale=0.0)
    half = cohort_step(copy.deepcopy(cohort), batch, task, distill_scale=0.5)
    for s in ("student_1", "student_2"):
        assert float(off[f"{s}/loss"]) == pytest.approx(0.7 * float(off[f"{s}/sup"]))
        assert float(half[f"{s}/loss"]) == pytest.approx(
            0.7 * float(half[f"{s}/sup"]) + 0.5 * (float(half[f"{s}/kd"]) + float(half[f"{s}/ml"])), rel=1e-6)


def test_soft_kl_weights_get_no_gradient_and_tiny_weights_are_a_weighted_mean():
    student, target = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    weight = torch.full((4,), 1e-4, requires_grad=True)
    loss = soft_kl(student, target, 2.0, weight=weight)
    loss.backward()
    assert weight.grad is None  # the weights say where to distil; they are not learned through the loss
    plain = soft_kl(student.detach(), target, 2.0)  # equal weights: the plain mean, however small they are
    assert float(loss.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)


def test_a_cohort_step_moves_the_learning_rate_schedule():
    from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step

    task, batch = ClassificationTask(2), {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(8) % 2}
    cohort = Cohort.build(CohortConfig(mode="ml", lr=0.1), task=task)
    cohort.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(cohort.optimizer, T_max=2)
    cohort_step(cohort, batch, task)
    cohort_step(cohort, batch, task)
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in cohort.optimizer.param_groups)


def test_both_kinds_of_knowledge_use_feature_maps():
    from mtml import CohortConfig

    assert CohortConfig(mode="kd_ml_styles", teacher_knowledge="both", peer_knowledge="predictions").uses_features
    assert not CohortConfig(mode="kd_ml").uses_features


def test_default_temperatures_and_an_empty_batch():
    """Gaps a mutation run of mtml/core/losses.py found (bench/mutation.py): the defaults (soft_kl
    and mutual_loss: tau = 1) and zero rows (a batch without a location to distill: 0, not NaN)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert soft_kl(s, t) == soft_kl(s, t, 1.0) != soft_kl(s, t, 2.0)
    assert mutual_loss(s, [t]) == mutual_loss(s, [t], 1.0) != mutual_loss(s, [t], 2.0)
    empty = soft_kl(torch.zeros(0, 3), torch.zeros(0, 3), 4.0)
    assert empty.item() == 0.0
