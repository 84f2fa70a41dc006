"""Is Stage II's gradient right? The relaxed-Bernoulli estimator of one op's apply probability against the exact
gradient, by temperature, and Eq. 2 on a toy whose optimum is known.

    python benchmarks/bench_estimator.py            # the README's table (2,000 draws a temperature)

1. One op (Invert, which has no magnitude and is exact in the augmenter) applied with probability p = sigmoid(theta)
   to 40 photo patches (16x16), under the cross-entropy L of a fixed random linear classifier. The expected loss is
   p L(invert(x)) + (1 - p) L(x) per image, so d/dtheta = p (1 - p) (L(invert(x)) - L(x)) exactly. Each draw is
   one batch through ``PolicyAugmenter`` in train mode and one backward; the table gives the draws' mean, its bias
   against the exact gradient, and the spread of one draw (the noise a Stage II step sees). For scale, the score
   function estimator (REINFORCE, hard gates, no baseline) on the same draws' count.
2. Eq. 2 on two Gaussian classes in 2-D with a linear teacher and student and one op with magnitude m in [0, 1]
   that moves every point along the class axis toward the boundary and, at m = 1, through it. The objective is a
   deterministic function of m, minimised on a grid; Stage II's optimiser (SGD, momentum 0.9) on theta, m =
   sigmoid(theta), must reach the grid's optimum, and without the teacher term m runs away to its bound.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from diffaug import PolicyAugmenter
from diffaug.distill.data import photo_patches
from diffaug.distill.objective import tst_terms

TEMPERATURES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _probe() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """40 photo patches, their labels, and a fixed random linear classifier's weights."""
    train, _ = photo_patches(per_class=4, size=16, seed=0)
    x, y = train.tensors
    weights = torch.randn(10, x[0].numel(), generator=torch.Generator().manual_seed(0)) * 0.05
    return x, y, weights


def estimator_draws(temperature: float, draws: int, probability: float = 0.3) -> tuple[float, torch.Tensor]:
    """The exact d E[L] / d theta and ``draws`` draws of the augmenter's relaxed-Bernoulli gradient (float64)."""
    x, y, weights = _probe()

    def losses(images: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(images.flatten(1) @ weights.T, y, reduction="none")

    exact = probability * (1 - probability) * float((losses(1 - x) - losses(x)).mean())
    augmenter = PolicyAugmenter(["Invert"], n_ops=1, probability=probability, temperature=temperature).train()
    generator = torch.Generator().manual_seed(1)
    grads = [torch.autograd.grad(losses(augmenter(x, generator=generator)).mean(), augmenter.probability_logits)[0]
             for _ in range(draws)]
    return exact, torch.cat(grads).double()


def score_function_draws(draws: int, probability: float = 0.3) -> torch.Tensor:
    """REINFORCE with hard gates h ~ Bernoulli(p) and no baseline: mean_i L_i(x_hat_i) (h_i - p)."""
    x, y, weights = _probe()
    generator = torch.Generator().manual_seed(1)
    values = []
    for _ in range(draws):
        gates = (torch.rand(len(x), generator=generator) < probability).float()
        x_hat = torch.where(gates[:, None, None, None].bool(), 1 - x, x)
        losses = F.cross_entropy(x_hat.flatten(1) @ weights.T, y, reduction="none")
        values.append((losses * (gates - probability)).mean())
    return torch.stack(values).double()


def toy_problem() -> tuple[torch.Tensor, torch.Tensor, object, object]:
    """Two Gaussian classes at x1 = -1.5 and +1.5 (sd 0.7), a sharp teacher that looks at x1 only and a student
    that also leans on x2: their logit for class 1 (class 0's is 0)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(2000) % 2
    points = torch.randn(2000, 2, generator=generator) * 0.7
    points[:, 0] += torch.where(labels == 1, 1.5, -1.5)

    def linear(w: list[float]):
        weight = torch.tensor(w)
        return lambda z: torch.stack([torch.zeros(len(z)), z @ weight], 1)

    return points, labels, linear([4.0, 0.0]), linear([1.0, 1.0])


def toy_objective(m: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Eq. 2 at magnitude m: the op maps x to x - 2 m x1 e1 (at m = 1 the mirror image across the boundary)."""
    points, labels, teacher, student = _TOY
    moved = torch.stack([points[:, 0] * (1 - 2 * m), points[:, 1]], 1)
    teacher_term, student_term = tst_terms(teacher(moved), student(moved), labels)
    return alpha * teacher_term + beta * student_term


_TOY = toy_problem()


def toy_search(alpha: float, steps: int = 1000, lr: float = 0.1) -> list[float]:
    """Stage II's optimiser on theta (m = sigmoid(theta)) from m = 0.5; theta after every step."""
    theta = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.SGD([theta], lr=lr, momentum=0.9)
    path = []
    for _ in range(steps):
        optimiser.zero_grad()
        toy_objective(torch.sigmoid(theta), alpha=alpha).backward()
        optimiser.step()
        path.append(float(theta.detach()))
    return path


def toy_grid_optimum(points: int = 1001) -> float:
    grid = torch.linspace(0, 1, points)
    with torch.no_grad():
        values = torch.stack([toy_objective(m) for m in grid])
    return float(grid[values.argmin()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=2000, help="draws a temperature (default %(default)s)")
    args = parser.parse_args(argv)
    if args.draws < 2:
        raise SystemExit(f"--draws must be at least 2; got {args.draws}")
    torch.set_num_threads(1)
    print("| temperature | mean of draws | bias (relative) | SE of the mean | SD of one draw | SD / exact |")
    print("|---|---|---|---|---|---|")
    for temperature in TEMPERATURES:
        exact, grads = estimator_draws(temperature, args.draws)
        mean, sd = float(grads.mean()), float(grads.std())
        print(f"| {temperature} | {mean:.4f} | {mean - exact:+.4f} ({(mean - exact) / exact:+.1%}) | "
              f"{sd / math.sqrt(len(grads)):.4f} | {sd:.4f} | {sd / exact:.2f} |")
    reinforce = score_function_draws(args.draws)
    print(f"exact gradient {exact:.4f}; score function (REINFORCE, no baseline): mean {float(reinforce.mean()):.4f}, "
          f"SD of one draw {float(reinforce.std()):.4f} ({float(reinforce.std()) / exact:.2f} x exact)")
    optimum = toy_grid_optimum()
    with_teacher, without = toy_search(1.0), toy_search(0.0)
    print(f"Eq. 2 toy: grid optimum m = {optimum:.3f}; search reaches m = {1 / (1 + math.exp(-with_teacher[-1])):.3f}; "
          f"without the teacher term m = {1 / (1 + math.exp(-without[-1])):.4f} after {len(without)} steps, "
          f"theta still rising (step 100: {without[99]:.2f}, step {len(without)}: {without[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
