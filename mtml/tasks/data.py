"""Small in-memory datasets (a seeded synthetic problem for tests) and where sample data lives."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset


def shared_data_dir() -> Path | None:
    """The real sample data beside the checkout (`$MTML_SHARED_DATA`, default `../shared/data`),
    or None when absent. Only tests and tours use it; full datasets come from data_scripts/."""
    path = Path(os.environ.get("MTML_SHARED_DATA",
                               Path(__file__).resolve().parents[3] / "shared" / "data"))
    return path if path.is_dir() else None


class TensorImageDataset(Dataset):
    """Images (N, C, H, W) float and labels (N,) as dict items {image, label, index}."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, patients=None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.patients = patients

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": i}


def make_separable(n: int = 256, size: int = 16, num_classes: int = 2, noise: float = 0.5,
                   seed: int = 0, split: int = 0) -> TensorImageDataset:
    """SYNTHETIC: each class is a fixed random colour pattern (drawn from `seed`) plus Gaussian
    noise; `split` draws other samples of the same problem (0 train, 1 validation, ...).
    Linearly separable at low noise; used by tests and the first demo."""
    if n < 1 or size < 4 or num_classes < 2:
        raise ValueError("need n >= 1, size >= 4, num_classes >= 2")
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, 3, size, size, generator=g)
    g = torch.Generator().manual_seed(seed * 1000 + 1 + split)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    images = prototypes[labels] + noise * torch.randn(n, 3, size, size, generator=g)
    return TensorImageDataset(images, labels)
