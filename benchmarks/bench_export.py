"""How closely the exported policies (diffaug.export) agree with ours, on the shipped photos.

    python benchmarks/bench_export.py [--size 64] [--draws 400] [--timm-wheel .whl/timm/timm-1.0.31-py3-none-any.whl]

1. Per op: PSNR (dB) of the exported op, applied once at strength m = 0.7 ("mean" sampling, each sign), against
   our reference op at the same signed magnitude, over the ten shipped photos resized to --size; kornia on float
   images, albumentations and timm on uint8 (their output / 255 against our float output, so 8-bit rounding alone
   caps them near 59 dB). 120 means equal within float rounding.
2. Per op: the rate at which a single-op policy (p = 0.6, m = 0.5, "relaxed": full strength with probability
   p * m = 0.3) changes an image over --draws draws, against 0.3 (binomial standard error about 0.023 at 400).
3. The default 14-op policy (p = m = 0.5, "relaxed"): the fraction of images left unchanged and the mean absolute
   pixel change, ours (ReferencePolicy) against each export over --draws draws of one 64 px photo, next to the
   unchanged fraction ``describe`` predicts; the change differs where two ops fire on one image (Eq. 5 against
   sequential application), and timm's Cutout slot never fires (its RandomErasing is left to the user).

timm's auto_augment.py is loaded alone from its wheel (timm itself imports torchvision); `make test` downloads it.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import os
import random
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffaug import OPS, ReferencePolicy, apply_op
from diffaug.export import describe, to_albumentations, to_kornia, to_timm
from diffaug.fit import shipped_images_dir
from diffaug.ops import get_op

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def load_timm(wheel: Path) -> object | None:
    """timm's auto_augment module from its wheel, or None without the wheel."""
    if not wheel.is_file():
        return None
    folder = Path(tempfile.mkdtemp())
    with zipfile.ZipFile(wheel) as archive:
        path = Path(archive.extract("timm/data/auto_augment.py", folder))
    spec = importlib.util.spec_from_file_location("timm_auto_augment", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def photos(size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: the shipped photos, resized."""
    paths = sorted(shipped_images_dir().glob("*.png"))
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths])


def to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / max(float(((a - b) ** 2).mean()), 1e-12))


class Exports:
    """One op's single-op policy through every target: ``run(target, images)`` -> float images in [0, 1]."""

    def __init__(self, policy: ReferencePolicy, timm: object | None) -> None:
        import albumentations as A

        self.kornia = to_kornia(policy)
        self.album = A.from_dict(to_albumentations(policy))
        # One shared stream (set_random_seed would give every op the same one; see to_albumentations).
        self.album.set_random_state(np.random.default_rng(0), random.Random(0))
        spec = to_timm(policy)
        self.timm = timm and timm.RandAugment([timm.AugmentOp(**op) for op in spec["ops"]], spec["num_layers"],
                                              spec["choice_weights"])

    def run(self, target: str, images: np.ndarray) -> torch.Tensor:
        if target == "kornia":
            return self.kornia(to_float(images))
        if target == "albumentations":
            return to_float(np.stack([self.album(image=im)["image"] for im in images]))
        return to_float(np.stack([np.asarray(self.timm(Image.fromarray(im))) for im in images]))


def op_psnr(name: str, images: np.ndarray, targets: list[str], timm: object | None) -> dict[str, float]:
    """Each target's PSNR against our op at m = 0.7: for a signed op, each image's exported result is compared
    with ours at both signs and matched to the closer one (the export draws the sign)."""
    policy = ReferencePolicy([name], n_ops=1, probability=1 - 1e-6, magnitude=0.7, magnitude_sampling="mean")
    exports, x = Exports(policy, timm), to_float(images)
    spec = get_op(name)
    strengths = (0.7, -0.7) if spec.signed else (0.7 if spec.has_magnitude else 0.0,)
    candidates = [apply_op(name, x, torch.full((len(x),), s)) for s in strengths]
    result = {}
    for target in targets:
        out = exports.run(target, images)
        errors = torch.stack([((out - c) ** 2).flatten(1).mean(1) for c in candidates]).min(0).values
        result[target] = 10 * math.log10(1 / max(float(errors.mean()), 1e-12))
    return result


def apply_rate(name: str, image: np.ndarray, target: str, draws: int, timm: object | None) -> float:
    policy = ReferencePolicy([name], n_ops=1, probability=0.6, magnitude=0.5)
    exports = Exports(policy, timm)
    batch = np.repeat(image[None], draws, 0)
    out = exports.run(target, batch)
    return float((out != to_float(image[None])).flatten(1).any(1).float().mean())


def default_policy(image: np.ndarray, targets: list[str], draws: int, timm: object | None) -> dict[str, tuple]:
    policy = ReferencePolicy(seed=0)
    x = to_float(np.repeat(image[None], draws, 0))
    outputs = {"diffaug": policy(x)}
    exports = Exports(policy, timm)
    for target in targets:
        outputs[target] = exports.run(target, np.repeat(image[None], draws, 0))
    # Compared at 8 bits: our float output rounded as a uint8 pipeline would store it.
    return {k: (float(((v * 255).round() == (x * 255).round()).flatten(1).all(1).float().mean()),
                float((v - x).abs().mean())) for k, v in outputs.items()}


def unchanged_probability(policy: ReferencePolicy) -> float:
    """P(no drawn op changes the image), from ``describe``: every n_ops-subset of the ops is equally likely."""
    ops = describe(policy)["ops"]
    subsets = list(itertools.combinations([op["effective_probability"] for op in ops.values()], policy.n_ops))
    return sum(math.prod(1 - q for q in subset) for subset in subsets) / len(subsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--timm-wheel", type=Path, default=Path(".whl/timm/timm-1.0.31-py3-none-any.whl"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    timm = load_timm(args.timm_wheel)
    targets = ["kornia", "albumentations"] + (["timm"] if timm else [])
    if not timm:
        print(f"timm: no wheel at {args.timm_wheel}, left out", file=sys.stderr)
    images = photos(args.size)
    print(f"PSNR (dB) of one applied op against ours, m = 0.7, {len(images)} photos at {args.size} px")
    print(f"{'op':<11}" + "".join(f"{t:>15}" for t in targets))
    for name in OPS:
        if name == "Cutout":
            continue  # a random position: compared by rate and by the default policy's figures only
        values = op_psnr(name, images, targets, timm)
        print(f"{name:<11}" + "".join(f"{values[t]:>15.1f}" for t in targets))
    print(f"\nRate of change of a single-op policy, p = 0.6, m = 0.5 (relaxed: p * m = 0.30; 0.60 without a "
          f"magnitude), {args.draws} draws")
    print(f"{'op':<11}{'expected':>10}" + "".join(f"{t:>15}" for t in targets))
    for name in OPS:
        expected = describe(ReferencePolicy([name], n_ops=1, probability=0.6, magnitude=0.5))["ops"][name]["rate"]
        rates = [f"{apply_rate(name, images[0], t, args.draws, timm):>15.3f}" if (t, name) != ("timm", "Cutout")
                 else f"{'n/a':>15}" for t in targets]
        print(f"{name:<11}{expected:>10.3f}" + "".join(rates))
    print(f"\nDefault policy (14 ops, n_ops 4, p = m = 0.5, relaxed), {args.draws} draws of one photo")
    print(f"{'':<15}{'unchanged':>10}{'mean |change|':>15}")
    print(f"{'expected':<15}{unchanged_probability(ReferencePolicy()):>10.3f}")
    for key, (unchanged, change) in default_policy(images[0], targets, args.draws, timm).items():
        print(f"{key:<15}{unchanged:>10.3f}{change:>15.4f}")


if __name__ == "__main__":
    main()
