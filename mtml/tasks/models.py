"""Teacher and student classifiers, by version.

The paper's three teacher-student pairs are not public; these are **our** choices, picked to span
three families and compression ratios of about 2x to 30x with ImageNet's 1000-class heads (up to
53x with a two-class head, see `version_table()`):

    version  teacher             student               why
    tiny     TinyConvNet(32-128) TinyConvNet(6-24)     trains in seconds on 2 CPU cores
    v1       ResNet-50           ResNet-18             same family, depth compression
    v2       DenseNet-121        MobileNetV2           dense -> depthwise-separable
    v3       WideResNet-50-2     ShuffleNetV2 x1.0     wide -> very light (about 30x)

`pretrained=True` loads torchvision's ImageNet weights for torchvision networks.
"""
from __future__ import annotations

import torch
from torch import nn

VERSIONS = {
    "tiny": ("tiny_teacher", "tiny_student"),
    "v1": ("resnet50", "resnet18"),
    "v2": ("densenet121", "mobilenet_v2"),
    "v3": ("wide_resnet50_2", "shufflenet_v2_x1_0"),
}
# students 6-12-24 (8-16-32 until 2026-11-28): narrow enough that the teacher beats them on the
# synthetic default's validation tiles (docs/choices.md, "Synthetic default"); the widths are in the run spec
TINY_WIDTHS = {"tiny_teacher": (32, 64, 128), "tiny_student": (6, 12, 24)}


def tiny_widths_label() -> str:
    """The tiny classifiers' widths as one string, teacher/student: '32-64-128/6-12-24'."""
    return "/".join("-".join(map(str, w)) for w in TINY_WIDTHS.values())


def check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; choose one of {sorted(VERSIONS)}")


class TinyConvNet(nn.Module):
    """Three conv-BN-ReLU stages with max-pooling, global average pooling, one linear layer."""

    # its forward is features -> global average pool -> fc, which mtml.core.stacking reproduces
    # for N students as one grouped network
    stackable = True

    def __init__(self, widths: tuple[int, ...], num_classes: int = 2, in_channels: int = 3):
        super().__init__()
        layers, c = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True), nn.Conv2d(w, w, 3, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    def feature_stages(self) -> list[nn.Module]:
        """The modules whose outputs are the stage maps (mtml.core.features): each stage's max-pool."""
        return [m for m in self.features if isinstance(m, nn.MaxPool2d)]


def _replace_last_linear(model: nn.Module, num_classes: int) -> nn.Module:
    parent, name, last = None, None, None
    for module_name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                parent, name, last = module, child_name, child
    if last is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier to replace")
    setattr(parent, name, nn.Linear(last.in_features, num_classes))
    return model


def build_network(arch: str, num_classes: int = 2, pretrained: bool = False) -> nn.Module:
    """One network by architecture name (a torchvision model name or tiny_teacher/tiny_student)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if arch in TINY_WIDTHS:
        if pretrained:
            raise ValueError("the tiny version has no pretrained weights; use pretrained=False")
        return TinyConvNet(TINY_WIDTHS[arch], num_classes)
    import torchvision

    weights = None
    if pretrained:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            weights.get_state_dict(progress=True)  # fills the torch hub cache
        except OSError as err:  # URLError is an OSError
            raise RuntimeError(
                f"could not download ImageNet weights for {arch} ({err}). Without internet, copy "
                f"{weights.url.rsplit('/', 1)[-1]} into {torch.hub.get_dir()}/checkpoints/ "
                "or use pretrained=False") from err
    model = torchvision.models.get_model(arch, weights=weights)
    return _replace_last_linear(model, num_classes)


def build_cohort_networks(version: str, n_students: int, num_classes: int = 2,
                          pretrained: bool = False, with_teacher: bool = True):
    """(teacher or None, [students]) for a version."""
    check_version(version)
    teacher_arch, student_arch = VERSIONS[version]
    teacher = build_network(teacher_arch, num_classes, pretrained) if with_teacher else None
    students = [build_network(student_arch, num_classes, pretrained) for _ in range(n_students)]
    return teacher, students


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def version_table(num_classes: int = 2):
    """A pandas DataFrame: parameters of teacher and student per version, and the compression."""
    import pandas as pd

    rows = []
    for version, (t_arch, s_arch) in VERSIONS.items():
        t = count_parameters(build_network(t_arch, num_classes))
        s = count_parameters(build_network(s_arch, num_classes))
        rows.append(dict(version=version, teacher=t_arch, student=s_arch, teacher_params=t,
                         student_params=s, compression=round(t / s, 1)))
    return pd.DataFrame(rows).set_index("version")
