"""Shared fixtures: the optional real dataset, and small real-image samples from it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_TARBALL = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_tarball() -> Path:
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"real data absent: {CIFAR_TARBALL} (see ../shared/datasets/README.md)")
    return CIFAR_TARBALL


@pytest.fixture(scope="session")
def cifar_sample(cifar_tarball):
    """40 real CIFAR-10 test images of each of 5 classes, at 64 px: (float images NCHW, labels)."""
    import torch
    from PIL import Image

    classes = ["airplane", "automobile", "bird", "cat", "ship"]
    per_class = 40
    taken: dict[str, list[np.ndarray]] = {c: [] for c in classes}
    with tarfile.open(cifar_tarball) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] == "test" and parts[-2] in taken:
                if len(taken[parts[-2]]) < per_class:
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    taken[parts[-2]].append(np.asarray(image.resize((64, 64), Image.Resampling.BICUBIC)))
                if all(len(v) == per_class for v in taken.values()):
                    break
    images = np.stack([img for c in classes for img in taken[c]])
    labels = np.repeat(np.arange(len(classes)), per_class)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels)
