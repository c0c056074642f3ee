"""Tests of mtml.teacher_tape: a run that replays a recorded teacher gives exactly the results of
a run that trains it, in both tasks; what may not replay trains the teacher; a resumed replay
needs its tape."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from mtml import ClassificationTask, Cohort, CohortConfig, fit
from mtml.data import make_separable
from mtml.teacher_tape import TapeRecorder, TapeReplay, tape_key, tape_path
from mtml.spec import spec_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = ClassificationTask(2)
TRAIN, VAL = make_separable(96, 16, seed=0), make_separable(32, 16, seed=1)


def run(mode: str, tape_dir, resume: bool = True, ckpt=None, **kw):
    cfg = CohortConfig(mode=mode, epochs=2, batch_size=16, seed=3, **kw)
    cohort = Cohort.build(cfg, task=TASK)
    history = fit(cohort, TASK, TRAIN, VAL, augment=TASK.augment, progress=False, tape_dir=tape_dir,
                  resume=resume, checkpoint_dir=ckpt)
    return cohort, history


def assert_same_run(a, b) -> None:
    (cohort_a, hist_a), (cohort_b, hist_b) = a, b
    pd.testing.assert_frame_equal(hist_a.drop(columns="time_s"), hist_b.drop(columns="time_s"), check_exact=True)
    for name, net in cohort_a.networks.items():
        other = cohort_b.networks[name].state_dict()
        for key, value in net.state_dict().items():
            assert torch.equal(value, other[key]), f"{name}.{key} differs"


def test_replayed_teacher_gives_the_trained_runs_results(tmp_path):
    trained = run("kd_ml", tape_dir=None)  # no tape: the teacher trains
    run("kd", tape_dir=tmp_path)  # records this seed's teacher
    spec = spec_of(trained[0].cfg, TASK, {"train_items": len(TRAIN)})
    assert tape_path(tmp_path, spec).is_file()
    cohort = Cohort.build(CohortConfig(mode="kd_ml", epochs=2, batch_size=16, seed=3), task=TASK)
    calls = []
    forward = cohort.teacher.forward
    cohort.teacher.forward = lambda x: calls.append(1) or forward(x)
    history = fit(cohort, TASK, TRAIN, VAL, augment=TASK.augment, progress=False, tape_dir=tmp_path, resume=True)
    assert calls == [], "a replayed teacher must not run"
    assert_same_run(trained, (cohort, history))
    assert list(history.columns) == list(trained[1].columns)


def test_detection_teacher_replays_exactly(tmp_path):
    from mtml.detection import DetectionTask
    from mtml.polyp import flip_augment, make_synthetic_polyps

    task = DetectionTask(size=64)
    data = make_synthetic_polyps(12, size=64, seed=0)

    def detection_run(mode, tape_dir, calls=None):
        cfg = CohortConfig.for_task(task, mode=mode, epochs=2, batch_size=4, seed=1)
        cohort = Cohort.build(cfg, task=task)
        if calls is not None:
            forward = cohort.teacher.forward
            cohort.teacher.forward = lambda x: calls.append(1) or forward(x)
        return cohort, fit(cohort, task, data, data, augment=flip_augment, progress=False, tape_dir=tape_dir,
                           resume=True)

    trained = detection_run("kd_ml", None)
    detection_run("kd", tmp_path)
    assert len(list(tmp_path.rglob("teacher_tape.pt"))) == 1
    calls = []
    assert_same_run(trained, detection_run("kd_ml", tmp_path, calls))
    assert calls == [], "a replayed teacher must not run"


def test_who_replays_and_who_records(tmp_path):
    cohort = Cohort.build(CohortConfig(mode="kd", epochs=1, batch_size=16), task=TASK)
    spec = spec_of(cohort.cfg, TASK, {"train_items": len(TRAIN)})
    fit(cohort, TASK, TRAIN, VAL, progress=False, tape_dir=tmp_path)
    # the students' settings do not change the teacher; its own settings do
    for kw, shared in ((dict(mode="kd_ml", temperature=2.0, w_kd=0.5, n_students=3), True),
                       (dict(lr=0.01), False), (dict(seed=1), False), (dict(epochs=2), False)):
        other = spec_of(CohortConfig(**{"mode": "kd", "epochs": 1, "batch_size": 16, **kw}), TASK,
                        {"train_items": len(TRAIN)})
        assert (tape_key(other) == tape_key(spec)) is shared, kw
    # resume=False records afresh; feature knowledge needs the teacher's maps, so it trains it
    for kw, resume in ((dict(mode="kd"), False), (dict(mode="kd_ml_styles"), True)):
        cohort = Cohort.build(CohortConfig(epochs=1, batch_size=16, **kw), task=TASK)
        seen = []
        original = TapeRecorder.step
        TapeRecorder.step = lambda self, *a, **k: seen.append(type(self)) or original(self, *a, **k)
        try:
            fit(cohort, TASK, TRAIN, VAL, progress=False, tape_dir=tmp_path, resume=resume)
        finally:
            TapeRecorder.step = original
        assert seen and set(seen) == {TapeRecorder}, kw


def test_a_teacher_that_draws_random_numbers_is_not_recorded(tmp_path):
    cohort = Cohort.build(CohortConfig(mode="kd", epochs=1, batch_size=16), task=TASK)
    cohort.teacher.features.insert(0, torch.nn.Dropout(0.1))
    fit(cohort, TASK, TRAIN, VAL, progress=False, tape_dir=tmp_path)
    assert not list(tmp_path.rglob("*.pt"))


def test_resumed_replay_needs_its_tape(tmp_path):
    run("kd", tape_dir=tmp_path)
    ckpt = tmp_path / "run"
    cohort = Cohort.build(CohortConfig(mode="kd_ml", epochs=2, batch_size=16, seed=3), task=TASK)
    assert isinstance(_tape_of(cohort, tmp_path, ckpt), TapeReplay)
    for tape in tmp_path.rglob("teacher_tape.pt"):
        tape.unlink()
    with pytest.raises(ValueError, match="replays the teacher tape .* gone or changed: delete"):
        run("kd_ml", tape_dir=tmp_path, ckpt=ckpt)


def _tape_of(cohort, tape_dir, ckpt):
    """Trains one epoch of two with `checkpoint_dir`, then returns the tape fit used."""
    seen = []
    original = TapeReplay.step
    TapeReplay.step = lambda self, *a, **k: seen.append(self) or original(self, *a, **k)

    def stop(history):
        raise KeyboardInterrupt

    try:
        fit(cohort, TASK, TRAIN, VAL, augment=TASK.augment, progress=False, tape_dir=tape_dir, resume=True,
            checkpoint_dir=ckpt, callback=stop)
    except KeyboardInterrupt:
        pass
    finally:
        TapeReplay.step = original
    return seen[0]
