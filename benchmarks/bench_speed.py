"""Speed of PolicyAugmenter, side by side with its peers in one run, on one CPU thread (or one GPU).

    python benchmarks/bench_speed.py            # 128x3x32x32, 32x3x224x224 and 8x3x8x8 on the CPU
    python benchmarks/bench_speed.py --quick    # fewer repeats
    python benchmarks/bench_speed.py --device cuda --dtype bfloat16   # 128x3x32x32 and 256x3x224x224 on a GPU

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
* ``compile=True`` in eval and train mode, its first call (the compilation) as the cold time: targets a train step
  <= 1x kornia's forward and an eval forward >= 2x faster than kornia's. On a CPU it has two compiled layouts,
  both timed at every shape: "gathered" (the drawn pairs, symbolic counts, one host sync) and "static" (every pair,
  static shapes, what a GPU runs); for some shapes compile=True runs eager instead ("eager*", timed as
  compile=True runs it). Which one a call takes is diffaug.compiled.choose_layout's, by shape and grad mode; the
  ratios are those of the layout taken;
* the memory-bandwidth floor, ``x.clone()``: the fraction of it reached, clone time / our time;
* dispatched aten ops per call (torch profiler, nested ones included): on a GPU each is a kernel launch of
  several microseconds whatever the batch, the floor of a step (DESIGN.md, section 7); the first (cold) call's
  time is reported too;
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
from typing import NamedTuple

import torch

from diffaug import PolicyAugmenter
from diffaug.compiled import choose_layout, force_layout

AUTHORS_MS_128x32 = (76.0, 85.0)


def _page_faults() -> int:
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def dispatched_ops(fn: Callable[[], object], on_gpu: bool = False) -> tuple[int, int | None]:
    """aten ops one call dispatches, nested ones included (what a GPU would launch, give or take views), and on a
    GPU the work the call runs there: kernels and copies, counted on the device, so that a compiled graph's Triton
    kernels, launched without an aten op, count too."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if on_gpu:
            torch.cuda.synchronize()
    events = prof.events()
    aten = sum(1 for event in events if event.name.startswith("aten::"))
    gpu = sum(1 for event in events if event.device_type == torch.autograd.DeviceType.CUDA) if on_gpu else None
    return aten, gpu


class Measured(NamedTuple):
    ms: float  # median per call
    faults: float  # minor page faults per call
    ops: int  # dispatched aten ops per call
    cold_ms: float  # the first call
    gpu_ops: int | None  # kernels and copies the GPU runs per call (None on a CPU)


def timed(candidates: dict[str, Callable[[], object]], repeats: int, on_gpu: bool = False,
          warmup: int = 3) -> dict[str, Measured]:
    """Median milliseconds, page faults and dispatched ops per call of each candidate, run in turn round after
    round so that load on the (shared) machine falls on all of them alike; on a GPU each call is waited for."""
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    cold = {}
    for name, fn in candidates.items():
        start = time.perf_counter()
        fn()
        sync()
        cold[name] = 1e3 * (time.perf_counter() - start)
        for _ in range(warmup - 1):
            fn()
    ops = {name: dispatched_ops(fn, on_gpu) for name, fn in candidates.items()}
    sync()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    faults = dict.fromkeys(candidates, 0)
    for _ in range(repeats):
        for name, fn in candidates.items():
            before = _page_faults()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
            faults[name] += _page_faults() - before
    return {name: Measured(1e3 * statistics.median(t), faults[name] / repeats, ops[name][0], cold[name], ops[name][1])
            for name, t in times.items()}


def layouts(batch: int, size: int, device: str) -> tuple[str, str]:
    """The layouts compile=True takes for an eval forward (no grad) and for a train step on such a batch ("eager*":
    compile=True running eager)."""
    module, images = PolicyAugmenter(compile=True).to(device), torch.empty(batch, 3, size, size, device=device)
    with torch.no_grad():
        eval_layout = choose_layout(module, images)
    return tuple("eager*" if layout == "eager" else layout for layout in (eval_layout, choose_layout(module, images)))


def bench(batch: int, size: int, repeats: int, device: str = "cpu",
          dtype: torch.dtype = torch.float32) -> dict[str, Measured]:
    import kornia.augmentation.auto as auto

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=generator).to(device, dtype)
    ours = PolicyAugmenter(seed=0).to(device)
    paper = PolicyAugmenter(seed=0, arch="paper", selection="batch").to(device)
    composed = PolicyAugmenter(seed=0, geometry="composed").to(device)
    masks = torch.randint(0, 11, (batch, size, size), generator=generator).to(device)
    box = torch.tensor([[2.0, 3.0, size / 2, size - 1.0], [size / 4, size / 4, size - 2.0, size / 2]], device=device)
    boxes = [box] * batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kornia_randaugment = auto.RandAugment(n=2, m=10).to(device)

    def no_grad_forward(module: torch.nn.Module, images: torch.Tensor = x) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return module(images)

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
    # compile=True in each compiled layout it can take here (on a CPU both, on a GPU static alone), each forced on
    # every call; and where it runs eager (a CPU's, for some shapes: choose_layout), as it runs ("eager*"), timed next
    # to the eager candidates: timed after the static layout's large steps it found the caches cold (1.12-1.14x eager
    # there, 2026-12-04; 1.0x in paired runs of its own).
    eval_layout, train_layout = layouts(batch, size, device)
    compiled = {}
    if eval_layout == "eager*":
        compiled["eager* eval fwd (no grad)"] = no_grad_forward(PolicyAugmenter(seed=0, compile=True).to(device).eval())
    if train_layout == "eager*":
        compiled["eager* train fwd+bwd"] = train_step(PolicyAugmenter(seed=0, compile=True).to(device))
    for layout in ("gathered", "static") if device == "cpu" else ("static",):
        compiled_eval, compiled_train = PolicyAugmenter(seed=0, compile=True).to(device).eval(), \
            PolicyAugmenter(seed=0, compile=True).to(device)
        if device == "cpu":
            for module in (compiled_eval, compiled_train):  # this layout at any size, train steps too
                force_layout(module, layout)
        compiled |= {f"{layout} eval fwd (no grad)": no_grad_forward(compiled_eval),
                     f"{layout} train fwd+bwd": train_step(compiled_train)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        candidates = {
            "clone": x.clone,
            # kornia's ops are not all bfloat16-safe: it gets the same images in float32.
            "kornia RandAugment(n=2) fwd": no_grad_forward(kornia_randaugment, x.float()),
            "ours eval fwd (no grad)": no_grad_forward(ours_eval),
            "ours train fwd+bwd": train_step(ours_train),
            **compiled,
            "paper form train fwd+bwd": train_step(paper),
            "composed train fwd+bwd": train_step(composed),
            "composed + masks, boxes": train_step(copy.deepcopy(composed), masks=masks, boxes=boxes),
        }
        return timed(candidates, repeats, on_gpu=device.startswith("cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--device", default="cpu", help="cpu (one thread) or cuda (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="image dtype (default: %(default)s)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="BxS",
                        help="batch x side, e.g. 128x32 (default: 128x32 32x224 8x8; on a GPU 128x32 256x224)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per shape (default: 30 at 32 px and below, "
                        "10 at 224; a third of that with --quick)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    on_gpu = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(args.device) if on_gpu else "1 thread"
    print(f"torch {torch.__version__}, {where}, {args.dtype}, median of repeats; times in ms per batch\n")
    shapes = args.shapes or (["128x32", "256x224"] if on_gpu else ["128x32", "32x224", "8x8"])
    for shape in shapes:
        batch, size = (int(v) for v in shape.split("x"))
        repeats = args.repeats or (10 if size > 32 else 30) // (3 if args.quick else 1)
        measured = bench(batch, size, repeats, args.device, dtype)
        r = {name: m.ms for name, m in measured.items()}
        ours_fwd, ours_step = r["ours eval fwd (no grad)"], r["ours train fwd+bwd"]
        kornia = r["kornia RandAugment(n=2) fwd"]
        print(f"== {batch}x3x{size}x{size}")
        gpu_column = f"   {'GPU ops':>8}" if on_gpu else ""  # kernels and copies run on the GPU
        print(f"  {'':<30} {'median':>8}   {'cold':>8}   {'aten ops':>8}{gpu_column}   page faults")
        for name, m in measured.items():
            gpu_ops = f"   {m.gpu_ops:8d}" if on_gpu else ""
            print(f"  {name:<30} {m.ms:8.2f}   {m.cold_ms:8.1f}   {m.ops:8d}{gpu_ops}   {m.faults:6.0f}")
        print(f"  ratio kornia RandAugment / ours (no-grad fwd, target >= 1.0): {kornia / ours_fwd:6.2f}")
        print(f"  ratio paper form / ours (fwd+bwd):                          {r['paper form train fwd+bwd'] / ours_step:6.2f}")
        # The machine's speed drifts by up to 1.5x between runs; a ratio of two times taken side by side drifts less.
        print(f"  ours train fwd+bwd / kornia RandAugment fwd:                {ours_step / kornia:6.2f}")
        layout, step_layout = layouts(batch, size, args.device)
        fast_fwd, fast_step = r[f"{layout} eval fwd (no grad)"], r[f"{step_layout} train fwd+bwd"]
        print(f"  compile=True takes the {layout} layout for eval forwards here, {step_layout} for train steps")
        print(f"  compile=True: kornia fwd / eval fwd (target >= 2):          {kornia / fast_fwd:6.2f}")
        print(f"  compile=True: train fwd+bwd / kornia fwd (target <= 1):     {fast_step / kornia:6.2f}")
        print(f"  compile=True / eager: eval fwd {fast_fwd / ours_fwd:.2f}, train fwd+bwd {fast_step / ours_step:.2f}")
        for each in ("gathered", "static"):  # every layout timed, whichever compile=True takes
            if f"{each} train fwd+bwd" in r:
                each_step = r[f"{each} train fwd+bwd"]
                print(f"  {each} layout: kornia fwd / eval fwd {kornia / r[f'{each} eval fwd (no grad)']:.2f}, "
                      f"train fwd+bwd / kornia fwd {each_step / kornia:.2f}, train / eager {each_step / ours_step:.2f}")
        if (batch, size) == (128, 32) and not on_gpu:
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
