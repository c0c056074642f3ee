"""Notebook parameters (the UPPER_CASE knobs of a `parameters` cell) -> a run's spec.

The notebooks and `mtml.reproduce` both call `spec_from_parameters`, so a run's identity is known
before it starts: the runner skips a finished run without executing anything.
"""
from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from .spec import RunSpec, spec_of
from ..core.cohort import CohortConfig

# notebook parameter -> CohortConfig field
CONFIG_PARAMETERS = {"MODE": "mode", "VERSION": "version", "N_STUDENTS": "n_students",
                     "TEMPERATURE": "temperature", "W_CE": "w_ce", "W_KD": "w_kd", "W_ML": "w_ml",
                     "EPOCHS": "epochs", "BATCH_SIZE": "batch_size", "LR": "lr", "SEED": "seed",
                     "PRETRAINED": "pretrained", "CLIP_GRAD_NORM": "clip_grad_norm",
                     "DISTILL_WARMUP_EPOCHS": "distill_warmup_epochs", "TEACHER_KNOWLEDGE": "teacher_knowledge",
                     "PEER_KNOWLEDGE": "peer_knowledge", "W_FEAT": "w_feat", "FEATURE_LEVELS": "feature_levels"}
# what a notebook's `if SMOKE:` cell caps (the runner applies the same caps before hashing;
# tests/test_spec.py checks that every notebook's smoke cell agrees)
SMOKE_CAPS = {"classification": {"EPOCHS": 2, "TILE_SIZE": 32},
              "detection": {"EPOCHS": 1, "FRAME_SIZE": 96, "TRAIN_FRAMES": 24, "EVAL_FRAMES": 16}}


FLOAT_PARAMETERS = ("STAIN_JITTER", "TEMPERATURE", "W_CE", "W_KD", "W_ML", "W_FEAT", "LR", "CLIP_GRAD_NORM", "DISTILL_WARMUP_EPOCHS",
                    "SCORE_THRESHOLD", "W_DISTILL_CLS", "W_DISTILL_BOX", "W_DISTILL_CTR")
INT_PARAMETERS = ("EPOCHS", "BATCH_SIZE", "N_STUDENTS", "SEED", "SPLIT_SEED", "TILE_SIZE", "FRAME_SIZE",
                  "TRAIN_FRAMES", "EVAL_FRAMES", "FEATURE_LEVELS")
# knobs that never change what a run computes (tests/test_spec.py checks every other knob is mapped)
NOT_IDENTITY = ("SMOKE", "OUT_DIR", "DEVICE", "RESUME", "SEEDS", "MODES", "METRIC", "BASELINE",
                "EXTERNAL_DATA_DIRS")  # extra test sets: evaluated after training (mtml.external)


def typed(params: dict) -> dict:
    """Notebook parameters with equal values written one way (4 and 4.0, '1e-2' and 0.01, 1 and
    True): a spec hash must not depend on how a value was typed. Impossible values are kept, so
    validation names them."""
    out = dict(params)
    for key, value in params.items():
        if value is None or isinstance(value, bool) and key != "PRETRAINED":
            continue
        try:
            if key in FLOAT_PARAMETERS:
                out[key] = float(value)
            elif key in INT_PARAMETERS and float(value) == int(float(value)):
                out[key] = int(float(value))
            elif key == "PRETRAINED" and str(value).lower() in ("0", "1", "true", "false"):
                out[key] = str(value).lower() in ("1", "true")
        except (TypeError, ValueError):
            pass
    if out.get("DATA_DIR"):  # a relative folder means the same for the runner and the kernel
        out["DATA_DIR"] = str(Path(out["DATA_DIR"]).expanduser().resolve())
    if out.get("EXTERNAL_DATA_DIRS"):
        folders = out["EXTERNAL_DATA_DIRS"]
        folders = [folders] if isinstance(folders, str) else folders
        out["EXTERNAL_DATA_DIRS"] = [str(Path(f).expanduser().resolve()) for f in folders]
    return out


def config_from_parameters(params: dict, task: str) -> CohortConfig:
    """A validated CohortConfig from notebook parameters; missing ones take `task`'s defaults."""
    params = typed(params)
    return CohortConfig.for_task(task_from_parameters(task, params),
                                 **{CONFIG_PARAMETERS[k]: v for k, v in params.items() if k in CONFIG_PARAMETERS})


def task_from_parameters(task: str, params: dict):
    if task == "classification":
        from ..tasks.task import ClassificationTask

        return ClassificationTask(num_classes=2, stain_jitter=typed(params).get("STAIN_JITTER", 0.0))
    if task == "detection":
        from ..tasks.detection import DetectionTask

        kw = {"size": "FRAME_SIZE", "box_loss": "BOX_LOSS", "ensemble": "ENSEMBLE",
              "score_threshold": "SCORE_THRESHOLD", "distill_weighting": "DISTILL_WEIGHTING",
              "w_distill_cls": "W_DISTILL_CLS", "w_distill_box": "W_DISTILL_BOX", "w_distill_ctr": "W_DISTILL_CTR"}
        params = typed(params)
        return DetectionTask(**{k: params[p] for k, p in kw.items() if p in params})
    raise ValueError(f"unknown task {task!r}; choose classification or detection")


def classification_manifest(data_dir) -> tuple[Path, str]:
    """(manifest path, 'real' or 'SYNTHETIC') for a classification DATA_DIR (None: synthetic)."""
    if data_dir:
        return Path(data_dir) / "manifest.csv", "real"
    from ..tasks.synthetic import ensure_synthetic_default

    return ensure_synthetic_default(), "SYNTHETIC"


def file_fingerprint(path) -> str:
    from ..tasks.download import MissingDatasetError

    path = Path(path)
    if not path.is_file():
        raise MissingDatasetError("manifest", path, "python data_scripts/msi_mss.py --help (or polyp.py)")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def data_fingerprint(task: str, params: dict) -> dict:
    """What data a run sees: source, content hash and sizes (no image is decoded)."""
    params = typed(params)
    if task == "classification":
        manifest, kind = classification_manifest(params.get("DATA_DIR"))
        fingerprint = {"kind": kind, "manifest_sha256": file_fingerprint(manifest),
                       "tile_size": params.get("TILE_SIZE", 224)}
        stamp = manifest.parent / "synthetic.json"  # the generator's version and settings
        if kind == "SYNTHETIC" and stamp.is_file():
            fingerprint["generator"] = json.loads(stamp.read_text())
        return fingerprint
    from ..tasks.polyp import polyp_fingerprint

    limits = (params.get("TRAIN_FRAMES"), params.get("EVAL_FRAMES"), params.get("EVAL_FRAMES"))
    return polyp_fingerprint(params.get("DATA_DIR"), params.get("FRAME_SIZE", 160), limits,
                             seed=params.get("SPLIT_SEED", 0), split_by=params.get("SPLIT_BY", "near_duplicates"))


def spec_from_parameters(task: str, params: dict) -> RunSpec:
    """The run spec of a notebook's parameters: `spec_from_parameters("detection", globals())`
    in a notebook, or the runner's resolved parameters; UPPER_CASE keys are read, others ignored."""
    params = typed({k: v for k, v in params.items() if k.isupper()})
    return spec_of(config_from_parameters(params, task), task_from_parameters(task, params),
                   data_fingerprint(task, params))


def parse_parameters(items) -> dict:
    """`KEY=VALUE` strings (command-line `--param`) -> {KEY: YAML value}; ValueError on a bad item."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isupper():
            raise ValueError(f"--param expects KEY=VALUE with an UPPER_CASE key, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def smoke_parameters(task: str, params: dict) -> dict:
    """`params` shrunk as the notebooks' `if SMOKE:` cell shrinks them."""
    out = dict(params)
    for key, cap in SMOKE_CAPS[task].items():
        out[key] = cap if out.get(key) is None else min(out[key], cap)
    return out


def notebook_defaults(path) -> dict:
    """The literal defaults of a notebook's `parameters` cell (expressions such as SMOKE skipped)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path} needs exactly one cell tagged 'parameters', found {len(cells)}")
    out = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out
