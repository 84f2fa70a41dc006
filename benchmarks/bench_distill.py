"""Does the TST search help? Four students at equal epochs on offline real data, mean +- std over seeds.

    python benchmarks/bench_distill.py --data mnist --epochs 15 --seeds 0 1 2
    python benchmarks/bench_distill.py --data photos --epochs 15 --seeds 0 1 2

Arms (same student architecture, optimiser, schedule and epochs; the teacher is trained once per seed):
  student    cross-entropy on x alone, no teacher;
  kd         KD (Eq. 1) on cat([x, x]): the Distiller with an augmenter that never applies and no search, so the
             student sees as many images per step as in the two arms below;
  kd+random  KD on cat([x_hat, x]) with the same 14 ops at the fixed initial policy (p = m = 0.5), no search;
  tst        KD on cat([x_hat, x]) with Stage II searching the policy (the default schedule: 1/8 and 3/8).
Data: "mnist" is few-shot MNIST (1,000 training digits, 4,000 test digits, shipped); "photos" is a 10-class colour
task of 32x32 patches of the ten shipped photos (100 per class from the left halves; tested on the right halves).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from diffaug import PolicyAugmenter
from diffaug.distill import Distiller
from diffaug.distill.__main__ import train_teacher
from diffaug.distill.data import mnist5k, photo_patches, small_models

ARMS = ("student", "kd", "kd+random", "tst")


def accuracy(model: torch.nn.Module, dataset) -> float:
    model.eval()
    x, y = dataset.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run(arm: str, data: str, seed: int, epochs: int, teacher_epochs: int, search_lr: float) -> tuple[float, float]:
    train, test = mnist5k(1000, seed=seed) if data == "mnist" else photo_patches(per_class=100, seed=seed)
    channels = train.tensors[0].shape[1]
    teacher, student = small_models(channels, 10, seed=seed)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    train_teacher(teacher, loader, teacher_epochs, "cpu")
    teacher_accuracy = accuracy(teacher, test)
    if arm == "student":
        optimiser = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
        milestones = [round(epochs * f) for f in (150 / 240, 180 / 240, 210 / 240)]
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones, 0.1)
        torch.manual_seed(seed)
        for _ in range(epochs):
            student.train()
            for x, y in loader:
                optimiser.zero_grad()
                F.cross_entropy(student(x), y).backward()
                optimiser.step()
            schedule.step()
        return accuracy(student, test), teacher_accuracy
    probability = 1e-6 if arm == "kd" else 0.5
    augmenter = PolicyAugmenter(probability=probability)
    searches = None if arm == "tst" else []
    distiller = Distiller(teacher, student, augmenter, lr=0.05, search_epochs=searches, search_lr=search_lr, seed=seed,
                          progress=False)
    distiller.fit(loader, epochs)
    return accuracy(student, test), teacher_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("mnist", "photos"), default="mnist")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--search-lr", type=float, default=0.01,
                        help="Stage II SGD lr (paper: 0.01 over ~390 steps a block; ours has ~16 a block)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict[str, list[float]] = {arm: [] for arm in args.arms}
    teachers = []
    for seed in args.seeds:
        for arm in args.arms:
            start = time.perf_counter()
            acc, teacher_acc = run(arm, args.data, seed, args.epochs, args.teacher_epochs, args.search_lr)
            results[arm].append(acc)
            teachers.append(teacher_acc)
            print(f"seed {seed} {arm:<10} test accuracy {acc:.4f} (teacher {teacher_acc:.4f}) "
                  f"[{time.perf_counter() - start:.0f}s]", flush=True)
    print(f"\n{args.data}, {args.epochs} epochs, seeds {args.seeds}, search lr {args.search_lr}; "
          f"teacher {statistics.mean(teachers):.4f}")
    print("| arm | test accuracy (mean +- std) |\n|---|---|")
    for arm, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {arm} | {100 * statistics.mean(accs):.2f} +- {100 * std:.2f} |")


if __name__ == "__main__":
    main()
