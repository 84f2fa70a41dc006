"""Speed of PolicyAugmenter, side by side with its peers in one run, on one CPU thread.

    python benchmarks/bench_speed.py            # both batch shapes
    python benchmarks/bench_speed.py --quick    # fewer repeats

Measured per batch (median of repeats, after warm-up), at equal batch size and n_ops = 4:

* no-grad forward in eval mode (how plain training and Stage III use it) against kornia's RandAugment(n=2)
  forward (not differentiable): the ratio kornia / ours should be >= 1;
* train-mode forward + backward to the policy logits (Stage II), against the same module built with the paper's
  encoders and per-batch op selection (``arch="paper", selection="batch"``: the paper's form, our code) and
  against the authors' augmentation module as measured on this machine (76-85 ms per 128x3x32x32 batch on one
  thread; their code has no licence and is not run here): the target is <= 20 ms, 4x faster;
* ``geometry="composed"`` (one warp per image, what masks and boxes need) against the residual geometry, train
  step to train step (target <= 1.2x), and the same step moving label masks and two boxes an image (target
  <= 1.1x the composed step without them);
* the memory-bandwidth floor, ``x.clone()``: the fraction of it reached, clone time / our time;
* minor page faults per call (Linux): glibc returns freed heap memory to the system after every step and the next
  step faults it back in (about 2.5 us a page on this VM). Rerun with more lenient allocator settings to see how
  much of a step that is::

      MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456 python benchmarks/bench_speed.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from diffaug import PolicyAugmenter

AUTHORS_MS_128x32 = (76.0, 85.0)


def _page_faults() -> int:
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, tuple[float, float]]:
    """Median milliseconds and mean minor page faults per call of each candidate, run in turn round after round so
    that load on the (shared) machine falls on all of them alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    faults = dict.fromkeys(candidates, 0)
    for _ in range(repeats):
        for name, fn in candidates.items():
            before = _page_faults()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            faults[name] += _page_faults() - before
    return {name: (1e3 * statistics.median(t), faults[name] / repeats) for name, t in times.items()}


def bench(batch: int, size: int, repeats: int) -> dict[str, tuple[float, float]]:
    import kornia.augmentation.auto as auto

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=generator)
    ours = PolicyAugmenter(seed=0)
    paper = PolicyAugmenter(seed=0, arch="paper", selection="batch")
    composed = PolicyAugmenter(seed=0, geometry="composed")
    masks = torch.randint(0, 11, (batch, size, size), generator=generator)
    boxes = [torch.tensor([[2.0, 3.0, size / 2, size - 1.0], [size / 4, size / 4, size - 2.0, size / 2]])] * batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kornia_randaugment = auto.RandAugment(n=2, m=10)

    def no_grad_forward(module: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return module(x)

        return run

    def train_step(module: PolicyAugmenter, **targets: object) -> Callable[[], object]:
        # Gradients are cleared as the Stage II loop clears them (the optimiser's zero_grad, a walk over its own
        # list); Module.zero_grad walks every submodule of the frozen encoders, 0.3 ms that no training loop spends.
        optimiser = torch.optim.SGD(module.parameters(), lr=0.0)

        def run() -> object:
            optimiser.zero_grad(set_to_none=True)
            out = module(x, **targets)
            (out if isinstance(out, torch.Tensor) else out.images).mean().backward()
            return module.probability_logits.grad

        return run

    ours_eval, ours_train = ours, copy.deepcopy(ours)
    ours_eval.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timed(
            {
                "clone": x.clone,
                "kornia RandAugment(n=2) fwd": no_grad_forward(kornia_randaugment),
                "ours eval fwd (no grad)": no_grad_forward(ours_eval),
                "ours train fwd+bwd": train_step(ours_train),
                "paper form train fwd+bwd": train_step(paper),
                "composed train fwd+bwd": train_step(composed),
                "composed + masks, boxes": train_step(copy.deepcopy(composed), masks=masks, boxes=boxes),
            },
            repeats,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, median of repeats; times in ms per batch\n")
    for batch, size, repeats in ((128, 32, 30), (32, 224, 10)):
        measured = bench(batch, size, max(5, repeats // 3) if args.quick else repeats)
        r = {name: ms for name, (ms, _) in measured.items()}
        ours_fwd, ours_step = r["ours eval fwd (no grad)"], r["ours train fwd+bwd"]
        print(f"== {batch}x3x{size}x{size}")
        for name, (ms, faults) in measured.items():
            print(f"  {name:<30} {ms:8.2f}   ({faults:6.0f} page faults per call)")
        print(f"  ratio kornia RandAugment / ours (no-grad fwd, target >= 1.0): {r['kornia RandAugment(n=2) fwd'] / ours_fwd:6.2f}")
        print(f"  ratio paper form / ours (fwd+bwd):                          {r['paper form train fwd+bwd'] / ours_step:6.2f}")
        # The machine's speed drifts by up to 1.5x between runs; a ratio of two times taken side by side drifts less.
        print(f"  ours train fwd+bwd / kornia RandAugment fwd:                {ours_step / r['kornia RandAugment(n=2) fwd']:6.2f}")
        if (batch, size) == (128, 32):
            lo, hi = AUTHORS_MS_128x32
            print(f"  authors' module {lo:.0f}-{hi:.0f} ms (measured earlier on this machine) / ours (target >= 4): "
                  f"{lo / ours_step:.1f}-{hi / ours_step:.1f}; target ours <= 20 ms: {'met' if ours_step <= 20 else 'NOT met'}")
        composed = r["composed train fwd+bwd"]
        print(f"  composed / residual geometry (fwd+bwd, target <= 1.2):        {composed / ours_step:6.2f}")
        print(f"  composed with masks and boxes / without (target <= 1.1):      {r['composed + masks, boxes'] / composed:6.2f}")
        print(f"  fraction of the bandwidth floor (clone / ours): fwd {r['clone'] / ours_fwd:.3f}, "
              f"fwd+bwd {r['clone'] / ours_step:.3f}\n")


if __name__ == "__main__":
    main()
