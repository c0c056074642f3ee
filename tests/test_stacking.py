"""Students in one pass (`stack_students`): the same training as one student after another, within
float rounding, with unchanged checkpoints; refused with one line where it cannot apply."""
import pytest
import torch

from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step
from mtml.runs.spec import spec_of

TASK = ClassificationTask()


def batch(seed=0, n=16, size=32):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, size, size, generator=g), "label": torch.randint(0, 2, (n,), generator=g)}


def trained(stack: bool, mode="kd_ml", n=3, steps=3):
    cohort = Cohort.build(CohortConfig(mode=mode, n_students=n, seed=1, stack_students=stack), task=TASK)
    cohort.train()
    terms = [cohort_step(cohort, batch(s), TASK, s) for s in range(steps)]
    return cohort, terms


@pytest.mark.parametrize("mode", ["independent", "ml", "kd_ml"])
def test_stacked_students_train_as_one_after_another(mode, monkeypatch):
    from mtml import stacking

    original, calls = stacking.stacked_forward, []

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(stacking, "stacked_forward", spy)
    (plain, plain_terms), (stacked, stacked_terms) = trained(False, mode), trained(True, mode)
    assert len(calls) == 3  # the stacked path ran once per step
    for name, net in plain.networks.items():
        a, b = net.state_dict(), stacked.networks[name].state_dict()
        assert a.keys() == b.keys()  # a student's checkpoint is the same on disk
        for key in a:  # weights, BN running statistics and num_batches_tracked
            # 3 steps at lr 0.05 let float rounding flip a max-pool or ReLU tie, which moved single
            # weights of the 6-12-24 students by up to 3e-4 (2026-11-28); a wrong grouping moves them by ~0.1
            torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-3, msg=f"{name}.{key}")
    for a, b in zip(plain_terms, stacked_terms):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


@pytest.fixture
def float16_by_default():
    """CPU autocast's default dtype is bf16 already: with float16 as the default for the test, only
    the kit's explicit bf16 makes a forward run in bf16 (on CUDA the default is float16)."""
    before = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)
    yield
    torch.set_autocast_dtype("cpu", before)


def _in_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_stacked_students_under_amp_match_one_after_another(monkeypatch, float16_by_default):
    """bf16 autocast around the one stacked forward: the first step's terms are the unstacked
    cohort's within bf16 rounding (measured: at most 3e-4 apart)."""
    from mtml import stacking

    original, autocast_on = stacking.stacked_forward, []

    def spy(*args, **kwargs):
        autocast_on.append(_in_bf16())
        return original(*args, **kwargs)

    monkeypatch.setattr(stacking, "stacked_forward", spy)

    def first_terms(stack: bool) -> dict:
        cohort = Cohort.build(CohortConfig(mode="kd_ml", n_students=3, seed=1, stack_students=stack, amp=True), task=TASK)
        cohort.train()
        return cohort_step(cohort, batch(0), TASK, 0)

    plain, stacked = first_terms(False), first_terms(True)
    assert autocast_on == [True], "the stacked forward ran once, under bf16 autocast"
    assert plain.keys() == stacked.keys()
    for key in plain:
        torch.testing.assert_close(stacked[key], plain[key], rtol=1e-2, atol=2e-3, msg=key)


@pytest.mark.parametrize("cfg", [dict(mode="kd_ml"), dict(mode="kd_ml_styles", teacher_knowledge="features")])
def test_amp_runs_each_forward_under_bf16_autocast_and_the_losses_in_float32(monkeypatch, float16_by_default, cfg):
    task, under_autocast = ClassificationTask(), []

    def spied(forward):
        def spy(*args, **kwargs):
            under_autocast.append(_in_bf16())
            return forward(*args, **kwargs)
        return spy

    for name in ("outputs", "outputs_and_features"):  # predictions only, or with feature maps
        monkeypatch.setattr(task, name, spied(getattr(task, name)))
    cohort = Cohort.build(CohortConfig(n_students=2, amp=True, **cfg), task=task)
    terms = cohort_step(cohort, batch(0), task)
    assert len(under_autocast) >= 3 and all(under_autocast), "teacher and two students, each under bf16 autocast"
    assert all(v.dtype == torch.float32 for v in terms.values())


def test_a_stacked_cohort_refuses_a_step_of_a_task_it_cannot_stack():
    from mtml.tasks.detection import DetectionTask

    cohort = Cohort.build(CohortConfig(mode="ml", stack_students=True), task=TASK)
    with pytest.raises(ValueError, match="classifiers only, not the detection task"):
        cohort_step(cohort, batch(), DetectionTask(size=64))


def test_the_option_enters_the_run_identity_only_when_on():
    off = spec_of(CohortConfig(mode="kd_ml"), TASK)
    assert "stack_students" not in off.config  # runs from before the option keep their hash
    assert spec_of(CohortConfig(mode="kd_ml", stack_students=True), TASK).hash != off.hash


@pytest.mark.parametrize("cfg,task,message", [
    (dict(mode="independent", n_students=1), TASK, "at least 2 students"),
    (dict(mode="kd_ml", version="v1"), TASK, "TinyConvNet students"),
    (dict(mode="kd_ml_styles"), TASK, "feature knowledge"),
])
def test_stacking_is_refused_where_it_cannot_apply(cfg, task, message):
    with pytest.raises(ValueError, match=message) as err:
        Cohort.build(CohortConfig(stack_students=True, **cfg), task=task)
    assert "\n" not in str(err.value) and "stack_students" in str(err.value)


def test_stacking_is_refused_for_detection():
    from mtml.tasks.detection import DetectionTask

    with pytest.raises(ValueError, match="classifiers only, not the detection task"):
        Cohort.build(CohortConfig(mode="kd_ml", stack_students=True), task=DetectionTask(size=64))


def test_settings_the_stacked_form_would_ignore_are_refused():
    from torch import nn

    from mtml.tasks.models import TinyConvNet
    from mtml.core.stacking import why_not_stackable

    def students(change=None, every=False):
        nets = [TinyConvNet((8, 16, 32)) for _ in range(2)]
        for net in nets if every else nets[1:]:
            if change:
                change(net)
        return nets

    assert why_not_stackable(students()) is None
    pool = lambda net: setattr(net.features[6], "ceil_mode", True)  # noqa: E731
    assert "ceil_mode" in why_not_stackable(students(pool))
    bias = lambda net: setattr(net.features[0], "bias", nn.Parameter(torch.zeros(8)))  # noqa: E731
    assert "conv bias" in why_not_stackable(students(bias, every=True))
    eps = lambda net: setattr(net.features[1], "eps", 1e-3)  # noqa: E731
    assert "differ in their settings" in why_not_stackable(students(eps))


def test_stacking_is_refused_with_compile_and_under_ddp():
    from mtml.runs.distributed import wrap_cohort

    with pytest.raises(ValueError, match="compile=True"):
        CohortConfig(mode="kd_ml", stack_students=True, compile=True).validate()
    cohort = Cohort.build(CohortConfig(mode="kd_ml", stack_students=True), task=TASK)
    with pytest.raises(ValueError, match="cannot run under DDP"):  # before any process group is needed
        wrap_cohort(cohort)
