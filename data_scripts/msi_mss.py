#!/usr/bin/env python
"""Download and prepare the MSI vs MSS tiles of Kather et al. 2019 (Zenodo record 2530835,
DOI 10.5281/zenodo.2530835), or generate the synthetic default instead.

    python data_scripts/msi_mss.py                 # CRC_DX: 4 archives, several GB
    python data_scripts/msi_mss.py --cancer STAD   # the gastric (STAD) archives instead
    python data_scripts/msi_mss.py --synthetic     # the small synthetic default, no download

File names, md5 checksums and links come from the record's metadata (`--record-url`). Archives go
to `<data dir>/downloads/msi_mss/`, tiles to `<data dir>/msi_mss/<CANCER>/{TRAIN,TEST}/{MSIMUT,MSS}/`,
and the manifest to `<data dir>/msi_mss/<CANCER>/manifest.csv`. The official TRAIN/TEST split is
kept; a validation split is carved out of TRAIN by patient, stratified by label (OURS).
Re-running is cheap: verified archives and extracted tiles are reused.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from mtml.tasks.download import data_dir, fetch, safe_extract  # noqa: E402
from mtml.tasks.tiles import build_manifest  # noqa: E402

RECORD_URL = "https://zenodo.org/api/records/2530835"
ARCHIVES = {
    "CRC": ["CRC_DX_TRAIN_MSIMUT.zip", "CRC_DX_TRAIN_MSS.zip",
            "CRC_DX_TEST_MSIMUT.zip", "CRC_DX_TEST_MSS.zip"],
    "STAD": ["STAD_TRAIN_MSIMUT.zip", "STAD_TRAIN_MSS.zip", "STAD_TEST_MSIMUT.zip", "STAD_TEST_MSS.zip"],
}
FOLDERS = {"CRC": "CRC_DX", "STAD": "STAD"}


def record_files(record_url: str) -> dict[str, dict]:
    """{file name: {"url", "md5"}} from a Zenodo record's JSON (current and legacy layouts)."""
    try:
        with urllib.request.urlopen(record_url, timeout=60) as response:
            record = json.load(response)
    except OSError as err:
        raise ConnectionError(f"cannot reach {record_url} ({err}); check the network or --record-url") from err
    files = {}
    for f in record.get("files", []):
        name = f.get("key") or f.get("filename")
        links = f.get("links", {})
        url = links.get("content") or links.get("self") or links.get("download")
        algorithm, _, digest = str(f.get("checksum", "")).rpartition(":")
        if name and url:
            files[name] = {"url": url, "md5": digest if algorithm in ("md5", "") and digest else None}
    if not files:
        raise ValueError(f"{record_url} lists no files: is it a Zenodo record's API address?")
    return files


def split_of(archive: str) -> tuple[str, str]:
    """CRC_DX_TRAIN_MSIMUT.zip -> ("TRAIN", "MSIMUT")."""
    tokens = Path(archive).stem.upper().split("_")
    return tokens[-2], tokens[-1]


def prepare(cancer: str, record_url: str, root: Path, val_fraction: float, seed: int,
            progress: bool = True, delete_archives: bool = False) -> Path:
    files = record_files(record_url)
    missing = [a for a in ARCHIVES[cancer] if a not in files]
    if missing:
        raise ValueError(f"the record at {record_url} lacks {missing} (it lists {sorted(files)}); "
                         "check --record-url")
    downloads, tiles = root / "downloads" / "msi_mss", root / "msi_mss" / FOLDERS[cancer]
    for name in ARCHIVES[cancer]:
        print(f"{name}: downloading (md5 {files[name]['md5']})", flush=True)
        archive = fetch(files[name]["url"], downloads, md5=files[name]["md5"], filename=name,
                        progress=progress)
        official, label = split_of(name)
        print(f"{name}: extracting to {tiles / official / label}", flush=True)
        safe_extract(archive, tiles / official / label)
        if delete_archives:
            archive.unlink()
    manifest, report = build_manifest(tiles, val_fraction=val_fraction, test_fraction=0.0, seed=seed)
    print(report.summary())
    return manifest


def main(argv=None) -> int:
    from mtml.cli import Parser

    parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--cancer", choices=sorted(ARCHIVES), default="CRC",
                        help="which archives (default CRC)")
    parser.add_argument("--synthetic", action="store_true", help="generate the synthetic default instead")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $MTML_DATA_DIR or ./data")
    parser.add_argument("--record-url", "--base-url", default=RECORD_URL,
                        help=f"the record's metadata JSON (default {RECORD_URL})")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of TRAIN patients per label moved to validation (default 0.2)")
    parser.add_argument("--split-seed", "--seed", dest="split_seed", type=int, default=0,
                        help="seed of the validation split (default 0); not the training seed")
    parser.add_argument("--delete-archives", action="store_true", help="delete each zip once extracted")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    root = args.data_dir or data_dir()
    if args.synthetic:
        from mtml.tasks.synthetic import ensure_synthetic_default

        manifest = ensure_synthetic_default(root / "synthetic")
    else:
        manifest = prepare(args.cancer, args.record_url, root, args.val_fraction, args.split_seed,
                           progress=not args.no_progress, delete_archives=args.delete_archives)
    import pandas as pd

    frame = pd.read_csv(manifest)
    table = frame.groupby(["split", "label_name"]).agg(patients=("patient_id", "nunique"),
                                                       tiles=("path", "size"))
    print(table.to_string())
    print(f"manifest: {manifest}")
    return 0


if __name__ == "__main__":
    from mtml.cli import run_main

    sys.exit(run_main(main))
