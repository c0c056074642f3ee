"""What differs between tasks, behind one small interface used by `mtml.core.step.cohort_step`.

A task says how to run a network on a batch (`outputs`), its supervised loss, the distillation
loss between two networks' outputs (the target is detached), how to move and collate batches,
and how to evaluate networks and their ensemble. Classification lives here; detection in
`mtml.detection`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from ..core.losses import soft_kl
from . import register

TILE_SIZE = 64  # the classification notebooks' TILE_SIZE default (tests/test_costs.py checks it)


class Task(Protocol):
    """What `mtml.core`, `mtml.experiment` and the evaluators use of a task."""
    name: str
    history_metrics: tuple[str, ...]                     # validation metrics kept per epoch
    config_defaults: dict                                # CohortConfig fields (epochs, batch_size, lr)

    def networks(self, version: str, n_students: int, num_classes: int = 2, pretrained: bool = False,
                 with_teacher: bool = True): ...         # (teacher or None, [students]) for a version
    def is_own_network(self, model: torch.nn.Module) -> bool: ...
    def check_networks(self, networks: dict) -> None: ...  # ValueError naming a network of another kind

    def outputs(self, model: torch.nn.Module, batch: Any) -> Any: ...
    def outputs_and_features(self, model: torch.nn.Module, batch: Any, levels: int) -> tuple: ...  # same forward
    def supervised_loss(self, out: Any, batch: Any) -> torch.Tensor: ...
    def distill_loss(self, out: Any, target: Any, temperature: float) -> torch.Tensor: ...
    # optional: distill_target(out), the part of `out` distill_loss reads as target (what a teacher
    # tape keeps, mtml.teacher_tape; default all of `out`, which must then hold only tensors)
    # optional: student_only_settings, names in settings() the teacher never reads (one tape serves them all)
    def collate(self, items: list) -> Any: ...
    def to_device(self, batch: Any, device: torch.device) -> Any: ...
    def evaluate(self, networks: dict, data, batch_size: int = 64, metrics=None, **kw): ...  # metrics: only these
    def settings(self) -> dict: ...                      # what changes results (part of the run spec)
    # and the classmethod from_settings(settings) rebuilds the task (mtml.external)
    def test_units(self, *predictions, data=None) -> Any: ...  # per test unit, for bootstrap intervals


@register
class ClassificationTask:
    """Batches are dicts with `image` (B, C, H, W) float and `label` (B,) long."""

    name = "classification"
    metric = "auroc"
    history_metrics = ("accuracy", "auroc")
    config_defaults = {"epochs": 5, "batch_size": 64, "lr": 0.05}  # ours, see docs/choices.md
    smoke_caps = {"EPOCHS": 2, "TILE_SIZE": 32}
    knob_types = {"STAIN_JITTER": float, "TILE_SIZE": int}  # its own numeric notebook knobs
    item, bootstrap_unit = "tile", "patients"  # one test input; what a study's bootstrap resamples
    data_kind = "MSI/MSS tiles (data_scripts/msi_mss.py)"
    # the notebook that trains each mode (mtml.runs.reproduce); 03's MODE switches the loss terms
    notebooks = {"kd": "01_kd_only", "ml": "02_ml_only", "kd_ml": "03_kd_plus_ml", "independent": "03_kd_plus_ml",
                 "offline": "01_kd_only", "kd_ml_styles": "03_kd_plus_ml"}

    @staticmethod
    def versions() -> tuple:
        from .models import VERSIONS

        return tuple(VERSIONS)

    @staticmethod
    def reads_manifest(columns: set) -> bool:
        """Whether a prepared folder's manifest (its column names) holds this task's data."""
        return {"path", "label"} <= columns and "boxes" not in columns

    @staticmethod
    def folder_fingerprint(folder: Path, size: int) -> str:
        """The content hash of a prepared folder (or a manifest file), without decoding images."""
        from .download import file_fingerprint

        return file_fingerprint(folder if folder.is_file() else folder / "manifest.csv")

    @staticmethod
    def load_folder(folder: Path, size: int):
        """Every tile of a prepared folder (or a manifest file), at `size` pixels: an external test set."""
        from .tiles import TileDataset

        return TileDataset(folder if folder.is_file() else folder / "manifest.csv", None, size=size, cache=True)

    @classmethod
    def from_parameters(cls, params: dict) -> "ClassificationTask":
        return cls(num_classes=2, stain_jitter=params.get("STAIN_JITTER", 0.0),
                   channels_last=bool(params.get("CHANNELS_LAST", False)))  # NHWC inputs (a speed option)

    size_parameter = "TILE_SIZE"   # the notebooks' image-size knob
    stackable = True               # students can run as one grouped network (mtml.core.stacking)

    @staticmethod
    def generated(n: int, size: int, seed: int = 0, split: int = 0):
        """`n` SYNTHETIC items of a seeded separable problem (`split` 1: its validation items)."""
        from .data import make_separable

        return make_separable(n, size, seed=seed, split=split)

    @staticmethod
    def load_splits(params: dict, data: str | None = None, who: str = "this run", with_test: bool = True):
        """(train, val, test, description, augmentation or None for the task's own) of the
        parameters' tiles; `data` ("real" or "synthetic"), if given, must be what DATA_DIR holds;
        without `with_test`, test is None and no test tile is read."""
        from .synthetic import classification_manifest
        from .tiles import TileDataset

        manifest, kind = classification_manifest(params.get("DATA_DIR"))
        if data is not None and (data == "real") != (kind == "real"):
            raise ValueError(f"{who} declares data: {data}, DATA_DIR gives {kind} tiles")
        splits = [TileDataset(manifest, s, size=params.get("TILE_SIZE", 224), cache=True) if with_test or s != "test"
                  else None for s in ("train", "val", "test")]
        return (*splits, f"{kind} tiles ({manifest})", None)

    def study_record(self, result, val, test) -> tuple:
        """What a study keeps of a finished run besides its metrics: the students' diversity on the
        test tiles, and the ensemble's test units."""
        import numpy as np

        from ..names import students_in
        from .diversity import classification_diversity

        u = result.units
        diversity = classification_diversity({s: np.c_[1 - u[s], u[s]] for s in students_in(result.cohort.networks)})
        return {f"diversity/{k}": v for k, v in diversity.items()}, u[["unit", "label", "item", "ensemble"]].round({"ensemble": 7})

    @staticmethod
    def network_revision(version: str) -> str | None:
        """A label of the version's networks when they changed under an unchanged name (tiny's widths)."""
        from .models import tiny_widths_label

        return tiny_widths_label() if version == "tiny" else None

    @staticmethod
    def cost_networks(version: str, n_students: int, size: int | None):
        """(teacher, students, input size, combine) for `mtml.runs.costs`, built as a run builds them."""
        from .models import build_cohort_networks

        probs = ClassificationTask(2).probabilities
        teacher, students = build_cohort_networks(version, n_students, 2, pretrained=False)
        return teacher, students, size or TILE_SIZE, lambda outs: torch.stack([probs(o) for o in outs]).mean(0)

    @staticmethod
    def data_fingerprint(params: dict) -> dict:
        """The manifest's content hash, the tile size, and the synthetic generator's settings."""
        import json

        from .download import file_fingerprint
        from .synthetic import classification_manifest

        manifest, kind = classification_manifest(params.get("DATA_DIR"))
        fingerprint = {"kind": kind, "manifest_sha256": file_fingerprint(manifest),
                       "tile_size": params.get("TILE_SIZE", 224)}
        stamp = manifest.parent / "synthetic.json"  # the generator's version and settings
        if kind == "SYNTHETIC" and stamp.is_file():
            fingerprint["generator"] = json.loads(stamp.read_text())
        return fingerprint

    def __init__(self, num_classes: int = 2, channels_last: bool = False, stain_jitter: float = 0.0):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if isinstance(stain_jitter, bool) or not isinstance(stain_jitter, (int, float)) or not 0 <= stain_jitter < 1:
            raise ValueError(f"stain_jitter (STAIN_JITTER) must be a number in [0, 1), 0 turns it off; got {stain_jitter!r}")
        self.num_classes = num_classes
        self.channels_last = channels_last
        self.stain_jitter = float(stain_jitter)

    def augment(self, batch, generator=None):
        """The training augmentation: `mtml.tiles.augment_tiles` with this task's stain jitter."""
        from .tiles import augment_tiles

        return augment_tiles(batch, stain=self.stain_jitter, generator=generator)

    def networks(self, version, n_students, num_classes=2, pretrained=False, with_teacher=True):
        from .models import build_cohort_networks

        return build_cohort_networks(version, n_students, num_classes, pretrained, with_teacher)

    def is_own_network(self, model):
        from .detectors import is_detector

        return not is_detector(model)

    def check_networks(self, networks: dict) -> None:
        check_networks(self, networks)

    def outputs(self, model, batch):
        return model(batch["image"])

    def outputs_and_features(self, model, batch, levels: int = 1):
        """(logits, the last `levels` stage maps) of one forward (`mtml.features`)."""
        from ..core.features import stage_modules, tap

        with tap(stage_modules(model)[-levels:]) as maps:
            out = self.outputs(model, batch)
        return out, list(maps)

    def supervised_loss(self, out, batch):
        return F.cross_entropy(out, batch["label"])

    def distill_loss(self, out, target, temperature):
        return soft_kl(out, target, temperature, kind="softmax")

    def collate(self, items):
        return default_collate(items)

    def to_device(self, batch, device):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        labels = batch["label"]  # checked on the host, before a GPU would hit a device-side assert
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(f"labels {sorted(set(labels.tolist()))} outside 0..{self.num_classes - 1}: "
                             "fix the dataset's labels or num_classes")
        out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
               for k, v in batch.items()}
        out["image"] = out["image"].contiguous(memory_format=fmt)
        return out

    def settings(self):
        if not self.stain_jitter:  # added later: runs without it keep their identity
            return {"num_classes": self.num_classes}
        return {"num_classes": self.num_classes, "stain_jitter": self.stain_jitter}

    @classmethod
    def from_settings(cls, s: dict) -> "ClassificationTask":
        return cls(num_classes=s["num_classes"], stain_jitter=s.get("stain_jitter", 0.0))

    def test_units(self, probs, labels, data=None):
        from .evaluate import classification_units

        return classification_units(probs, labels, getattr(data, "patients", None))

    def probabilities(self, out):
        return out.float().softmax(-1)

    def evaluate(self, networks, data, batch_size=64, **kw):
        from .evaluate import evaluate_classification

        return evaluate_classification(networks, data, self, batch_size=batch_size, **kw)


def check_networks(task, networks: dict) -> None:
    """ValueError naming the task and the network when a network is not the task's kind (a
    classifier in a detection cohort, or the reverse), before any step runs."""
    if not hasattr(task, "is_own_network"):  # a task of one's own without the check
        return
    from .detectors import is_detector

    for name, model in networks.items():
        if not task.is_own_network(model):
            kind = "detector" if is_detector(model) else "classifier"
            raise ValueError(f"the {task.name} task cannot train {name} ({type(model).__name__}, a {kind}): "
                             f"build the cohort with the task's own networks (networks=task.networks)")
