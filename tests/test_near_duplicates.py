"""Near-duplicate hashing and grouping, and Kvasir-SEG splits that keep near-copies together."""
from __future__ import annotations

import os

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtml.runs.parameters import notebook_defaults, smoke_parameters, spec_from_parameters
from mtml.tasks.near_duplicates import (MAX_DISTANCE, cross_split_pairs, hamming, hash_images, image_hash,
                                        near_duplicate_groups, near_duplicate_pairs)
from mtml.tasks.polyp import (_kvasir_rows_in_memory, default_polyp_root, polyp_fingerprint, prepare_kvasir,
                              split_frames, split_hygiene)

DETECTION_NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "05_detection_kd_only.ipynb"


def scene(seed: int, size=(480, 400)) -> Image.Image:
    """A smooth random colour image (coarse noise upsampled), unlike any other seed's."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((10, 12, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)


def distance(a, b) -> int:
    return int(hamming(np.stack([image_hash(a), image_hash(b)]))[0, 1])


def test_hash_survives_resizing_and_jpeg_but_tells_other_images_apart(tmp_path):
    scene(0).save(tmp_path / "a.png")
    scene(0).resize((300, 250)).save(tmp_path / "a_small.jpg", quality=40)
    scene(0).resize((720, 600)).save(tmp_path / "a_large.jpg", quality=90)
    scene(1).save(tmp_path / "b.png")
    assert image_hash(tmp_path / "a.png").shape == (2,)  # 128 bits
    assert distance(tmp_path / "a.png", tmp_path / "a_small.jpg") <= 8
    assert distance(tmp_path / "a.png", tmp_path / "a_large.jpg") <= 8
    assert distance(tmp_path / "a.png", tmp_path / "b.png") > MAX_DISTANCE
    hashes = hash_images([tmp_path / "a.png", tmp_path / "a_small.jpg", tmp_path / "b.png"])
    assert near_duplicate_groups(hashes).tolist() == [0, 0, 1]


def test_hamming_counts_bits_of_every_word():
    hashes = np.array([[0, 0], [1, 0], [0, 2**64 - 1], [3, 2**63]], np.uint64)
    assert hamming(hashes).tolist() == [[0, 1, 64, 3], [1, 0, 65, 2], [64, 65, 0, 65], [3, 2, 65, 0]]
    assert hamming(np.array([0b1011, 0b0001], np.uint64)).tolist() == [[0, 2], [2, 0]]  # one word each


def test_groups_are_transitive_and_numbered_in_frame_order():
    a, far = 0, 2**64 - 1
    b = a ^ 0b111                  # 3 bits from a
    c = b ^ (0b111 << 10)          # 3 bits from b, 6 from a
    hashes = np.array([far, a, c, far ^ 1, b], np.uint64)
    assert near_duplicate_groups(hashes, max_distance=3).tolist() == [0, 1, 1, 0, 1]  # a-b-c: one group
    assert near_duplicate_groups(hashes, max_distance=0).tolist() == [0, 1, 2, 3, 4]
    i, j = near_duplicate_pairs(hashes, max_distance=3)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 3), (1, 4), (2, 4)]  # a-c (6 bits) is not a pair


def test_grouped_split_never_separates_near_duplicates():
    rng = np.random.default_rng(0)
    unique = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    copies = unique[:120] ^ np.uint64(1)  # 120 near-copies (1 bit off)
    hashes = np.concatenate([unique, copies])
    frames = [f"f{k}" for k in range(len(hashes))]
    groups = near_duplicate_groups(hashes, max_distance=2)
    assert len(set(groups)) == 300
    grouped = np.array(split_frames(frames, groups, seed=0))
    for g in set(groups):
        assert len(set(grouped[groups == g])) == 1
    assert cross_split_pairs(hashes, grouped, max_distance=2) == 0
    assert cross_split_pairs(hashes, split_frames(frames, seed=0), max_distance=2) > 0  # the leak being fixed


def kvasir_folder(root):
    """Six frames: a, a re-encoded smaller (a near-copy), and four unrelated scenes."""
    (root / "images").mkdir(parents=True)
    scene(0).save(root / "images" / "a.jpg", quality=90)
    scene(0).resize((360, 300)).save(root / "images" / "a_copy.jpg", quality=50)
    for k in range(1, 5):
        scene(k).save(root / "images" / f"s{k}.jpg", quality=90)
    return root


def test_prepare_kvasir_keeps_near_copies_in_one_split(tmp_path):
    root = kvasir_folder(tmp_path / "kvasir")
    for seed in range(6):
        frame, _ = prepare_kvasir(root, out_dir=tmp_path / "out", seed=seed, fractions=(0.5, 0.25, 0.25))
        split = frame.set_index("frame")["split"]
        assert split["a"] == split["a_copy"], seed
        group = frame.set_index("frame")["near_duplicate_group"]
        assert group["a"] == group["a_copy"] and group.nunique() == 5
    written = pd.read_csv(tmp_path / "out" / "manifest.csv", dtype={"frame": str})
    assert "near_duplicate_group" in written
    frame, _ = prepare_kvasir(root, out_dir=tmp_path / "old", split_by="frame")
    assert "near_duplicate_group" not in frame
    with pytest.raises(ValueError, match="split_by"):
        prepare_kvasir(root, out_dir=tmp_path / "bad", split_by="frames")


def test_fingerprint_is_the_split_itself_prepared_or_in_memory(tmp_path):
    """The manifest hash covers the split: one split hashes alike whether data_scripts/polyp.py
    prepared it or it was drawn in memory, and split_by changes the hash only through the split."""
    root = kvasir_folder(tmp_path / "kvasir")
    for split_by in ("frame", "near_duplicates"):
        prepare_kvasir(root, out_dir=tmp_path / split_by, split_by=split_by)
        assert polyp_fingerprint(root, split_by=split_by) == polyp_fingerprint(tmp_path / split_by)
    assert polyp_fingerprint(root) == polyp_fingerprint(root, split_by="near_duplicates")  # the default
    splits = {by: pd.read_csv(tmp_path / by / "manifest.csv").set_index("frame")["split"] for by in ("frame", "near_duplicates")}
    assert not splits["frame"].sort_index().equals(splits["near_duplicates"].sort_index())  # the fixture splits differ
    assert polyp_fingerprint(root, split_by="frame") != polyp_fingerprint(root, split_by="near_duplicates")
    params = {**smoke_parameters("detection", notebook_defaults(DETECTION_NOTEBOOK)), "DATA_DIR": str(root)}
    assert (spec_from_parameters("detection", {**params, "SPLIT_BY": "frame"}).hash  # SPLIT_BY is in the identity
            != spec_from_parameters("detection", {**params, "SPLIT_BY": "near_duplicates"}).hash)
    with pytest.raises(ValueError, match="split_by"):
        polyp_fingerprint(None, split_by="near-duplicates")


def test_real_kvasir_grouped_split_has_no_cross_split_near_duplicates():
    root, label = default_polyp_root()
    if root is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"no real Kvasir-SEG frames ({label})")
    rows = _kvasir_rows_in_memory(root, 0, "near_duplicates")
    assert cross_split_pairs(hash_images(rows["image"]), rows["split"]) == 0
    report = split_hygiene(root, seed=0)
    assert report["frames"] == len(rows) == 1000
    assert report["near_duplicate_pairs"] >= 10 and report["largest_group"] <= 5  # no chaining into a blob
    assert report["cross_split_pairs_grouped_split"] == 0 < report["cross_split_pairs_frame_split"]
    assert report["split_sizes_grouped_split"] == rows["split"].value_counts().to_dict()
