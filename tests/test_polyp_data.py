"""Polyp data: boxes from json and masks, bad annotations, manifests, splits, the Kvasir-SEG
downloader against a local HTTP server, the synthetic generator and the flip augmentation."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from mtml.tasks.polyp import (CVC_SEQUENCE_ENDS, PrepReport, boxes_from_mask, clean_boxes, cvc_sequence,
                        flip_augment, load_polyp_dataset, make_synthetic_polyps, prepare_cvc,
                        prepare_kvasir, read_bbox_json, split_frames)

REPO = Path(__file__).resolve().parents[1]


def test_real_kvasir_mask_boxes_agree_with_official_json(shared_data):
    """Each official box matched to the best mask component: IoU > 0.9 for >= 95% of 1,071."""
    root = shared_data / "kvasir-seg"
    official = json.loads((root / "kavsir_bboxes.json").read_text())
    ious = []
    for frame, entry in official.items():
        with Image.open(root / "masks" / f"{frame}.jpg") as im:
            found = torch.from_numpy(boxes_from_mask(np.asarray(im.convert("L"))))
        gt = torch.tensor([[b[k] for k in ("xmin", "ymin", "xmax", "ymax")] for b in entry["bbox"]],
                          dtype=torch.float32)
        ious += box_iou(gt, found).max(1).values.tolist() if len(found) else [0.0] * len(gt)
    assert len(ious) == 1071
    assert np.mean(np.array(ious) > 0.9) >= 0.95


def test_mask_components_eight_connected_and_min_area():
    mask = np.zeros((40, 50), np.uint8)
    mask[2:12, 3:13] = 255      # 100 px
    mask[12:20, 13:20] = 200    # touches the first only diagonally: same component (8-connected)
    mask[30:38, 30:45] = 255    # a second polyp
    mask[0, 49] = 255           # a speck below min_area
    mask[25, 5] = 100           # below the threshold: background
    report = PrepReport()
    boxes = boxes_from_mask(mask, min_area=10, report=report)
    assert sorted(boxes.tolist()) == [[3, 2, 20, 20], [30, 30, 45, 38]]
    assert report["components_below_min_area"] == 1
    empty = boxes_from_mask(np.zeros((8, 8), np.uint8), report=report)
    assert empty.shape == (0, 4) and report["masks_empty"] == 1


def test_clean_boxes_clips_drops_and_counts():
    report = PrepReport()
    boxes = clean_boxes([[-5, 10, 50, 120], [30, 5, 10, 40], [200, 0, 300, 10], [1, 1, 9, 9]],
                        width=100, height=100, report=report)
    assert boxes.tolist() == [[0, 10, 50, 100], [1, 1, 9, 9]]
    assert report == {"boxes_dropped_inverted": 1, "boxes_clipped": 2, "boxes_dropped_empty": 1}


def test_bbox_json_malformed_file_and_entries(tmp_path):
    bad = tmp_path / "kavsir_bboxes.json"
    bad.write_text('{"a": {"height": 10,')
    with pytest.raises(ValueError, match="--boxes masks"):
        read_bbox_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="map frame ids"):
        read_bbox_json(bad)
    bad.write_text(json.dumps({
        "ok": {"height": 50, "width": 60, "bbox": [{"label": "polyp", "xmin": 10, "ymin": 5, "xmax": 70, "ymax": 40}]},
        "no_bbox": {"height": 50, "width": 60},
        "bad_number": {"height": 50, "width": 60, "bbox": [{"xmin": "x", "ymin": 1, "xmax": 2, "ymax": 3}]},
        "inverted": {"height": 50, "width": 60, "bbox": [{"xmin": 30, "ymin": 1, "xmax": 2, "ymax": 3}]},
    }))
    report = PrepReport()
    entries = read_bbox_json(bad, report)
    assert sorted(entries) == ["inverted", "ok"]
    assert entries["ok"]["boxes"].tolist() == [[10, 5, 60, 40]]  # clipped to the width
    assert len(entries["inverted"]["boxes"]) == 0
    assert report["json_entries_malformed"] == 2 and report["boxes_dropped_inverted"] == 1


def _jpeg(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def kvasir_files(n=6) -> dict[str, bytes]:
    """A small Kvasir-SEG tree (as in the official zip): frames, masks, boxes json; frame 0 has
    no polyp, frame 1 is missing from the json, frame 2's image is corrupt."""
    rng = np.random.default_rng(0)
    files, boxes = {}, {}
    for i in range(n):
        h, w = 60 + i, 80
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        if i > 0:
            mask[10:10 + 3 * i + 12, 20:50] = 255
            boxes[f"f{i}"] = {"height": h, "width": w, "bbox": [
                {"label": "polyp", "xmin": 20, "ymin": 10, "xmax": 50, "ymax": 10 + 3 * i + 12}]}
        else:
            boxes["f0"] = {"height": h, "width": w, "bbox": []}
        files[f"Kvasir-SEG/images/f{i}.jpg"] = _jpeg(image) if i != 2 else b"not a jpeg"
        files[f"Kvasir-SEG/masks/f{i}.jpg"] = _jpeg(mask)
    del boxes["f1"]
    files["Kvasir-SEG/kavsir_bboxes.json"] = json.dumps(boxes).encode()
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_prepare_kvasir_reports_and_trains_on_empty_frames(tmp_path):
    root = write_tree(tmp_path / "src", kvasir_files())
    frame, report = prepare_kvasir(root, out_dir=tmp_path / "out")
    assert report["images_unreadable"] == 1 and report["frames_missing_from_json"] == 1
    assert report["frames"] == 5 and report["frames_without_boxes"] == 2  # f0 (no polyp), f1 (not in json)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["frames"] == 5
    masks_frame, masks_report = prepare_kvasir(root, out_dir=tmp_path / "m", boxes="masks", min_area=1)
    assert masks_frame.set_index("frame").loc["f1", "n_boxes"] == 1 and masks_report["masks_empty"] == 1
    data = load_polyp_dataset(tmp_path / "out", split=None, size=64)
    assert len(data) == 5 and sum(len(data[i]["boxes"]) == 0 for i in range(5)) == 2
    f3 = data[data.frames.index("f3")]["boxes"]  # 80 x 63 frame -> 64 x 64: boxes scale with it
    assert torch.allclose(f3, torch.tensor([[16.0, 10 * 64 / 63, 40.0, 31 * 64 / 63]]))
    from mtml import Cohort, CohortConfig, cohort_step
    from mtml.tasks.detection import DetectionTask
    from mtml.tasks.detectors import build_detection_networks

    task = DetectionTask(size=64)
    cohort = Cohort.build(CohortConfig(mode="kd_ml", batch_size=5, lr=0.01),
                          networks=lambda *a, **k: build_detection_networks(*a, size=64, **k))
    terms = cohort_step(cohort, task.collate([data[i] for i in range(5)]), task)
    assert all(torch.isfinite(v) for v in terms.values())


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("polyp_script", REPO / "data_scripts" / "polyp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kvasir_cli_downloads_from_local_server(http_server, tmp_path, capsys):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in kvasir_files().items():
            zf.writestr(name, data)
    http_server.files["/downloads/kvasir-seg.zip"] = buf.getvalue()
    load_script().main(["kvasir", "--quiet", "--url", http_server.url("/downloads/kvasir-seg.zip"),
                        "--data-dir", str(tmp_path)])
    manifest = pd.read_csv(tmp_path / "kvasir-seg" / "manifest.csv", dtype={"frame": str})
    assert sorted(manifest["frame"]) == ["f0", "f1", "f3", "f4", "f5"]
    assert (tmp_path / "kvasir-seg" / "raw" / "Kvasir-SEG" / "images" / "f5.jpg").is_file()
    assert "images_unreadable: 1" in capsys.readouterr().out
    assert http_server.hits["/downloads/kvasir-seg.zip"] == 1
    # a second run reuses the verified download and the extracted files
    load_script().main(["kvasir", "--quiet", "--url", http_server.url("/downloads/kvasir-seg.zip"),
                        "--data-dir", str(tmp_path)])
    assert http_server.hits["/downloads/kvasir-seg.zip"] == 1


def test_cli_help_and_missing_source(tmp_path):
    script = str(REPO / "data_scripts" / "polyp.py")
    assert "Kvasir-SEG" in subprocess.run([sys.executable, script, "--help"], capture_output=True,
                                          text=True, check=True).stdout
    run = subprocess.run([sys.executable, script, "cvc", "--from", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "does not exist" in run.stderr


def test_cvc_sequences_never_cross_splits():
    assert len(CVC_SEQUENCE_ENDS) == 29 and CVC_SEQUENCE_ENDS[-1] == 612
    frames = list(range(1, 613))
    sequences = [cvc_sequence(f) for f in frames]
    assert sequences[0] == 1 and sequences[24] == 1 and sequences[25] == 2 and sequences[-1] == 29
    for seed in range(5):
        splits = split_frames(frames, sequences, seed=seed)
        per_sequence = pd.DataFrame({"s": sequences, "split": splits}).groupby("s")["split"].nunique()
        assert per_sequence.max() == 1 and set(splits) == {"train", "val", "test"}
        assert 0.7 < splits.count("train") / 612 < 0.9
    assert split_frames(frames, sequences, seed=1) == split_frames(frames, sequences, seed=1)
    with pytest.raises(ValueError):
        cvc_sequence(613)


def test_prepare_cvc_from_folder(tmp_path):
    root = tmp_path / "CVC-ClinicDB" / "PNG"
    for n in (1, 2, 26, 27, 51, 600):
        image = np.full((30, 40, 3), n % 256, np.uint8)
        mask = np.zeros((30, 40), np.uint8)
        if n != 27:  # frame 27: an empty mask
            mask[5:20, 10:30] = 255
        for folder, array in (("Original", image), ("Ground Truth", mask)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / folder / f"{n}.png")
    frame, report = prepare_cvc(tmp_path, out_dir=tmp_path / "out", seed=0)
    assert frame.set_index("frame")["sequence"].to_dict() == {"1": 1, "2": 1, "26": 2, "27": 2, "51": 3, "600": 29}
    assert report["masks_empty"] == 1 and report["frames_without_boxes"] == 1
    assert frame.groupby("sequence")["split"].nunique().max() == 1
    assert json.loads(frame.set_index("frame").loc["1", "boxes"]) == [[10, 5, 30, 20]]


def test_synthetic_polyps_seeded_and_boxes_cover_red():
    a, b = make_synthetic_polyps(16, size=64, seed=3), make_synthetic_polyps(16, size=64, seed=3)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(16))
    assert not torch.equal(a[0]["image"], make_synthetic_polyps(16, size=64, seed=3, split=1)[0]["image"])
    for i in range(16):
        image, boxes = a[i]["image"].float(), a[i]["boxes"]
        red = image[1] < 110  # polyp pixels have far less green than the pink background
        inside = torch.zeros_like(red)
        for x0, y0, x1, y1 in boxes.long().tolist():
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            inside[y0:y1, x0:x1] = True
        assert not (red & ~inside).any()


def test_flip_augment_moves_boxes_with_pixels():
    image = torch.zeros(1, 3, 32, 48)
    image[0, :, 4:10, 6:20] = 1.0
    batch = {"image": image, "targets": [{"boxes": torch.tensor([[6.0, 4, 20, 10]]), "labels": torch.ones(1)}]}
    torch.manual_seed(0)
    for _ in range(8):
        out = flip_augment(batch)
        x0, y0, x1, y1 = out["targets"][0]["boxes"][0].long().tolist()
        assert out["image"][0, 0, y0:y1, x0:x1].min() == 1 and out["image"][0, 0].sum() == 6 * 14


def test_flip_augment_of_a_batch_equals_frame_by_frame_flips_with_the_same_draws():
    """The batched flips give the frames and boxes of flipping each frame in turn (horizontal, then
    vertical draw per frame), so runs before and after the change see the same augmentation."""
    from mtml.tasks.detection import DetectionTask

    batch = DetectionTask(32).collate([make_synthetic_polyps(12, size=32, seed=3)[i] for i in range(12)])
    g = torch.Generator().manual_seed(5)
    expected_images, expected_boxes = batch["image"].clone(), []
    for i, t in enumerate(batch["targets"]):
        b = t["boxes"].clone()
        if torch.rand(1, generator=g) < 0.5:
            expected_images[i] = expected_images[i].flip(-1)
            b[:, [0, 2]] = 32 - b[:, [2, 0]]
        if torch.rand(1, generator=g) < 0.5:
            expected_images[i] = expected_images[i].flip(-2)
            b[:, [1, 3]] = 32 - b[:, [3, 1]]
        expected_boxes.append(b)
    out = flip_augment(batch, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out["image"], expected_images)
    assert all(torch.equal(a["boxes"], b) for a, b in zip(out["targets"], expected_boxes))
    assert not torch.equal(out["image"], batch["image"])  # some frames flipped; the batch itself untouched


def test_notebook_data_falls_back_to_labelled_synthetic(monkeypatch, tmp_path):
    import mtml.tasks.polyp as polyp

    monkeypatch.setattr(polyp, "default_polyp_root", lambda: (None, "SYNTHETIC polyps (test)"))
    train, val, test, label = polyp.polyp_splits(None, size=64, limits=(8, 4, 4))
    assert label.startswith("SYNTHETIC") and (len(train), len(val), len(test)) == (8, 4, 4)
    monkeypatch.setenv("MTML_DATA_DIR", str(tmp_path))  # a prepared folder wins over the fallbacks
    write_tree(tmp_path / "kvasir-seg" / "raw", kvasir_files())
    prepare_kvasir(tmp_path / "kvasir-seg" / "raw", out_dir=tmp_path / "kvasir-seg")
    monkeypatch.undo()
    monkeypatch.setenv("MTML_DATA_DIR", str(tmp_path))
    root, label = polyp.default_polyp_root()
    assert root == tmp_path / "kvasir-seg" and "prepared" in label
