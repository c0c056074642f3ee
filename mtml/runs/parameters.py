"""Notebook parameters (the UPPER_CASE knobs of a `parameters` cell) -> a run's spec.

The notebooks and `mtml.reproduce` both call `spec_from_parameters`, so a run's identity is known
before it starts: the runner skips a finished run without executing anything.
"""
from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

from ..core.cohort import CohortConfig
from ..tasks import task_class, task_names
from .spec import RunSpec, spec_of

# notebook parameter -> CohortConfig field, as the fields declare it (mtml.core.cohort.knob)
CONFIG_PARAMETERS = {f.metadata["notebook"]: f.name for f in fields(CohortConfig) if f.metadata.get("notebook")}
# knobs that never change what a run computes (tests/test_spec.py checks every other knob is mapped)
NOT_IDENTITY = ("SMOKE", "OUT_DIR", "DEVICE", "RESUME", "SEEDS", "MODES", "METRIC", "BASELINE",
                "EXTERNAL_DATA_DIRS")  # extra test sets: evaluated after training (mtml.external)


def knob_types() -> dict:
    """{PARAMETER: float or int}: the config's numeric knobs (from the field types) and those of
    every registered task (its `knob_types`), so a value typed as 4 or 4.0 reads the same."""
    types = {name: {"float": float, "int": int}[f.type] for name, f in
             ((f.metadata.get("notebook"), f) for f in fields(CohortConfig)) if name and f.type in ("float", "int")}
    for task in task_names():
        types.update(getattr(task_class(task), "knob_types", {}))  # optional for a task
    return types


def typed(params: dict) -> dict:
    """Notebook parameters with equal values written one way (4 and 4.0, '1e-2' and 0.01, 1 and
    True): a spec hash must not depend on how a value was typed. Impossible values are kept, so
    validation names them."""
    out, types = dict(params), knob_types()
    for key, value in params.items():
        if value is None or isinstance(value, bool) and key != "PRETRAINED":
            continue
        try:
            if types.get(key) is float:
                out[key] = float(value)
            elif types.get(key) is int and float(value) == int(float(value)):
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
    """The `task` (a registered name, `mtml.tasks.task_class`) built from notebook parameters."""
    return task_class(task).from_parameters(typed(params))


def data_fingerprint(task: str, params: dict) -> dict:
    """What data a run sees: source, content hash and sizes (no image is decoded)."""
    return task_class(task).data_fingerprint(typed(params))


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
    """`params` shrunk as the notebooks' `if SMOKE:` cell shrinks them (the task's `smoke_caps`;
    tests/test_spec.py checks that every notebook's smoke cell agrees)."""
    out = dict(params)
    for key, cap in task_class(task).smoke_caps.items():
        out[key] = cap if out.get(key) is None else min(out[key], cap)
    return out


ADVANCED = "advanced-parameters"  # the tag of a notebook's folded cell of advanced knobs


def parameter_cells(nb) -> list:
    """A notebook's knob cells, in order: the folded `advanced-parameters` cell (if any), then the
    one `parameters` cell. The advanced cell comes first, so the values papermill injects after
    the `parameters` cell override both."""
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    advanced = [c for c in nb.cells if ADVANCED in c.metadata.get("tags", [])]
    if len(tagged) != 1 or len(advanced) > 1:
        raise ValueError(f"a notebook needs exactly one cell tagged 'parameters' and at most one tagged "
                         f"{ADVANCED!r}, found {len(tagged)} and {len(advanced)}")
    return [*advanced, *tagged]


def notebook_defaults(path) -> dict:
    """The literal defaults of a notebook's knob cells (expressions such as SMOKE skipped)."""
    import nbformat

    out = {}
    for cell in parameter_cells(nbformat.read(path, as_version=4)):
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    out[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    return out
