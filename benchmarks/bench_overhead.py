"""Stage III overhead: one Distiller.train_step against a plain KD step that also feeds 2B images.

    python benchmarks/bench_overhead.py [--batch 128] [--threads 1]

Both steps run the teacher once on 2B images and the student forward and backward on 2B images with the same
optimiser; the Stage III step also draws x_hat from the policy (eval mode, no grad). The target ratio is <= 1.15.
Measured for a CIFAR ResNet-20 student (ResNet-56 teacher) on 3x32x32 and for the example's small CNNs on MNIST.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from diffaug import PolicyAugmenter
from diffaug.distill import Distiller, kd_loss
from diffaug.distill.data import small_models


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


def cifar_resnet(depth: int, classes: int = 100) -> nn.Module:
    """The CIFAR ResNets of He et al. (2016): depth 6n + 2, widths 16/32/64."""
    n = (depth - 2) // 6
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            layers.append(Basic(cin, width, stride if i == 0 else 1))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


def measure(teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor, rounds: int) -> tuple[float, float]:
    distiller = Distiller(teacher, student, PolicyAugmenter(seed=0), progress=False)
    optimiser = distiller.optimiser

    def plain_kd() -> None:
        inputs, targets = torch.cat([x, x]), torch.cat([y, y])
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
        "ResNet-56 -> ResNet-20, 3x32x32": (cifar_resnet(56), cifar_resnet(20), torch.rand(args.batch, 3, 32, 32), 100),
        "example CNNs, MNIST 1x28x28": (*small_models(1, 10), torch.rand(args.batch, 1, 28, 28), 10),
    }
    print(f"batch {args.batch} (2B = {2 * args.batch} images per step), {args.threads} thread(s), median ms per step")
    for name, (teacher, student, x, classes) in cases.items():
        y = torch.randint(classes, (args.batch,))
        kd, tst = measure(teacher, student, x, y, args.rounds)
        print(f"  {name:<34} plain KD {kd:8.1f}  Stage III {tst:8.1f}  ratio {tst / kd:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
