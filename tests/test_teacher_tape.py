"""Tests of mtml.teacher_tape: a run that replays a recorded teacher gives exactly the results of
a run that trains it, in both tasks; what may not replay trains the teacher; a resumed replay
goes on only with its own tape; a finished run reloads without one."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from mtml import ClassificationTask, Cohort, CohortConfig, fit
from mtml.tasks.data import make_separable
from mtml.runs.spec import spec_of
from mtml.core.loop import Callback
from mtml.runs.checkpoint import Checkpoint
from mtml.runs.teacher_tape import TeacherTape
from mtml.runs.teacher_tape import TapeRecorder, TapeReplay, tape_key, read_tape, tape_path, teacher_meta

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = ClassificationTask(2)
TRAIN, VAL = make_separable(96, 16, seed=0), make_separable(32, 16, seed=1)


def cohort_of(mode: str, **kw) -> Cohort:
    return Cohort.build(CohortConfig(**{"mode": mode, "epochs": 2, "batch_size": 16, "seed": 3, **kw}), task=TASK)


def spec(cfg, task=TASK, n: int | None = None):
    """The run's spec with a data fingerprint (a tape needs one, not only the data's size)."""
    return spec_of(cfg, task, {"train_items": n or len(TRAIN), "dataset": "make_separable(seed=0)"})


def with_store(cohort: Cohort, tape_dir, run_spec, checkpoint_dir=None, resume=True, stop=False) -> list:
    """The callbacks of a run in the store: its checkpoint, its teacher tape (both optional), and a
    KeyboardInterrupt after the first epoch (`stop`)."""
    callbacks = [Checkpoint(checkpoint_dir, run_spec, resume)] if checkpoint_dir else []
    callbacks += [TeacherTape(tape_dir, run_spec, resume)] if tape_dir else []
    return callbacks + ([StopAfterOneEpoch()] if stop else [])


class StopAfterOneEpoch(Callback):
    def on_epoch_end(self, cohort, state):
        raise KeyboardInterrupt


def run(cohort: Cohort, tape_dir, **kw):
    """(cohort, history, whether its teacher was replayed) of a run with `tape_dir` as its run store."""
    callbacks = with_store(cohort, tape_dir, spec(cohort.cfg), **kw)
    history = fit(cohort, TASK, TRAIN, VAL, augment=TASK.augment, progress=False, callbacks=callbacks)
    return cohort, history, any(isinstance(cb, TeacherTape) and cb.replayed for cb in callbacks)


def count_teacher_forwards(cohort: Cohort) -> list:
    calls, forward = [], cohort.teacher.forward
    cohort.teacher.forward = lambda x: calls.append(1) or forward(x)
    return calls


def assert_same_run(a, b) -> None:
    (cohort_a, hist_a, _), (cohort_b, hist_b, _) = a, b
    pd.testing.assert_frame_equal(hist_a.drop(columns="time_s"), hist_b.drop(columns="time_s"), check_exact=True)
    for name, net in cohort_a.networks.items():
        other = cohort_b.networks[name].state_dict()
        for key, value in net.state_dict().items():
            assert torch.equal(value, other[key]), f"{name}.{key} differs"


def test_replayed_teacher_gives_the_trained_runs_results(tmp_path):
    trained = run(cohort_of("kd_ml"), tape_dir=None)  # no tape: the teacher trains
    assert trained[2] is False
    run(cohort_of("kd"), tape_dir=tmp_path)  # records this seed's teacher
    assert tape_path(tmp_path, spec(trained[0].cfg)).is_file()
    cohort = cohort_of("kd_ml")
    calls = count_teacher_forwards(cohort)
    replayed = run(cohort, tape_dir=tmp_path)
    assert calls == [], "a replayed teacher must not run"
    assert replayed[2] is True
    assert_same_run(trained, replayed)
    assert list(replayed[1].columns) == list(trained[1].columns)


def test_detection_teacher_replays_exactly(tmp_path):
    from mtml.tasks.dense_distill import DenseDistillation
    from mtml.tasks.detection import DetectionTask
    from mtml.tasks.polyp import flip_augment, make_synthetic_polyps

    task = DetectionTask(size=64)
    data = make_synthetic_polyps(12, size=64, seed=0)

    def detection_run(cohort, tape_dir):
        callbacks = with_store(cohort, tape_dir, spec(cohort.cfg, task, len(data)))
        history = fit(cohort, task, data, data, augment=flip_augment, progress=False, callbacks=callbacks)
        return cohort, history, any(isinstance(cb, TeacherTape) and cb.replayed for cb in callbacks)

    def detection_cohort(mode):
        return Cohort.build(CohortConfig.for_task(task, mode=mode, epochs=2, batch_size=4, seed=1), task=task)

    trained = detection_run(detection_cohort("kd_ml"), None)
    detection_run(detection_cohort("kd"), tmp_path)
    assert len(list(tmp_path.rglob("teacher_tape.pt"))) == 1
    cohort = detection_cohort("kd_ml")
    calls = count_teacher_forwards(cohort)
    replayed = detection_run(cohort, tmp_path)
    assert calls == [], "a replayed teacher must not run"
    assert_same_run(trained, replayed)

    # other distillation and ensemble settings: the same teacher, so the kd run's tape serves them too
    task = DetectionTask(size=64, box_loss="l1", ensemble="wbf", score_threshold=0.5,
                         distill=DenseDistillation("confidence", box_loss="l1", w_box=0.5))
    trained = detection_run(detection_cohort("kd_ml"), None)
    cohort = detection_cohort("kd_ml")
    calls = count_teacher_forwards(cohort)
    replayed = detection_run(cohort, tmp_path)
    assert calls == [] and replayed[2] is True
    assert_same_run(trained, replayed)
    assert len(list(tmp_path.rglob("teacher_tape.pt"))) == 1


def test_the_students_settings_share_the_teacher_its_own_do_not():
    def key(**kw):
        cfg = CohortConfig(**{"mode": "kd", "epochs": 1, "batch_size": 16, **kw})
        return tape_key(spec(cfg))

    assert key(mode="kd_ml", temperature=2.0, w_kd=0.5, n_students=3, distill_warmup_epochs=1.0) == key()
    for own in (dict(lr=0.01), dict(seed=1), dict(epochs=2), dict(batch_size=32), dict(amp=True)):
        assert key(**own) != key(), own

    from mtml.tasks.dense_distill import DenseDistillation
    from mtml.tasks.detection import DetectionTask

    def detection_key(**kw):
        task = DetectionTask(**kw)
        return tape_key(spec(CohortConfig.for_task(task, mode="kd"), task), task)

    assert detection_key(box_loss="l1", ensemble="wbf", score_threshold=0.5, wbf_iou=0.7,
                         distill=DenseDistillation("confidence", "l1", w_cls=0.5, w_box=2.0, w_ctr=0.0)) == detection_key()
    assert detection_key(size=96) != detection_key()


def test_who_records_instead_of_replaying(tmp_path, monkeypatch):
    run(cohort_of("kd"), tape_dir=tmp_path)
    replays = []
    monkeypatch.setattr(TapeReplay, "step", lambda *a, **k: replays.append(1))
    # resume=False retrains the run and records afresh; feature knowledge needs the teacher's maps
    for cohort, resume in ((cohort_of("kd_ml"), False), (cohort_of("kd_ml_styles"), True)):
        calls = count_teacher_forwards(cohort)
        run(cohort, tape_dir=tmp_path, resume=resume)
        assert calls and not replays


def test_a_teacher_that_draws_random_numbers_is_not_recorded(tmp_path):
    run(cohort_of("kd"), tape_dir=tmp_path / "plain")  # the control: recorded
    assert list((tmp_path / "plain").rglob("teacher_tape.pt"))
    cohort = cohort_of("kd")
    cohort.teacher.features.insert(0, torch.nn.Dropout(0.1))
    with pytest.warns(UserWarning, match="not recorded .*draws random numbers"):
        run(cohort, tape_dir=tmp_path / "dropout")
    assert not list((tmp_path / "dropout").rglob("*.pt"))


def stop_after_one_epoch(cohort, tape_dir, ckpt):
    with pytest.raises(KeyboardInterrupt):
        run(cohort, tape_dir=tape_dir, checkpoint_dir=ckpt, stop=True)


def test_a_resumed_replay_goes_on_only_with_its_own_tape(tmp_path):
    run(cohort_of("kd"), tape_dir=tmp_path)
    tape = next(tmp_path.rglob("teacher_tape.pt"))
    uninterrupted = run(cohort_of("kd_ml"), tape_dir=tmp_path)
    ckpt = tmp_path / "run"
    stop_after_one_epoch(cohort_of("kd_ml"), tmp_path, ckpt)
    assert_same_run(uninterrupted, run(cohort_of("kd_ml"), tape_dir=tmp_path, checkpoint_dir=ckpt))

    stop_after_one_epoch(cohort_of("kd_ml"), tmp_path, ckpt := tmp_path / "run2")
    with pytest.raises(ValueError, match="replays a teacher tape: resume it with its tape"):
        run(cohort_of("kd_ml"), tape_dir=None, checkpoint_dir=ckpt)  # it would train a teacher from scratch
    run(cohort_of("kd"), tape_dir=tmp_path, resume=False)  # the same teacher recorded again: another tape
    with pytest.raises(ValueError, match="replays the teacher tape .* gone or changed .recorded again since.: delete"):
        run(cohort_of("kd_ml"), tape_dir=tmp_path, checkpoint_dir=ckpt)
    tape.unlink()
    with pytest.raises(ValueError, match="gone or changed .no tape."):
        run(cohort_of("kd_ml"), tape_dir=tmp_path, checkpoint_dir=ckpt)


def test_callbacks_act_in_their_order_whatever_order_they_are_given_in(tmp_path):
    """The checkpoint restores a run before the tape decides: a resumed replay whose tape is gone
    is refused even when the tape callback comes first in the list."""
    run(cohort_of("kd"), tape_dir=tmp_path)
    stop_after_one_epoch(cohort_of("kd_ml"), tmp_path, ckpt := tmp_path / "run")
    next(tmp_path.rglob("teacher_tape.pt")).unlink()
    cohort = cohort_of("kd_ml")
    run_spec = spec(cohort.cfg)
    with pytest.raises(ValueError, match="gone or changed .no tape."):
        fit(cohort, TASK, TRAIN, VAL, augment=TASK.augment, progress=False,
            callbacks=[TeacherTape(tmp_path, run_spec, resume=True), Checkpoint(ckpt, run_spec, resume=True)])


def test_a_finished_replay_reloads_without_its_tape(tmp_path):
    run(cohort_of("kd"), tape_dir=tmp_path)
    ckpt = tmp_path / "run"
    finished = run(cohort_of("kd_ml"), tape_dir=tmp_path, checkpoint_dir=ckpt)
    next(tmp_path.rglob("teacher_tape.pt")).unlink()
    reloaded = run(cohort_of("kd_ml"), tape_dir=tmp_path, checkpoint_dir=ckpt)
    assert_same_run(finished, reloaded)
    assert reloaded[2] is True
    assert not list(tmp_path.rglob("teacher_tape.pt")), "reloading a finished run records nothing"


def test_recorder_notes_what_spoils_a_tape(tmp_path):
    recorder = TapeRecorder(tmp_path / "t.pt", "k", {})
    out = torch.zeros(2, 2)
    recorder.step(1, lambda: (out, None, torch.tensor(0.0)), torch.device("cpu"))
    assert "step 1 came after 0" in recorder.spoiled
    recorder = TapeRecorder(tmp_path / "t.pt", "k", {})
    model = torch.nn.Linear(1, 1)
    recorder.step(0, lambda: ({"model": model}, None, torch.tensor(0.0)), torch.device("cpu"))
    assert "objects other than tensors" in recorder.spoiled
    with pytest.warns(UserWarning, match="not recorded"):
        assert recorder.save(torch.nn.Linear(1, 1)) is None


def test_a_tape_needs_a_data_fingerprint_and_is_not_recorded_twice(tmp_path, monkeypatch):
    cohort = cohort_of("kd")
    fit(cohort, TASK, TRAIN, VAL, progress=False, callbacks=[TeacherTape(tmp_path)])  # data known by its size only
    assert not list(tmp_path.rglob("*.pt"))
    run(cohort_of("kd"), tape_dir=tmp_path)
    tape = next(tmp_path.rglob("teacher_tape.pt"))
    stamp = tape.stat().st_mtime_ns
    recorded = []
    monkeypatch.setattr(TapeRecorder, "save", lambda *a: recorded.append(1))
    run(cohort_of("kd_ml_styles"), tape_dir=tmp_path)  # trains its teacher (features), keeps the tape
    assert not recorded and tape.stat().st_mtime_ns == stamp


def test_a_tape_from_other_conditions_is_named_and_not_replayed(tmp_path):
    run(cohort_of("kd"), tape_dir=tmp_path)
    cohort = cohort_of("kd_ml")
    meta = teacher_meta(cohort.teacher, cohort.device, steps=12, epochs=2, eval_batch_size=128, val_items=len(VAL))
    path = tape_path(tmp_path, spec(cohort.cfg))
    assert read_tape(path, tape_key(spec(cohort.cfg)), meta)[1] == ""
    other = {**meta, "threads": meta["threads"] + 1}
    assert "threads" in read_tape(path, tape_key(spec(cohort.cfg)), other)[1]
    tape = torch.load(path, weights_only=True)  # as if recorded on a GPU with another torch
    tape["meta"].update(device="cuda", torch="2.11.0+cu130")
    torch.save(tape, path)
    calls = count_teacher_forwards(cohort)
    with pytest.warns(UserWarning, match=r"not replayed, recorded under other conditions: device 'cuda' \(tape\) "
                                         r"vs 'cpu' \(run\); torch '2.11.0\+cu130' \(tape\) vs"):
        run(cohort, tape_dir=tmp_path)
    assert calls  # the teacher trained
    torch.manual_seed(0)
    changed = cohort_of("kd_ml")
    changed.teacher.fc.weight.data += 1  # another initial teacher under the same spec: records, never replays
    calls = count_teacher_forwards(changed)
    with pytest.warns(UserWarning, match="teacher_sha256"):
        run(changed, tape_dir=tmp_path)
    assert calls


def test_a_tape_recorded_meanwhile_by_a_run_beside_is_kept(tmp_path):
    """Two runs of one teacher at once (a grid's jobs): the second to finish keeps the first's
    tape, which a run may already replay; a tape there before recording began is replaced."""
    path = tmp_path / "teacher-k" / "teacher_tape.pt"
    recorder = TapeRecorder(path, "k", {})
    path.parent.mkdir()
    path.write_bytes(b"the other run's tape")
    assert recorder.save(torch.nn.Linear(1, 1)) is None
    assert path.read_bytes() == b"the other run's tape"
    recorder = TapeRecorder(path, "k", {})  # a tape there before recording began (resume=False) ...
    replaced = path.with_suffix(".new")
    replaced.write_bytes(b"a sibling's tape, written while this one recorded")
    replaced.replace(path)  # ... but replaced meanwhile, as atomic writes do: the sibling's stays
    assert recorder.save(torch.nn.Linear(1, 1)) is None
    assert path.read_bytes().startswith(b"a sibling's tape")
    assert TapeRecorder(path, "k", {}).save(torch.nn.Linear(1, 1)) == path  # unchanged since: recorded afresh
    assert not path.read_bytes().startswith(b"a sibling's tape")
