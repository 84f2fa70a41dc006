"""Fidelity of the shipped priors to the reference ops, default and paper architectures side by side.

    python benchmarks/bench_fidelity.py [--priors DIR] [--images DIR] [--count 256]

Measured on crops of photos the fit never saw (the shipped coffee and rocket photos, or every fifth image of
--images), magnitudes uniform over each op's whole range, at the fitting size and at 3x: PSNR (dB) of the encoder
and of doing nothing, and the cosine between the encoder's derivative w.r.t. m and the reference's finite
difference, next to the reference's own autograd cosine (the ceiling; n/a for Posterize and Solarize, which are
steps in m).
"""

from __future__ import annotations

import argparse
import math

import torch

from diffaug import load_priors
from diffaug.fit import FIDELITY_TARGETS, evaluate_encoder, load_images
from diffaug.ops import MAGNITUDE_OPS

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--priors", default=None, help="a priors folder (default: the shipped default priors)")
    parser.add_argument("--images", default=None, help="a folder of images (default: the shipped held-out photos)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--count", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    _, held = load_images(args.images)
    ours = load_priors(args.priors)
    paper = load_priors(arch="paper")
    big = 3 * args.size
    print(f"{'op':<11} {'target':>6} | {'ours ' + str(args.size):>8} {'ours ' + str(big):>8} {'paper':>7} "
          f"{'identity':>8} | {'cos ours':>8} {'cos paper':>9} {'ceiling':>7}")

    def cell(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.3f}"

    for name in MAGNITUDE_OPS:
        a = evaluate_encoder(ours[name], held, args.size, count=args.count)
        b = evaluate_encoder(ours[name], held, big, count=max(16, args.count // 4))
        p = evaluate_encoder(paper[name], held, args.size, count=args.count)
        print(f"{name:<11} {FIDELITY_TARGETS[name]:>6.0f} | {a['psnr']:>8.2f} {b['psnr']:>8.2f} {p['psnr']:>7.2f} "
              f"{a['identity_psnr']:>8.2f} | {cell(a['grad_cosine']):>8} {cell(p['grad_cosine']):>9} "
              f"{cell(a['grad_ceiling']):>7}")


if __name__ == "__main__":
    main()
