"""One home per task: its data, networks, metrics and distillation terms (classification, detection).

The registry: a task class registers itself under its `name` (`@register`), and everything
outside this folder finds it by that name (`task_class(name)`) instead of branching on it. A
task class carries, besides the interface of `mtml.tasks.task.Task`:
    metric           the main metric of its studies (the student ensemble's), e.g. "auroc"
    smoke_caps       what a notebook's `if SMOKE:` cell caps, {PARAMETER: cap}
    from_parameters  classmethod: the task from a notebook's (typed) parameters
    data_fingerprint staticmethod: what data the run sees, from the parameters (the run spec's `data`)
    knob_types       optional: {PARAMETER: float or int} of its own numeric notebook knobs
    item, bootstrap_unit  optional words for reports: one test input ("tile"), what a bootstrap resamples ("patients")
    notebooks        optional: {mode: the notebook that trains it} (mtml.runs.reproduce)
    versions         optional staticmethod: its version names (mtml.runs.costs)
    reads_manifest, folder_fingerprint, load_folder, data_kind
                     optional: how a prepared folder of its data is recognised, hashed and loaded
                     as an external test set (mtml.runs.external)
"""
from __future__ import annotations

_TASKS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: makes `cls` findable as `task_class(cls.name)`."""
    _TASKS[cls.name] = cls
    return cls


def task_class(name: str) -> type:
    """The task class registered under `name` (the kit's own two are registered on first use)."""
    from . import detection, task  # noqa: F401  (they register themselves)

    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(_TASKS))}") from None


def task_names() -> list[str]:
    task_class("classification")  # loads the kit's own
    return sorted(_TASKS)
