"""MSI vs MSS histology tiles: names, manifests, patient splits, a tile dataset with a cache,
and batch augmentation.

Real tiles (Kather et al. 2019, Zenodo 2530835) are named
`blk-<12-letter tile id>-<patient>-01Z-00-DX1.png`, e.g. `blk-ADPPCPKAFCGC-TCGA-WS-AB45-01Z-00-DX1.png`
-> tile `ADPPCPKAFCGC`, patient `TCGA-WS-AB45`, and sorted into folders `MSIMUT` / `MSS` under
`TRAIN` / `TEST`. The synthetic default (`mtml.synthetic`) uses the same layout.

Manifest columns: path (relative to the manifest's folder), label (MSI=1, MSS=0), label_name,
patient_id, tile_id, official_split (TRAIN/TEST from the folders, or empty), split
(train/val/test, by patient), synthetic (bool).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from .download import MissingDatasetError, data_dir
from ..io import atomic_path, write_csv, write_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
LABELS = {"MSIMUT": 1, "MSI": 1, "MSS": 0}  # folder / list names -> class index (MSI is positive)
LABEL_NAMES = {1: "MSI", 0: "MSS"}
SPLITS = ("train", "val", "test")
FETCH_COMMAND = "python data_scripts/msi_mss.py --help"
# OURS: ImageNet statistics, since backbones may start from ImageNet weights.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 40_000_000  # decompression-bomb guard: real tiles are 224 x 224 (50k pixels)

_BLK = re.compile(r"^blk-(?P<tile>[A-Za-z]{12})-(?P<patient>.+?)-\d{2}[A-Z]-\d{2}-DX\d+$")
_TCGA = re.compile(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}")


def parse_tile_name(name: str) -> tuple[str, str]:
    """`blk-<tile>-<patient>-01Z-00-DX1.png` -> (tile_id, patient_id). Other names: the TCGA
    patient found anywhere in them and the file stem as tile id. ValueError if there is none."""
    stem = Path(name).stem
    m = _BLK.match(stem)
    if m:
        return m["tile"], m["patient"]
    m = _TCGA.search(name)
    if m:
        return stem, m.group(0)
    raise ValueError(f"no patient id in tile name {name!r}")


@dataclass
class TileReport:
    """What was skipped and why. Manifests fill `unlabelled` and `no_patient`; datasets `bad`."""
    n_ok: int = 0
    bad: dict = field(default_factory=dict)          # path -> reason (unreadable image)
    unlabelled: list = field(default_factory=list)   # paths under no MSIMUT/MSS folder
    no_patient: list = field(default_factory=list)   # names that carry no patient id

    @property
    def n_skipped(self) -> int:
        return len(self.bad) + len(self.unlabelled) + len(self.no_patient)

    def summary(self) -> str:
        return (f"{self.n_ok} tiles ok; skipped {len(self.bad)} unreadable, {len(self.unlabelled)} "
                f"without a label folder, {len(self.no_patient)} without a patient id")


def _label_and_split(parts: tuple[str, ...]) -> tuple[int | None, str]:
    """Label from the nearest folder named (or ending in) MSIMUT/MSS; TRAIN/TEST from any folder."""
    label, official = None, ""
    for part in parts:  # outermost first, so the innermost folder wins
        tokens = re.split(r"[_\-. ]", part.upper())
        label = next((LABELS[t] for t in reversed(tokens) if t in LABELS), label)
        official = next((t for t in tokens if t in ("TRAIN", "TEST")), official)
    return label, official


def scan_tiles(root) -> tuple[pd.DataFrame, TileReport]:
    """Every image under `root` with label, patient, tile id and official split (no image is opened)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingDatasetError("MSI vs MSS tiles", root, FETCH_COMMAND)
    rows, report = [], TileReport()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        rel = path.relative_to(root)
        label, official = _label_and_split(rel.parts[:-1])
        if label is None:
            report.unlabelled.append(rel.as_posix())
            continue
        try:
            tile_id, patient = parse_tile_name(path.name)
        except ValueError:
            report.no_patient.append(rel.as_posix())
            continue
        rows.append({"path": rel.as_posix(), "label": label, "label_name": LABEL_NAMES[label],
                     "patient_id": patient, "tile_id": tile_id, "official_split": official,
                     "synthetic": any("SYNTH" in p.upper() for p in rel.parts)})
    report.n_ok = len(rows)
    columns = ["path", "label", "label_name", "patient_id", "tile_id", "official_split", "synthetic"]
    return pd.DataFrame(rows, columns=columns), report


def patient_split(manifest: pd.DataFrame, val_fraction: float = 0.2, test_fraction: float = 0.2,
                  seed: int = 0) -> pd.Series:
    """Assigns each patient to train/val/test; returns a Series indexed by patient_id.

    Patients in an official TEST folder go to test and those in TRAIN stay out of it; patients
    without an official split are drawn into test with `test_fraction`. Validation is carved out
    of the non-test patients with `val_fraction`. Draws are stratified by label (each label's
    patients are shuffled with `seed` and the first round(fraction * n), at least 1, are taken).
    Raises ValueError when a patient has two labels or a split would miss a label.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1)")
    official = manifest.get("official_split", pd.Series("", index=manifest.index)).fillna("")
    per = pd.DataFrame({"patient_id": manifest["patient_id"], "label": manifest["label"],
                        "official": official.str.upper()}).groupby("patient_id")
    mixed = per.nunique().query("label > 1 or official > 1").index.tolist()
    if mixed:
        raise ValueError(f"patients with tiles of two labels or two official splits: {mixed[:5]}")
    patients = per.first().sort_index()
    rng = np.random.default_rng(seed)
    split = pd.Series(np.where(patients["official"] == "TEST", "test", "train"), index=patients.index)

    def carve(pool: pd.Index, fraction: float, name: str):
        for label in sorted(patients.loc[pool, "label"].unique()):
            ids = pool[patients.loc[pool, "label"] == label].to_numpy()
            if fraction == 0 or len(ids) == 0:
                continue
            take = min(max(1, round(fraction * len(ids))), max(len(ids) - 1, 1))
            split[rng.permutation(ids)[:take]] = name

    carve(patients.index[patients["official"] == ""], test_fraction, "test")
    carve(split.index[split == "train"], val_fraction, "val")
    labels = set(patients["label"])
    for name in SPLITS:
        present = set(patients.loc[split == name, "label"])
        if present and present != labels:
            raise ValueError(f"split {name!r} has labels {sorted(present)} of {sorted(labels)}: "
                             "too few patients per label for a stratified patient split")
    return split.rename("split")


def build_manifest(root, out=None, val_fraction: float = 0.2, test_fraction: float = 0.2,
                   seed: int = 0) -> tuple[Path, TileReport]:
    """Scans `root`, splits by patient, writes the manifest CSV (default `root/manifest.csv`)
    and its report (`<manifest>.report.json`). Returns (manifest path, report)."""
    root = Path(root)
    frame, report = scan_tiles(root)
    if frame.empty:
        raise MissingDatasetError(f"MSI vs MSS tiles (no labelled tile; {report.summary()})", root,
                                  FETCH_COMMAND)
    frame["split"] = frame["patient_id"].map(patient_split(frame, val_fraction, test_fraction, seed))
    out = Path(out) if out else root / "manifest.csv"
    # paths in the CSV are relative to the manifest's own folder
    frame["path"] = [Path(os.path.relpath(root / p, out.parent)).as_posix() for p in frame["path"]]
    write_csv(out, frame, index=False)
    write_json(out.with_suffix(".report.json"), asdict(report))
    return out, report


def load_image(path, size: int | None = None) -> np.ndarray:
    """Reads an image as RGB uint8 (H, W, 3), resized to size x size when given. Handles PNG,
    JPEG, TIFF and grayscale/RGBA/palette/CMYK/16-bit modes. Raises on unreadable files."""
    with Image.open(path) as im:
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"{im.width}x{im.height} pixels exceeds the decompression-bomb guard")
        im.load()
        if im.mode in ("I;16", "I;16B", "I", "F"):
            a = np.asarray(im, dtype=np.float64)
            im = Image.fromarray(np.clip(a / max(a.max(), 1) * 255, 0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.array(im, dtype=np.uint8)


def _label_indices(labels: pd.Series) -> np.ndarray:
    """Label column -> int64 class indices; accepts 0/1 or names (MSI, MSIMUT, MSS)."""
    if pd.api.types.is_numeric_dtype(labels):
        values = labels.to_numpy()
        if not np.isin(values, list(LABEL_NAMES)).all():
            odd = sorted(set(values) - set(LABEL_NAMES))
            raise ValueError(f"labels must be 0 (MSS) or 1 (MSI); found {odd[:5]}")
        return values.astype(np.int64)
    names = labels.astype(str).str.upper()
    unknown = sorted(set(names) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown labels {unknown[:5]} in the manifest; use {sorted(LABELS)} or 0/1")
    return names.map(LABELS).to_numpy(np.int64)


def read_manifest(manifest) -> tuple[pd.DataFrame, Path]:
    """A manifest CSV path or DataFrame -> (frame, folder its relative paths start from)."""
    if isinstance(manifest, pd.DataFrame):
        return manifest.reset_index(drop=True), Path.cwd()
    path = Path(manifest)
    if not path.is_file():
        raise MissingDatasetError("MSI vs MSS tile manifest", path, FETCH_COMMAND)
    return pd.read_csv(path, keep_default_na=False), path.parent


class TileDataset(Dataset):
    """Tiles of one split of a manifest as dict items {image, label, index}.

    `image` is float (3, size, size), normalised with MEAN/STD; `label` is long (MSI=1, MSS=0);
    `.patients[i]` is item i's patient (for patient-level AUROC). Every tile is decoded once in
    the main process when the dataset is built: unreadable ones (corrupt, truncated, zero-byte,
    not an image, too many pixels) are skipped and listed in `.report`, so DataLoader workers
    never meet them. With `cache` (a folder, or True: `<manifest folder>/cache`, or
    `data_dir()/cache` for a DataFrame manifest), the decoded,
    resized tiles of the whole manifest go into a uint8 memmap plus a JSON sidecar naming the tiles
    it holds and the bad ones; later datasets (any split) reuse it and skip PNG decoding.
    """

    def __init__(self, manifest, split: str | None = None, size: int = 224, cache=None,
                 mean=MEAN, std=STD, progress: bool = False):
        frame, base = read_manifest(manifest)
        if split is not None and (split not in SPLITS or "split" not in frame):
            raise ValueError(f"split must be one of {SPLITS} (with a 'split' column) or None, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:  # NaN too
            raise ValueError(f"size must be >= 8 (an integer), got {size!r}")
        self.size, self.progress = size, progress
        self.paths = [str(p) if Path(p).is_absolute() else str(base / p) for p in frame["path"]]
        in_split = np.ones(len(frame), bool) if split is None else (frame["split"] == split).to_numpy()
        labels = _label_indices(frame["label"])
        self._mean = torch.tensor(mean).view(3, 1, 1)
        self._std = torch.tensor(std).view(3, 1, 1)
        if cache is True:
            cache = data_dir() / "cache" if isinstance(manifest, pd.DataFrame) else base / "cache"
        # the cache holds the whole manifest (shared by all splits); without it, check this split only
        self.cache_file, bad = self._open_cache(Path(cache)) if cache else (None, self._decode_all(in_split))
        self.rows = np.flatnonzero(in_split & np.array([p not in bad for p in self.paths], dtype=bool))
        self.labels = torch.as_tensor(labels[self.rows])
        self.patients = frame["patient_id"].astype(str).to_numpy()[self.rows].tolist()
        stems = [Path(p).stem for p in self.paths]
        self.tile_ids = [frame["tile_id"].iloc[r] if "tile_id" in frame else stems[r] for r in self.rows]
        position = {p: i for i, p in enumerate(self.paths)} if bad else {}
        self.report = TileReport(n_ok=len(self.rows),
                                 bad={p: why for p, why in bad.items() if in_split[position[p]]})
        from_file = isinstance(manifest, (str, os.PathLike))
        sidecar = Path(manifest).with_suffix(".report.json") if from_file else None
        if sidecar is not None and sidecar.is_file():  # what the manifest build skipped
            scanned = json.loads(sidecar.read_text())
            self.report.unlabelled, self.report.no_patient = scanned["unlabelled"], scanned["no_patient"]
        self._memmap = None

    # -- validation and cache -------------------------------------------------------------------
    def _decode_all(self, wanted=None, sink=None) -> dict:
        """Decodes the wanted tiles (default all) in this process; returns {path: why} of bad ones."""
        from tqdm.auto import tqdm

        bad = {}
        rows = range(len(self.paths)) if wanted is None else np.flatnonzero(wanted)
        for i in tqdm(rows, desc="checking tiles", disable=not self.progress):
            path = self.paths[i]
            try:
                tile = load_image(path, self.size)
            except Exception as err:  # any unreadable file is skipped and reported, never raised
                bad[path] = f"{type(err).__name__}: {err}"[:200]
                continue
            if sink is not None:
                sink[i] = tile
        return bad

    def _cache_key(self) -> str:
        h = hashlib.sha256(str(self.size).encode())
        for p in self.paths:
            st = Path(p).stat() if Path(p).exists() else None
            h.update(f"{p}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
        return h.hexdigest()[:16]

    def _open_cache(self, folder: Path) -> tuple[Path, dict]:
        key = self._cache_key()
        data, sidecar = folder / f"tiles-{self.size}px-{key}.u8", folder / f"tiles-{self.size}px-{key}.json"
        if sidecar.is_file() and data.is_file():
            meta = json.loads(sidecar.read_text())
            if meta.get("paths") == self.paths and meta.get("size") == self.size:
                return data, meta["bad"]
        shape = (max(len(self.paths), 1), self.size, self.size, 3)
        with atomic_path(data, suffix=".u8") as tmp:
            sink = np.memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            bad = self._decode_all(sink=sink)
            sink.flush()
            del sink
        write_json(sidecar, {"size": self.size, "paths": self.paths, "bad": bad,
                             "shape": list(shape), "dtype": "uint8"})
        return data, bad

    # -- items ----------------------------------------------------------------------------------
    def __len__(self):
        return len(self.rows)

    def __getstate__(self):  # memmaps are reopened in each worker
        return {**self.__dict__, "_memmap": None}

    def _tile(self, row: int) -> np.ndarray:
        if self.cache_file is None:
            try:
                return load_image(self.paths[row], self.size)
            except Exception as err:
                raise RuntimeError(f"tile {self.paths[row]} became unreadable after validation: {err}") \
                    from err
        if self._memmap is None:
            n = max(len(self.paths), 1)
            shape = (n, self.size, self.size, 3)
            self._memmap = np.memmap(self.cache_file, mode="r", dtype=np.uint8, shape=shape)
        return np.array(self._memmap[row])

    def __getitem__(self, i):
        tile = torch.from_numpy(self._tile(int(self.rows[i]))).permute(2, 0, 1).float().div_(255)
        return {"image": (tile - self._mean) / self._std, "label": self.labels[i], "index": i}


def augment_tiles(batch: dict, brightness: float = 0.1, saturation: float = 0.1, stain: float = 0.0,
                  mean=MEAN, std=STD, generator: torch.Generator | None = None) -> dict:
    """Histology batch augmentation on a collated batch (any device): random horizontal flips,
    90-degree rotations, light brightness/saturation jitter and, when `stain` > 0, stain jitter
    (OURS): each tile's optical density -log(RGB) is scaled by 1 +- `stain` and shifted by
    +- `stain`/5 per channel, so that staining tells the slides apart less. Draws only from the CPU
    `generator` (`mtml.fit` passes one per step, equal across modes, so resumed runs repeat
    exactly); None draws from torch's global RNG."""
    if not 0 <= stain < 1:
        raise ValueError(f"stain must be in [0, 1) (0 turns it off), got {stain}")
    x, g = batch["image"], generator
    b, device = x.shape[0], x.device
    flip = torch.rand(b, generator=g) < 0.5
    square = x.shape[-1] == x.shape[-2]  # non-square batches only turn by 0 or 180 degrees
    turns = torch.randint(0, 4, (b,), generator=g) if square else torch.randint(0, 2, (b,), generator=g) * 2
    gain = 1 + (torch.rand(b, generator=g) * 2 - 1) * brightness
    sat = 1 + (torch.rand(b, generator=g) * 2 - 1) * saturation
    m = torch.tensor(mean, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    x = torch.where(flip.to(device).view(b, 1, 1, 1), x.flip(-1), x)
    out = x.clone()
    for k in (1, 2, 3):
        sel = (turns == k).to(device)
        if sel.any():
            out[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
    rgb = out * s + m
    luma = torch.tensor([0.299, 0.587, 0.114], device=device, dtype=x.dtype).view(1, 3, 1, 1)
    gray = (rgb * luma).sum(1, keepdim=True)
    rgb = gray + sat.to(device, x.dtype).view(b, 1, 1, 1) * (rgb - gray)
    rgb = (rgb * gain.to(device, x.dtype).view(b, 1, 1, 1)).clamp(0, 1)
    if stain > 0:  # drawn after the rest: stain 0 draws exactly what it drew before it existed
        scale = 1 + (torch.rand(b, 3, generator=g) * 2 - 1) * stain
        shift = (torch.rand(b, 3, generator=g) * 2 - 1) * stain * 0.2
        od = -torch.log(rgb.clamp(min=1 / 255))
        od = od * scale.to(device, x.dtype).view(b, 3, 1, 1) + shift.to(device, x.dtype).view(b, 3, 1, 1)
        rgb = torch.exp(-od.clamp(min=0))
    return {**batch, "image": (rgb - m) / s}
