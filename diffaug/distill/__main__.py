"""Run TST on real data: ``python -m diffaug.distill [--data mnist|photos|cifar --cifar-dir DIR] ...``

Trains a teacher first (cached in --cache-dir, keyed by data, size and seed), then distils a student with the
searched policy, and prints the student's test accuracy and the learned policy.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import DiffAugError
from ..files import write_atomic
from ..policy import PolicyAugmenter
from .data import cifar, mnist5k, photo_patches, random_crop_flip, small_models
from .loop import Distiller


def load_data(args: argparse.Namespace) -> tuple[Dataset, Dataset, int, int]:
    if args.data == "mnist":
        train, test = mnist5k(args.train_size, seed=args.seed)
        return train, test, 1, 10
    if args.data == "photos":
        train, test = photo_patches(per_class=args.train_size // 10, seed=args.seed)
        return train, test, 3, 10
    if args.cifar_dir is None:
        raise DiffAugError("--data cifar needs --cifar-dir, a folder with the CIFAR python batches; got none")
    train, test = cifar(args.cifar_dir)
    return train, test, 3, int(train.tensors[1].max()) + 1


def train_teacher(model: torch.nn.Module, loader: DataLoader, epochs: int, device: str,
                  standard_augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                  seed: int = 0) -> torch.nn.Module:
    """Plain supervised training (SGD, cosine schedule); the teacher of the example. ``standard_augment`` (e.g.
    ``random_crop_flip``) is applied to every batch with a generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * len(loader))
    for _ in range(epochs):
        for x, y in loader:
            x = x.to(device)
            if standard_augment is not None:
                x = standard_augment(x, generator)
            loss = torch.nn.functional.cross_entropy(model(x), y.to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return model.eval()


def standard_augment(data: str) -> Callable[[Tensor, torch.Generator], Tensor]:
    """The paper's baseline augmentation for every model: a 4-px padded random crop, and a flip except on digits."""
    return functools.partial(random_crop_flip, padding=4, flip=data != "mnist")


def cached_teacher(args: argparse.Namespace, teacher: torch.nn.Module, train: Dataset) -> torch.nn.Module:
    path = Path(args.cache_dir) / f"teacher-{args.data}-{args.train_size}-seed{args.seed}-e{args.teacher_epochs}-cropflip.pt"
    if path.is_file():
        teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"teacher loaded from {path}", file=sys.stderr)
        return teacher.eval()
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    train_teacher(teacher, loader, args.teacher_epochs, args.device, standard_augment(args.data), seed=args.seed)
    write_atomic(path, lambda temporary: torch.save(teacher.state_dict(), temporary))
    print(f"teacher trained and cached in {path}", file=sys.stderr)
    return teacher.cpu().eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffaug.distill", description=__doc__)
    parser.add_argument("--data", choices=("mnist", "photos", "cifar"), default="mnist")
    parser.add_argument("--cifar-dir", default=None, help="folder with the CIFAR-10/100 python batches")
    parser.add_argument("--train-size", type=int, default=1000, help="training images (mnist, photos)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="runs", help="where the teacher is cached (default: %(default)s)")
    parser.add_argument("--out", default="runs/distill", help="checkpoint and history folder")
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    args = parser.parse_args(argv)
    try:
        train, test, channels, classes = load_data(args)
        teacher, student = small_models(channels, classes, seed=args.seed)
        teacher = cached_teacher(args, teacher, train)
        augmenter = PolicyAugmenter()
        distiller = Distiller(teacher, student, augmenter, standard_augment=standard_augment(args.data), lr=args.lr,
                              device=args.device, amp=args.amp, seed=args.seed)
        out = Path(args.out)
        if args.resume:
            distiller.load(out / "checkpoint.pt")
        loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator())
        history = distiller.fit(loader, args.epochs, DataLoader(test, batch_size=256), checkpoint=out / "checkpoint.pt")
        distiller.save_history(out / "history.json")
    except DiffAugError as error:
        print(f"diffaug.distill: error: {error}", file=sys.stderr)
        return 2
    final = history["epochs"][-1]
    print(json.dumps({"val_accuracy": final.get("val_accuracy"), "policy": final["policy"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
