"""Students in one pass (OURS): N students of one tiny architecture (`TinyConvNet`, same widths)
run as one network whose convolutions are grouped by student. Batch norm is per channel, so a
student's channels are normalised exactly as alone; each student keeps its own parameters and
buffers (its state_dict on disk does not change): every forward concatenates them, so the
gradients flow back to each student, and the batch statistics are written back to each one.
Results equal the per-student path up to floating-point rounding (another convolution kernel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def why_not_stackable(students) -> str | None:
    """None when `students` can run stacked, else the reason (for a one-line error)."""
    if len(students) < 2:
        return "it needs at least 2 students"
    if not all(type(s) is type(students[0]) and getattr(type(s), "stackable", False) for s in students):
        kinds = sorted({type(s).__name__ for s in students})
        return f"it needs TinyConvNet students (the tiny version's stackable networks, not wrapped), got {kinds}"
    shapes = {tuple((k, tuple(v.shape)) for k, v in s.state_dict().items()) for s in students}
    if len(shapes) > 1:
        return "the students differ in architecture"
    layers = [_settings(layer) for s in students for layer in s.features]
    if None in layers:
        return "a layer has settings the stacked form does not reproduce (conv bias, groups, dilation, " \
               "padding mode; pool ceil_mode or dilation; batch norm without affine, running stats or momentum)"
    if len({tuple(_settings(layer) for layer in s.features) for s in students}) > 1:
        return "the students' layers differ in their settings"
    return None


def _settings(layer):
    """The settings `stacked_forward` reads from `layer`, or None when it would ignore one that matters."""
    if isinstance(layer, nn.Conv2d):
        plain = (layer.bias is None and layer.groups == 1 and layer.padding_mode == "zeros"
                 and layer.dilation == (1, 1) and not isinstance(layer.padding, str))
        return ("conv", layer.stride, layer.padding) if plain else None
    if isinstance(layer, nn.BatchNorm2d):
        plain = layer.affine and layer.track_running_stats and layer.momentum is not None
        return ("bn", layer.eps, layer.momentum) if plain else None
    if isinstance(layer, nn.MaxPool2d):
        plain = not layer.ceil_mode and layer.dilation in (1, (1, 1)) and not layer.return_indices
        return ("pool", layer.kernel_size, layer.stride, layer.padding) if plain else None
    return ("relu",) if isinstance(layer, nn.ReLU) else None


def _batch_norm(mods: list[nn.BatchNorm2d], h: torch.Tensor) -> torch.Tensor:
    m0 = mods[0]
    weight, bias = torch.cat([m.weight for m in mods]), torch.cat([m.bias for m in mods])
    mean, var = torch.cat([m.running_mean for m in mods]), torch.cat([m.running_var for m in mods])
    out = F.batch_norm(h, mean, var, weight, bias, m0.training, m0.momentum, m0.eps)
    if m0.training:  # F.batch_norm updated the concatenated statistics: give each student its share
        with torch.no_grad():
            for m, rm, rv in zip(mods, mean.chunk(len(mods)), var.chunk(len(mods))):
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
                m.num_batches_tracked += 1
    return out


def stacked_forward(students: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Each student's logits for the images `x`, from one grouped network."""
    n, h, grouped = len(students), x, False
    for k, layer in enumerate(students[0].features):
        mods = [s.features[k] for s in students]
        if isinstance(layer, nn.Conv2d):  # the first one sees the shared image: no groups needed
            h = F.conv2d(h, torch.cat([m.weight for m in mods]), None, layer.stride, layer.padding,
                         layer.dilation, groups=n if grouped else 1)
            grouped = True
        elif isinstance(layer, nn.BatchNorm2d):
            h = _batch_norm(mods, h)
        elif isinstance(layer, nn.ReLU):
            h = F.relu(h)
        elif isinstance(layer, nn.MaxPool2d):
            h = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding)
        else:
            raise TypeError(f"no stacked form for {type(layer).__name__}")
    pooled = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1).view(x.shape[0], n, -1)
    weight = torch.stack([s.fc.weight for s in students])  # (n, classes, channels)
    bias = torch.stack([s.fc.bias for s in students])
    return list((torch.einsum("bnc,nkc->nbk", pooled, weight) + bias[:, None, :]).unbind(0))
