"""No frame that chose a setting is a frame a study tests on: the validation frames of every
study that evaluates on validation (the ablations that choose settings) against the test
frames of every study that tests on the same data, compared by the bytes of the image files."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mtml.runs.study import Study
from mtml.tasks.polyp import split_rows

REPO = Path(__file__).resolve().parents[1]
STUDIES = [Study.load(p) for p in sorted((REPO / "studies").glob("*.yaml"))]
CHOOSERS = [s for s in STUDIES if s.split == "validation"]
TESTED = [s for s in STUDIES if s.split == "test"]


def frame_hashes(study: Study, split: str, kvasir: Path) -> set:
    """sha256 of every image file of `split` as the study's runs load it (its split and caps)."""
    p = study.params
    limit = p.get("TRAIN_FRAMES") if split == "train" else p.get("EVAL_FRAMES")
    rows, root = split_rows(p.get("DATA_DIR") or kvasir, split, limit, p.get("SPLIT_SEED", 0),
                            p.get("SPLIT_BY", "near_duplicates"))
    return {hashlib.sha256((root / image).read_bytes()).hexdigest() for image in rows["image"]}


def same_split(a: Study, b: Study) -> bool:
    """The same real frames split the same way (a second split, SPLIT_SEED 1, tests whether a
    verdict depends on the split; its test frames may be the first split's validation frames)."""
    keys = ("DATA_DIR", "SPLIT_SEED", "SPLIT_BY")
    return a.task == b.task == "detection" and a.data == b.data == "real" and \
        all(a.params.get(k) == b.params.get(k) for k in keys)


FIRST_ABLATION = "ablation_detection_distillation"  # frame-by-frame split: its overlap is known and reported
OWN_SPLIT = [s for s in CHOOSERS if s.name != FIRST_ABLATION]


def test_the_studies_that_choose_settings_evaluate_on_validation_only():
    assert {s.name for s in CHOOSERS} >= {"kvasir_distill_ablation", "kvasir_styles_ablation", FIRST_ABLATION}
    assert all(not s.external for s in CHOOSERS), "a study that chooses settings tests on nothing else"


@pytest.mark.parametrize("chooser", OWN_SPLIT, ids=lambda s: s.name)
def test_no_frame_that_chose_a_setting_is_a_test_frame(chooser, shared_data):
    kvasir = shared_data / "kvasir-seg"
    chose = frame_hashes(chooser, "val", kvasir)
    assert len(chose) > 50, "the validation frames were found"
    studies = [s for s in TESTED if same_split(s, chooser)]
    assert {"kvasir_tiny_cpu", "kvasir_styles_tiny_cpu"} <= {s.name for s in studies}
    for study in studies:
        test = frame_hashes(study, "test", kvasir)
        assert len(test) > 50
        shared = chose & test
        assert not shared, f"{len(shared)} validation frame(s) of {chooser.name} are test frames of {study.name}"


def test_the_first_ablation_overlaps_the_studies_test_frames_as_reported(shared_data):
    """The first ablation split frame by frame: 6 of kvasir_tiny_cpu's 99 test frames are its validation
    frames (the number docs/results.md and docs/choices.md give); the check counts them."""
    kvasir = shared_data / "kvasir-seg"
    first = next(s for s in CHOOSERS if s.name == FIRST_ABLATION)
    study = next(s for s in TESTED if s.name == "kvasir_tiny_cpu")
    assert not same_split(first, study)
    assert len(frame_hashes(first, "val", kvasir) & frame_hashes(study, "test", kvasir)) == 6
