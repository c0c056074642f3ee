"""SYNTHETIC H&E-like tiles for MSI vs MSS: the default dataset of the demo, notebooks and tests.

Not real histology. Tiles are painted in optical density (Beer-Lambert: RGB = exp(-OD), OD a mix
of a hematoxylin and an eosin colour vector), so stains mix like real ones:
- eosin-pink stroma with smooth texture, pale lumen/gland holes (both classes);
- large, paler tumour-like nuclei (both classes);
- small, dark, round lymphocyte-like nuclei and pale bluish mucin-like pools: both classes have
  them, MSI-like tiles have more on average (OURS: a loose echo of the tumour-infiltrating
  lymphocytes and mucinous histology linked to MSI). The per-patient and per-tile spread makes
  the classes overlap, so the tiny model reaches a tile AUROC well below 1.
- per-patient stain variation (hue and strength of both stains, brightness), like slides from
  different labs and scanners.

Written in the real dataset's layout and naming so one manifest code serves both:
`<root>/SYNTHETIC_CRC_DX/{TRAIN,TEST}/{MSIMUT,MSS}/blk-<12 letters>-SYNTH-<4 digits>-01Z-00-DX1.png`.
"""
from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

GENERATOR_VERSION = 1
FOLDER = "SYNTHETIC_CRC_DX"
# optical-density colour vectors (R, G, B) of hematoxylin (blue-purple) and eosin (pink)
HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class SyntheticConfig:
    """Size of the synthetic cohort (defaults: the demo's default dataset, OURS)."""
    n_patients: int = 120          # 68 train, 16 validation, 36 test (48 x 40 until 2026-11-28)
    tiles_per_patient: int = 16
    size: int = 64
    msi_fraction: float = 0.5
    test_fraction: float = 0.3     # patients in the official TEST folder
    signal: float = 2.0            # 0: classes identical, larger: easier (1.0 until 2026-11-28)
    seed: int = 0


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]: coarse noise upsampled bilinearly."""
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255


def _blobs(yx: np.ndarray, centres: np.ndarray, radii: np.ndarray, amps: np.ndarray) -> np.ndarray:
    """Max over soft-edged discs (n, ) on the pixel grid yx (2, H, W)."""
    if len(centres) == 0:
        return np.zeros(yx.shape[1:], np.float32)
    d = np.sqrt(((yx[None] - centres[:, :, None, None]) ** 2).sum(1))  # (n, H, W)
    return (np.clip(radii[:, None, None] - d + 0.5, 0, 1) * amps[:, None, None]).max(0)


def paint_tile(rng, size: int, stain: dict, lymph_rate: float, mucin_prob: float) -> np.ndarray:
    """One RGB uint8 tile."""
    yx = np.mgrid[0:size, 0:size].astype(np.float32)
    scale = size / 64
    eosin = 0.35 + 0.45 * _smooth_noise(rng, size, 6) + 0.1 * rng.random((size, size))
    hema = 0.05 + 0.05 * _smooth_noise(rng, size, 10)
    # lumen / gland holes in both classes
    n = rng.poisson(0.8)
    holes = _blobs(yx, rng.random((n, 2)) * size, rng.uniform(4, 12, n) * scale, np.ones(n))
    # tumour-like nuclei: large, moderately stained
    n = rng.poisson(14)
    hema += _blobs(yx, rng.random((n, 2)) * size, rng.uniform(2.5, 4.5, n) * scale, rng.uniform(0.5, 0.9, n))
    # lymphocyte-like nuclei: small, round, dark
    n = rng.poisson(lymph_rate)
    hema += _blobs(yx, rng.random((n, 2)) * size, rng.uniform(1.0, 1.8, n) * scale, rng.uniform(1.1, 1.6, n))
    # mucin-like pools: pale, faintly blue
    mucin = np.zeros((size, size), np.float32)
    if rng.random() < mucin_prob:
        mucin = _blobs(yx, rng.random((1, 2)) * size, rng.uniform(8, 16, 1) * scale, np.ones(1))
        mucin *= 0.6 + 0.4 * _smooth_noise(rng, size, 8)
    eosin = eosin * (1 - holes) * (1 - 0.8 * mucin)
    hema = hema * (1 - 0.9 * holes) * (1 - 0.5 * mucin) + 0.12 * mucin
    od = (hema[..., None] * stain["h"] + eosin[..., None] * stain["e"]) * stain["strength"]
    rgb = np.exp(-od) * stain["white"] + rng.normal(0, 0.015, (size, size, 3))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _patient_stain(rng) -> dict:
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    return {"h": unit(HEMATOXYLIN + rng.normal(0, 0.08, 3)).clip(0.02),
            "e": unit(EOSIN + rng.normal(0, 0.08, 3)).clip(0.02),
            "strength": rng.uniform(0.7, 1.3), "white": rng.uniform(0.88, 1.0, 3)}


def _tile_id(rng) -> str:
    return "".join(rng.choice(list(string.ascii_uppercase), 12))


def generate(root, cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    """Writes the synthetic cohort under `root/SYNTHETIC_CRC_DX`; returns that folder."""
    if cfg.n_patients < 8 or cfg.tiles_per_patient < 1 or cfg.size < 16:
        raise ValueError("need n_patients >= 8 (both labels in train, val and test), "
                         "tiles_per_patient >= 1 and size >= 16")
    rng = np.random.default_rng(cfg.seed)
    out = Path(root) / FOLDER
    n_msi = round(cfg.n_patients * cfg.msi_fraction)
    labels = np.array([1] * n_msi + [0] * (cfg.n_patients - n_msi))
    test = np.zeros(cfg.n_patients, bool)
    for label in (0, 1):  # official TEST split, stratified by label
        ids = rng.permutation(np.flatnonzero(labels == label))
        test[ids[:max(1, round(cfg.test_fraction * len(ids)))]] = True
    for p in range(cfg.n_patients):
        stain = _patient_stain(rng)
        msi = labels[p] == 1
        # a patient's own level, drawn from overlapping class distributions, then per-tile spread
        lymph = rng.gamma(3, (3.0 + 8.0 * cfg.signal * msi) / 3)
        mucin = float(np.clip(rng.normal(0.1 + 0.3 * cfg.signal * msi, 0.1), 0, 0.9))
        folder = out / ("TEST" if test[p] else "TRAIN") / ("MSIMUT" if msi else "MSS")
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(cfg.tiles_per_patient):
            tile = paint_tile(rng, cfg.size, stain, lymph * rng.uniform(0.5, 1.5), mucin)
            Image.fromarray(tile).save(folder / f"blk-{_tile_id(rng)}-SYNTH-{p:04d}-01Z-00-DX1.png",
                                       compress_level=1)
    return out


def ensure_synthetic_default(root=None, cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    """Generates the synthetic default once (into `root`, default `data_dir()/synthetic`) and builds
    its manifest; later calls reuse both. Returns the manifest path. Generation happens in a
    temporary folder renamed into place, so an interrupted run never leaves a half dataset; processes
    that start together generate it once."""
    import fcntl

    from .download import data_dir

    root = Path(root) if root else data_dir() / "synthetic"
    manifest, stamp = root / FOLDER / "manifest.csv", root / FOLDER / "synthetic.json"
    wanted = {"generator_version": GENERATOR_VERSION, **asdict(cfg)}
    ready = lambda: manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted  # noqa: E731
    if ready():
        return manifest
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # one process generates; the others wait, then reuse it
        fcntl.flock(lock, fcntl.LOCK_EX)     # (a second generation would replace the folder under the first's feet)
        if not ready():
            _generate_into(root, cfg, wanted)
    return manifest


def _generate_into(root: Path, cfg: SyntheticConfig, wanted: dict) -> None:
    from .tiles import build_manifest

    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root))
    try:
        generate(tmp, cfg)
        build_manifest(tmp / FOLDER, val_fraction=0.2, test_fraction=0.0, seed=cfg.seed)
        (tmp / FOLDER / "synthetic.json").write_text(json.dumps(wanted, indent=2) + "\n")
        old = root / f".old-{os.getpid()}"
        if (root / FOLDER).exists():
            os.replace(root / FOLDER, old)
        os.replace(tmp / FOLDER, root / FOLDER)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def classification_manifest(data_dir) -> tuple[Path, str]:
    """(manifest path, 'real' or 'SYNTHETIC') for a classification DATA_DIR (None: the synthetic default)."""
    if data_dir:
        return Path(data_dir) / "manifest.csv", "real"
    return ensure_synthetic_default(), "SYNTHETIC"
