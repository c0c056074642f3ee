"""Feature distillation: the "learning styles" of Niyaz, Sambyal & Bathula (arXiv 2212.02931,
Computers in Biology and Medicine 2023). One student learns from the teacher's predictions, the
other from the teacher's feature maps, and the students exchange both with each other.

How features are matched is not public; the kit's choices (OURS, all parameters):

* Which maps: classification, the output of the last `feature_levels` stages of the network
  (`stage_modules`: ResNet layer1-4, DenseNet blocks and the final norm, ShuffleNet stages and
  conv5, MobileNetV2 blocks, the tiny network's pooled stages); detection, the first `feature_levels` FPN levels (P3 first: the finest,
  where small polyps are), which line up by stride between teacher and students.
* Adapters: a 1x1 convolution per (student, target network, level) maps the student's channels
  to the target's (FitNets' regressor, Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep
  Nets", arXiv 1412.6550). It belongs to the student, trains with it and is saved with it.
* Loss: the hint loss of FitNets, mean squared error, on maps standardised per sample (zero
  mean, unit variance over channels and positions), so its scale does not depend on the
  networks' activation scale:  L_feat = mean over levels of mean((z(A(F_s)) - z(F_t))^2),
  z(x) = (x - mean(x)) / sqrt(var(x) + eps). The target F_t is detached, as every target.
  A student map of another spatial size is average-pooled to the target's.

The maps come from the same forward as the predictions: forward hooks on the stage modules
(classification) or the FPN levels the detector returns (detection).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

KNOWLEDGE = ("predictions", "features", "both")
EPS = 1e-5


def standardise(x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS)


def feature_loss(student_map: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
    """Hint loss between an adapted student map (B, C, H, W) and a target map (B, C, H', W');
    the target is detached."""
    target_map = target_map.detach()
    if student_map.shape[1] != target_map.shape[1]:
        raise ValueError(f"feature maps have {student_map.shape[1]} and {target_map.shape[1]} channels: "
                         "adapt the student's map first (mtml.features.Adapters)")
    if student_map.shape[-2:] != target_map.shape[-2:]:
        student_map = F.adaptive_avg_pool2d(student_map, target_map.shape[-2:])
    return (standardise(student_map.float()) - standardise(target_map.float())).pow(2).mean()


def stage_modules(model: nn.Module) -> list[nn.Module]:
    """The stages of a classification network, in order; the last one gives the last conv map."""
    model = getattr(model, "module", model)
    if hasattr(model, "feature_stages"):  # the kit's own networks name their stages (TinyConvNet)
        return model.feature_stages()
    if hasattr(model, "layer4"):  # ResNet, WideResNet
        return [model.layer1, model.layer2, model.layer3, model.layer4]
    if hasattr(model, "stage4"):  # ShuffleNetV2
        return [model.stage2, model.stage3, model.stage4, model.conv5]
    if hasattr(model, "features") and hasattr(model.features, "denseblock4"):  # DenseNet
        return [model.features.denseblock1, model.features.denseblock2, model.features.denseblock3,
                model.features.norm5]
    if hasattr(model, "features"):  # MobileNetV2: its blocks, the last one the 1x1 conv before pooling
        return list(model.features.children())
    raise ValueError(f"no feature stages known for {type(model).__name__}")


def feature_channels(model: nn.Module, levels: int) -> list[int]:
    """Channels of the maps `outputs_and_features` returns: the FPN width (detection), or those
    of one dry forward of a 64 px image through the stages (eval mode, no gradient, no random
    draw), so concatenating or re-projecting stages are counted as they run."""
    model = getattr(model, "module", model)
    detector = hasattr(model, "anchor_generator")  # torchvision's FCOS: one map per FPN level
    available = len(model.anchor_generator.sizes) if detector else len(stage_modules(model))
    if levels > available:
        raise ValueError(f"feature_levels={levels}, but {type(model).__name__} has {available} "
                         f"{'FPN levels' if detector else 'stages'}")
    if detector:
        return [model.backbone.out_channels] * levels
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), tap(stage_modules(model)[-levels:]) as maps:
            model(torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device))
    finally:
        model.train(training)
    return [m.shape[1] for m in maps]


@contextmanager
def tap(modules: list[nn.Module]):
    """Collects the outputs of `modules` during the forwards run inside the block, in order."""
    maps: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: maps.append(out)) for m in modules]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


class Adapters(nn.Module):
    """A student's 1x1 convolutions towards each target network it matches features with:
    `self[target][level]` maps the student's channels to the target's at that level."""

    def __init__(self, student_channels: list[int], targets: dict[str, list[int]]):
        super().__init__()
        self.maps = nn.ModuleDict({target: nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(student_channels, chans))
                                   for target, chans in targets.items()})

    def loss(self, target: str, student_maps: list[torch.Tensor], target_maps: list[torch.Tensor]) -> torch.Tensor:
        """Mean over levels of the hint loss of this student's adapted maps towards `target`'s."""
        return torch.stack([feature_loss(adapter(s), t) for adapter, s, t
                            in zip(self.maps[target], student_maps, target_maps)]).mean()


def parse_knowledge(value: str, n_students: int, what: str) -> list[str]:
    """'predictions', 'features', 'both', or (n_students > 1) one per student joined by '|' ->
    one per student."""
    parts = [p.strip() for p in str(value).split("|")]
    if len(parts) == 1:
        parts = parts * n_students
    if any(p not in KNOWLEDGE for p in parts) or len(parts) != n_students:
        per_student = f", or one per student joined by '|' ({n_students} students)" if n_students > 1 else ""
        raise ValueError(f"{what} must be one of {KNOWLEDGE}{per_student}, got {value!r}")
    return parts


def uses(knowledge: str, kind: str) -> bool:
    return knowledge in (kind, "both")
