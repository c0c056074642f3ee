"""MSI vs MSS tiles: names, manifests, patient splits, the tile dataset and its cache, augmentation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mtml import CohortConfig, tiles
from mtml.tasks.data import make_separable
from mtml.tasks.download import MissingDatasetError
from mtml.tasks.synthetic import FOLDER, SyntheticConfig, ensure_synthetic_default, generate
from mtml.tasks.tiles import (TileDataset, augment_tiles, build_manifest, load_image, parse_tile_name,
                        patient_split, scan_tiles)

SMALL = SyntheticConfig(n_patients=8, tiles_per_patient=3, size=32, test_fraction=0.25, seed=3)


# -- real tile names -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_tiles(shared_data):
    """All 98,904 real tile names with patient, tile id and label parsed by our code."""
    folder = shared_data / "msi-tile-lists"
    frames = []
    for csv in sorted(folder.glob("CRC_DX_*.csv")):
        frame = pd.read_csv(csv)
        # the list's file name plays the folder's role: CRC_DX_TEST_MSIMUT -> MSI, TEST
        frame["label"], frame["official_split"] = tiles._label_and_split((csv.stem,))
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    parsed = [parse_tile_name(name) for name in frame["img_name"]]
    frame["tile_id"], frame["patient_id"] = zip(*parsed)
    return frame, pd.read_csv(folder / "patients_by_split.csv")


def test_real_names_parse_into_patients_and_labels(real_tiles, shared_data):
    frame, patients = real_tiles
    assert len(frame) == 98_904
    assert (frame["tile_id"] == frame["slice_id"]).all()
    assert (frame["patient_id"] == frame["subject_id"].str[:12]).all()
    their_labels = pd.concat(pd.read_csv(f, usecols=["label"]) for f in
                             sorted((shared_data / "msi-tile-lists").glob("CRC_DX_*.csv")))["label"]
    assert (frame["label"].map(tiles.LABEL_NAMES).to_numpy() == their_labels.to_numpy()).all()
    ours = frame.groupby("patient_id").agg(n_tiles=("img_name", "size"), label=("label", "first"))
    theirs = patients.set_index("patient_id").sort_index()
    assert ours.index.equals(theirs.index) and len(ours) == 100
    assert (ours["n_tiles"] == theirs["n_tiles"]).all()
    assert (ours["label"].map(tiles.LABEL_NAMES) == theirs["label"]).all()


def test_patient_split_of_real_tiles(real_tiles):
    frame, _ = real_tiles
    split = patient_split(frame, val_fraction=0.2, test_fraction=0.25, seed=0)
    assigned = frame["patient_id"].map(split)
    assert assigned.notna().all()
    assert (assigned.groupby(frame["patient_id"]).nunique() == 1).all()  # no patient in two splits
    official_test = frame.loc[frame["official_split"] == "TEST", "patient_id"].unique()
    assert (split[official_test] == "test").all()  # the official test split is kept
    for name in ("train", "val", "test"):
        assert set(frame.loc[assigned == name, "label"]) == {0, 1}, name
    assert split.equals(patient_split(frame, 0.2, 0.25, seed=0))
    assert not split.equals(patient_split(frame, 0.2, 0.25, seed=1))


def test_patient_split_refuses_impossible_input():
    one_msi = pd.DataFrame({"patient_id": ["a", "b", "c", "d"], "label": [1, 0, 0, 0]})
    with pytest.raises(ValueError, match="too few patients"):
        patient_split(one_msi, val_fraction=0.3, test_fraction=0.0)
    mixed = pd.DataFrame({"patient_id": ["a", "a", "b"], "label": [1, 0, 0]})
    with pytest.raises(ValueError, match="two labels"):
        patient_split(mixed)


def test_unparseable_name():
    with pytest.raises(ValueError, match="no patient id"):
        parse_tile_name("holiday-photo.png")
    assert parse_tile_name("Tile_(1,2).jpg".replace("Tile", "TCGA-AD-6964-01Z-00-DX1/Tile")) == \
        ("Tile_(1,2)", "TCGA-AD-6964")


# -- the real sample tiles ----------------------------------------------------------------------
def test_real_histology_samples_load(shared_data, tmp_path):
    files = sorted(p for p in (shared_data / "histology-samples").rglob("*")
                   if p.suffix.lower() in tiles.IMAGE_SUFFIXES)
    assert {p.suffix.lower() for p in files} >= {".jpg", ".tif"}
    # one real tile re-encoded as PNG and in other modes (grayscale, RGBA, CMYK, palette)
    rgb = Image.open(files[0]).convert("RGB")
    for mode in ("RGB", "L", "RGBA", "CMYK", "P"):
        variant = tmp_path / f"variant-{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        rgb.convert(mode).save(variant)
        files.append(variant)
    manifest = pd.DataFrame({"path": [str(p) for p in files], "label": [i % 2 for i in range(len(files))],
                             "patient_id": [p.stem for p in files]})
    data = TileDataset(manifest, size=48)
    assert len(data) == len(files) and data.report.bad == {}
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    assert images.shape == (len(files), 3, 48, 48) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.std() > 0.2  # normalised, not blank
    assert data[1]["label"].dtype == torch.long and data[1]["label"] == 1 and data[1]["index"] == 1
    gray = load_image(files[-4])  # the "L" variant comes back as RGB with equal channels
    assert gray.shape[-1] == 3 and (gray[..., 0] == gray[..., 2]).all()


# -- manifests and bad input --------------------------------------------------------------------
@pytest.fixture
def small_tree(tmp_path):
    return generate(tmp_path, SMALL)


def test_manifest_from_synthetic_tree(small_tree):
    manifest, report = build_manifest(small_tree, val_fraction=0.2, test_fraction=0.0, seed=0)
    frame = pd.read_csv(manifest)
    assert len(frame) == SMALL.n_patients * SMALL.tiles_per_patient and report.n_skipped == 0
    assert set(frame.columns) >= {"path", "label", "patient_id", "tile_id", "split", "synthetic"}
    assert frame["synthetic"].all() and frame["patient_id"].str.startswith("SYNTH-").all()
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    assert ((frame["official_split"] == "TEST") == (frame["split"] == "test")).all()
    assert (frame["label"] == frame["path"].str.contains("/MSIMUT/").astype(int)).all()
    for split in ("train", "val", "test"):
        assert set(frame.loc[frame["split"] == split, "label"]) == {0, 1}


def test_bad_tiles_are_skipped_and_reported(small_tree):
    mss = next(small_tree.glob("TRAIN/MSS"))
    good = sorted(mss.glob("*.png"))
    truncated = mss / "blk-TRUNCATEDAAA-SYNTH-0900-01Z-00-DX1.png"
    truncated.write_bytes(good[0].read_bytes()[:300])
    (mss / "blk-ZEROBYTEAAAA-SYNTH-0900-01Z-00-DX1.png").write_bytes(b"")
    (mss / "blk-TEXTFILEAAAA-SYNTH-0900-01Z-00-DX1.png").write_text("not an image")
    (mss / "holiday.png").write_bytes(good[0].read_bytes())  # no patient id in the name
    (small_tree / "TRAIN" / "OTHER").mkdir()
    (small_tree / "TRAIN" / "OTHER" / good[0].name).write_bytes(good[0].read_bytes())  # no label folder
    manifest, report = build_manifest(small_tree, test_fraction=0.0)
    assert [p.split("/")[-1] for p in report.no_patient] == ["holiday.png"]
    assert report.unlabelled == [f"TRAIN/OTHER/{good[0].name}"]
    for cache in (None, small_tree / "cache"):
        data = TileDataset(manifest, None, size=32, cache=cache)
        bad_ids = sorted(Path(p).name.split("-")[1] for p in data.report.bad)
        assert bad_ids == ["TEXTFILEAAAA", "TRUNCATEDAAA", "ZEROBYTEAAAA"]
        assert len(data) == SMALL.n_patients * SMALL.tiles_per_patient == data.report.n_ok
        assert data.report.no_patient == report.no_patient and data.report.n_skipped == 5
        loader = DataLoader(data, batch_size=8, num_workers=2)  # workers never meet a bad tile
        assert sum(len(b["label"]) for b in loader) == len(data)


def test_label_names_in_a_manifest(small_tree):
    manifest, _ = build_manifest(small_tree, test_fraction=0.0)
    frame = pd.read_csv(manifest)
    frame["path"] = [str(small_tree / p) for p in frame["path"]]
    named = frame.assign(label=frame["label"].map({1: "MSIMUT", 0: "mss"}))
    assert torch.equal(TileDataset(named, "val", size=16).labels, TileDataset(frame, "val", size=16).labels)
    with pytest.raises(ValueError, match="unknown labels"):
        TileDataset(frame.assign(label="tumour"), "val", size=16)
    with pytest.raises(ValueError, match="0 \\(MSS\\) or 1"):
        TileDataset(frame.assign(label=2), "val", size=16)


def test_missing_dataset_names_the_command(tmp_path):
    for call in (lambda: scan_tiles(tmp_path / "nowhere"), lambda: TileDataset(tmp_path / "m.csv", "train")):
        with pytest.raises(MissingDatasetError, match="data_scripts/msi_mss.py"):
            call()


def test_decompression_bomb_guard(small_tree, monkeypatch):
    manifest, _ = build_manifest(small_tree, test_fraction=0.0)
    monkeypatch.setattr(tiles, "MAX_PIXELS", 32 * 32 - 1)
    data = TileDataset(manifest, "train", size=32)
    assert len(data) == 0 and all("decompression-bomb" in r for r in data.report.bad.values())


# -- cache ---------------------------------------------------------------------------------------
def test_cache_is_built_once_and_matches_decoding(small_tree, monkeypatch):
    manifest, _ = build_manifest(small_tree, test_fraction=0.0)
    plain = TileDataset(manifest, "train", size=24)
    cached = TileDataset(manifest, "train", size=24, cache=True)
    assert len(list((small_tree / "cache").glob("*.u8"))) == 1
    assert plain.patients == cached.patients and len(plain) == len(cached)
    for i in range(len(plain)):
        assert torch.equal(plain[i]["image"], cached[i]["image"])

    def no_decoding(*a, **k):
        raise AssertionError("the cache should be reused, not rebuilt")

    monkeypatch.setattr(tiles, "load_image", no_decoding)
    val = TileDataset(manifest, "val", size=24, cache=True)  # another split, same cache
    assert len(val) > 0 and val[0]["image"].shape == (3, 24, 24)
    batch = next(iter(DataLoader(val, batch_size=4, num_workers=2)))  # memmap reopened in workers
    assert batch["image"].shape == (4, 3, 24, 24)
    monkeypatch.undo()
    # a changed tile changes the cache key: a new cache is built
    first = sorted(small_tree.rglob("*.png"))[0]
    first.write_bytes(b"")
    rebuilt = TileDataset(manifest, None, size=24, cache=True)
    assert len(list((small_tree / "cache").glob("*.u8"))) == 2 and len(rebuilt.report.bad) == 1


# -- augmentation --------------------------------------------------------------------------------
def test_augment_tiles_uses_global_rng_and_keeps_content():
    x = torch.randn(16, 3, 8, 8).clamp(-2, 2)
    batch = {"image": x, "label": torch.zeros(16, dtype=torch.long), "index": torch.arange(16)}
    torch.manual_seed(5)
    a = augment_tiles(batch)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    b = augment_tiles(batch)
    assert torch.equal(a["image"], b["image"]) and torch.equal(torch.get_rng_state(), after)
    assert a["image"].shape == x.shape and a["label"] is batch["label"] and not torch.equal(a["image"], x)
    # without jitter every tile is one of its 8 flips/rotations, and all of them occur
    torch.manual_seed(0)
    big = torch.rand(64, 3, 8, 8)
    norm = (big - torch.tensor(tiles.MEAN).view(1, 3, 1, 1)) / torch.tensor(tiles.STD).view(1, 3, 1, 1)
    out = augment_tiles({"image": norm}, brightness=0, saturation=0)["image"]
    seen = set()
    for i in range(64):
        variants = [torch.rot90(t, k, (-2, -1)) for t in (norm[i], norm[i].flip(-1)) for k in range(4)]
        match = [j for j, v in enumerate(variants) if torch.allclose(v, out[i], atol=1e-5)]
        assert match, i
        seen.add(match[0])
    assert seen == set(range(8))


def test_stain_jitter_scales_each_tiles_optical_density_and_is_drawn_last():
    """stain 0 draws exactly what the augmentation drew before stain jitter existed; stain s
    scales each tile's optical density per channel within 1 +- s (shift within +- s/5)."""
    torch.manual_seed(0)
    rgb = torch.rand(32, 3, 8, 8) * 0.8 + 0.1
    norm = (rgb - torch.tensor(tiles.MEAN).view(1, 3, 1, 1)) / torch.tensor(tiles.STD).view(1, 3, 1, 1)
    plain_g, stained_g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plain = augment_tiles({"image": norm}, brightness=0, saturation=0, generator=plain_g)["image"]
    stained = augment_tiles({"image": norm}, brightness=0, saturation=0, stain=0.3, generator=stained_g)["image"]
    assert torch.equal(augment_tiles({"image": norm}, brightness=0, saturation=0, stain=0.0,
                                     generator=torch.Generator().manual_seed(3))["image"], plain)
    back = lambda x: x * torch.tensor(tiles.STD).view(1, 3, 1, 1) + torch.tensor(tiles.MEAN).view(1, 3, 1, 1)  # noqa: E731
    od_plain, od_stained = -torch.log(back(plain)), -torch.log(back(stained))
    for i in range(32):
        for c in range(3):  # od' = a od + b with one (a, b) per tile and channel
            a, b = np.polyfit(od_plain[i, c].flatten().numpy(), od_stained[i, c].flatten().numpy(), 1)
            assert 0.7 - 1e-3 <= a <= 1.3 + 1e-3 and abs(b) <= 0.06 + 1e-3
    assert not torch.allclose(stained, plain)
    with pytest.raises(ValueError, match="stain must be in"):
        augment_tiles({"image": norm}, stain=1.0)


def test_the_task_owns_its_stain_jitter_and_refuses_another_augmentation():
    from mtml.runs.experiment import RunOptions, run_cohort
    from mtml.tasks.task import ClassificationTask

    for bad in (None, 1.0, -0.1, True, "0.3"):
        with pytest.raises(ValueError, match="STAIN_JITTER"):
            ClassificationTask(stain_jitter=bad)
    task = ClassificationTask(stain_jitter=0.3)
    assert task.settings() == {"num_classes": 2, "stain_jitter": 0.3}
    assert ClassificationTask().settings() == {"num_classes": 2}  # runs without it keep their identity
    assert ClassificationTask.from_settings(task.settings()).stain_jitter == 0.3
    data = make_separable(32, 8, seed=0)
    cfg = CohortConfig(mode="independent", epochs=1, batch_size=16)
    with pytest.raises(ValueError, match=r"augment=task\.augment"):
        run_cohort(cfg, task, data, data, options=RunOptions(augment=augment_tiles, progress=False))


# -- synthetic default + fit smoke ---------------------------------------------------------------
def test_ensure_synthetic_default_generates_once(tmp_path, monkeypatch):
    manifest = ensure_synthetic_default(tmp_path, SMALL)
    assert manifest == tmp_path / FOLDER / "manifest.csv"
    frame = pd.read_csv(manifest)
    assert set(frame["split"]) == {"train", "val", "test"} and frame["synthetic"].all()
    assert all(tiles._BLK.match(p.split("/")[-1][:-4]) for p in frame["path"])  # the real naming
    monkeypatch.setattr("mtml.tasks.synthetic.generate", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_synthetic_default(tmp_path, SMALL) == manifest
    assert not list(tmp_path.glob(".synthetic-*"))  # no temporary folder left


def test_synthetic_patients_differ_in_stain(small_tree):
    frame, _ = scan_tiles(small_tree)
    means = frame.groupby("patient_id")["path"].apply(
        lambda ps: np.mean([np.asarray(Image.open(small_tree / p), dtype=float).mean((0, 1)) for p in ps], 0))
    assert np.stack(means.to_numpy()).std(0).max() > 2  # per-patient colour differences (0-255 scale)


def test_fit_smoke_on_synthetic_tiles(tmp_path):
    from mtml import ClassificationTask, Cohort, CohortConfig, fit

    manifest = ensure_synthetic_default(tmp_path, SMALL)
    train = TileDataset(manifest, "train", size=32, cache=True)
    val = TileDataset(manifest, "val", size=32, cache=True)
    cfg = CohortConfig(mode="kd_ml", version="tiny", n_students=2, epochs=1, batch_size=4).validate()
    cohort = Cohort.build(cfg, "cpu", task=ClassificationTask())
    history = fit(cohort, ClassificationTask(), train, val, augment=augment_tiles, progress=False)
    assert len(history) == 1 and np.isfinite(history.filter(like="train/").to_numpy()).all()
    assert "val/ensemble/auroc" in history
