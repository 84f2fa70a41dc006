"""Run TST: ``python -m diffaug.distill --data mnist|photos|cifar|folder [--teacher NAME --student NAME] ...``

The paper's recipe in one command, in one process or under ``torchrun --nproc_per_node N`` (DDP: gloo on CPU, nccl
on CUDA). It trains the teacher with its data's recipe unless ``--teacher-checkpoint`` is given (cached in
--cache-dir, keyed by the data's identity, the recipe, the model, the seed and the steps), then distils the student
with the searched policy, showing progress for both, saving a checkpoint every epoch and the history as JSON, and
at the end the student's test metric and the learned policy. Images are normalised on the training device with the
dataset's statistics after the standard crop and flip; the augmenter is told the normalisation.

Recipes (each default can be overridden):
  cifar   CIFAR-10/100 python batches in --cifar-dir; 240 epochs, batch 128, SGD nesterov lr 0.1 (0.05 for
          wrn_40_2 -> wrn_40_1 and -> shufflev1, 0.02 for resnet32x4 -> shufflev1), weight decay 1e-4, x0.1 at
          150/180/210; padded crop + flip; teacher (CRD's): 240 epochs, batch 64, lr 0.05 (0.01 for mobilenetv2 and
          the shufflenets), weight decay 5e-4, same steps. Default pair wrn_40_2 -> wrn_16_2.
  folder  --data-dir with train/ and val/, one subfolder per class (ImageNet's layout), decoded with PIL in
          DataLoader workers; random-resized crop + flip (train), resize + centre crop (evaluation), ImageNet's
          normalisation; 100 epochs, batch 256, lr 0.1, weight decay 1e-4, x0.1 at 30/60/90 (DIST's), teacher the
          same. Default pair resnet34 -> resnet18 (a torchvision checkpoint loads with --teacher-checkpoint).
          A folder with fewer training images than a batch trains on smaller batches (said once).
  mnist, photos  the shipped data; 8 epochs, batch 64, lr 0.05; teacher 15 epochs, cosine. Default pair: the
          small example CNNs ("small"; zoo models need 3 channels, so photos only).

Exit status: 0 done; 2 a bad flag, or flags that do not fit the data or files they name (nothing was trained);
1 a failure while training (the last checkpoint is intact); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import DiffAugError
from ..policy import PolicyAugmenter
from . import parallel
from .data import standard_augment
from .loop import Distiller, check_record, resumable_keywords
from .models import MODELS
from .objective import KD_LOSSES
from .recipes import PAIR_LR, RECIPES, Recipe, build_pair, cached_teacher, fitting_batch, load_data
from .settings import Run, Search, Settings, StageThree
from .trainer import read_checkpoint


# -- flags -------------------------------------------------------------------------------------------------------

# Flags that must be positive (the rest of the numbers must be >= 0); NaN and inf are never valid.
POSITIVE = ("epochs", "teacher_epochs", "batch_size", "train_size", "image_size", "lr", "search_steps", "search_lr")
AT_LEAST_ZERO = ("workers", "seed")


def check_flags(args: argparse.Namespace) -> str | None:
    """The first flag whose value makes no sense, as an error message; None if all do. A value given is never
    replaced by a default."""
    for name in (*POSITIVE, *AT_LEAST_ZERO):
        value = getattr(args, name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            return f"{flag} must be a finite number; got {value}"
        if name in POSITIVE and value <= 0:
            return f"{flag} must be positive; got {value}"
        if value < 0:
            return f"{flag} must be >= 0; got {value}"
    return None


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N; got {text!r}")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffaug.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=tuple(RECIPES), default="mnist", help="default: %(default)s")
    p.add_argument("--cifar-dir", default=None, help="folder with the CIFAR-10/100 python batches (--data cifar)")
    p.add_argument("--data-dir", default=None, help="folder with train/ and val/ image folders (--data folder)")
    p.add_argument("--image-size", type=int, default=224,
                   help="crop size for --data folder (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: 8 for --data folder, 0 otherwise)")
    p.add_argument("--train-size", type=int, default=1000,
                   help="training images of mnist, photos (default: %(default)s)")
    names = ["small", *MODELS]
    p.add_argument("--teacher", choices=names, default=None, metavar="NAME",
                   help=f"one of {', '.join(names)} (default: the data's pair, see above)")
    p.add_argument("--student", choices=names, default=None, metavar="NAME", help="as --teacher")
    p.add_argument("--teacher-checkpoint", default=None,
                   help="teacher weights (a state_dict, or one under 'model'/'state_dict'), loaded strictly; "
                        "default: train the teacher with the recipe and cache it")
    p.add_argument("--kd", choices=tuple(KD_LOSSES), default="kd",
                   help="Stage III's distillation term next to CE (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the recipe's)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch of originals, split over the ranks (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None, help="Stage III learning rate (default: the recipe's)")
    p.add_argument("--search-steps", type=int, default=None,
                   help="Stage II steps per search block (default: one pass over the training data; the paper's "
                        "shortest ablation searched 391, its configs about 30 passes)")
    p.add_argument("--search-lr", type=float, default=Search.lr, help="Stage II learning rate (default: %(default)s)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda; under torchrun each rank takes "
                   "cuda:LOCAL_RANK (default: %(default)s)")
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
    """Fill the options left unset from the data's recipe (a flag given is never replaced); returns the recipe."""
    recipe = RECIPES[args.data]
    defaults = {"teacher": recipe.teacher[0], "student": recipe.teacher[1], "epochs": recipe.epochs,
                "teacher_epochs": recipe.teacher_epochs, "batch_size": recipe.batch_size,
                "workers": 8 if args.data == "folder" else 0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lr is None:
        args.lr = PAIR_LR.get((args.teacher, args.student), recipe.lr)
    if args.data == "folder" and args.data_dir is None:
        raise DiffAugError("--data folder needs --data-dir, a folder with train/ and val/ (one subfolder per class "
                           "in each); got none")
    if args.data == "cifar" and args.cifar_dir is None:
        raise DiffAugError("--data cifar needs --cifar-dir, a folder with the CIFAR python batches; got none")
    if "small" in (args.teacher, args.student) and (args.teacher, args.student) != ("small", "small"):
        raise DiffAugError(f"'small' is the example pair (a 4-layer CNN teacher, a 2-layer student): give it as "
                           f"both --teacher and --student; got {args.teacher} -> {args.student}")
    return recipe


def settings(args: argparse.Namespace, recipe: Recipe, mean: list[float], std: list[float]) -> Settings:
    """The Distiller's settings from the flags and the recipe."""
    return Settings(
        StageThree(lr=args.lr, weight_decay=recipe.weight_decay, milestone_fractions=recipe.milestones, kd=args.kd),
        Search(steps=args.search_steps, lr=args.search_lr),
        Run(seed=args.seed, mean=tuple(mean), std=tuple(std), device=args.device, amp=args.amp,
            channels_last=args.channels_last),
    )


def read_teacher(path: str, model: nn.Module) -> None:
    """Load a teacher's weights strictly: a state_dict, or a dict holding one under "model" or "state_dict"."""
    state = read_checkpoint(path, what="--teacher-checkpoint")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        reason = str(error).split("\n")[0]
        raise DiffAugError(f"--teacher-checkpoint {path} does not fit --teacher {type(model).__name__}: {reason}") \
            from None


# -- the run -----------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict | None:
    """Resolve the recipe, check everything that can be checked, train (the teacher if it is not cached, then the
    student) and write the history; returns the report on rank 0, None on the others."""
    recipe = resolve(args)
    args.device = parallel.join_from_environment(args.device)
    Run(device=args.device, amp=args.amp)  # CUDA and AMP are checked before any work
    data = load_data(args.data, data_dir=args.data_dir, cifar_dir=args.cifar_dir, image_size=args.image_size,
                     train_size=args.train_size, seed=args.seed)
    plan = settings(args, recipe, data.mean, data.std)
    out = Path(args.out)
    checkpoint = out / "checkpoint.pt"
    resume = args.resume and checkpoint.is_file()
    if resume:  # the settings first, before a teacher is trained for a run that cannot continue
        check_record(read_checkpoint(checkpoint), {"settings": resumable_keywords(plan)})
    teacher, student = build_pair(data, args.teacher, args.student, args.seed)
    if args.teacher_checkpoint is not None:
        read_teacher(args.teacher_checkpoint, teacher)
    else:
        teacher = cached_teacher(teacher, args.teacher, args.data, data, epochs=args.teacher_epochs, seed=args.seed,
                                 device=args.device, workers=args.workers, cache_dir=args.cache_dir,
                                 on_train=lambda: setattr(args, "training", True))
        args.training = False
    augment = None if args.data == "folder" else standard_augment(args.data)
    distiller = Distiller.from_settings(teacher.eval(), student, PolicyAugmenter(mean=data.mean, std=data.std), plan,
                                        standard_augment=augment)
    if resume:
        distiller.load(checkpoint)
    world, drop_last = parallel.world(), args.data == "folder"
    batch = fitting_batch(args.batch_size, data.train, "batch", drop_last, world) // world
    workers = {"num_workers": args.workers, "persistent_workers": args.workers > 0, "pin_memory": "cuda" in args.device}
    loader = parallel.train_loader(data.train, batch, args.seed, drop_last, **workers)
    # Every rank evaluates the whole test set: the summed statistics give the exact metric.
    test_loader = DataLoader(data.test, batch_size=256, **workers)
    args.training = True
    history = distiller.fit(loader, args.epochs, test_loader, checkpoint=checkpoint)
    if parallel.rank() != 0:
        return None
    distiller.save_history(out / "history.json")
    final = history["epochs"][-1]
    return {"teacher": args.teacher, "student": args.student, "kd": args.kd,
            "val_accuracy": final.get("val_accuracy"), "policy": final["policy"]}


def one_line(error: DiffAugError) -> str:
    """The error's own message: a DataLoader worker's error reaches the main process with the worker's traceback
    prepended ("Caught DiffAugError in DataLoader worker process 0. Original Traceback ..."); its last line is the
    message."""
    message = str(error).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return message


def main(argv: list[str] | None = None) -> int:
    """The command: 0 done, 2 bad flags or inputs (nothing trained), 1 failed while training, 130 interrupted."""
    flags = parser()
    try:
        args = flags.parse_args(argv)
        problem = check_flags(args)
        if problem is not None:
            flags.error(problem)
    except SystemExit as exit:  # argparse has printed its usage line and the error (or the help)
        return int(exit.code or 0)
    args.training = False
    try:
        report = run(args)
    except KeyboardInterrupt:
        print("diffaug.distill: interrupted; the last checkpoint (if any) is intact", file=sys.stderr)
        return 130
    except DiffAugError as error:
        print(f"diffaug.distill: error: {one_line(error)}", file=sys.stderr)
        return 1 if args.training else 2
    finally:
        parallel.destroy()
    if report is not None:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parallel.end_distributed_process(status)  # a torchrun worker: no interpreter finalisation (see its docstring)
    sys.exit(status)
