"""Polyp frames and boxes: Kvasir-SEG, CVC-ClinicDB, and a synthetic stand-in.

* Kvasir-SEG (Jha et al., MMM 2020): 1,000 frames, masks, and official boxes in
  `kavsir_bboxes.json` = {id: {"height", "width", "bbox": [{"label", "xmin", "ymin", "xmax", "ymax"}]}}.
  The split is random, but near-duplicate frames stay in one split (`mtml.near_duplicates`,
  `split_hygiene`).
* CVC-ClinicDB (Bernal et al., CMIG 2015): 612 frames (`Original/N.tif`) with masks
  (`Ground Truth/N.tif`; public copies also use `images/` + `masks/` and JPEG) from 29 video
  sequences; boxes come from the masks' connected components.
  Frames of one sequence never cross splits. The sequence frame ranges (`CVC_SEQUENCE_ENDS`, last
  frame of each sequence) are the ones listed for the 29 sequences on the CVC-ClinicDB page of the
  MICCAI 2015 polyp detection challenge (polyp.grand-challenge.org/CVCClinicDB); we took them from
  a public transcription and could not check them against the dataset's README here: pass
  `sequence_ends=` (or `--sequence-ends` to the script) if your copy's README differs.

Boxes are xyxy pixels, x in [0, W], y in [0, H] (exclusive max). Bad annotations are clipped,
dropped or skipped and counted in a `PrepReport`, never raised mid-epoch. Manifests are CSV files
(one row per frame, boxes as a JSON list) written atomically beside the data; their paths are
relative to the manifest's folder, so a prepared folder can be moved or copied whole.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .data import shared_data_dir
from ..io import write_csv, write_json
from .near_duplicates import MAX_DISTANCE, cross_split_pairs, hash_images, near_duplicate_groups, near_duplicate_pairs

CVC_SEQUENCE_ENDS = (25, 50, 67, 78, 103, 126, 151, 177, 199, 205, 227, 252, 277, 297, 317, 342, 363,
                     383, 408, 428, 447, 466, 478, 503, 528, 546, 571, 591, 612)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MANIFEST = "manifest.csv"
SPLIT_BY = ("near_duplicates", "frame")  # how Kvasir-SEG is split; the first is the default


class PrepReport(Counter):
    """Counts of what preparation clipped, dropped or skipped (printed and saved as JSON)."""

    def __str__(self):
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.items())) or "nothing to report"


# boxes -----------------------------------------------------------------------------------------
def clean_boxes(boxes, width: int, height: int, report: PrepReport | None = None) -> np.ndarray:
    """Clips xyxy boxes to the frame; drops (and counts) non-finite ones, inverted ones (xmin > xmax
    or ymin > ymax) and those with no area left after clipping."""
    report = report if report is not None else PrepReport()
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(boxes).all(1)  # json.loads accepts NaN and Infinity
    if not finite.all():
        report["boxes_dropped_nonfinite"] += int((~finite).sum())
    boxes = boxes[finite]
    inverted = (boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])
    report["boxes_dropped_inverted"] += int(inverted.sum())
    boxes = boxes[~inverted]
    clipped = np.clip(boxes, 0, [width, height, width, height])
    report["boxes_clipped"] += int((clipped != boxes).any(1).sum())
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    report["boxes_dropped_empty"] += int(empty.sum())
    return clipped[~empty].astype(np.float32)


def read_bbox_json(path, report: PrepReport | None = None) -> dict[str, dict]:
    """Kvasir-SEG's `kavsir_bboxes.json` -> {id: {"width", "height", "boxes" (k, 4)}}.
    Unparseable file: ValueError naming the fix; malformed entries or boxes: skipped and counted."""
    report = report if report is not None else PrepReport()
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the box file {path} ({err}); fetch the dataset again, or "
                         "take boxes from the masks (boxes='masks', --boxes masks)") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} should map frame ids to entries, got {type(raw).__name__}; "
                         "use boxes='masks' (--boxes masks) instead")
    out = {}
    for frame, entry in raw.items():
        try:
            width, height = int(entry["width"]), int(entry["height"])
            boxes = [[float(b[k]) for k in ("xmin", "ymin", "xmax", "ymax")] for b in entry["bbox"]]
        except (KeyError, TypeError, ValueError):
            report["json_entries_malformed"] += 1
            continue
        out[str(frame)] = {"width": width, "height": height, "boxes": clean_boxes(boxes, width, height, report)}
    return out


def boxes_from_mask(mask, threshold: int = 128, min_area: int = 64,
                    report: PrepReport | None = None) -> np.ndarray:
    """Boxes (k, 4) xyxy of the 8-connected components of `mask >= threshold` with at least
    `min_area` pixels. An empty mask gives no box (counted as `masks_empty`)."""
    from scipy import ndimage

    report = report if report is not None else PrepReport()
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    labels, n = ndimage.label(mask >= threshold, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        report["masks_empty"] += 1
        return np.zeros((0, 4), np.float32)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    report["components_below_min_area"] += int((area < min_area).sum())
    boxes = [[sx.start, sy.start, sx.stop, sy.stop] for (sy, sx), a in zip(ndimage.find_objects(labels), area)
             if a >= min_area]
    return np.asarray(boxes, np.float32).reshape(-1, 4)


# manifests and splits --------------------------------------------------------------------------
def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _find_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first folder under root (depth <= 3) whose name matches one of `names` (case-insensitive)."""
    wanted = {n.lower() for n in names}
    for dirpath, dirnames, _ in os.walk(root):
        if Path(dirpath).relative_to(root).parts.__len__() > 3:
            continue
        for d in sorted(dirnames):
            if d.lower() in wanted:
                return Path(dirpath) / d
    return None


def _image_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    from .tiles import MAX_PIXELS

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:  # decompression-bomb guard
                return None
            im.load()  # a full decode: verify() lets truncated JPEGs through
            return im.size
    except Exception:  # PIL raises many types for corrupt files
        return None


def split_frames(frames, groups=None, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> list[str]:
    """Seeded train/val/test assignment. With `groups` (one per frame, e.g. a video sequence),
    whole groups are shuffled and assigned in turn, so a group never crosses splits."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1):
        raise ValueError(f"fractions must be three numbers >= 0 summing to 1, got {fractions}")
    groups = list(frames) if groups is None else list(groups)
    unique = sorted(set(groups), key=str)
    order = np.random.default_rng(seed).permutation(len(unique))
    sizes = Counter(groups)
    bounds, total, done, split_of = np.cumsum(fractions[:2]) * len(groups), len(groups), 0, {}
    for k in order:
        g = unique[k]
        split_of[g] = "train" if done < bounds[0] else "val" if done < bounds[1] else "test"
        done += sizes[g]
    assert done == total
    return [split_of[g] for g in groups]


def _finish(rows, root: Path, out_dir: Path, report: PrepReport, groups, seed, fractions) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise ValueError(f"no usable frames under {root} ({report}); check the folder")
    frame["split"] = split_frames(frame["frame"], frame[groups] if groups else None, fractions, seed)
    report["frames"], report["boxes"] = len(frame), int(frame["n_boxes"].sum())
    report["frames_without_boxes"] = int((frame["n_boxes"] == 0).sum())
    write_csv(Path(out_dir) / MANIFEST, frame, index=False)
    write_json(Path(out_dir) / "report.json", dict(report))
    return frame


def manifest_path(path: Path, base: Path) -> str:
    """How a manifest in `base` names `path`: relative (POSIX) when it lies under `base`, so the
    folder can move; absolute otherwise (data_scripts/polyp.py copies sources under `base`)."""
    path, base = Path(path).resolve(), Path(base).resolve()
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)


def _row(frame_id, image: Path, mask, boxes, width, height, base: Path, **extra):
    return dict(frame=str(frame_id), image=manifest_path(image, base),
                mask=manifest_path(mask, base) if mask else "", width=width, height=height,
                n_boxes=len(boxes), boxes=json.dumps(np.round(boxes, 2).tolist()), **extra)


def _check_split_by(split_by: str) -> None:
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")


def kvasir_images(root) -> Path | None:
    """The `images/` folder of a Kvasir-SEG copy (depth <= 3), or None."""
    return _find_dir(Path(root), ("images",))


def prepare_kvasir(root, out_dir=None, boxes: str = "json", seed: int = 0, fractions=(0.8, 0.1, 0.1),
                   min_area: int = 64, split_by: str = "near_duplicates",
                   max_distance: int = MAX_DISTANCE) -> tuple[pd.DataFrame, PrepReport]:
    """Manifest of a Kvasir-SEG folder (images/, masks/, kavsir_bboxes.json, possibly one level
    down). `boxes="json"` uses the official boxes (falls back to the masks, reported, if the json
    is missing); `"masks"` derives them from the masks. The dataset publishes no video or patient
    ids, so the split is random. `split_by="near_duplicates"` puts the frames whose hashes are
    within `max_distance` bits (`mtml.near_duplicates`) in the same split, in a
    `near_duplicate_group` column. `"frame"` splits frame by frame, the old split, kept so that
    old runs can be reproduced."""
    _check_split_by(split_by)
    root = Path(root)
    images_dir = kvasir_images(root)
    if images_dir is None:
        raise FileNotFoundError(f"no images/ folder under {root}; is this the Kvasir-SEG folder?")
    base = images_dir.parent
    out_dir = Path(out_dir or base)
    report = PrepReport()
    json_path, masks_dir = base / "kavsir_bboxes.json", base / "masks"
    official = None
    if boxes == "json":
        if json_path.is_file():
            official = read_bbox_json(json_path, report)
        else:
            report["json_missing_boxes_from_masks"] = 1
    elif boxes != "masks":
        raise ValueError(f"boxes must be 'json' or 'masks', got {boxes!r}")
    rows, kept = [], []
    for frame_id, image in _images(images_dir).items():
        size = _image_size(image)
        if size is None:
            report["images_unreadable"] += 1
            continue
        kept.append(image)
        mask = masks_dir / image.name if (masks_dir / image.name).is_file() else None
        if official is not None:
            entry = official.get(frame_id)
            if entry is None:
                report["frames_missing_from_json"] += 1
            found = entry["boxes"] if entry else np.zeros((0, 4), np.float32)
            if entry and (entry["width"], entry["height"]) != size:
                report["json_size_mismatch_rescaled"] += 1
                found = found * np.array([size[0] / entry["width"], size[1] / entry["height"]] * 2, np.float32)
        elif mask is not None:
            found = _mask_boxes(mask, min_area, report)
        else:
            report["masks_missing"] += 1
            found = np.zeros((0, 4), np.float32)
        rows.append(_row(frame_id, image, mask, found, *size, base=out_dir, dataset="kvasir-seg"))
    group = None
    if split_by == "near_duplicates" and rows:
        group = "near_duplicate_group"
        for row, g in zip(rows, near_duplicate_groups(hash_images(kept), max_distance)):
            row[group] = int(g)
    return _finish(rows, root, out_dir, report, group, seed, fractions), report


def _mask_boxes(mask_path: Path, min_area: int, report: PrepReport) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(mask_path) as im:
            return boxes_from_mask(np.asarray(im.convert("L")), min_area=min_area, report=report)
    except OSError:
        report["masks_unreadable"] += 1
        return np.zeros((0, 4), np.float32)


def cvc_sequence(frame_number: int, sequence_ends=CVC_SEQUENCE_ENDS) -> int:
    """1-based sequence of a CVC-ClinicDB frame number (1..612)."""
    if not 1 <= frame_number <= sequence_ends[-1]:
        raise ValueError(f"CVC-ClinicDB frame {frame_number} is outside 1..{sequence_ends[-1]}")
    return int(np.searchsorted(sequence_ends, frame_number)) + 1


CVC_LAYOUTS = (  # (frames folder, mask folder names) of the published copies, tried in order
    ("Original", ("Ground Truth", "GroundTruth", "Ground_Truth")),
    ("images", ("masks", "Ground Truth")),
)


def cvc_folders(root) -> tuple[Path, Path]:
    """(frames folder, masks folder) of a CVC-ClinicDB copy: `Original/` + `Ground Truth/` (the
    authors' release) or `images/` + `masks/` (common public copies), at depth <= 3."""
    root = Path(root)
    for frames_name, mask_names in CVC_LAYOUTS:
        frames = _find_dir(root, (frames_name,))
        if frames is None:
            continue
        wanted = {n.lower() for n in mask_names}
        masks = next((d for d in sorted(frames.parent.iterdir()) if d.is_dir() and d.name.lower() in wanted), None)
        if masks is not None:
            return frames, masks
    found = sorted(p.name for p in root.iterdir() if p.is_dir())[:8] if root.is_dir() else []
    raise FileNotFoundError(f"no CVC-ClinicDB frames under {root} (folders there: {found}): it needs "
                            "'Original/' + 'Ground Truth/' or 'images/' + 'masks/'; point --from at the "
                            "dataset's folder or archive")


def prepare_cvc(root, out_dir=None, seed: int = 0, fractions=(0.8, 0.1, 0.1), min_area: int = 64,
                sequence_ends=CVC_SEQUENCE_ENDS) -> tuple[pd.DataFrame, PrepReport]:
    """Manifest of a CVC-ClinicDB folder (see `cvc_folders`; frames and masks PNG, TIFF or JPEG,
    frames named by their number): boxes from the masks; split by video sequence. JPEG masks
    carry compression noise (dozens of grey levels near 0 and 255, ringing at the edges):
    thresholding at 128, half-way between background and polyp, and dropping components under
    `min_area` pixels gives the same boxes as the lossless masks within a pixel or two."""
    root = Path(root)
    originals, truths = cvc_folders(root)
    out_dir = Path(out_dir or root)
    report, rows, masks = PrepReport(), [], _images(truths)
    for stem, image in _images(originals).items():
        if not re.fullmatch(r"\d+", stem) or not 1 <= int(stem) <= sequence_ends[-1]:
            report["frames_unnumbered_skipped"] += 1
            continue
        size = _image_size(image)
        if size is None:
            report["images_unreadable"] += 1
            continue
        mask = masks.get(stem)
        if mask is None:
            report["masks_missing"] += 1
        found = _mask_boxes(mask, min_area, report) if mask else np.zeros((0, 4), np.float32)
        rows.append(_row(stem, image, mask, found, *size, base=out_dir, dataset="cvc-clinicdb",
                         sequence=cvc_sequence(int(stem), sequence_ends)))
    return _finish(rows, root, out_dir, report, "sequence", seed, fractions), report


# datasets --------------------------------------------------------------------------------------
class DetectionDataset(Dataset):
    """In-memory frames: items {image (3, S, S) uint8, boxes (k, 4) float, index, frame}."""

    def __init__(self, images: list[torch.Tensor], boxes: list[torch.Tensor], frames=None, label=""):
        if len(images) != len(boxes):
            raise ValueError(f"{len(images)} images but {len(boxes)} box lists")
        self.images, self.boxes = images, [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
        self.frames = list(frames) if frames is not None else [str(i) for i in range(len(images))]
        self.label = label

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "boxes": self.boxes[i], "index": i, "frame": self.frames[i]}


def load_manifest(root) -> pd.DataFrame:
    path = Path(root) / MANIFEST if Path(root).is_dir() else Path(root)
    if not path.is_file():
        from .download import MissingDatasetError

        raise MissingDatasetError("polyp manifest", path, "python data_scripts/polyp.py --help")
    return pd.read_csv(path, dtype={"frame": str, "mask": str}, keep_default_na=False)


def capped_subset(frame: pd.DataFrame, limit: int | None, seed: int = 0) -> pd.DataFrame:
    """A seeded random subset of `limit` rows in manifest order (all rows when `limit` is None or larger)."""
    return frame.sample(n=limit, random_state=seed).sort_index() if limit is not None and limit < len(frame) else frame


def load_polyp_dataset(root, split: str | None = "train", size: int = 160, limit: int | None = None,
                       seed: int = 0, split_by: str = "near_duplicates") -> DetectionDataset:
    """Frames of a prepared folder (its manifest.csv; a Kvasir-SEG folder without one is prepared
    in memory, nothing written, split as `split_by` says) resized to size x size, boxes scaled.
    A manifest keeps the split it was made with. `limit` keeps a seeded random subset.
    Unreadable frames were already skipped when the manifest was made."""
    from PIL import Image

    from .tiles import load_image

    frame, root = split_rows(root, split, limit, seed, split_by)
    missing = [p for p in frame["image"] if not (root / p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(frame)} frames named by the manifest in {root} are "
                                f"missing (first: {root / missing[0]}); move or copy the prepared folder "
                                "whole, or prepare it again with python data_scripts/polyp.py")
    images, boxes = [], []
    for row in frame.itertuples():
        full = load_image(root / row.image)  # RGB uint8 whatever the mode, bomb-guarded
        h, w = full.shape[:2]
        im = Image.fromarray(full).resize((size, size), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous())
        b = torch.tensor(json.loads(row.boxes), dtype=torch.float32).reshape(-1, 4)
        boxes.append(b * torch.tensor([size / w, size / h, size / w, size / h]))
    return DetectionDataset(images, boxes, frame["frame"].tolist(), label=str(root))


def split_rows(root, split: str | None = "train", limit: int | None = None, seed: int = 0,
               split_by: str = "near_duplicates") -> tuple[pd.DataFrame, Path]:
    """(manifest rows, the folder their image paths are relative to) of the frames
    `load_polyp_dataset` loads with these arguments; no image is read."""
    _check_split_by(split_by)
    root = Path(root)
    if root.is_dir() and not (root / MANIFEST).is_file():
        frame = _kvasir_rows_in_memory(root, seed, split_by)
    else:
        frame = load_manifest(root)
        root = root if root.is_dir() else root.parent
    if split is not None:
        frame = frame[frame["split"] == split]
    return capped_subset(frame, limit, seed), root


def _kvasir_rows_in_memory(root: Path, seed: int, split_by: str = "near_duplicates") -> pd.DataFrame:
    """The Kvasir-SEG manifest of a read-only folder (e.g. ../shared/data), kept in memory."""
    key = (str(Path(root).resolve()), seed, split_by)
    if key not in _IN_MEMORY:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            frame, _ = prepare_kvasir(root, out_dir=tmp, seed=seed, split_by=split_by)
        images_dir = _find_dir(root, ("images",))
        frame["image"] = [str(images_dir / Path(p).name) for p in frame["image"]]
        _IN_MEMORY[key] = frame
    return _IN_MEMORY[key].copy()


_IN_MEMORY: dict = {}


def _polyp_source(data_dir):
    """(root or None, description): `data_dir` if given, else `default_polyp_root()`."""
    return (Path(data_dir), f"polyp frames from {data_dir}") if data_dir else default_polyp_root()


SYNTHETIC_POLYP_COUNTS = (256, 64, 64)  # train, val, test frames of the synthetic default
SYNTHETIC_POLYP_VERSION = 1             # bump when make_synthetic_polyps draws other frames


def polyp_splits(data_dir=None, size: int = 160, limits=(None, None, None), seed: int = 0,
                 split_by: str = "near_duplicates", with_test: bool = True):
    """(train, val, test, description) for the notebooks: frames of `data_dir` (a prepared folder)
    if given, else of `default_polyp_root()`, else SYNTHETIC polyps (256/64/64 frames unless
    `limits` says otherwise; the same frames for every seed). `limits` caps each split;
    `split_by` splits an unprepared Kvasir-SEG folder (see `prepare_kvasir`); without
    `with_test`, test is None and no test frame is read (a study that chooses settings)."""
    _check_split_by(split_by)
    root, label = _polyp_source(data_dir)
    names = ("train", "val", "test") if with_test else ("train", "val")
    if root is None:
        counts = [lim or default for lim, default in zip(limits, SYNTHETIC_POLYP_COUNTS)]
        splits = [make_synthetic_polyps(counts[i], size, seed=0, split=i) for i in range(len(names))]
    else:
        splits = [load_polyp_dataset(root, split, size, limit=lim, seed=seed, split_by=split_by)
                  for split, lim in zip(names, limits)]
    return (*splits, *[None] * (3 - len(names)), label)


def polyp_fingerprint(data_dir=None, size: int = 160, limits=(None, None, None), seed: int = 0,
                      split_by: str = "near_duplicates") -> dict:
    """What `polyp_splits` with these arguments loads, without decoding a frame: the source, a
    hash of its manifest (frame ids, boxes and splits), the frame size, the caps and the split
    seed that draws capped subsets (and splits an unprepared Kvasir-SEG folder). The manifest
    hash covers the split, so `split_by` changes it exactly when it changes the split, and one
    split hashes alike whether it was prepared by `data_scripts/polyp.py` or in memory."""
    import hashlib

    _check_split_by(split_by)
    root, _ = _polyp_source(data_dir)
    base = {"size": size, "limits": list(limits)}
    if root is None:
        return {**base, "kind": "SYNTHETIC", "generator_version": SYNTHETIC_POLYP_VERSION,
                "counts": [lim or d for lim, d in zip(limits, SYNTHETIC_POLYP_COUNTS)]}
    in_memory = root.is_dir() and not (root / MANIFEST).is_file()
    frame = _kvasir_rows_in_memory(root, seed, split_by) if in_memory else load_manifest(root)
    content = frame[["frame", "split", "boxes"]].to_csv(index=False)
    return {**base, "kind": "real", "manifest_sha256": hashlib.sha256(content.encode()).hexdigest()[:16],
            "split_seed": seed}


def split_hygiene(root, seed: int = 0, max_distance: int = MAX_DISTANCE) -> dict:
    """Near-duplicates among the Kvasir-SEG frames of `root`, and how many near-duplicate pairs
    cross splits under the random frame split and under the near-duplicate split (always 0).
    The frames' hashes are kept in memory, so a second call takes a fraction of a second."""
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(f"no Kvasir-SEG folder at {root}: python data_scripts/polyp.py kvasir")
    rows = _kvasir_rows_in_memory(Path(root), seed, "frame")
    hashes = hash_images(rows["image"])
    groups = near_duplicate_groups(hashes, max_distance)
    grouped = split_frames(rows["frame"], groups, seed=seed)  # what prepare_kvasir does
    sizes = np.bincount(groups)
    return {"frames": len(rows), "max_distance": max_distance,
            "near_duplicate_pairs": len(near_duplicate_pairs(hashes, max_distance)[0]),
            "groups_over_one_frame": int((sizes > 1).sum()), "largest_group": int(sizes.max()),
            "cross_split_pairs_frame_split": cross_split_pairs(hashes, rows["split"], max_distance),
            "cross_split_pairs_grouped_split": cross_split_pairs(hashes, grouped, max_distance),
            "split_sizes_frame_split": _split_sizes(rows["split"]), "split_sizes_grouped_split": _split_sizes(grouped)}


def _split_sizes(splits) -> dict:
    return {s: int((np.asarray(splits) == s).sum()) for s in ("train", "val", "test")}


def default_polyp_root() -> tuple[Path | None, str]:
    """Where the notebooks find frames: $MTML_DATA_DIR/kvasir-seg if prepared, else
    ../shared/data/kvasir-seg beside the checkout, else None (use the synthetic generator)."""
    from .download import data_dir

    prepared = data_dir() / "kvasir-seg"
    if (prepared / MANIFEST).is_file():
        return prepared, f"Kvasir-SEG prepared at {prepared}"
    shared = shared_data_dir()
    if shared is not None and (shared / "kvasir-seg" / "images").is_dir():
        return shared / "kvasir-seg", f"Kvasir-SEG real frames from {shared / 'kvasir-seg'} (shared test data)"
    return None, "SYNTHETIC polyps (no Kvasir-SEG found; run python data_scripts/polyp.py kvasir)"


def make_synthetic_polyps(n: int = 64, size: int = 128, seed: int = 0, split: int = 0,
                          empty_fraction: float = 0.1) -> DetectionDataset:
    """SYNTHETIC frames: a pinkish textured background with one or two reddish textured
    ellipses ("polyps"); their bounding boxes are the targets. About `empty_fraction` of the
    frames have none. `split` draws other frames of the same problem (0 train, 1 val, ...)."""
    if not (n >= 1 and size >= 32 and 0 <= empty_fraction <= 1):  # NaN fails every comparison
        raise ValueError(f"need n >= 1 and size >= 32 and 0 <= empty_fraction <= 1, got {n}, {size}, "
                         f"{empty_fraction}")
    g = torch.Generator().manual_seed(seed * 1000 + 7 + split)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images, boxes = [], []
    for _ in range(n):
        noise = torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=(size, size),
                                                mode="bilinear", align_corners=False)[0, 0]
        base = torch.tensor([0.93, 0.66, 0.62])[:, None, None] * (0.85 + 0.25 * noise)
        image = base + 0.03 * torch.randn(3, size, size, generator=g)
        frame_boxes = []
        count = 0 if torch.rand(1, generator=g) < empty_fraction else int(torch.randint(1, 3, (1,), generator=g))
        for _ in range(count):
            ry, rx = (torch.rand(2, generator=g) * 0.15 + 0.08) * size
            cy, cx = torch.rand(2, generator=g) * (size - 2 * torch.stack([ry, rx])) + torch.stack([ry, rx])
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            shade = 0.8 + 0.2 * torch.rand(size, size, generator=g)
            polyp = torch.tensor([0.78, 0.28, 0.26])[:, None, None] * shade
            image = torch.where(inside, polyp, image)
            ys, xs = torch.nonzero(inside, as_tuple=True)
            frame_boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
        boxes.append(torch.tensor(frame_boxes, dtype=torch.float32).reshape(-1, 4))
    return DetectionDataset(images, boxes, label="SYNTHETIC")


def flip_augment(batch, p: float = 0.5, generator: torch.Generator | None = None):
    """Random horizontal and vertical flips of a collated detection batch (boxes follow), the
    whole batch in a few tensor ops; draws from `generator` (`mtml.fit` passes one per step), or
    torch's global RNG when None: frame by frame, horizontal then vertical (the draws of every run so far)."""
    images = batch["image"]
    height, width = images.shape[-2:]
    flips = torch.rand(len(images), 2, generator=generator) < p  # drawn on the CPU, read there
    horizontal, vertical = (f.to(images.device, non_blocking=True)[:, None, None, None] for f in flips.unbind(1))
    images = torch.where(horizontal, images.flip(-1), images)
    images = torch.where(vertical, images.flip(-2), images)
    targets = []
    for t, (h, v) in zip(batch["targets"], flips.tolist()):
        b = t["boxes"].clone()  # slices, not list indices (a list index is copied to the device)
        if h:
            b[:, 0::2] = width - b[:, 0::2].flip(-1)
        if v:
            b[:, 1::2] = height - b[:, 1::2].flip(-1)
        targets.append({**t, "boxes": b})
    return {**batch, "image": images, "targets": targets}
