"""Shared fixtures: real photos from the package, one thread per test process (the suite runs in parallel)."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")  # tests draw off screen

import numpy as np
import pytest
import torch
from PIL import Image

from diffaug.fit import shipped_images_dir

torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip, saying so, where there is no CUDA device (they run in the device check)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def photo(name: str = "astronaut.png", size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.open(shipped_images_dir() / name).convert("RGB")
    return image.resize(size, Image.BILINEAR) if size else image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, C, H, W) float in [0, 1] from a PIL image."""
    array = np.array(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255).unsqueeze(0)


@pytest.fixture
def images() -> torch.Tensor:
    """Eight 32x32 crops of real photos, float in [0, 1]."""
    from diffaug.fit import load_images, random_crops

    fit, _ = load_images()
    return random_crops(fit, 8, 32, torch.Generator().manual_seed(0))
