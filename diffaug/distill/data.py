"""Real data for the distillation example and benchmark: shipped MNIST-5k, crops of the shipped photos, the
CIFAR-10/100 python-pickle batches from a folder the user points at, and ImageNet-style image folders."""

from __future__ import annotations

import functools
import hashlib
import math
import pickle
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from ..errors import DiffAugError
from ..images import IMAGE_SUFFIXES, open_rgb, read_image, shipped_images_dir

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolder", "Splits", "balanced_subsets", "channel_statistics", "cifar",
           "data_identity", "mnist5k", "mnist_arrays", "photo_patches", "photo_regions", "random_crop_flip",
           "read_cifar_batch", "small_models", "standard_augment", "task_splits"]


class Splits(NamedTuple):
    """Three disjoint splits of one task: fit on ``train``, choose settings on ``validation``, report ``test`` once."""

    train: TensorDataset
    validation: TensorDataset
    test: TensorDataset


def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The shipped MNIST-5k digits (5000, 28, 28) uint8 and their labels."""
    with resources.files("diffaug.data").joinpath("mnist5k.npz").open("rb") as file:
        data = np.load(file)
        return data["images"], data["labels"]


def balanced_subsets(labels: np.ndarray, per_class: list[int], seed: int) -> list[np.ndarray]:
    """Disjoint index sets, the i-th holding ``per_class[i]`` random images of every class; the rest after them."""
    order = np.random.default_rng(seed).permutation(len(labels))
    by_class = [order[labels[order] == c] for c in range(10)]
    bounds = np.cumsum([0, *per_class])
    subsets = [np.concatenate([members[lo:hi] for members in by_class]) for lo, hi in zip(bounds, bounds[1:])]
    used = np.concatenate(subsets)
    return [*subsets, np.setdiff1d(np.arange(len(labels)), used)]


def _mnist_dataset(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> TensorDataset:
    x = torch.from_numpy(images[index].astype(np.float32) / 255).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels[index].astype(np.int64)))


def mnist5k(train_size: int = 1000, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) from the 5,000 MNIST digits that ship with diffaug (BSD-3, see LICENSE-mnist5k-BSD3.txt):
    ``train_size`` digits, balanced over classes, for training; the rest for testing. Images (1, 28, 28) in [0, 1]."""
    images, labels = mnist_arrays()
    if not 10 <= train_size < len(labels):
        raise DiffAugError(f"train_size must be in [10, {len(labels) - 1}]; got {train_size}")
    train, test = balanced_subsets(labels, [train_size // 10], seed)
    return _mnist_dataset(images, labels, train), _mnist_dataset(images, labels, np.sort(test))


def _patches(image: Tensor, count: int, size: int, generator: torch.Generator) -> list[Tensor]:
    """``count`` random size x size patches of ``image`` (C, H, W)."""
    patches = []
    for _ in range(count):
        top = int(torch.randint(image.shape[-2] - size + 1, (1,), generator=generator))
        left = int(torch.randint(image.shape[-1] - size + 1, (1,), generator=generator))
        patches.append(image[:, top : top + size, left : left + size])
    return patches


def photo_regions(regions: list[tuple[slice, slice]], per_class: int, size: int, seed: int) -> list[TensorDataset]:
    """One dataset per region: ``per_class`` patches of every shipped photo, drawn inside ``(rows, columns)``
    given as fractions of the photo's height and width."""
    generator = torch.Generator().manual_seed(seed)
    splits: list[tuple[list[Tensor], list[int]]] = [([], []) for _ in regions]
    for label, path in enumerate(sorted(shipped_images_dir().glob("*.png"))):
        image = read_image(path)
        height, width = image.shape[-2:]
        for (rows, columns), (xs, ys) in zip(regions, splits, strict=True):
            part = image[:, round(rows.start * height) : round(rows.stop * height),
                         round(columns.start * width) : round(columns.stop * width)]
            xs += _patches(part, per_class, size, generator)
            ys += [label] * per_class
    return [TensorDataset(torch.stack(xs), torch.tensor(ys)) for xs, ys in splits]


def photo_patches(per_class: int = 100, size: int = 32, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """A 10-class colour task from real photos: which of the ten shipped photos a size x size patch comes from.
    Training patches come from the left half of each photo, test patches from the right half."""
    train, test = photo_regions([(slice(0, 1), slice(0, 0.5)), (slice(0, 1), slice(0.5, 1))], per_class, size, seed)
    return train, test


def task_splits(task: str, seed: int = 0, per_class: int = 100) -> Splits:
    """Train, validation and test splits of a shipped task, ``per_class`` images of each of the 10 classes in
    train and validation; disjoint, and the validation split is carved from the training data, never the test.

    - ``"mnist"``: 1,000 / 1,000 / 3,000 digits at ``per_class=100`` (the remaining digits are the test split).
    - ``"photos"``: which shipped photo a 32x32 patch comes from; train patches from the top three quarters of
      each photo's left half, validation from the bottom quarter of it, test (``per_class`` too) from the right
      half, so no two splits share a pixel.

    >>> splits = task_splits("photos", per_class=2)
    >>> [len(s) for s in splits]
    [20, 20, 20]
    """
    if task == "mnist":
        images, labels = mnist_arrays()
        if not 1 <= per_class <= 200:
            raise DiffAugError(f"per_class must be in [1, 200] for mnist (500 digits a class are shipped); got {per_class}")
        train, validation, test = balanced_subsets(labels, [per_class, per_class], seed)
        return Splits(*(_mnist_dataset(images, labels, index) for index in (train, validation, np.sort(test))))
    if task == "photos":
        if not isinstance(per_class, int) or per_class < 1:
            raise DiffAugError(f"per_class must be a positive int; got {per_class!r}")
        regions = [(slice(0, 0.75), slice(0, 0.5)), (slice(0.75, 1), slice(0, 0.5)), (slice(0, 1), slice(0.5, 1))]
        return Splits(*photo_regions(regions, per_class, 32, seed))
    raise DiffAugError(f"task must be 'mnist' or 'photos'; got {task!r}")


def random_crop_flip(images: Tensor, generator: torch.Generator | None = None, *, padding: int = 4,
                     flip: bool = True, fill: float = 0.0) -> Tensor:
    """The standard augmentation of image classification, batched on the images' device: every image is padded
    by ``padding`` pixels of ``fill`` on each side and cropped back to its size at a random offset (torchvision's
    ``RandomCrop(size, padding)``), then mirrored left-right with probability 1/2 if ``flip``.

    One gather for the whole batch, no Python loop over images. Random numbers come from ``generator`` (on the
    CPU or the images' device), so a run is reproducible from its seed. The signature is the one the
    Distiller's ``standard_augment`` expects: ``Distiller(..., standard_augment=random_crop_flip)``; for other
    settings, ``functools.partial(random_crop_flip, flip=False)``.

    Shape: (B, C, H, W) -> (B, C, H, W).

    >>> x = torch.arange(16.0).view(1, 1, 4, 4)
    >>> random_crop_flip(x, padding=0, flip=False).equal(x)
    True
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = f"shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise DiffAugError(f"images must be a (B, C, H, W) tensor; got {got}")
    if not isinstance(padding, int) or padding < 0:
        raise DiffAugError(f"padding must be a non-negative int; got {padding!r}")
    batch, channels, height, width = images.shape
    draw_on = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(2 * padding + 1, (batch, 2), generator=generator, device=draw_on).to(images.device)
    mirrored = torch.rand(batch, generator=generator, device=draw_on).to(images.device) < 0.5
    padded = F.pad(images, (padding,) * 4, value=fill)
    rows = offsets[:, :1] + torch.arange(height, device=images.device)  # (B, H)
    columns = torch.arange(width, device=images.device).expand(batch, width)
    if flip:
        columns = torch.where(mirrored[:, None], columns.flip(1), columns)
    columns = offsets[:, 1:] + columns  # (B, W)
    index = (rows[:, :, None] * (width + 2 * padding) + columns[:, None, :]).view(batch, 1, -1)
    out = padded.flatten(2).gather(2, index.expand(batch, channels, -1))
    return out.view(batch, channels, height, width)


# The only globals the official CIFAR python batches hold: numpy's array and dtype reconstructors (protocol 2, as
# the archives are written; _frombuffer for protocol 5 copies, numpy._core for files written by numpy 2), and the
# latin-1 encoder by which Python 3 writes bytes at protocol 2. Each is a pure constructor.
_CIFAR_GLOBALS = frozenset({
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
})


class _CifarUnpickler(pickle.Unpickler):
    """Admits the dict, list, bytes, str and int pieces of a CIFAR batch and numpy arrays; refuses any other global
    when the pickle names it, which is before anything it would call can run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise DiffAugError(f"a CIFAR batch holds only numpy arrays, dicts, lists, bytes, str and int; this file asks "
                           f"for {module}.{name}, refused without running it (is it the official CIFAR file?)")


def read_cifar_batch(path: str | Path) -> dict[bytes, Any]:
    """One CIFAR python batch, read with the restricted unpickler and checked: a dict with ``b"data"`` (N, 3072)
    uint8 and integer labels (``b"labels"`` or ``b"fine_labels"``) of length N."""
    with open(path, "rb") as handle:
        try:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
        except DiffAugError:
            raise
        except Exception as error:
            raise DiffAugError(f"{path} is not a CIFAR python batch: {error}") from None
    expected = f"{path} must hold a dict with b'data' (N, 3072) uint8 and N integer labels"
    if not isinstance(batch, dict) or not isinstance(batch.get(b"data"), np.ndarray):
        raise DiffAugError(f"{expected}; got {type(batch).__name__}")
    data = batch[b"data"]
    labels = batch.get(b"labels", batch.get(b"fine_labels"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or not isinstance(labels, list) \
            or len(labels) != len(data) or not all(isinstance(v, int) for v in labels):
        raise DiffAugError(f"{expected}; got data {data.dtype} {data.shape} and labels of type {type(labels).__name__}")
    return batch


def cifar(folder: str | Path) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) from the CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``)
    python-pickle files in ``folder``, as the official archives unpack them. Images (3, 32, 32) in [0, 1].
    The files are read with a restricted unpickler (``read_cifar_batch``): a crafted file cannot run code."""
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
            batch = read_cifar_batch(file)
            xs.append(batch[b"data"].reshape(-1, 3, 32, 32))
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


def channel_statistics(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of an (N, C, H, W) image tensor: a dataset's normalisation."""
    flat = images.transpose(0, 1).flatten(1).double()
    return flat.mean(1).tolist(), flat.std(1).tolist()


# The normalisation torchvision's ImageNet checkpoints expect (and the usual one for any ImageNet-style folder).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolder(Dataset):
    """An image-classification folder with one subfolder per class (ImageNet's layout), decoded with PIL when an
    item is read, so in the DataLoader's workers.

    Training (``train=True``): a random-resized crop (area 8-100 % of the image, aspect ratio 3/4-4/3, ten tries,
    else the largest centre crop of admissible ratio) resized to ``size`` and a horizontal flip with probability
    1/2, drawn from torch's global RNG, which the DataLoader seeds per worker from its generator. Evaluation: the
    shorter side resized to ``size / 0.875`` (256 for 224) and the centre ``size`` crop. Items are ``(image,
    label)`` with the image a float (3, size, size) tensor in [0, 1]; labels index ``classes``, the sorted
    subfolder names (pass the training set's ``classes`` to a validation set so that both agree).
    """

    def __init__(self, root: str | Path, train: bool, size: int = 224, classes: list[str] | None = None):
        self.root, self.train, self.size = Path(root), train, size
        if not self.root.is_dir():
            raise DiffAugError(f"an image folder must be a directory with one subfolder per class; got {str(root)!r}")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.classes = found if classes is None else list(classes)
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise DiffAugError(f"{root} has classes the training folder lacks: {unknown[:5]}")
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples = [(path, index[name]) for name in found for path in sorted((self.root / name).iterdir())
                        if path.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise DiffAugError(f"{root} must hold images ({', '.join(sorted(IMAGE_SUFFIXES))}) in one subfolder per "
                               f"class; found {len(found)} subfolders and no image")

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this folder's data: a hash of every image's path (relative to the root), size and
        label, and the classes. Cheap (no image is read); a changed, added or removed file changes it."""
        digest = hashlib.sha256()
        for path, label in self.samples:
            digest.update(f"{path.relative_to(self.root)}\0{path.stat().st_size}\0{label}\n".encode())
        return {"images": len(self.samples), "classes": len(self.classes), "sha256": digest.hexdigest(),
                "train": self.train, "size": self.size}

    def _crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        area = width * height
        for _ in range(10):
            target = area * float(torch.empty(()).uniform_(0.08, 1.0))
            ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3))))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(width - w + 1, ()))
                top = int(torch.randint(height - h + 1, ()))
                return left, top, left + w, top + h
        ratio = min(max(width / height, 3 / 4), 4 / 3)  # the fallback: the largest centre crop of admissible ratio
        w, h = (width, round(width / ratio)) if width / height < ratio else (round(height * ratio), height)
        return (width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        path, label = self.samples[item]
        image = open_rgb(path)
        width, height = image.size
        if self.train:
            image = image.resize((self.size, self.size), Image.BILINEAR, box=self._crop_box(width, height))
            if float(torch.rand(())) < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            scale = round(self.size / 0.875) / min(width, height)
            w, h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
            left, top = (w - self.size) // 2, (h - self.size) // 2
            image = image.resize((w, h), Image.BILINEAR).crop((left, top, left + self.size, top + self.size))
        array = np.asarray(image, dtype=np.uint8).copy()
        return torch.from_numpy(array).permute(2, 0, 1).float().div(255), label


def standard_augment(data: str) -> Callable[[Tensor, torch.Generator], Tensor]:
    """The paper's baseline augmentation for every model of a shipped dataset (``"mnist"``, ``"photos"``,
    ``"cifar"``): a 4-px padded random crop, and a flip except on digits."""
    return functools.partial(random_crop_flip, padding=4, flip=data != "mnist")


def data_identity(loader: Any) -> dict[str, Any] | None:
    """What identifies the data a loader (or a dataset) yields, as plain JSON, or None where it cannot be known:
    a dataset's own ``fingerprint()`` (``ImageFolder``), a hash of a ``TensorDataset``'s tensors, else its class
    and length. Checkpoints and the command's teacher cache record it, so that a run is not resumed, nor a cached
    teacher reused, on other data."""
    dataset = getattr(loader, "dataset", loader)
    if hasattr(dataset, "fingerprint") and callable(dataset.fingerprint):
        return dataset.fingerprint()
    if isinstance(dataset, TensorDataset):
        digest = hashlib.sha256()
        for tensor in dataset.tensors:
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return {"class": "TensorDataset", "length": len(dataset), "sha256": digest.hexdigest()}
    try:
        return {"class": type(dataset).__name__, "length": len(dataset)}
    except TypeError:
        return None
