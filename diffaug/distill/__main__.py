"""Run TST: ``python -m diffaug.distill --data mnist|photos|cifar|folder [--teacher NAME --student NAME] ...``

The paper's recipe in one command, in one process or under ``torchrun --nproc_per_node N`` (DDP: gloo on CPU, nccl
on CUDA). It trains the teacher with its data's recipe unless ``--teacher-checkpoint`` is given (cached in
--cache-dir, keyed by data, model, size, epochs and seed), then distils the student with the searched policy,
printing progress per epoch, saving a checkpoint every epoch and the history as JSON, and at the end the student's
test metric and the learned policy. Images are normalised on the training device with the dataset's statistics
after the standard crop and flip; the augmenter is told the normalisation.

Recipes (each default can be overridden):
  cifar   CIFAR-10/100 python batches in --cifar-dir; 240 epochs, batch 128, SGD nesterov lr 0.1 (0.05 for
          wrn_40_2 -> wrn_40_1 and -> shufflev1, 0.02 for resnet32x4 -> shufflev1), weight decay 1e-4, x0.1 at
          150/180/210; padded crop + flip; teacher (CRD's): 240 epochs, batch 64, lr 0.05 (0.01 for mobilenetv2 and
          the shufflenets), weight decay 5e-4, same steps. Default pair wrn_40_2 -> wrn_16_2.
  folder  --data-dir with train/ and val/, one subfolder per class (ImageNet's layout), decoded with PIL in
          DataLoader workers; random-resized crop + flip (train), resize + centre crop (evaluation), ImageNet's
          normalisation; 100 epochs, batch 256, lr 0.1, weight decay 1e-4, x0.1 at 30/60/90 (DIST's), teacher the
          same. Default pair resnet34 -> resnet18 (a torchvision checkpoint loads with --teacher-checkpoint).
  mnist, photos  the shipped data; 8 epochs, batch 64, lr 0.05; teacher 15 epochs, cosine. Default pair: the
          small example CNNs ("small"; zoo models need 3 channels, so photos only).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import DiffAugError
from ..files import write_atomic
from ..policy import PolicyAugmenter
from .data import (IMAGENET_MEAN, IMAGENET_STD, ImageFolder, channel_statistics, cifar, mnist5k, photo_patches,
                   random_crop_flip, small_models)
from .loop import PAPER_MILESTONES, Distiller, default_milestones, end_distributed_process
from .models import MODELS, build_model


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


def train_teacher(model: torch.nn.Module, loader: DataLoader, epochs: int, device: str,
                  standard_augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                  seed: int = 0, lr: float = 0.05, weight_decay: float = 5e-4,
                  milestones: Sequence[int] | None = None) -> torch.nn.Module:
    """Plain supervised training (SGD nesterov, momentum 0.9): a cosine schedule over all steps, or with
    ``milestones`` the learning rate x0.1 at those epochs. ``standard_augment`` (e.g. ``random_crop_flip``) is
    applied to every batch on the device with a generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    if milestones is None:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * len(loader))
    else:
        steps = [m * len(loader) for m in milestones]
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, steps, gamma=0.1)
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


def normalised(augment: Callable[[Tensor, torch.Generator], Tensor] | None, mean: Sequence[float],
               std: Sequence[float]) -> Callable[[Tensor, torch.Generator], Tensor]:
    """``augment`` (if any) and then the normalisation, on the images' device: the teacher's training input."""
    def apply(images: Tensor, generator: torch.Generator) -> Tensor:
        if augment is not None:
            images = augment(images, generator)
        view = (1, -1, 1, 1)
        return (images - images.new_tensor(mean).view(view)) / images.new_tensor(std).view(view)
    return apply


def load_data(args: argparse.Namespace) -> tuple[Dataset, Dataset, int, int, tuple[list[float], list[float]]]:
    """(train, test, channels, classes, (mean, std)) of ``--data``."""
    if args.data == "folder":
        if args.data_dir is None:
            raise DiffAugError("--data folder needs --data-dir, a folder with train/ and val/ (one subfolder per "
                               "class in each); got none")
        train = ImageFolder(Path(args.data_dir) / "train", train=True, size=args.image_size)
        test = ImageFolder(Path(args.data_dir) / "val", train=False, size=args.image_size, classes=train.classes)
        return train, test, 3, len(train.classes), (list(IMAGENET_MEAN), list(IMAGENET_STD))
    if args.data == "mnist":
        train, test = mnist5k(args.train_size, seed=args.seed)
        classes = 10
    elif args.data == "photos":
        train, test = photo_patches(per_class=args.train_size // 10, seed=args.seed)
        classes = 10
    else:
        if args.cifar_dir is None:
            raise DiffAugError("--data cifar needs --cifar-dir, a folder with the CIFAR python batches; got none")
        train, test = cifar(args.cifar_dir)
        # The layout names the dataset (as cifar() reads it); the largest label might be missing from the files.
        classes = 10 if (Path(args.cifar_dir) / "data_batch_1").is_file() else 100
    images = train.tensors[0]
    return train, test, images.shape[1], classes, channel_statistics(images)


def build_pair(args: argparse.Namespace, channels: int, classes: int) -> tuple[nn.Module, nn.Module]:
    if "small" in (args.teacher, args.student):
        if (args.teacher, args.student) != ("small", "small"):
            raise DiffAugError(f"'small' is the example pair (a 4-layer CNN teacher, a 2-layer student): give it as "
                               f"both --teacher and --student; got {args.teacher} -> {args.student}")
        return small_models(channels, classes, seed=args.seed)
    if channels != 3:
        raise DiffAugError(f"the zoo's models take RGB images; --data {args.data} has {channels} channel(s) "
                           "(use --teacher small --student small, or --data photos)")
    torch.manual_seed(args.seed)
    return build_model(args.teacher, classes), build_model(args.student, classes)


def read_checkpoint(path: str, model: nn.Module) -> None:
    """Load a teacher's weights strictly: a state_dict, or a dict holding one under "model" or "state_dict"."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise DiffAugError(f"--teacher-checkpoint {path} could not be read as a weights-only checkpoint: {error}") \
            from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise DiffAugError(f"--teacher-checkpoint {path} does not fit --teacher {type(model).__name__}: {error}") \
            from None


def prepare_teacher(args: argparse.Namespace, teacher: nn.Module, train: Dataset, recipe: Recipe,
                    normalisation: tuple[list[float], list[float]]) -> nn.Module:
    """The teacher from ``--teacher-checkpoint``, or from the cache, or trained by rank 0 with the recipe and cached
    (the other ranks wait and load it)."""
    if args.teacher_checkpoint is not None:
        read_checkpoint(args.teacher_checkpoint, teacher)
        return teacher.eval()
    size = args.train_size if args.data in ("mnist", "photos") else len(train)
    path = Path(args.cache_dir) / (f"teacher-{args.data}-{args.teacher}-{size}-seed{args.seed}-"
                                   f"e{args.teacher_epochs}-cropflip-normalised.pt")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not path.is_file() and rank == 0:
        loader = DataLoader(train, batch_size=recipe.teacher_batch_size, shuffle=True, num_workers=args.workers,
                            generator=torch.Generator().manual_seed(args.seed), drop_last=args.data == "folder")
        lr = recipe.teacher_lr if args.teacher not in LIGHT_MODELS else 0.01
        milestones = None if recipe.teacher_milestones is None else \
            default_milestones(args.teacher_epochs, recipe.teacher_milestones)
        augment = None if args.data == "folder" else standard_augment(args.data)
        train_teacher(teacher, loader, args.teacher_epochs, args.device, normalised(augment, *normalisation),
                      seed=args.seed, lr=lr, weight_decay=recipe.teacher_weight_decay, milestones=milestones)
        state = {k: v.cpu() for k, v in teacher.state_dict().items()}
        write_atomic(path, lambda temporary: torch.save(state, temporary))
        print(f"teacher trained and cached in {path}", file=sys.stderr)
    if dist.is_initialized():
        dist.barrier()
    teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if rank == 0:
        print(f"teacher from {path}", file=sys.stderr)
    return teacher.cpu().eval()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffaug.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=tuple(RECIPES), default="mnist", help="default: %(default)s")
    p.add_argument("--cifar-dir", default=None, help="folder with the CIFAR-10/100 python batches (--data cifar)")
    p.add_argument("--data-dir", default=None, help="folder with train/ and val/ image folders (--data folder)")
    p.add_argument("--image-size", type=int, default=224, help="crop size for --data folder (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: 8 for --data folder, 0 otherwise)")
    p.add_argument("--train-size", type=int, default=1000, help="training images of mnist, photos (default: %(default)s)")
    names = ["small", *MODELS]
    p.add_argument("--teacher", choices=names, default=None, metavar="NAME",
                   help=f"one of {', '.join(names)} (default: the data's pair, see above)")
    p.add_argument("--student", choices=names, default=None, metavar="NAME", help="as --teacher")
    p.add_argument("--teacher-checkpoint", default=None,
                   help="teacher weights (a state_dict, or one under 'model'/'state_dict'), loaded strictly; "
                        "default: train the teacher with the recipe and cache it")
    p.add_argument("--kd", choices=("kd", "dkd", "dist"), default="kd",
                   help="Stage III's distillation term next to CE (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the recipe's)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch of originals, split over the ranks (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None, help="Stage III learning rate (default: the recipe's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda; under torchrun each rank takes cuda:LOCAL_RANK "
                   "(default: %(default)s)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision (default: none)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for the models")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--cache-dir", default="runs", help="where the teacher is cached (default: %(default)s)")
    p.add_argument("--out", default="runs/distill", help="checkpoint and history folder (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out/checkpoint.pt when it exists (else start), so the same command serves "
                        "torchrun --max-restarts")
    return p


def resolve(args: argparse.Namespace) -> Recipe:
    """Fill the options left unset from the data's recipe; returns the recipe."""
    recipe = RECIPES[args.data]
    args.teacher = args.teacher or recipe.teacher[0]
    args.student = args.student or recipe.teacher[1]
    args.epochs = args.epochs or recipe.epochs
    args.teacher_epochs = args.teacher_epochs or recipe.teacher_epochs
    args.batch_size = args.batch_size or recipe.batch_size
    args.lr = args.lr or PAIR_LR.get((args.teacher, args.student), recipe.lr)
    args.workers = args.workers if args.workers is not None else (8 if args.data == "folder" else 0)
    for name in ("epochs", "teacher_epochs", "batch_size", "train_size", "image_size"):
        if getattr(args, name) < 1:
            raise DiffAugError(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    return recipe


def setup_distributed(args: argparse.Namespace) -> int:
    """Join the torchrun job if there is one; returns the world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if args.device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            args.device = f"cuda:{local}"
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.batch_size % world:
        raise DiffAugError(f"--batch-size ({args.batch_size}) must divide among the {world} ranks")
    return world


def run(args: argparse.Namespace) -> dict | None:
    """Resolve the recipe, train (the teacher if it is not cached, then the student) and write the history;
    returns the report on rank 0, None on the others."""
    recipe = resolve(args)
    world = setup_distributed(args)
    train, test, channels, classes, normalisation = load_data(args)
    teacher, student = build_pair(args, channels, classes)
    teacher = prepare_teacher(args, teacher, train, recipe, normalisation)
    mean, std = normalisation
    augmenter = PolicyAugmenter(mean=mean, std=std)
    distiller = Distiller(
        teacher, student, augmenter, kd=args.kd, lr=args.lr, weight_decay=recipe.weight_decay,
        milestones=default_milestones(args.epochs, recipe.milestones),
        standard_augment=None if args.data == "folder" else standard_augment(args.data), mean=mean, std=std,
        device=args.device, amp=args.amp, channels_last=args.channels_last, seed=args.seed)
    out = Path(args.out)
    if args.resume and (out / "checkpoint.pt").is_file():
        distiller.load(out / "checkpoint.pt")
    workers = {"num_workers": args.workers, "persistent_workers": args.workers > 0, "pin_memory": "cuda" in args.device}
    batch = args.batch_size // world
    if world > 1:
        sampler = DistributedSampler(train, shuffle=True, seed=args.seed, drop_last=True)
        loader = DataLoader(train, batch_size=batch, sampler=sampler, drop_last=True, **workers)
    else:
        loader = DataLoader(train, batch_size=batch, shuffle=True, generator=torch.Generator(),
                            drop_last=args.data == "folder", **workers)
    # Every rank evaluates the whole test set: the summed statistics give the exact metric.
    test_loader = DataLoader(test, batch_size=256, **workers)
    history = distiller.fit(loader, args.epochs, test_loader, checkpoint=out / "checkpoint.pt")
    if distiller.rank != 0:
        return None
    distiller.save_history(out / "history.json")
    final = history["epochs"][-1]
    return {"teacher": args.teacher, "student": args.student, "kd": args.kd,
            "val_accuracy": final.get("val_accuracy"), "policy": final["policy"]}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = run(args)
    except DiffAugError as error:
        print(f"diffaug.distill: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if report is not None:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        end_distributed_process(status)  # a torchrun worker: no interpreter finalisation (see its docstring)
    sys.exit(status)
