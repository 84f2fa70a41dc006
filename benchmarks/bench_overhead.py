"""Stage III overhead: one Distiller.train_step against a plain KD step that also feeds 2B images.

    python benchmarks/bench_overhead.py [--batch 128] [--threads 1]

Both steps apply the standard padded crop and flip to the B originals (``random_crop_flip``, on the batch), run
the teacher once on 2B images and the student forward and backward on 2B images with the same optimiser; the
Stage III step also draws x_hat from the policy (eval mode, no grad). The target ratio is <= 1.05. Measured for
the zoo's resnet20 student (resnet56 teacher) on 3x32x32 and for the example's small CNNs on MNIST.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from diffaug import PolicyAugmenter
from diffaug.distill import Distiller, kd_loss
from diffaug.distill.data import random_crop_flip, small_models
from diffaug.distill.models import build_model


def measure(teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor, rounds: int) -> tuple[float, float]:
    distiller = Distiller(teacher, student, PolicyAugmenter(seed=0), standard_augment=random_crop_flip, progress=False)
    optimiser = distiller.optimiser
    generator = torch.Generator().manual_seed(0)

    def plain_kd() -> None:
        cropped = random_crop_flip(x, generator)
        inputs, targets = torch.cat([cropped, cropped]), torch.cat([y, y])
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        student.train()
        loss = kd_loss(student(inputs), teacher_logits, targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    def stage_three() -> None:
        distiller.train_step(x, y)

    times: dict[str, list[float]] = {"kd": [], "tst": []}
    for fn in (plain_kd, stage_three):
        fn()
    for _ in range(rounds):  # interleaved, so that load on the machine falls on both alike
        for name, fn in (("kd", plain_kd), ("tst", stage_three)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return 1e3 * statistics.median(times["kd"]), 1e3 * statistics.median(times["tst"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {
        "resnet56 -> resnet20, 3x32x32": (build_model("resnet56", 100), build_model("resnet20", 100),
                                           torch.rand(args.batch, 3, 32, 32), 100),
        "example CNNs, MNIST 1x28x28": (*small_models(1, 10), torch.rand(args.batch, 1, 28, 28), 10),
    }
    print(f"batch {args.batch} (2B = {2 * args.batch} images per step), {args.threads} thread(s), median ms per step")
    for name, (teacher, student, x, classes) in cases.items():
        y = torch.randint(classes, (args.batch,))
        kd, tst = measure(teacher, student, x, y, args.rounds)
        print(f"  {name:<34} plain KD {kd:8.1f}  Stage III {tst:8.1f}  ratio {tst / kd:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
