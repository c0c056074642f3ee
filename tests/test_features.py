"""Feature distillation and learning styles (mtml.features, mode kd_ml_styles): the loss by hand,
gradient isolation with adapters, one forward per network, exact resume, bad parameters."""
from __future__ import annotations

import copy

import pytest
import torch

from mtml import ClassificationTask, Cohort, CohortConfig, cohort_step, fit
from mtml.tasks.data import make_separable
from mtml.tasks.detection import DetectionTask
from mtml.core.features import EPS, feature_loss, uses
from mtml.tasks.polyp import make_synthetic_polyps
from mtml.runs.spec import spec_of
from mtml.core.loop import Callback
from mtml.runs.checkpoint import Checkpoint

TASK = ClassificationTask(2)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(n=16, seed=0):
    data = make_separable(n, 16, seed=seed)
    return TASK.collate([data[i] for i in range(n)])


def test_feature_loss_by_hand():
    s = torch.tensor([0.0, 2.0]).view(1, 1, 1, 2)   # standardised: [-1, 1] / sqrt(1 + eps)
    same = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)  # another scale and offset, same pattern
    flipped = torch.tensor([3.0, 1.0]).view(1, 1, 1, 2)
    assert float(feature_loss(s, same)) == pytest.approx(0.0, abs=1e-12)
    assert float(feature_loss(s, flipped)) == pytest.approx(4 / (1 + EPS), rel=1e-6)
    # a 2x2 student map is pooled to the 1x2 target: columns [0, 2] and [2, 6] -> [1, 4] (var 2.25)
    pooled = torch.tensor([[0.0, 2.0], [2.0, 6.0]]).view(1, 1, 2, 2)
    expected = (1.5 / (2.25 + EPS) ** 0.5 + 1 / (1 + EPS) ** 0.5) ** 2
    assert float(feature_loss(pooled, flipped)) == pytest.approx(expected, rel=1e-6)
    target = torch.randn(2, 3, 4, 4, requires_grad=True)
    feature_loss(torch.randn(2, 3, 4, 4, requires_grad=True), target).backward()
    assert target.grad is None  # the target is detached
    with pytest.raises(ValueError, match="adapt the student"):
        feature_loss(torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4))


def reference_grads(cohort: Cohort, b, task=TASK) -> dict:
    """Each network's (and its adapters') gradient from its own objective alone, with every other
    network's outputs and maps explicitly detached, on copies."""
    cfg = cohort.cfg
    teacher_k, peer_k = cfg.knowledge()
    nets = {k: copy.deepcopy(m) for k, m in cohort.networks.items()}
    adapters = copy.deepcopy(cohort.adapters)
    fwd = {k: task.outputs_and_features(m, b, cfg.feature_levels) for k, m in nets.items()}
    students = [k for k in nets if k.startswith("student")]
    grads = {"teacher": torch.autograd.grad(task.supervised_loss(fwd["teacher"][0], b),
                                            list(nets["teacher"].parameters()), retain_graph=True)}
    for i, name in enumerate(students):
        out, maps = fwd[name]
        loss = cfg.w_ce * task.supervised_loss(out, b)
        t_out, t_maps = detached(fwd["teacher"][0]), [m.detach() for m in fwd["teacher"][1]]
        if uses(teacher_k[i], "predictions"):
            loss = loss + cfg.w_kd * task.distill_loss(out, t_out, cfg.temperature)
        if uses(teacher_k[i], "features"):
            loss = loss + cfg.w_kd * cfg.w_feat * adapters[name].loss("teacher", maps, t_maps)
        peers = [p for p in students if p != name]
        if uses(peer_k, "predictions"):
            loss = loss + cfg.w_ml * torch.stack([task.distill_loss(out, detached(fwd[p][0]), cfg.temperature)
                                                  for p in peers]).mean()
        if uses(peer_k, "features"):
            loss = loss + cfg.w_ml * cfg.w_feat * torch.stack(
                [adapters[name].loss(p, maps, [m.detach() for m in fwd[p][1]]) for p in peers]).mean()
        own = list(nets[name].parameters()) + (list(adapters[name].parameters()) if name in adapters else [])
        grads[name] = torch.autograd.grad(loss, own, retain_graph=True)
    return grads


def detached(out):
    if torch.is_tensor(out):
        return out.detach()
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}


@pytest.mark.parametrize("task_name, knowledge", [
    ("classification", dict()), ("classification", dict(teacher_knowledge="both", peer_knowledge="features")),
    ("classification", dict(teacher_knowledge="features|predictions|both")), ("detection", dict()),
    ("classification", dict(teacher_knowledge="predictions", peer_knowledge="features"))])  # peers' maps only
def test_every_network_and_adapter_gets_gradient_from_its_own_objective_only(task_name, knowledge):
    if task_name == "detection":
        task = DetectionTask(size=64)
        frames = make_synthetic_polyps(4, 64)
        b = task.collate([frames[i] for i in range(4)])
        cfg = CohortConfig.for_task(task, mode="kd_ml_styles", n_students=3, w_kd=1.5, w_ml=0.7, w_feat=2.0,
                                    clip_grad_norm=0.0, **knowledge)
    else:
        task, b = TASK, batch()
        cfg = CohortConfig(mode="kd_ml_styles", n_students=3, w_kd=1.5, w_ml=0.7, w_feat=2.0, clip_grad_norm=0.0,
                           **knowledge)
    cohort = Cohort.build(cfg, task=task)
    cohort.train()
    expected = reference_grads(cohort, b, task)
    cohort_step(cohort, b, task)
    for name, net in cohort.networks.items():
        own = list(net.parameters()) + (list(cohort.adapters[name].parameters()) if name in cohort.adapters else [])
        assert len(own) == len(expected[name])
        for p, ref in zip(own, expected[name]):
            assert torch.allclose(p.grad, ref, atol=1e-5), name


def test_a_student_with_predictions_only_is_unaffected_by_feature_terms():
    b = batch()
    plain = Cohort.build(CohortConfig(mode="kd_ml"), task=TASK)
    styled = Cohort.build(CohortConfig(mode="kd_ml_styles", teacher_knowledge="predictions|features",
                                       peer_knowledge="predictions"), task=TASK)
    assert list(styled.adapters) == ["student_2"]  # only the feature learner has adapters
    a, c = cohort_step(plain, b, TASK), cohort_step(styled, b, TASK)
    assert float(a["student_1/loss"]) == float(c["student_1/loss"])
    for p, q in zip(plain.students[0].parameters(), styled.students[0].parameters()):
        assert torch.equal(p, q)  # the same update, bit for bit
    assert float(c["student_2/kd_feat"]) > 0 and "student_2/kd" not in c


def test_a_feature_only_learner_logs_the_loss_its_terms_add_up_to():
    """A student whose teacher knowledge is features alone: its logged loss is w_ce x sup +
    w_kd x w_feat x its feature term, nothing added (a constant would leave the gradients alone
    and still misreport every loss curve)."""
    cfg = CohortConfig(mode="kd_ml_styles", teacher_knowledge="predictions|features", peer_knowledge="predictions",
                       w_kd=0.7, w_ml=0.4, w_feat=0.3, w_ce=1.5)
    log = cohort_step(Cohort.build(cfg, task=TASK), batch(), TASK)
    expected = 1.5 * log["student_2/sup"] + 0.7 * 0.3 * log["student_2/kd_feat"] + 0.4 * log["student_2/ml"]
    assert float(log["student_2/loss"]) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("task_name", ["classification", "detection"])
def test_one_forward_per_network_with_features_on(task_name):
    if task_name == "classification":
        task, b = TASK, batch()
        cohort = Cohort.build(CohortConfig(mode="kd_ml_styles", n_students=3), task=task)
    else:
        task = DetectionTask(size=64)
        frames = make_synthetic_polyps(4, 64)
        b = task.collate([frames[i] for i in range(4)])
        cohort = Cohort.build(CohortConfig.for_task(task, mode="kd_ml_styles"), task=task)
        assert [len(a) for a in cohort.adapters["student_2"].maps.values()] == [3, 3]  # P3-P5, teacher and peer
    calls = dict.fromkeys(cohort.networks, 0)
    for name, net in cohort.networks.items():
        net.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))
    terms = cohort_step(cohort, b, task)
    assert calls == dict.fromkeys(cohort.networks, 1)
    assert all(torch.isfinite(v) for v in terms.values()) and "student_2/kd_feat" in terms and "student_1/ml_feat" in terms


def test_adapters_train_save_and_resume_exactly(tmp_path):
    data, val = make_separable(48, 16, seed=0), make_separable(16, 16, seed=1, split=1)
    cfg = CohortConfig(mode="kd_ml_styles", epochs=2, batch_size=16)
    whole = Cohort.build(cfg, task=TASK)
    before = copy.deepcopy(whole.adapters.state_dict())
    fit(whole, TASK, data, val, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in whole.adapters.state_dict().items())  # they learn

    first = Cohort.build(CohortConfig(**{**cfg.__dict__, "epochs": 2}), task=TASK)
    spec = spec_of(cfg, TASK, {"train_items": len(data)})
    with pytest.raises(KeyboardInterrupt):
        fit(first, TASK, data, val, progress=False, callbacks=[Checkpoint(tmp_path, spec), StopAfterOneEpoch()])
    resumed = Cohort.build(cfg, task=TASK)
    fit(resumed, TASK, data, val, progress=False, callbacks=[Checkpoint(tmp_path, spec, resume=True)])
    for (k, v), w in zip(whole.adapters.state_dict().items(), resumed.adapters.state_dict().values()):
        assert torch.equal(v, w), k
    for a, c in zip(whole.students[1].parameters(), resumed.students[1].parameters()):
        assert torch.equal(a, c)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="kd_ml_styles", teacher_knowledge="feature"), "teacher_knowledge must be one of"),
    (dict(mode="kd_ml_styles", teacher_knowledge="features|predictions|both"), "one per student"),
    (dict(mode="ml", teacher_knowledge="features"), "needs a teacher"),
    (dict(mode="kd", peer_knowledge="both"), "needs peers"),
    (dict(mode="kd_ml_styles", feature_levels=0), "feature_levels must be >= 1"),
    (dict(mode="kd_ml_styles", w_feat=float("nan")), "w_feat"),
])
def test_bad_knowledge_settings_are_refused_up_front(kw, match):
    with pytest.raises(ValueError, match=match):
        CohortConfig(**kw).validate()


def test_too_many_feature_levels_are_refused_when_the_cohort_is_built():
    with pytest.raises(ValueError, match="feature_levels=4, but TinyConvNet has 3 stages"):
        Cohort.build(CohortConfig(mode="kd_ml_styles", feature_levels=4), task=TASK)
    task = DetectionTask(size=64)
    with pytest.raises(ValueError, match="has 3 FPN levels"):
        Cohort.build(CohortConfig.for_task(task, mode="kd_ml_styles", feature_levels=5), task=task)


def test_run_identity_keeps_old_runs_and_resolves_auto():
    plain = spec_of(CohortConfig(mode="kd_ml"), TASK)
    assert not {"teacher_knowledge", "peer_knowledge", "w_feat", "feature_levels"} & set(plain.config)
    assert spec_of(CohortConfig(mode="kd_ml", teacher_knowledge="predictions", peer_knowledge="predictions",
                                w_feat=3.0), TASK).hash == plain.hash  # nothing learns features: same run
    auto = spec_of(CohortConfig(mode="kd_ml_styles"), TASK)
    explicit = spec_of(CohortConfig(mode="kd_ml_styles", teacher_knowledge="predictions|features",
                                    peer_knowledge="both"), TASK)
    assert auto.hash == explicit.hash and auto.config["teacher_knowledge"] == "predictions|features"
    assert spec_of(CohortConfig(mode="kd_ml_styles", w_feat=0.5), TASK).hash != auto.hash


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_adapter_channels_match_the_maps_of_every_version(version):
    from mtml.core.features import feature_channels
    from mtml.tasks.models import build_cohort_networks

    teacher, (student,) = build_cohort_networks(version, 1)
    images = {"image": torch.randn(2, 3, 32, 32)}
    for net in (teacher, student):
        net.eval()
        for levels in (1, 2):
            with torch.no_grad():
                _, maps = TASK.outputs_and_features(net, images, levels)
            assert feature_channels(net, levels) == [m.shape[1] for m in maps], (version, type(net).__name__, levels)
        assert not net.training  # the dry forward leaves the mode as it found it


@pytest.mark.parametrize("kw", [dict(amp=True), dict(channels_last=True), dict(mode="offline"),
                                dict(n_students=3, feature_levels=2), dict(amp=True, feature_levels=2)])
def test_feature_knowledge_with_the_speed_options_offline_and_more_students(kw):
    from mtml.tasks.models import build_network

    kw = {"mode": "kd_ml_styles", "teacher_knowledge": "features", **kw}
    teacher = build_network("tiny_teacher", 2) if kw["mode"] == "offline" else None
    task = ClassificationTask(2, channels_last=kw.get("channels_last", False))
    cohort = Cohort.build(CohortConfig(**kw), teacher=teacher, task=task)
    before = copy.deepcopy(teacher.state_dict()) if teacher is not None else None
    terms = cohort_step(cohort, batch(), task)
    assert all(torch.isfinite(v) for v in terms.values()) and "student_1/kd_feat" in terms
    if before is not None:  # the frozen teacher is untouched
        assert all(torch.equal(v, cohort.teacher.state_dict()[k]) for k, v in before.items())


def test_compile_with_feature_knowledge_is_refused():
    with pytest.raises(ValueError, match="compile=True cannot be combined with feature knowledge"):
        CohortConfig(mode="kd_ml_styles", compile=True).validate()
    CohortConfig(mode="kd_ml", compile=True).validate()  # predictions only: fine


def test_a_study_without_claims_takes_the_default_claims_its_modes_allow(tmp_path):
    from mtml.runs.study import Study

    path = tmp_path / "two_modes.yaml"
    path.write_text("name: two_modes\ntask: detection\ndata: real\nversion: tiny\nmodes: [kd_ml, kd]\nseeds: [0, 1]\n")
    assert Study.load(path).claims == (("kd_ml", "kd"),)
    path.write_text(path.read_text() + "claims: [[kd_ml, ml]]\n")
    with pytest.raises(ValueError, match="claims must be pairs"):
        Study.load(path)


def test_an_offline_teacher_with_feature_knowledge_pretrains_like_any_other():
    from mtml import pretrain_teacher

    data = make_separable(16, 16, seed=0)
    plain = pretrain_teacher(TASK, data, CohortConfig(mode="offline", epochs=1, batch_size=8), progress=False)
    styled = pretrain_teacher(TASK, data, CohortConfig(mode="offline", teacher_knowledge="features", epochs=1,
                                                       batch_size=8), progress=False)
    for a, b in zip(plain.parameters(), styled.parameters()):
        assert torch.equal(a, b)  # the teacher's own training ignores what students take from it


def test_adapters_draw_from_their_own_generator_only():
    torch.manual_seed(0)
    Cohort.build(CohortConfig(mode="kd_ml"), task=TASK)
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    Cohort.build(CohortConfig(mode="kd_ml_styles"), task=TASK)
    assert torch.equal(torch.rand(3), after_plain)  # the global stream is where it would be without them


class StopAfterOneEpoch(Callback):
    def on_epoch_end(self, cohort, state):
        raise KeyboardInterrupt
