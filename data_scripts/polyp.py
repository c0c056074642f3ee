#!/usr/bin/env python
"""Download and prepare the polyp detection datasets: a manifest (one row per frame, its boxes,
its split) and a report of what was clipped, dropped or skipped, in $MTML_DATA_DIR/<dataset>/.

  kvasir   Kvasir-SEG (Jha et al., MMM 2020; free for research and education): downloads the
           official zip (or uses --from PATH, a zip or folder you already have), extracts it,
           boxes from the official kavsir_bboxes.json (or --boxes masks), random split that
           keeps near-duplicate frames together (or --split-by frame).
  cvc      CVC-ClinicDB (Bernal et al., CMIG 2015; access by request from its authors): prepares
           the folder or archive you were given (--from PATH; Original/ + Ground Truth/ or
           images/ + masks/, PNG, TIFF or JPEG): boxes from the masks' connected components,
           split by the 29 video sequences (frames of one never cross splits).

A folder given with --from is copied (an archive extracted) into <data-dir>/<dataset>/raw, and
the manifest names frames relative to its own folder: the prepared folder can move as one.
Errors are one line (what is wrong and the fix), exit code 2.

Examples:
  python data_scripts/polyp.py kvasir
  python data_scripts/polyp.py cvc --from ~/Downloads/CVC-ClinicDB.zip
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# mtml (and torch) are imported inside the commands, so that --help answers at once

KVASIR_URL = "https://datasets.simula.no/downloads/kvasir-seg.zip"


def _unpack(source: Path, target: Path) -> Path:
    """The dataset under `target`, so that the prepared folder (manifest and frames) can move as
    one: an archive is extracted (safely) into it, a folder elsewhere is copied into it."""
    import shutil

    from mtml.tasks.download import safe_extract

    if source.is_dir() and source.resolve().is_relative_to(target.parent.resolve()):
        return source  # already inside the prepared folder
    if source.resolve().is_relative_to(target.resolve()):
        raise ValueError(f"{source} lies inside {target}, which preparation empties first: move it elsewhere")
    shutil.rmtree(target, ignore_errors=True)  # an earlier copy must never mix into this one
    if source.is_dir():
        print(f"copying {source} -> {target / source.name}")
        shutil.copytree(source, target / source.name)
        return target / source.name
    print(f"extracting {source} -> {target}")
    safe_extract(source, target)
    return target


def _data_dir(args) -> Path:
    from mtml.tasks.download import data_dir

    return Path(args.data_dir) if args.data_dir else data_dir()


def kvasir(args) -> None:
    from mtml.tasks.download import fetch, file_hash
    from mtml.tasks.polyp import kvasir_images, prepare_kvasir

    out = _data_dir(args) / "kvasir-seg"
    if args.source:
        source = Path(args.source).expanduser()
        if source.is_dir() and kvasir_images(source) is None:  # named as given, before anything is copied
            raise FileNotFoundError(f"no images/ folder under {source}; is this the Kvasir-SEG folder?")
        root = _unpack(source, out / "raw")
    else:
        archive = fetch(args.url, _data_dir(args) / "downloads", sha256=args.sha256,
                        progress=not args.quiet)
        print(f"{archive.name}: sha256 {file_hash(archive)} (pass it as --sha256 to pin it)")
        root = _unpack(archive, out / "raw")
    frame, report = prepare_kvasir(root, out_dir=out, boxes=args.boxes, seed=args.split_seed,
                                   min_area=args.min_area, split_by=args.split_by)
    _summary(out, frame, report)


def cvc(args) -> None:
    from mtml.tasks.polyp import CVC_SEQUENCE_ENDS, cvc_folders, prepare_cvc

    try:
        ends = tuple(int(x) for x in args.sequence_ends.split(",")) if args.sequence_ends else CVC_SEQUENCE_ENDS
    except ValueError:
        ends = ()
    if not ends or list(ends) != sorted(set(ends)) or ends[0] < 1:
        raise ValueError("--sequence-ends must be increasing frame numbers, e.g. 25,50,67,...")
    out = _data_dir(args) / "cvc-clinicdb"
    source = Path(args.source).expanduser()
    if source.is_dir():
        cvc_folders(source)  # a wrong folder is named as given, before anything is copied
    root = _unpack(source, out / "raw")
    frame, report = prepare_cvc(root, out_dir=out, seed=args.split_seed, min_area=args.min_area,
                                sequence_ends=ends)
    _summary(out, frame, report)
    print("sequences per split:", frame.groupby("split")["sequence"].nunique().to_dict())


def _summary(out: Path, frame, report) -> None:
    print(f"manifest: {out / 'manifest.csv'} ({len(frame)} frames: "
          f"{frame['split'].value_counts().to_dict()})")
    print(f"report:   {out / 'report.json'} ({report})")


def main(argv=None) -> int:
    from mtml.cli import Parser

    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)
    for name, fn in (("kvasir", kvasir), ("cvc", cvc)):
        p = sub.add_parser(name, help=f"prepare {'Kvasir-SEG' if name == 'kvasir' else 'CVC-ClinicDB'}")
        p.set_defaults(fn=fn)
        p.add_argument("--data-dir", default=None, help="default: $MTML_DATA_DIR or <repo>/data")
        p.add_argument("--split-seed", "--seed", dest="split_seed", type=int, default=0,
                       help="seed of the train/val/test split (80/10/10); not the training seed")
        p.add_argument("--min-area", type=int, default=64, help="smallest mask component kept as a box (pixels)")
        p.add_argument("--from", dest="source", required=name == "cvc",
                       help="a folder or zip/tar archive you already have")
    k = sub.choices["kvasir"]
    k.add_argument("--url", default=KVASIR_URL, help="where to download the zip from")
    k.add_argument("--sha256", default=None, help="expected sha256 of the zip (none is published)")
    k.add_argument("--boxes", choices=("json", "masks"), default="json",
                   help="official kavsir_bboxes.json, or connected components of the masks")
    k.add_argument("--split-by", choices=("near_duplicates", "frame"), default="near_duplicates",
                   help="keep near-duplicate frames in one split (default), or split frame by frame "
                        "(the old split); see mtml/tasks/near_duplicates.py")
    k.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.choices["cvc"].add_argument("--sequence-ends", default=None,
                                    help="last frame of each sequence, comma-separated "
                                         "(default: the 29 ranges documented in mtml/tasks/polyp.py)")
    args = parser.parse_args(argv)
    if args.source and not Path(args.source).expanduser().exists():
        raise FileNotFoundError(f"--from {args.source} does not exist: give the folder or archive of the dataset")
    args.fn(args)
    return 0


if __name__ == "__main__":
    from mtml.cli import run_main

    sys.exit(run_main(main))
