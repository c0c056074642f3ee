"""The reproduction grid on many devices and machines: `--shard K/M` parts are disjoint, cover the
grid and keep the runs of one teacher together, `--jobs N` gives the same records as one job, and a
report collects the shards' folders."""
from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pandas as pd
import pytest

from mtml import reproduce


@pytest.fixture
def synthetic_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MTML_SHARED_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernels of one job use what --jobs 2 gives each


def _grid(modes, versions=("tiny", "v1"), seeds=(0, 1, 2)) -> list:
    """Stand-ins for planned runs, in grid order (version, then seed, then mode: `Study.planned`)."""
    return [SimpleNamespace(cell=(v, mode, seed), spec=SimpleNamespace(task="classification"))
            for v in versions for seed in seeds for mode in modes]


@pytest.mark.parametrize("m", [1, 2, 3, 5, 7, 40])
def test_shards_are_disjoint_cover_the_grid_and_keep_each_teachers_runs_together(m):
    runs = _grid(["independent", "kd", "ml", "kd_ml", "offline", "kd_ml_styles"])
    parts = [reproduce.shard(runs, k, m) for k in range(1, m + 1)]
    placed = [id(run) for part in parts for run in part]
    assert len(placed) == len(set(placed)) == len(runs) and set(placed) == set(map(id, runs))
    teachers = ("kd", "kd_ml", "kd_ml_styles")  # one online teacher per version and seed: its first run records it
    for part in parts:  # ... and the others, in the same part and after it in grid order, replay it
        cells = [run.cell for run in part]
        for version, mode, seed in cells:
            if mode in teachers:
                group = [cells.index((version, m, seed)) for m in teachers if (version, m, seed) in cells]
                assert group == sorted(group) and len(group) == len(teachers)
    assert max(map(len, parts)) - min(map(len, parts)) <= 3  # balanced to within one group
    if m == 5:  # offline's frozen teacher records no tape: it is not kept with its seed's kd
        where = {run.cell: k for k, part in enumerate(parts) for run in part}
        assert any(where[(v, "offline", s)] != where[(v, "kd", s)] for v, _, s in where)


@pytest.mark.parametrize("text", ["0/2", "3/2", "2", "a/b", "1/0"])
def test_bad_parts_are_refused(text):
    with pytest.raises(ValueError, match="K/M"):
        reproduce.parse_part(text, "--shard")


def _records(folder) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted(folder.rglob("metrics.json"))]
    return pd.DataFrame(rows).sort_values(["mode", "seed"]).reset_index(drop=True)


def test_shards_run_their_parts_and_two_jobs_give_the_records_of_one(smoke_grid, tmp_path, synthetic_only, monkeypatch):
    """The grid three ways with the same numbers: one job (the session's `smoke_grid`), `--jobs 2`
    (two processes at once, real notebooks) and `--shard 1/2` then `--shard 2/2` (each in its own
    folder, like two machines; each run is the one job's, copied, so no notebook runs twice),
    collected into one report."""
    argv, one_dir = smoke_grid
    one = _records(one_dir)
    finished = {json.loads(p.read_text())["spec_hash"]: p.parent for p in one_dir.rglob("metrics.json")}

    def copy_finished(notebook, out_dir, parameters, smoke, resume_hint=""):  # as if a machine ran it
        shutil.copytree(finished[out_dir.name.rpartition("-")[2]], out_dir)  # <mode>-seed<k>-<spec hash>

    with monkeypatch.context() as mp:
        mp.setattr(reproduce, "execute", copy_finished)
        for k in (1, 2):
            assert reproduce.main([*argv, "--shard", f"{k}/2", "--runs-dir", str(tmp_path / f"shard{k}")]) == 0
    shards = [_records(tmp_path / f"shard{k}") for k in (1, 2)]
    assert sorted(map(len, shards)) == [3, 3] and not (tmp_path / "shard1" / "classification_results.csv").exists()
    for records in shards:  # the runs of one teacher (kd, kd_ml of a seed) in one part
        teachers = records[records["mode"] != "ml"]
        assert all(len(group) == 2 for _, group in teachers.groupby("seed"))
    assert reproduce.main([*argv, "--report", "--runs-dir", str(tmp_path / "all"),
                           "--collect-from", str(tmp_path / "shard1"), str(tmp_path / "shard2")]) == 0
    assert reproduce.main([*argv, "--jobs", "2", "--runs-dir", str(tmp_path / "two")]) == 0
    two = _records(tmp_path / "two")
    metrics = [c for c in one if "/" in c]
    assert len(one) == len(two) == 6 and list(one["spec_hash"]) == list(two["spec_hash"])
    pd.testing.assert_frame_equal(one[metrics], two[metrics])  # the same runs, the same numbers
    # a version's runs share one store: each kd_ml run replays its seed's kd teacher (one job and
    # each of two jobs keep the two runs of one teacher together)
    for records in (one, two):
        assert records.groupby("mode")["teacher_replayed"].agg(set).to_dict() == \
            {"kd": {False}, "kd_ml": {True}, "ml": {False}}
    assert len(pd.read_csv(tmp_path / "two" / "classification_results.csv")) == 6
    table = pd.read_csv(tmp_path / "all" / "classification_results.csv")
    assert sorted(table["spec_hash"]) == sorted(one["spec_hash"])
    pd.testing.assert_frame_equal(table.sort_values(["mode", "seed"]).reset_index(drop=True)[metrics], one[metrics])


def test_the_gpu_check_runs_its_code_path_on_cpu(tmp_path):
    """bench/gpu_check.py is meant for a GPU; --small runs every row's code on CPU in seconds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", reproduce.REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.main(["--device", "cpu", "--small", "--out", str(tmp_path / "gpu.md")])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 16 and (tmp_path / "gpu.md").read_text() == text
    assert "host waits for the GPU in one step | n/a on CPU" in text
    assert "skipped (compile is CUDA only)" in text and "skipped (no GPU)" in text
    rates = [float(r.split("|")[2].replace(",", "")) for r in rows if "fp32" in r or "AMP |" in r]
    assert rates and all(v > 0 for v in rates)
    assert text.count("kd and kd_ml") == 2 and text.count("| the same network |") == 2  # the CPU is deterministic
    study_row = next(r for r in rows if "one tiny study run" in r)
    assert re.search(r"\| \d+ s \(ensemble map50 \d\.\d{3}; no external set\)", study_row) or "skipped" in study_row


def test_the_run_profile_splits_a_study_run_into_parts_that_add_up(tmp_path):
    """bench/profile_run.py: one smoke run of a study timed part by part, split into parts (steps,
    data, per-epoch validation, test sets, extras, other) none of which is negative (a part whose
    clock missed time, or counted it twice, would make another one negative)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("profile_run", reproduce.REPO / "bench" / "profile_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "profile.md"
    assert module.main([str(reproduce.REPO / "studies" / "synthetic_tiny_cpu.yaml"), "--mode", "kd_ml", "--smoke",
                        "--threads", "1", "--out", str(out)]) == 0
    rows = {k: float(v) for k, v in re.findall(r"^\| (\S[^|]*?) \| (-?[\d.]+) \|", out.read_text(), re.M)}
    parts = ["steps", "data", "per-epoch validation", "test and external sets", "study extras", "other"]
    assert set(parts) <= set(rows) and rows["steps"] > 0 and rows["per-epoch validation"] > 0
    assert all(rows[k] >= 0 for k in parts) and rows["total"] > rows["steps"]
    wall = float(re.search(r"wall (\d+) s", out.read_text()).group(1))
    assert rows["total"] <= wall + 0.5  # the run is inside the timed call
    assert "not training (everything but the steps)" in out.read_text()


def test_the_waits_a_detection_step_makes_for_the_device_are_counted_and_few():
    """bench/step_ops.py counts what a kd_ml detection step dispatches. Distillation makes the host
    wait for the device nowhere; the FCOS loss only at its 4 selections of positive locations per
    network (3 networks); the whole step 20 times (those 12, their 6 backward selections, the 2
    finiteness checks that stop a diverged run before its update). Torchvision's own FCOS and GIoU
    losses made it 147 (e4da140, 128 px). A boolean selection or a value read back that creeps in
    fails this; a Python list copied to the device dispatches nothing on a CPU and is not seen."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("step_ops", reproduce.REPO / "bench" / "step_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        ops, waits = module.count_step("tiny", "kd_ml", size=64, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    assert waits["distillation terms (forward)"] == 0 and ops["distillation terms (forward)"] > 100
    assert waits["FCOS targets and losses"] == 12 and waits["optimizer step"] == 0
    assert sum(waits.values()) == 20
