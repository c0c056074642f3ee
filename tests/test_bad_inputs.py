"""The bad-input corpus (built by tests/bad_inputs.py at test time): every case gives a clear
error or is skipped and counted; none crashes the process or hangs a DataLoader worker."""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from bad_inputs import ODD_MODES, UNREADABLE, time_limit, write_image_corpus
from torch.utils.data import DataLoader

from mtml import ClassificationTask, Cohort, CohortConfig, fit, soft_kl
from mtml.tasks.data import TensorImageDataset, make_separable
from mtml.tasks.detection import DetectionTask
from mtml.tasks.polyp import load_polyp_dataset, make_synthetic_polyps, prepare_kvasir, split_frames
from mtml.tasks.tiles import MEAN, STD, TileDataset, patient_split, scan_tiles

LIMIT = 60  # seconds for anything that runs DataLoader workers
NAN = float("nan")


def tile_name(case: str) -> str:
    """A real-looking tile name, blk-<12 letters>-<patient>-01Z-00-DX1, keeping the case's suffix."""
    letters = "".join(chr(65 + b % 26) for b in hashlib.sha256(case.encode()).digest()[:12])
    return f"blk-{letters}-TCGA-AA-0001-01Z-00-DX1{Path(case).suffix}"


@pytest.fixture
def tile_corpus(tmp_path):
    """(manifest frame with absolute paths, {case: path}) for every image case as an MSS tile."""
    root = tmp_path / "tiles"
    paths = write_image_corpus(root / "TRAIN" / "MSS", name=tile_name)
    frame, report = scan_tiles(root)  # names and folders are fine: nothing skipped yet
    assert report.n_skipped == 0 and len(frame) == len(paths)
    frame["path"] = [str(root / p) for p in frame["path"]]
    return frame, paths


@pytest.mark.parametrize("cached", [False, True], ids=["decoded", "memmap-cache"])
def test_tile_dataset_skips_and_counts_every_unreadable_image(tile_corpus, tmp_path, cached):
    frame, paths = tile_corpus
    data = TileDataset(frame, size=16, cache=tmp_path / "cache" if cached else None)
    assert set(data.report.bad) == {str(paths[case]) for case in UNREADABLE}
    for case in ("bomb_20000px.png", "big_8000px.png"):
        assert "decompression" in data.report.bad[str(paths[case])].lower()
    assert len(data) == data.report.n_ok == len(paths) - len(UNREADABLE)
    with time_limit(LIMIT):
        batches = list(DataLoader(data, batch_size=2, num_workers=2))
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (len(data), 3, 16, 16) and torch.isfinite(images).all()
    loaded = {data.paths[row]: image for row, image in zip(data.rows, images)}
    for case in ODD_MODES:
        assert str(paths[case]) in loaded
    gray = loaded[str(paths["grayscale.png"])] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[1], gray[2], atol=1e-5)


def error_of(call, kind=Exception) -> BaseException:
    """Runs `call` under the time limit and returns the error it raised, its traceback dropped: that
    frees a failed DataLoader at once (left to the garbage collector, PyTorch waits 5 s per worker
    to stop its workers)."""
    try:
        with time_limit(LIMIT):
            call()
    except kind as err:
        err.__traceback__ = None
        return err
    pytest.fail(f"no {kind.__name__} raised")


def test_a_tile_broken_after_validation_fails_clearly_in_the_main_process(tile_corpus):
    frame, paths = tile_corpus
    data = TileDataset(frame, size=16)
    good = paths["good_0.png"]
    good.write_bytes(good.read_bytes()[:100])
    err = error_of(lambda: list(DataLoader(data, batch_size=2, num_workers=2)), RuntimeError)
    assert "became unreadable after validation" in str(err) and good.name in str(err)


def tiny_cohort(num_workers: int = 2) -> Cohort:
    return Cohort.build(CohortConfig(mode="kd_ml", epochs=1, batch_size=8, num_workers=num_workers), task=ClassificationTask())


def test_a_manifest_label_outside_the_classes_is_refused_by_the_tile_dataset(tile_corpus):
    frame, _ = tile_corpus
    frame.loc[3, "label"] = 5  # a hand-edited manifest with two classes
    with pytest.raises(ValueError, match=r"label.*\b5\b"):
        TileDataset(frame, size=16)


@pytest.mark.parametrize("bad", [5, -1])
def test_labels_outside_the_classes_stop_fit_with_a_clear_error(bad):
    base = make_separable(16, 8)
    labels = base.labels.clone()
    labels[3] = bad  # any dataset: the task checks every batch on the host
    data = TensorImageDataset(base.images, labels)
    err = error_of(lambda: fit(tiny_cohort(), ClassificationTask(2), data, progress=False), ValueError)
    assert re.search(rf"labels \[.*{bad}.*\] outside 0\.\.1", str(err))


BAD_CONFIGS = [("lr", NAN), ("lr", -0.1), ("temperature", NAN), ("temperature", -1.0),
               ("temperature", math.inf), ("w_kd", NAN), ("w_ml", -1.0), ("w_ce", math.inf),
               ("momentum", -0.5), ("weight_decay", NAN), ("epochs", NAN), ("epochs", 0),
               ("n_students", 0), ("n_students", 2.5), ("batch_size", -1), ("num_classes", 1),
               ("num_workers", -1)]


@pytest.mark.parametrize("name, value", BAD_CONFIGS, ids=[f"{n}={v}" for n, v in BAD_CONFIGS])
def test_nan_or_negative_config_values_give_an_error_naming_them(name, value):
    with pytest.raises(ValueError, match=name):
        CohortConfig(**{name: value}).validate()


EMPTY_MANIFEST = pd.DataFrame(columns=["path", "label", "patient_id"])
TWO_PATIENTS = pd.DataFrame({"patient_id": ["a", "b"], "label": [0, 1]})
BAD_CALLS = {
    "soft_kl temperature=nan": (lambda: soft_kl(torch.zeros(2, 3), torch.zeros(2, 3), NAN), "temperature"),
    "TileDataset size=-1": (lambda: TileDataset(EMPTY_MANIFEST, size=-1), "size"),
    "patient_split val_fraction=nan": (lambda: patient_split(TWO_PATIENTS, val_fraction=NAN), "fraction"),
    "patient_split test_fraction<0": (lambda: patient_split(TWO_PATIENTS, test_fraction=-0.1), "fraction"),
    "make_separable n=-1": (lambda: make_separable(-1), "n >= 1"),
    "TileDataset size=nan": (lambda: TileDataset(EMPTY_MANIFEST, size=NAN), "size"),
    "split_frames fractions=nan": (lambda: split_frames(["a", "b"], fractions=(NAN, 0.5, 0.5)), "fractions"),
    "split_frames fraction<0": (lambda: split_frames(["a", "b"], fractions=(1.2, -0.2, 0)), "fractions"),
    "make_synthetic_polyps n=-1": (lambda: make_synthetic_polyps(-1), "n >= 1"),
    "make_synthetic_polyps empty_fraction=nan": (lambda: make_synthetic_polyps(2, empty_fraction=NAN), "empty_fraction"),
    "DetectionTask size=nan": (lambda: DetectionTask(size=NAN), "size"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_nan_or_negative_arguments_give_a_clear_error(case):
    call, words = BAD_CALLS[case]
    with pytest.raises(ValueError, match=words):
        call()


# -- polyp frames and boxes ---------------------------------------------------------------------
BOX = {"label": "polyp", "xmin": 12, "ymin": 10, "xmax": 40, "ymax": 30}
BAD_BOXES = {  # frame -> an extra box that must be dropped (or clipped) and counted
    "good_1": ({**BOX, "xmin": 40, "xmax": 12}, "boxes_dropped_inverted"),
    "grayscale": ({**BOX, "xmin": NAN}, "boxes_dropped_nonfinite"),
    "rgba": ({**BOX, "xmin": -5, "xmax": 60}, "boxes_clipped"),
}


@pytest.fixture
def kvasir_corpus(tmp_path):
    """A Kvasir-SEG-like folder: every image case in images/, a mask for each, and a box json with
    an inverted, a NaN, an out-of-frame and a malformed entry."""
    from PIL import Image

    root = tmp_path / "kvasir"
    paths = write_image_corpus(root / "images")
    (root / "masks").mkdir()
    mask = torch.zeros(48, 48, dtype=torch.uint8)
    mask[10:30, 12:40] = 255
    entries = {}
    for path in paths.values():
        Image.fromarray(mask.numpy()).save(root / "masks" / path.name)
        entries[path.stem] = {"height": 48, "width": 48, "bbox": [dict(BOX)]}
    for frame, (box, _) in BAD_BOXES.items():
        entries[frame]["bbox"].append(box)
    entries["cmyk"] = {"width": 48, "bbox": "oops"}  # no height, boxes not a list
    (root / "kavsir_bboxes.json").write_text(json.dumps(entries))
    return root, paths


def test_kvasir_preparation_skips_and_counts_bad_frames_and_boxes(kvasir_corpus, tmp_path):
    root, paths = kvasir_corpus
    frame, report = prepare_kvasir(root, out_dir=tmp_path / "prepared")
    readable = {Path(p).stem for c, p in paths.items() if c not in UNREADABLE}
    assert set(frame["frame"]) == readable and report["images_unreadable"] == len(UNREADABLE)
    assert report["json_entries_malformed"] == 1
    for _, counter in BAD_BOXES.values():
        assert report[counter] == 1, (counter, dict(report))
    with time_limit(LIMIT):
        data = load_polyp_dataset(tmp_path / "prepared", split=None, size=32)
        batches = list(DataLoader(data, batch_size=2, num_workers=2, collate_fn=DetectionTask(size=32).collate))
    assert sum(len(b["image"]) for b in batches) == len(readable)
    boxes = torch.cat([t["boxes"] for b in batches for t in b["targets"]])
    assert torch.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= 32).all()
    # one box per frame: good_1 and grayscale lose their bad box, rgba keeps its clipped one as a
    # second, cmyk (malformed entry) has none
    assert len(boxes) == len(readable)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""], ids=["syntax", "list", "empty"])
def test_an_unreadable_box_file_names_the_way_out(kvasir_corpus, tmp_path, content):
    root, _ = kvasir_corpus
    (root / "kavsir_bboxes.json").write_text(content)
    with pytest.raises(ValueError, match="boxes='masks'"):
        prepare_kvasir(root, out_dir=tmp_path / "prepared")
