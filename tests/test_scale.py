"""The reproduction grid on many devices and machines: `--shard K/M` parts are disjoint, cover the
grid and keep the runs of one teacher together, `--jobs N` gives the same records as one job, and a
report collects the shards' folders."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from mtml import reproduce

ARGV = ["--task", "classification", "--modes", "kd", "kd_ml", "--seeds", "0", "1", "--smoke",
        "--param", "EPOCHS=1", "--param", "TILE_SIZE=16"]


@pytest.fixture
def synthetic_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MTML_SHARED_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("MTML_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernels of one job use what --jobs 2 gives each


def _grid(modes, versions=("tiny", "v1"), seeds=(0, 1, 2)) -> list:
    """Stand-ins for planned runs, in grid order (version, then mode, then seed)."""
    return [SimpleNamespace(cell=(v, mode, seed), spec=SimpleNamespace(task="classification"))
            for v in versions for mode in modes for seed in seeds]


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


def test_two_jobs_give_the_records_of_two_shards_run_one_after_the_other_and_one_report(tmp_path, synthetic_only):
    """The grid three ways with the same numbers: `--jobs 2` (two processes at once) and `--shard 1/2`
    then `--shard 2/2` (each one job, in its own folder, like two machines), collected into one report."""
    for k in (1, 2):
        assert reproduce.main([*ARGV, "--shard", f"{k}/2", "--runs-dir", str(tmp_path / f"shard{k}")]) == 0
    sizes = [len(_records(tmp_path / f"shard{k}")) for k in (1, 2)]
    assert sizes == [2, 2] and not (tmp_path / "shard1" / "classification_results.csv").exists()
    assert reproduce.main([*ARGV, "--report", "--runs-dir", str(tmp_path / "all"),
                           "--collect-from", str(tmp_path / "shard1"), str(tmp_path / "shard2")]) == 0
    one = pd.concat([_records(tmp_path / f"shard{k}") for k in (1, 2)]).sort_values(["mode", "seed"]).reset_index(drop=True)
    assert reproduce.main([*ARGV, "--jobs", "2", "--runs-dir", str(tmp_path / "two")]) == 0
    two = _records(tmp_path / "two")
    metrics = [c for c in one if "/" in c]
    assert len(one) == len(two) == 4 and list(one["spec_hash"]) == list(two["spec_hash"])
    pd.testing.assert_frame_equal(one[metrics], two[metrics])  # the same runs, the same numbers
    # a version's runs share one store: each kd_ml run replays its seed's kd teacher (a shard and a job
    # both keep the two runs of one teacher together)
    for records in (one, two):
        assert records.groupby("mode")["teacher_replayed"].agg(set).to_dict() == {"kd": {False}, "kd_ml": {True}}
    assert len(pd.read_csv(tmp_path / "two" / "classification_results.csv")) == 4
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
    assert len(rows) == 9 and (tmp_path / "gpu.md").read_text() == text
    assert "skipped (compile is CUDA only)" in text and "skipped (no GPU)" in text
    rates = [float(r.split("|")[2].replace(",", "")) for r in rows if "fp32" in r or "AMP |" in r]
    assert rates and all(v > 0 for v in rates)
