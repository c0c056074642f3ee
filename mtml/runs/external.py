"""External evaluation sets: a run tested on data beyond its own split, e.g. detectors trained on
Kvasir-SEG tested on CVC-ClinicDB (cross-dataset generalisation), or MSI/MSS classifiers tested
on tiles of another cohort (a second manifest).

A set is a prepared folder (its `manifest.csv`; a Kvasir-SEG folder without one is read as it is)
and is evaluated whole: every frame or tile of it, whatever its split column says. Its name is
the folder's name. A run record holds, per set, `<set>:<network>/<metric>` for every network, the
students' mean and the ensemble, and `<set>:items`, `<set>:source`, `<set>:manifest_sha256`.
External sets never change how a run trains, so they are not part of its spec: a finished run
can be evaluated on a new set later from its final checkpoint, without training again:

    python -m mtml.runs.external runs/demo/07_detection_kd_plus_ml --data data/cvc-clinicdb
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from ..cli import Parser
from ..names import student_name
from ..tasks import task_class, task_names
from .report import SEPARATOR, run_record, sets_in


def set_name(folder) -> str:
    path = Path(folder).expanduser()
    return (path.parent if path.is_file() else path).resolve().name


RESERVED = ("test",)  # the runs' own test split in the per-set tables


def load_sets(task, folders, tile_size: int = 224, training_data: dict | None = None) -> dict:
    """{set name: (dataset, info)} for prepared folders (a list, or one folder); `task` decides how
    they are read (frames at the task's size, or tiles at `tile_size`). Refused with ValueError:
    repeated or reserved names, a folder of the other task's kind, and a set whose content is the
    run's own data (`training_data`, the run spec's data fingerprint)."""
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders or ())
    sets = {}
    for folder in folders:
        name = set_name(folder)
        if name in sets:
            raise ValueError(f"two external sets are named {name!r} (their folders' names): rename one folder")
        if SEPARATOR in name or name in RESERVED:
            raise ValueError(f"an external set cannot be named {name!r} (its folder's name): rename the folder")
        sets[name] = _load_one(task, Path(folder).expanduser(), tile_size)
        if training_data and sets[name][1]["manifest_sha256"] == training_data.get("manifest_sha256"):
            raise ValueError(f"external set {name} ({folder}) holds the run's own data: an external set must be "
                             "other data (another dataset or cohort)")
    return sets


def set_fingerprint(task_name: str, folder, size: int = 160) -> str:
    """The content hash a set is stored with (`<set>:manifest_sha256`), without decoding images."""
    folder = Path(folder).expanduser()
    _check_kind(task_name, folder)
    return task_class(task_name).folder_fingerprint(folder, size)


def _manifest(folder: Path) -> Path:
    """A prepared folder's manifest (or the manifest file given itself)."""
    return folder if folder.is_file() else folder / "manifest.csv"


def _check_kind(task_name: str, folder: Path) -> None:
    """ValueError when a prepared folder holds another task's data (frames vs tiles), naming both."""
    manifest = _manifest(folder)
    if not manifest.is_file():
        return  # an unprepared Kvasir-SEG folder (detection) or a missing one: the loader says which
    columns = set(pd.read_csv(manifest, nrows=0).columns)
    wanted = task_class(task_name)
    if hasattr(wanted, "reads_manifest") and not wanted.reads_manifest(columns):
        held = [task_class(t).data_kind for t in task_names()
                if hasattr(task_class(t), "reads_manifest") and task_class(t).reads_manifest(columns)]
        raise ValueError(f"{folder} holds {held[0] if held else 'an unknown manifest'}, a {task_name} run needs "
                         f"{wanted.data_kind}")


def _load_one(task, folder: Path, tile_size: int):
    size = getattr(task, "size", tile_size)  # detection: the task's frame size; classification: tile_size
    digest = set_fingerprint(task.name, folder, getattr(task, "size", 160))
    data = task_class(task.name).load_folder(folder, size)
    if len(data) == 0:
        raise ValueError(f"external set {folder} holds no frames or tiles: check the folder")
    return data, {"items": len(data), "source": str(folder.resolve()), "manifest_sha256": digest}


def external_record(task, networks: dict, sets: dict) -> dict:
    """The record keys of `networks` evaluated on every set of `load_sets`."""
    record = {}
    for name, (data, info) in sets.items():
        metrics = task.evaluate(networks, data)
        for key, value in {**run_record(metrics), **info}.items():
            record[f"{name}{SEPARATOR}{key}"] = value
    return record


# a finished run --------------------------------------------------------------------------------
def load_run(run_dir, device: str = "cpu"):
    """(task, networks, record, tile_size) of a finished notebook run: its `metrics.json` and the
    final checkpoint of the same spec (in the run store beside it, `../store/<spec hash>/`, or in
    `checkpoints/<spec hash>/` for runs made before the store)."""
    import torch

    from ..tasks import task_class
    from ..io import load_checkpoint
    from .spec import RunSpec
    from ..core.cohort import CohortConfig

    run_dir = Path(run_dir).expanduser()
    hint = "give the folder of a finished run (runs/<task>/<version>/<mode>-seed<k>-<hash> or runs/demo/<notebook>)"
    try:
        record = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{run_dir} has no readable metrics.json ({err}): {hint}") from err
    if not isinstance(record, dict) or "spec_hash" not in record:
        raise ValueError(f"{run_dir / 'metrics.json'} is not a single run's record (a comparison?): {hint}")
    from ..io import run_store

    found = [c for c in (run_store(run_dir) / record["spec_hash"] / "checkpoint.pt",  # the run store
                         run_dir / "checkpoints" / record["spec_hash"] / "checkpoint.pt")  # runs before it
             if c.is_file()]
    checkpoint = found[0] if found else run_store(run_dir) / record["spec_hash"] / "checkpoint.pt"
    if not found:
        raise FileNotFoundError(f"{checkpoint} is missing: the run's final checkpoint is needed; run it again "
                                "(mtml.reproduce or the notebook) to write it")
    state = load_checkpoint(checkpoint)
    spec = RunSpec.from_dict(state["spec"])
    if state.get("step_in_epoch") != 0 or state.get("epoch") != state["config"].get("epochs"):
        raise ValueError(f"{checkpoint} holds an unfinished run (epoch {state.get('epoch')} of "
                         f"{state['config'].get('epochs')}): finish it (the notebook or mtml.reproduce) first")
    if spec.hash != record["spec_hash"]:
        raise ValueError(f"{checkpoint} is of run {spec.hash}, metrics.json of run {record['spec_hash']}: "
                         "the folder mixes two runs; run it again")
    task = task_class(spec.task).from_settings(spec.task_settings)
    cfg = CohortConfig.from_dict(state["config"])
    from .spec import spec_of

    built, stored = spec_of(cfg, task).config.get("tiny_widths"), spec.config.get("tiny_widths")
    if built != stored:  # the tiny classifiers' widths changed once (mtml.models)
        raise ValueError(f"{run_dir} was trained with tiny networks of widths {stored or '32-64-128/8-16-32'} "
                         f"(teacher/student), this kit builds {built}: train the run again")
    saved = state["cohort"]["networks"]
    teacher, students = task.networks(cfg.version, cfg.n_students, cfg.num_classes, with_teacher="teacher" in saved)
    networks = {**({"teacher": teacher} if teacher is not None else {}),
                **{student_name(i): s for i, s in enumerate(students)}}
    for name, model in networks.items():
        model.load_state_dict(saved[name])
        model.to(torch.device(device)).eval()
    return task, networks, record, int(record.get("data.tile_size", 224))


def evaluate_run(run_dir, folders, device: str = "cpu") -> dict:
    """Evaluates a finished run on external sets and adds them to its `metrics.json`; returns the
    record. A set already in the record is evaluated again (the data may have changed)."""
    from ..io import write_json

    task, networks, record, tile_size = load_run(run_dir, device)
    own = {k.removeprefix("data."): v for k, v in record.items() if k.startswith("data.")}
    sets = load_sets(task, folders, tile_size, training_data=own)
    stale = [k for k in record if k.split(SEPARATOR)[0] in sets and SEPARATOR in k]
    record = {k: v for k, v in record.items() if k not in stale}
    record.update(external_record(task, networks, sets))
    write_json(Path(run_dir) / "metrics.json", record)
    return record


def external_table(record: dict, metrics=("map50", "map", "auroc", "accuracy")) -> pd.DataFrame:
    """Rows: set x network; columns: the metrics present."""
    rows = []
    for name in sets_in(record):
        prefix = f"{name}{SEPARATOR}"
        nets = dict.fromkeys(k[len(prefix):].split("/")[0] for k in record if k.startswith(prefix) and "/" in k)
        for net in nets:
            row = {"set": name, "network": net}
            row.update({m: record[f"{prefix}{net}/{m}"] for m in metrics if f"{prefix}{net}/{m}" in record})
            rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = Parser(prog="python -m mtml.runs.external", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="folders of finished runs (with metrics.json; checkpoints in the run store beside them)")
    p.add_argument("--data", action="append", required=True, metavar="FOLDER",
                   help="a prepared data folder (manifest.csv) to evaluate on; repeat for more")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    for run in args.runs:
        record = evaluate_run(run, args.data, args.device)
        print(f"{run} (run {record['spec_hash']}):")
        print(external_table(record).round(4).to_string(index=False))
    return 0


if __name__ == "__main__":
    from ..cli import run_main

    sys.exit(run_main(main, prog="python -m mtml.runs.external"))
