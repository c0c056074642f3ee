"""Students in one pass (`stack_students`): the same training as one student after another, within
float rounding, with unchanged checkpoints; refused with one line where it cannot apply."""
import pytest
import torch

from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step
from mtml.spec import spec_of

TASK = ClassificationTask()


def batch(seed=0, n=16, size=32):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, size, size, generator=g), "label": torch.randint(0, 2, (n,), generator=g)}


def trained(stack: bool, mode="kd_ml", n=3, steps=3):
    cohort = Cohort.build(CohortConfig(mode=mode, n_students=n, seed=1, stack_students=stack), task=TASK)
    cohort.train()
    terms = [cohort_step(cohort, batch(s), TASK, s) for s in range(steps)]
    return cohort, terms


@pytest.mark.parametrize("mode", ["independent", "kd_ml"])
def test_stacked_students_train_as_one_after_another(mode):
    (plain, plain_terms), (stacked, stacked_terms) = trained(False, mode), trained(True, mode)
    for name, net in plain.networks.items():
        a, b = net.state_dict(), stacked.networks[name].state_dict()
        assert a.keys() == b.keys()  # a student's checkpoint is the same on disk
        for key in a:  # weights, BN running statistics and num_batches_tracked
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    for a, b in zip(plain_terms, stacked_terms):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_a_stacked_checkpoint_loads_into_the_plain_cohort():
    stacked, _ = trained(True)
    plain = Cohort.build(CohortConfig(mode="kd_ml", n_students=3, seed=1), task=TASK)
    plain.load_state_dict(stacked.state_dict())
    x = batch(9)["image"]
    for name, net in plain.networks.items():
        net.eval(), stacked.networks[name].eval()
        torch.testing.assert_close(net(x), stacked.networks[name](x))


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
    from mtml.detection import DetectionTask

    with pytest.raises(ValueError, match="classifiers only, not the detection task"):
        Cohort.build(CohortConfig(mode="kd_ml", stack_students=True), task=DetectionTask(size=64))
