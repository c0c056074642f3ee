"""Tests of mtml.models: every version builds and classifies, the parameter table agrees with
torchvision's published ImageNet counts, and pretrained weights fail clearly without internet."""
from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from mtml.tasks.models import VERSIONS, build_cohort_networks, build_network, count_parameters, version_table

# input features of each torchvision classifier (the layer build_network replaces)
CLASSIFIER_IN = {"resnet18": 512, "resnet50": 2048, "densenet121": 1024, "mobilenet_v2": 1280,
                 "wide_resnet50_2": 2048, "shufflenet_v2_x1_0": 1024}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # steadier on a shared 2-core machine


def tiny_count(widths, num_classes, in_channels=3):
    """Per stage two bias-free 3x3 convolutions and two BatchNorms (weight, bias), then a linear."""
    total, c = 0, in_channels
    for w in widths:
        total += 9 * c * w + 9 * w * w + 4 * w
        c = w
    return total + c * num_classes + num_classes


def expected_count(arch: str, num_classes: int) -> int:
    if arch == "tiny_teacher":
        return tiny_count((32, 64, 128), num_classes)
    if arch == "tiny_student":
        return tiny_count((6, 12, 24), num_classes)
    imagenet = torchvision.models.get_model_weights(arch).DEFAULT.meta["num_params"]  # 1000 classes
    return imagenet - (CLASSIFIER_IN[arch] + 1) * (1000 - num_classes)


@pytest.mark.parametrize("version, size", [("tiny", 16), ("v1", 64), ("v2", 64), ("v3", 64)])
def test_every_version_builds_and_gives_one_logit_per_class(version, size):
    torch.manual_seed(0)
    teacher, students = build_cohort_networks(version, 2, num_classes=3)
    assert len(students) == 2 and type(students[0]) is type(students[1])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for net in (teacher, students[0]):
            out = net.eval()(x)
            assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert count_parameters(teacher) == expected_count(VERSIONS[version][0], 3)
    assert count_parameters(students[0]) == expected_count(VERSIONS[version][1], 3)
    no_teacher, _ = build_cohort_networks(version, 1, num_classes=3, with_teacher=False)
    assert no_teacher is None


def test_version_table_counts():
    table = version_table(num_classes=2)
    print("\n" + table.to_string())  # shown with pytest -s
    assert list(table.index) == ["tiny", "v1", "v2", "v3"]
    for version, row in table.iterrows():
        assert (row["teacher"], row["student"]) == VERSIONS[version]
        assert row["teacher_params"] == expected_count(row["teacher"], 2)
        assert row["student_params"] == expected_count(row["student"], 2)
        assert row["compression"] == pytest.approx(row["teacher_params"] / row["student_params"], abs=0.05)
        assert row["compression"] > 1.5  # every teacher is clearly larger than its student


def test_pretrained_without_internet_raises_a_clear_runtime_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # an empty weights cache

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no route to host (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="could not download ImageNet weights for resnet18") as err:
        build_network("resnet18", pretrained=True)
    message = str(err.value)
    assert str(tmp_path / "checkpoints") in message and "pretrained=False" in message
    assert "resnet18-" in message  # names the file to copy in


def test_bad_network_arguments():
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_network("tiny_student", pretrained=True)
    with pytest.raises(ValueError, match="num_classes"):
        build_network("resnet18", num_classes=1)
    with pytest.raises(ValueError, match="unknown version"):
        build_cohort_networks("v4", 2)
