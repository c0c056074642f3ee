"""One run identity: a frozen specification of everything that changes what a run computes.

A `RunSpec` holds the task's name, every `CohortConfig` field that changes results, the task's
own settings (box loss, frame size, ...) and a fingerprint of the data (manifest content hash,
or the synthetic generator's settings and version). Its `hash` is computed once and is the only
identity of a run: it names checkpoint and output folders, is stored in every checkpoint and
`metrics.json`, decides whether a run resumes from its checkpoint (`mtml.runs.checkpoint`) and whether `mtml.reproduce` may skip a run.

Notebooks and the reproduction runner build specs from the same UPPER_CASE parameters with
`mtml.parameters.spec_from_parameters`, so both agree on a run's identity before it starts.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property

SPEC_FORMAT = 1            # bump when the meaning of a field changes


def _canonical(obj) -> dict:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


@dataclass(frozen=True)
class RunSpec:
    task: str
    config: dict
    task_settings: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("config", "task_settings", "data"):
            object.__setattr__(self, name, _canonical(getattr(self, name)))

    def as_dict(self) -> dict:
        return {"format": SPEC_FORMAT, "task": self.task, "config": self.config,
                "task_settings": self.task_settings, "data": self.data}

    @cached_property
    def hash(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def flat(self) -> dict:
        """One level: config fields as they are, task settings and data prefixed (CSV columns)."""
        return {"task": self.task, **self.config,
                **{f"task.{k}": v for k, v in self.task_settings.items()},
                **{f"data.{k}": v for k, v in self.data.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(d["task"], d["config"], d.get("task_settings", {}), d.get("data", {}))


KNOWLEDGE_FIELDS = ("teacher_knowledge", "peer_knowledge", "w_feat", "feature_levels")


def spec_of(cfg, task, data: dict | None = None) -> RunSpec:
    """The spec of a run of `cfg` (a `mtml.core.cohort.CohortConfig`; not imported here, which keeps
    this module below mtml.core) on `task` with data described by `data`. The knowledge fields
    (added with feature distillation) enter it resolved, and only when some student learns
    features: a predictions-only run keeps the identity it had before they existed."""
    speed_only = {f.name for f in fields(cfg) if not f.metadata.get("identity", True)}  # e.g. num_workers
    config = {k: v for k, v in asdict(cfg).items() if k not in speed_only and k not in KNOWLEDGE_FIELDS}
    if not config.get("stack_students"):  # added later: runs without it keep their identity
        config.pop("stack_students", None)
    revision = getattr(task, "network_revision", lambda version: None)(cfg.version)
    if revision:  # tiny classifiers' widths changed once under the same name (mtml.models)
        config["tiny_widths"] = revision
    from ..core.terms import KIT_TERMS, STUDENT_TERMS

    added = [t.name for t in STUDENT_TERMS if t.name not in KIT_TERMS]
    if added:  # a term added to the student objective changes what the run computes
        config["student_terms"] = added
    teacher, peer = cfg.knowledge()
    if cfg.uses_features:
        config.update(teacher_knowledge="|".join(teacher), peer_knowledge=peer, w_feat=cfg.w_feat,
                      feature_levels=cfg.feature_levels)
    settings = task.settings() if hasattr(task, "settings") else {}
    return RunSpec(task.name, config, settings, data or {})


def differences(stored: dict, wanted: dict) -> dict:
    """{dotted key: (stored, wanted)} for the leaves where two spec dicts differ."""
    out = {}
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update({f"{key}.{k}": v for k, v in differences(a, b).items()})
        elif a != b:
            out[key] = (a, b)
    return out


