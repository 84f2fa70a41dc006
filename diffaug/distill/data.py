"""Real data for the distillation example and benchmark: shipped MNIST-5k, crops of the shipped photos, and the
CIFAR-10/100 python-pickle batches from a folder the user points at."""

from __future__ import annotations

import pickle
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ..errors import DiffAugError

__all__ = ["mnist5k", "photo_patches", "cifar", "small_models"]


def mnist5k(train_size: int = 1000, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) from the 5,000 MNIST digits that ship with diffaug (BSD-3, see LICENSE-mnist5k-BSD3.txt):
    ``train_size`` digits, balanced over classes, for training; the rest for testing. Images (1, 28, 28) in [0, 1]."""
    with resources.files("diffaug.data").joinpath("mnist5k.npz").open("rb") as file:
        data = np.load(file)
        images, labels = data["images"], data["labels"]
    if not 10 <= train_size < len(labels):
        raise DiffAugError(f"train_size must be in [10, {len(labels) - 1}]; got {train_size}")
    order = np.random.default_rng(seed).permutation(len(labels))
    per_class = train_size // 10
    train_index = np.concatenate([order[labels[order] == c][:per_class] for c in range(10)])
    test_index = np.setdiff1d(np.arange(len(labels)), train_index)
    x = torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x[train_index], y[train_index]), TensorDataset(x[test_index], y[test_index])


def photo_patches(per_class: int = 100, size: int = 32, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """A 10-class colour task from real photos: which of the ten shipped photos a size x size patch comes from.
    Training patches come from the left half of each photo, test patches from the right half."""
    from ..fit import _read_image, shipped_images_dir

    paths = sorted(shipped_images_dir().glob("*.png"))
    generator = torch.Generator().manual_seed(seed)
    splits: dict[str, tuple[list[Tensor], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, path in enumerate(paths):
        image = _read_image(path)
        width = image.shape[-1]
        for split, (lo, hi) in (("train", (0, width // 2)), ("test", (width // 2, width))):
            half = image[..., lo:hi]
            for _ in range(per_class):
                top = int(torch.randint(half.shape[-2] - size + 1, (1,), generator=generator))
                left = int(torch.randint(half.shape[-1] - size + 1, (1,), generator=generator))
                splits[split][0].append(half[:, top : top + size, left : left + size])
                splits[split][1].append(label)
    return tuple(TensorDataset(torch.stack(xs), torch.tensor(ys)) for xs, ys in splits.values())  # type: ignore[return-value]


def cifar(folder: str | Path) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) from the CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``)
    python-pickle files in ``folder``, as the official archives unpack them. Images (3, 32, 32) in [0, 1]."""
    root = Path(folder)
    if (root / "data_batch_1").is_file():
        train_files, test_files, key = [root / f"data_batch_{i}" for i in range(1, 6)], [root / "test_batch"], b"labels"
    elif (root / "train").is_file():
        train_files, test_files, key = [root / "train"], [root / "test"], b"fine_labels"
    else:
        raise DiffAugError(f"CIFAR folder must hold data_batch_1..5 and test_batch (CIFAR-10) or train and test "
                           f"(CIFAR-100), the python version; got {str(root)!r}")

    def read(files: list[Path]) -> TensorDataset:
        xs, ys = [], []
        for file in files:
            with open(file, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")  # the official CIFAR format is a pickle
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[key], dtype=np.int64))
        return TensorDataset(torch.from_numpy(np.concatenate(xs)).float().div(255), torch.from_numpy(np.concatenate(ys)))

    return read(train_files), read(test_files)


def small_models(channels: int, classes: int, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(teacher, student): a 4-layer CNN with BatchNorm and a 2-layer CNN a tenth of its size."""
    from torch import nn

    torch.manual_seed(seed)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    teacher = nn.Sequential(
        *block(channels, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )
    student = nn.Sequential(
        *block(channels, 8), nn.MaxPool2d(2), *block(8, 16), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )
    return teacher, student
