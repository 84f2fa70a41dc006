"""The paper's recipes per dataset, as ``python -m diffaug.distill`` runs them: the defaults of each ``--data``,
its data and model pair, batches that the data can fill, and the recipe's teacher, trained by the trainer and cached
under a key of everything that determines it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import DiffAugError
from ..files import write_atomic
from . import parallel
from .data import (IMAGENET_MEAN, IMAGENET_STD, ImageFolder, channel_statistics, cifar, data_identity, mnist5k,
                   photo_patches, small_models, standard_augment)
from .models import build_model
from .settings import PAPER_MILESTONES, default_milestones
from .trainer import read_checkpoint, train_teacher

__all__ = ["LIGHT_MODELS", "PAIR_LR", "RECIPES", "Data", "Recipe", "build_pair", "cached_teacher", "fitting_batch",
           "load_data"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A data's defaults: the student's (Stage III) and the teacher's training, milestones as fractions of the
    epochs (None: a cosine schedule)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    milestones: tuple[float, ...]
    teacher: tuple[str, str]
    teacher_epochs: int
    teacher_batch_size: int
    teacher_lr: float
    teacher_weight_decay: float
    teacher_milestones: tuple[float, ...] | None


RECIPES = {
    "cifar": Recipe(240, 128, 0.1, 1e-4, PAPER_MILESTONES, ("wrn_40_2", "wrn_16_2"), 240, 64, 0.05, 5e-4,
                    PAPER_MILESTONES),
    "folder": Recipe(100, 256, 0.1, 1e-4, (0.3, 0.6, 0.9), ("resnet34", "resnet18"), 100, 256, 0.1, 1e-4,
                     (0.3, 0.6, 0.9)),
    "mnist": Recipe(8, 64, 0.05, 1e-4, PAPER_MILESTONES, ("small", "small"), 15, 64, 0.05, 5e-4, None),
    "photos": Recipe(8, 64, 0.05, 1e-4, PAPER_MILESTONES, ("small", "small"), 15, 64, 0.05, 5e-4, None),
}
# Stage III learning rates of the paper's CIFAR pairs that differ from 0.1 (DESIGN.md, section 5).
PAIR_LR = {("wrn_40_2", "wrn_40_1"): 0.05, ("wrn_40_2", "shufflev1"): 0.05, ("resnet32x4", "shufflev1"): 0.02}
# CRD trains these at lr 0.01 (too deep a drop at 0.05 for depthwise convolutions).
LIGHT_MODELS = ("mobilenetv2", "shufflev1", "shufflev2")
TEACHER_CACHE_FORMAT = 1


class Data(NamedTuple):
    """A recipe's data: the splits, the images' channels, the number of classes and the normalisation."""

    train: Dataset
    test: Dataset
    channels: int
    classes: int
    mean: list[float]
    std: list[float]


def load_data(data: str, *, data_dir: str | None = None, cifar_dir: str | None = None, image_size: int = 224,
              train_size: int = 1000, seed: int = 0) -> Data:
    """The data of a recipe: an image folder (``data_dir`` with train/ and val/), CIFAR (``cifar_dir``), or the
    shipped MNIST digits or photo patches (``train_size`` training images)."""
    if data == "folder":
        train = ImageFolder(Path(data_dir) / "train", train=True, size=image_size)
        test = ImageFolder(Path(data_dir) / "val", train=False, size=image_size, classes=train.classes)
        return Data(train, test, 3, len(train.classes), list(IMAGENET_MEAN), list(IMAGENET_STD))
    if data == "mnist":
        train, test = mnist5k(train_size, seed=seed)
        classes = 10
    elif data == "photos":
        train, test = photo_patches(per_class=train_size // 10, seed=seed)
        classes = 10
    elif data == "cifar":
        train, test = cifar(cifar_dir)
        # The layout names the dataset (as cifar() reads it); the largest label might be missing from the files.
        classes = 10 if (Path(cifar_dir) / "data_batch_1").is_file() else 100
    else:
        raise DiffAugError(f"data must be one of {list(RECIPES)}; got {data!r}")
    images = train.tensors[0]
    return Data(train, test, images.shape[1], classes, *channel_statistics(images))


def build_pair(data: Data, teacher: str, student: str, seed: int) -> tuple[nn.Module, nn.Module]:
    """The teacher and student named (``"small"`` for both: the example CNNs), seeded by ``seed``."""
    if "small" in (teacher, student):
        if (teacher, student) != ("small", "small"):
            raise DiffAugError(f"'small' is the example pair (a 4-layer CNN teacher, a 2-layer student): give it as "
                               f"both --teacher and --student; got {teacher} -> {student}")
        return small_models(data.channels, data.classes, seed=seed)
    if data.channels != 3:
        raise DiffAugError(f"the zoo's models take RGB images; this data has {data.channels} channel(s) "
                           "(use --teacher small --student small, or --data photos)")
    torch.manual_seed(seed)
    return build_model(teacher, data.classes), build_model(student, data.classes)


def fitting_batch(requested: int, dataset: Dataset, what: str, drop_last: bool, world: int) -> int:
    """``requested`` (a global batch over ``world`` ranks), or the largest that the training images fill when they
    are fewer (said once): a batch larger than the data would train for no step at all with ``drop_last``."""
    if requested % world:
        raise DiffAugError(f"--batch-size ({requested}) must divide among the {world} ranks")
    if not drop_last or requested <= len(dataset):
        return requested
    fitting = len(dataset) // world * world
    if fitting == 0:
        raise DiffAugError(f"the training data has {len(dataset)} images, fewer than the {world} ranks: a batch "
                           "needs at least one image a rank")
    if parallel.rank() == 0:
        print(f"the training data has {len(dataset)} images, fewer than the {what} of {requested}: "
              f"training on batches of {fitting}", file=sys.stderr)
    return fitting


def cached_teacher(model: nn.Module, name: str, data_name: str, data: Data, *, epochs: int, seed: int,
                   device: str, workers: int, cache_dir: str | Path,
                   on_train: Callable[[], None] | None = None) -> nn.Module:
    """``model`` (the teacher ``name``) trained with ``data_name``'s recipe for ``epochs``, by rank 0 with the
    library's trainer (and its progress), and cached in ``cache_dir`` under a key of everything that determines it:
    the data's identity, the recipe, the model, the seed and the steps. The other ranks wait and load it. A cache
    file that cannot be read, or that was written for another teacher, is refused. ``on_train`` is called when
    the teacher is about to be trained (the command's exit status tells a failure while training apart)."""
    recipe = RECIPES[data_name]
    drop_last = data_name == "folder"
    batch = fitting_batch(recipe.teacher_batch_size, data.train, "teacher's batch", drop_last, 1)
    lr = recipe.teacher_lr if name not in LIGHT_MODELS else 0.01
    steps = len(data.train) // batch if drop_last else math.ceil(len(data.train) / batch)
    record = json.dumps({
        "format": TEACHER_CACHE_FORMAT, "data": data_name, "identity": data_identity(data.train), "model": name,
        "channels": data.channels, "classes": data.classes, "seed": seed, "epochs": epochs, "batch_size": batch,
        "steps_per_epoch": steps, "lr": lr, "weight_decay": recipe.teacher_weight_decay,
        "milestones": recipe.teacher_milestones, "augment": "none" if drop_last else "crop-flip",
        "mean": data.mean, "std": data.std}, sort_keys=True)
    key = hashlib.sha256(record.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"teacher-{data_name}-{name}-{key}.pt"
    if not path.is_file() and parallel.rank() == 0:
        loader = DataLoader(data.train, batch_size=batch, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(seed), drop_last=drop_last)
        milestones = None if recipe.teacher_milestones is None else \
            default_milestones(epochs, recipe.teacher_milestones)
        augment = None if drop_last else standard_augment(data_name)
        if on_train is not None:
            on_train()
        train_teacher(model, loader, epochs, device, augment, seed=seed, lr=lr, weight_decay=recipe.teacher_weight_decay,
                      milestones=milestones, mean=data.mean, std=data.std, progress=True)
        state = {"record": record, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}
        write_atomic(path, lambda temporary: torch.save(state, temporary))
        print(f"teacher trained and cached in {path}", file=sys.stderr)
    parallel.barrier()
    try:
        cached = read_checkpoint(path, what="teacher cache")
    except DiffAugError as error:
        raise DiffAugError(f"{error}; delete it to train the teacher again") from None
    if not (isinstance(cached, dict) and cached.get("record") == record and isinstance(cached.get("state_dict"), dict)):
        raise DiffAugError(f"teacher cache {path} was not written for this teacher (data, recipe, model, seed and "
                           "steps); delete it to train the teacher again")
    try:
        model.load_state_dict(cached["state_dict"])
    except RuntimeError as error:
        raise DiffAugError(f"teacher cache {path} does not fit the teacher {name} ({str(error).splitlines()[0]}); "
                           "delete it to train the teacher again") from None
    if parallel.rank() == 0:
        print(f"teacher from {path}", file=sys.stderr)
    return model.cpu().eval()
