"""studies/check_results.py: the checks behind the README's caveats recompute what the studies
computed (nothing held out gives the committed verdicts) and split frames as the ablation did."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checks():
    spec = importlib.util.spec_from_file_location("check_results", REPO / "studies" / "check_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nothing_held_out_gives_the_committed_verdicts_and_a_held_out_frame_changes_them(checks):
    committed = pd.read_csv(REPO / "docs" / "results" / "kvasir_styles_tiny_cpu" / "verdicts.csv")
    table, test = checks.verdicts_without("kvasir_styles_tiny_cpu", set())
    assert len(test) == 99 and list(table["verdict"]) == list(committed["verdict"])
    numbers = ["mean", "ci95", "p_holm", "boot_lo", "boot_hi", "detectable"]
    pd.testing.assert_frame_equal(table[numbers], committed[numbers], atol=1e-5, rtol=0)  # metrics recomputed per frame
    without, same_test = checks.verdicts_without("kvasir_styles_tiny_cpu", {sorted(test)[0]})
    assert same_test == test and without["mean"].iloc[0] != pytest.approx(committed["mean"].iloc[0], abs=1e-5)


def test_the_ablation_frames_are_its_own_split(checks, shared_data, monkeypatch):
    """The frames check_results attributes to the ablation are those its runs load: the training
    and the validation frames, from the ablation's own settings (read from its study file)."""
    from mtml.runs.study import Study

    monkeypatch.setenv("MTML_SHARED_DATA", str(shared_data))
    base = Study.load(REPO / "studies" / "ablation_detection_distillation.yaml").params
    frames = checks.ablation_frames()
    assert len(frames["train"]) == base["TRAIN_FRAMES"] and len(frames["val"]) == base["EVAL_FRAMES"]
    assert not frames["val"] & frames["train"]
    from mtml.tasks.polyp import load_polyp_dataset

    for split, limit in (("train", base["TRAIN_FRAMES"]), ("val", base["EVAL_FRAMES"])):  # what the runs load
        loaded = load_polyp_dataset(shared_data / "kvasir-seg", split, 64, limit=limit, seed=base["SPLIT_SEED"],
                                    split_by=base["SPLIT_BY"])
        assert frames[split] == set(loaded.frames), split
