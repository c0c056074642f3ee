"""Atomic file writes, safe checkpoint loading, and where a run keeps its checkpoints (the run store).

Every result file is written to a temporary file in the same folder, flushed to disk, then
renamed over the target: a reader sees the old file or the new one, never a truncated one.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yields a temporary path beside `path`; renamed onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; results are ordinary files
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_csv(path, frame, **kw) -> Path:
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, **kw)
    return Path(path)


def save_figure(fig, path, **kw) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, bbox_inches="tight", **kw)
    return path


def map_tensors(x, fn):
    """`fn` applied to every tensor in nested dicts, lists and tuples (task outputs, checkpoints)."""
    if torch.is_tensor(x):
        return fn(x)
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    return type(x)(map_tensors(v, fn) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path, state: dict) -> Path:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Loads with `weights_only=True`: tensors and plain containers only, no code runs."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the unpickler refuses anything that is not plain data
        raise ValueError(f"{path} is not a valid mtml checkpoint (refused to load it safely: "
                         f"{(str(err).splitlines() or [type(err).__name__])[0]}); delete it to "
                         "start over") from err


STORE = "store"


def run_store(out_dir) -> Path:
    """The run store of a notebook writing into `out_dir`: `<out_dir>/../store`, one folder per
    run identity inside. Notebooks writing beside each other share it, so a run one of them
    finished is loaded, not trained again, by the next (04 reloads the seed-0 runs of 01-03).
    `mtml.runs.experiment.RunStore.beside(out_dir)` is this folder as an object."""
    return Path(out_dir).parent / STORE
