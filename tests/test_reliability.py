"""Reliability of training and result files: exact resume after SIGKILL, safe checkpoint loading,
atomic writes under SIGKILL, and non-finite losses that stop training and keep the last good
checkpoint. Kills happen in child processes; every child runs under a timeout."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bad_inputs import time_limit

from mtml import ClassificationTask, Cohort, CohortConfig, NonFiniteLossError, fit
from mtml.tasks.data import make_separable
from mtml.io import load_checkpoint, save_checkpoint, write_json, write_text
from mtml.runs.checkpoint import CHECKPOINT_NAME
from mtml.runs.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT = 60  # seconds; a child that runs longer is killed and the test fails

# The child trains the tiny cohort; before each step it prints a line and waits for one on stdin
# (so the parent kills it at a known step, however loaded the machine). Its augmentation draws
# from fit's per-step generator and from the global numpy and python RNGs, which checkpoints must carry.
TRAINER = r"""
import random, sys
import numpy as np, torch
torch.set_num_threads(1)
from mtml import ClassificationTask, Cohort, CohortConfig, fit
from mtml.tasks.data import make_separable
from mtml.io import save_checkpoint
from mtml.runs.checkpoint import Checkpoint

out, ckpt_dir, resume, every = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]) or None
cfg = CohortConfig(mode="kd_ml", n_students=2, epochs=3, batch_size=16, lr=0.05, seed=3)
cohort = Cohort.build(cfg, task=ClassificationTask())

def augment(batch, generator=None):
    image = batch["image"] + 0.1 * torch.randn(batch["image"].shape, generator=generator)
    if np.random.rand() < 0.5:
        image = image.flip(-1)
    if random.random() < 0.5:
        image = image.flip(-2)
    print("step", flush=True)
    sys.stdin.readline()
    return {**batch, "image": image}

history = fit(cohort, ClassificationTask(2), make_separable(80, 16, seed=1),
              make_separable(32, 16, seed=1, split=1), augment=augment,
              callbacks=[Checkpoint(ckpt_dir, resume=resume, every=every)], progress=False)
save_checkpoint(out, {"networks": {k: m.state_dict() for k, m in cohort.networks.items()},
                      "history": history.drop(columns="time_s").to_dict("list")})
"""
STEPS_PER_EPOCH, EPOCHS = 5, 3  # 80 samples, batch 16


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_trainer(tmp: Path, name: str, ckpt_dir: Path, resume: bool, every: int) -> dict:
    out = tmp / f"{name}.pt"
    subprocess.run([sys.executable, "-c", TRAINER, str(out), str(ckpt_dir), str(int(resume)), str(every)],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=CHILD_TIMEOUT,
                   env=_env(), cwd=tmp)
    return load_checkpoint(out)


def kill_after_lines(args: list[str], n_lines: int, tmp: Path) -> int:
    """Starts a child and answers each line it prints with one on its stdin, except line `n_lines`:
    then it SIGKILLs the child. Returns the count of lines seen."""
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(), cwd=tmp)
    seen = 0
    try:
        with time_limit(CHILD_TIMEOUT):  # a silent child must not hang the test run
            for _ in child.stdout:
                seen += 1
                if seen == n_lines:
                    child.send_signal(signal.SIGKILL)
                    break
                child.stdin.write("\n")
                child.stdin.flush()
    finally:
        child.kill()
        child.wait(timeout=CHILD_TIMEOUT)
    assert seen == n_lines, f"the child exited after {seen} lines, before the kill"
    return seen


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    return run_trainer(tmp, "reference", tmp / "ckpt", resume=False, every=0)


def assert_same_run(a: dict, b: dict, context: str):
    assert a["history"] == b["history"], f"histories differ ({context})"
    for net, state in a["networks"].items():
        for key, value in state.items():
            assert torch.equal(value, b["networks"][net][key]), f"{net}.{key} differs ({context})"


@pytest.mark.parametrize("every", [1, 0], ids=["mid-epoch-checkpoint", "epoch-end-checkpoint"])
def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, every):
    # killed after `done` finished steps, while waiting to start the next one
    total = STEPS_PER_EPOCH * EPOCHS
    mid_epoch = [d for d in range(1, total) if d % STEPS_PER_EPOCH]
    # its own seeded draw: fit reseeds the global `random`, so the step would depend on earlier tests
    done = random.Random(every).choice(mid_epoch if every else range(STEPS_PER_EPOCH + 1, total))
    ckpt_dir = tmp_path / "ckpt"
    kill_after_lines([sys.executable, "-c", TRAINER, str(tmp_path / "killed.pt"), str(ckpt_dir), "0",
                      str(every)], done + 1, tmp_path)
    state = load_checkpoint(ckpt_dir / CHECKPOINT_NAME)
    context = f"killed after step {done}, checkpoint at epoch {state['epoch']} step {state['step_in_epoch']}"
    if every:
        assert (state["epoch"], state["step_in_epoch"]) == divmod(done, STEPS_PER_EPOCH), context
    else:
        assert (state["epoch"], state["step_in_epoch"]) == (done // STEPS_PER_EPOCH, 0), context
        assert len(state["history"]) == state["epoch"], context
    assert not (tmp_path / "killed.pt").exists()
    resumed = run_trainer(tmp_path, "resumed", ckpt_dir, resume=True, every=every)
    assert_same_run(uninterrupted, resumed, context)


# -- checkpoints that must not load -------------------------------------------------------------

class SideEffect:
    """Unpickling this object creates a folder: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def tiny_setup(**overrides):
    cfg = CohortConfig(**{**dict(mode="kd_ml", n_students=2, epochs=1, batch_size=16, seed=0), **overrides})
    return Cohort.build(cfg, task=ClassificationTask()), ClassificationTask(cfg.num_classes), make_separable(32, 8)


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt" / CHECKPOINT_NAME
    save_checkpoint(ckpt, {"spec": SideEffect(marker), "epoch": 0})
    torch.load(ckpt, weights_only=False)  # control: a plain unpickling does run the payload
    assert marker.is_dir()
    marker.rmdir()
    cohort, task, data = tiny_setup()
    with pytest.raises(ValueError, match="not a valid mtml checkpoint"):
        fit(cohort, task, data, callbacks=[Checkpoint(ckpt.parent, resume=True)], progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", "half"], ids=["empty", "text", "truncated"])
def test_an_unreadable_checkpoint_gives_a_clear_error(tmp_path, content):
    cohort, task, data = tiny_setup()
    fit(cohort, task, data, callbacks=[Checkpoint(tmp_path)], progress=False)
    ckpt = tmp_path / CHECKPOINT_NAME
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2] if content == "half" else content)
    cohort, task, data = tiny_setup()
    with pytest.raises(ValueError, match="not a valid mtml checkpoint"):
        fit(cohort, task, data, callbacks=[Checkpoint(tmp_path, resume=True)], progress=False)


@pytest.mark.parametrize("change", [
    dict(mode="kd"), dict(n_students=3), dict(version="v1"), dict(format=0), dict(spec=None),
    dict(model_only=True)], ids=lambda change: "-".join(f"{k}={v}" for k, v in change.items()))
def test_a_checkpoint_for_another_cohort_or_format_gives_a_clear_error(tmp_path, change):
    cohort, task, data = tiny_setup()
    fit(cohort, task, data, callbacks=[Checkpoint(tmp_path)], progress=False)
    ckpt = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(ckpt)
    if "version" in change:  # building a v1 cohort is slow on CPU: relabel the checkpoint instead
        state["spec"]["config"]["version"], state["spec_hash"] = "v1", "0" * 16
    elif "format" in change:
        state["format"] = 0
    elif "spec" in change:
        del state["spec"]
    elif "model_only" in change:  # a bare state_dict saved by hand
        state = cohort.students[0].state_dict()
    save_checkpoint(ckpt, state)
    kept = {k: v for k, v in change.items() if k in ("mode", "n_students")}
    cohort, task, data = tiny_setup(**kept)
    with pytest.raises(ValueError) as err:
        fit(cohort, task, data, callbacks=[Checkpoint(tmp_path, resume=True)], progress=False)
    message = str(err.value)
    assert "resume=False" in message
    for key in ("mode", "n_students", "version", "format"):
        if key in change:
            assert key in message


# -- atomic result files ------------------------------------------------------------------------

# loads mtml/io.py alone: importing the whole package would cost seconds of CPU per child
WRITER = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("mtml_io", sys.argv[2])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
with io.atomic_path(sys.argv[1]) as tmp, open(tmp, "w") as f:
    for _ in range(100_000):
        f.write("x" * 65536 + "\n")
        f.flush()
        print("chunk", flush=True)
"""


@pytest.mark.parametrize("previous", ["old results\n", None], ids=["over-a-file", "new-file"])
def test_sigkill_during_a_results_write_leaves_the_previous_file_or_none(tmp_path, previous):
    target = tmp_path / "out" / "metrics.json"
    if previous is not None:
        write_text(target, previous)
    kill_after_lines([sys.executable, "-c", WRITER, str(target), str(REPO / "mtml" / "io.py")], 20, tmp_path)
    leftovers = [p for p in target.parent.iterdir() if p != target]
    assert leftovers and max(p.stat().st_size for p in leftovers) >= 19 * 65536, "killed before writing"
    if previous is None:
        assert not target.exists()
    else:
        assert target.read_text() == previous


def test_a_failed_results_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.5})
    with pytest.raises(TypeError):
        write_json(target, {"accuracy": object()})
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# -- non-finite losses --------------------------------------------------------------------------

def test_the_non_finite_error_names_the_network_the_term_the_step_and_the_fix():
    loss = NonFiniteLossError("student_1", "kd", 7, float("nan"))
    assert (loss.network, loss.term, loss.step) == ("student_1", "kd", 7)
    assert str(loss) == ("non-finite loss at step 7: student_1 kd = nan. Lower the learning rate or the loss "
                         "weights; the last good checkpoint is kept")
    assert str(NonFiniteLossError("teacher", "weights", 3, float("inf"))).startswith(
        "non-finite weights after the update at step 3: teacher weights = inf. Lower the learning rate")


class Recorder:
    """An `augment` hook that records the checkpoint's hash before every step and can put a NaN
    into the batch of step `poison`."""

    def __init__(self, ckpt: Path, poison: int | None = None):
        self.ckpt, self.poison, self.hashes = ckpt, poison, []

    def __call__(self, batch, generator=None):
        self.hashes.append(hashlib.sha256(self.ckpt.read_bytes()).hexdigest() if self.ckpt.exists() else None)
        if len(self.hashes) - 1 == self.poison:
            batch = {**batch, "image": batch["image"].clone()}
            batch["image"][5, 0, 2, 2] = float("nan")
        return batch


def test_the_first_non_finite_term_is_named_and_an_overflowing_sum_of_finite_terms_too():
    from mtml.core.step import _check_finite

    nan, big = torch.tensor(float("nan")), torch.tensor(3e38)
    with pytest.raises(NonFiniteLossError, match=r"at step 2: student_1 kd = nan\."):
        _check_finite(nan, {"student_1/sup": torch.tensor(0.5), "student_1/kd": nan, "student_2/kd": -nan}, 2)
    with pytest.raises(NonFiniteLossError, match=r"at step 5: cohort total = inf\.") as err:
        _check_finite(big * 2, {"student_1/sup": big, "student_2/sup": big}, 5)  # 6e38 overflows float32
    assert (err.value.network, err.value.term, err.value.step) == ("cohort", "total", 5)


def test_a_step_called_without_its_number_is_step_0():
    from mtml import cohort_step

    cohort, task, data = tiny_setup(mode="ml")
    batch = task.collate([data[i] for i in range(4)])
    batch["image"][0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="at step 0: student_1 sup = nan"):
        cohort_step(cohort, batch, task)


def check_stop(err: NonFiniteLossError, cohort: Cohort, recorder: Recorder):
    message = str(err)
    assert err.network in cohort.networks and err.network in message
    assert f"step {err.step}" in message and err.term in message
    assert len(recorder.hashes) == err.step + 1, "training went on after the non-finite step"
    state = load_checkpoint(recorder.ckpt)  # the last good checkpoint: unchanged and finite
    assert hashlib.sha256(recorder.ckpt.read_bytes()).hexdigest() == recorder.hashes[err.step]
    assert state["epoch"] * 2 + state["step_in_epoch"] == err.step  # 2 steps per epoch
    for net in state["cohort"]["networks"].values():
        assert all(torch.isfinite(v).all() for v in net.values() if v.is_floating_point())


def test_a_diverging_run_stops_naming_network_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path):
    cohort, task, data = tiny_setup(lr=1e6, epochs=10)
    recorder = Recorder(tmp_path / CHECKPOINT_NAME)
    with pytest.raises(NonFiniteLossError) as err:
        fit(cohort, task, data, callbacks=[Checkpoint(tmp_path, every=1)], augment=recorder, progress=False)
    assert err.value.step >= 1  # the first step is finite: there is a good checkpoint to keep
    check_stop(err.value, cohort, recorder)


@pytest.mark.parametrize("mode, network", [("kd_ml", "teacher"), ("ml", "student_1")])
def test_a_nan_in_a_batch_stops_at_that_step_naming_the_first_network_and_its_term(tmp_path, mode, network):
    cohort, task, data = tiny_setup(mode=mode, epochs=3)
    poisoned_step = 3  # epoch 1, second batch
    recorder = Recorder(tmp_path / CHECKPOINT_NAME, poison=poisoned_step)
    with pytest.raises(NonFiniteLossError) as err:
        fit(cohort, task, data, callbacks=[Checkpoint(tmp_path, every=1)], augment=recorder, progress=False)
    assert (err.value.network, err.value.term, err.value.step) == (network, "sup", poisoned_step)
    check_stop(err.value, cohort, recorder)


def test_deterministic_cuda_sets_its_flags_inside_and_gives_the_old_ones_back(monkeypatch):
    """Studies train under `deterministic_cuda` on a GPU (seeds paired across modes there too);
    a notebook's own settings come back after the run."""
    from mtml.core.cohort import deterministic_cuda

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with deterministic_cuda():
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.deterministic
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # set for the run only
    with deterministic_cuda(False):
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


@pytest.mark.parametrize("saved", [True, False])
def test_a_checkpoint_trained_in_another_cuda_mode_is_not_resumed_but_a_finished_run_reloads(tmp_path, saved):
    """One run, one mode: an unfinished checkpoint trained on a GPU with deterministic kernels on
    (or off) does not go on here on the CPU, and the error says why and what to do; a finished one
    only reloads (nothing trains), and keeps the mode it trained in."""
    cohort, task, data = tiny_setup()
    fit(cohort, task, data, callbacks=[Checkpoint(tmp_path)], progress=False)
    ckpt = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(ckpt)
    assert state["cuda_deterministic"] is None  # trained on the CPU
    save_checkpoint(ckpt, {**state, "cuda_deterministic": saved})
    cohort, task, data = tiny_setup()
    reload = Checkpoint(tmp_path, resume=True)
    fit(cohort, task, data, callbacks=[reload], progress=False)
    assert reload.cuda_mode is saved
    save_checkpoint(ckpt, {**state, "cuda_deterministic": saved, "epoch": state["epoch"] - 1})  # unfinished
    cohort, task, data = tiny_setup()
    with pytest.raises(ValueError, match=f"trained on a GPU with deterministic kernels {'on' if saved else 'off'}, "
                                         r"this run trains on the CPU .*RunOptions\(device=..., deterministic=...\)"):
        fit(cohort, task, data, callbacks=[Checkpoint(tmp_path, resume=True)], progress=False)
