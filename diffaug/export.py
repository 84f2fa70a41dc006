"""A learned policy in other libraries' terms: albumentations (uint8 images in DataLoader workers), kornia (float
batches on any device) and timm's RandAugment (PIL images).

Every export takes a ``PolicyAugmenter``, a ``ReferencePolicy`` or a ``to_dict()`` dict, and reads it through
``describe``, which states what the policy means: each op drawn with probability n_ops / K, then applied with its
probability p, at a strength that depends on ``magnitude_sampling`` ("relaxed": full strength with probability m,
else none; "mean": exactly m; "uniform": uniform on [0, m]). Under "relaxed" an op at strength 0 is the identity, so
it is exported as "applied at full strength with probability p * m", the same distribution.

What no export keeps: diffaug composes the ops an image draws by Eq. 5 (the sum of their residuals on the original
image); the other libraries apply them one after another. The two agree exactly on an image where at most one op
fires; where several fire they differ (a rotation then a brightness change, against their residuals added). Each
function's docstring lists what its library changes beyond that, as measured on the shipped photos
(``benchmarks/bench_export.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import kornia
import torch
from torch import Tensor, nn

from .errors import DiffAugError, check_images
from .ops import CUTOUT_FRACTION, get_op
from .policy import PolicyAugmenter, ReferencePolicy
from .sampling import op_meaning

__all__ = ["KorniaPolicy", "describe", "op_meaning", "to_albumentations", "to_kornia", "to_timm"]

_EXPECTED = "policy must be a PolicyAugmenter, a ReferencePolicy or a dict from their to_dict()"


def _reference(policy: object) -> ReferencePolicy:
    """The policy as a ReferencePolicy (which validates a dict fully), from any of the accepted forms."""
    if isinstance(policy, ReferencePolicy):
        return policy
    if isinstance(policy, PolicyAugmenter):
        return ReferencePolicy.from_dict(policy.to_dict())
    if isinstance(policy, Mapping):
        try:
            return ReferencePolicy.from_dict(policy)
        except DiffAugError as error:
            raise DiffAugError(f"{_EXPECTED}; got a dict that is not one: {error}") from None
    raise DiffAugError(f"{_EXPECTED}; got {type(policy).__name__}")


def describe(policy: PolicyAugmenter | ReferencePolicy | Mapping[str, Any]) -> dict[str, Any]:
    """What the policy does to one image, op by op, as plain data.

    Each image draws ``n_ops`` of the K ops without replacement (``draw_probability`` = n_ops / K each); a drawn op
    is applied with its ``probability`` p, at a ``strength`` in [0, 1] (a fraction of the op's full AutoAugment
    strength, in the direction of a random sign for signed ops) whose distribution depends on the sampler:

    - "relaxed": full strength (1) with probability m, else 0, the identity (Eq. 4 in hard samples);
    - "mean": exactly m;
    - "uniform": uniform on [0, m].

    ``effective_probability`` and ``effective_strength`` say the same with the identity taken out: under
    "relaxed", applied at full strength with probability p * m; otherwise p and the strength above. ``rate`` is the
    fraction of images the op changes, ``draw_probability * effective_probability``. Ops without a magnitude
    (Equalize, Invert, Cutout) have the one strength 1.

    Example:
        >>> from diffaug import ReferencePolicy
        >>> op = describe(ReferencePolicy(["Solarize", "Rotate"], n_ops=1, probability=0.5, magnitude=0.3))["ops"]
        >>> round(op["Solarize"]["effective_probability"], 6), op["Solarize"]["effective_strength"]
        (0.15, {'kind': 'fixed', 'value': 1.0})
        >>> op["Solarize"]["summary"].split(": ")[-1]
        'at full strength with probability p * m = 0.15'
    """
    reference = _reference(policy)
    k, n_ops, sampling = len(reference.ops), reference.n_ops, reference.magnitude_sampling
    ops = {}
    for name, values in reference.policy().items():
        meaning = values  # policy() states each op through sampling.op_meaning
        ops[name] = {**meaning, "signed": get_op(name).signed, "rate": n_ops / k * meaning["effective_probability"],
                     "summary": f"when drawn ({n_ops} of {k} ops), {meaning['summary']}"}
    return {"magnitude_sampling": sampling, "n_ops": n_ops, "selection": reference.selection,
            "draw_probability": n_ops / k, "ops": ops}


# ----------------------------------------------------------------------------------------------------------------
# albumentations


def _albumentations() -> Any:
    # albumentations asks PyPI for a newer version when imported (a network call and a warning) unless told not to;
    # a library that imports it on its user's behalf should not do that. A user's own setting is kept.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import albumentations
    except ImportError:
        raise DiffAugError("to_albumentations needs albumentations (an optional extra): pip install diffaug[export]; "
                           "it is not installed") from None
    return albumentations


def _parameter(name: str, magnitude: float) -> float:
    """Op ``name``'s own parameter (factor, bits, threshold, shear, shift, degrees) at ``magnitude``, from the op
    table: the exports restate no map of their own."""
    return float(get_op(name).parameter(torch.tensor([magnitude], dtype=torch.float64))[0])


def _jitter(A: Any, field: str, low: float, high: float, p: float) -> Any:
    """ColorJitter changing one factor: its brightness, saturation and contrast are PIL's Brightness, Color and
    Contrast."""
    identity = {"brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "saturation": (1.0, 1.0), "hue": (0.0, 0.0)}
    return A.ColorJitter(**(identity | {field: (low, high)}), p=p)


def _sharpen(A: Any, low: float, high: float, p: float) -> Any:
    """PIL's Sharpness, x + (f - 1)(x - blur13), is the kernel I + (f - 1) / 13 (8 I - neighbours): Sharpen with
    alpha (f - 1) / 13 and lightness 1. Its alpha is in [0, 1], so it cannot blur (f < 1): NoOp there."""
    if high <= 1:
        return A.NoOp(p=p)
    return A.Sharpen(alpha=((max(low, 1.0) - 1) / 13, (high - 1) / 13), lightness=(1.0, 1.0), method="kernel", p=p)


def _affine(A: Any, p: float, **geometry: Any) -> Any:
    return A.Affine(**geometry, interpolation=1, border_mode=0, fill=0, p=p)  # cv2.INTER_LINEAR, BORDER_CONSTANT


def _degrees(low: float, high: float) -> tuple[float, float]:
    return math.degrees(math.atan(low)), math.degrees(math.atan(high))  # the shear angle of our factor, our sign


_STILL = (0.0, 0.0)
# albumentations' transform of each op, given the op table's parameter at the two ends of a range (equal: a fixed
# strength) and the probability.
_ALBUMENTATIONS = {
    "Brightness": lambda A, low, high, p: _jitter(A, "brightness", low, high, p),
    "Color": lambda A, low, high, p: _jitter(A, "saturation", low, high, p),
    "Contrast": lambda A, low, high, p: _jitter(A, "contrast", low, high, p),
    "Sharpness": _sharpen,
    "Posterize": lambda A, low, high, p: A.NoOp(p=p) if high >= 8 else A.Posterize(num_bits=int(high), p=p),
    # albumentations inverts uint8 levels >= fraction * 255, ours >= threshold * 255 (256/255 (1 - m)), which exceeds
    # 1 for m < 1/256 and then inverts nothing; the fraction is capped at 1 (white alone inverted). Decreasing in m.
    "Solarize": lambda A, low, high, p: A.Solarize(threshold_range=(min(1.0, high), min(1.0, low)), p=p),
    "ShearX": lambda A, low, high, p: _affine(A, p, shear={"x": _degrees(low, high), "y": _STILL}),
    "ShearY": lambda A, low, high, p: _affine(A, p, shear={"x": _STILL, "y": _degrees(low, high)}),
    # Ours samples at p + t (the content moves by -t); albumentations moves the content by its translation.
    "TranslateX": lambda A, low, high, p: _affine(A, p, translate_percent={"x": (-high, -low), "y": _STILL}),
    "TranslateY": lambda A, low, high, p: _affine(A, p, translate_percent={"x": _STILL, "y": (-high, -low)}),
    "Rotate": lambda A, low, high, p: _affine(A, p, rotate=(low, high)),
    "Equalize": lambda A, low, high, p: A.Equalize(mode="pil", by_channels=True, p=p),
    "Invert": lambda A, low, high, p: A.InvertImg(p=p),
    "Cutout": lambda A, low, high, p: A.CoarseDropout(
        num_holes_range=(1, 1), hole_height_range=(CUTOUT_FRACTION,) * 2, hole_width_range=(CUTOUT_FRACTION,) * 2,
        fill=0, p=p),
}


def _album_op(A: Any, name: str, lo: float, hi: float, p: float) -> Any:
    """One albumentations transform for op ``name`` at a signed magnitude uniform on [lo, hi] (lo = hi: fixed)."""
    return _ALBUMENTATIONS[name](A, _parameter(name, lo), _parameter(name, hi), p)


def _posterize_bits(high: float) -> list[tuple[float, float]]:
    """(a strength, its probability) for each bit count a strength uniform on [0, high] gives, from the op table's
    map (at the midpoints of 10,000 steps)."""
    strengths = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000 * high
    bits = get_op("Posterize").parameter(strengths)
    return [(float(strengths[bits == b][0]), float((bits == b).double().mean())) for b in bits.unique()]


def to_albumentations(policy: PolicyAugmenter | ReferencePolicy | Mapping[str, Any]) -> dict[str, Any]:
    """The policy in albumentations' own serialisation format, for uint8 (H, W, C) numpy images.

    ``A.from_dict(to_albumentations(policy))`` loads it: a ``SomeOf(n=n_ops, replace=False)`` over one transform per
    op, each with the op's ``effective_probability`` (see ``describe``; under "relaxed", p * m at full strength), a
    ``OneOf`` of the two directions for a signed op at a fixed strength, and a symmetric range for one at a strength
    uniform on [0, m]. Ops map to their measured equivalents: ``ColorJitter`` factors for Brightness, Color and
    Contrast (PIL's blends); ``Sharpen`` with the PIL kernel; ``Posterize``; ``Solarize`` (threshold from our 256/255
    convention); ``Affine`` (rotate and shear in degrees with our sign, ``translate_percent``, bilinear, black fill);
    ``Equalize(mode="pil")``; ``InvertImg``; Cutout as ``CoarseDropout`` of one square hole.

    What it cannot keep, besides Eq. 5 (see the module docstring), as measured on the shipped photos:

    - albumentations truncates translations to whole pixels (about 31 dB against ours at 64 px);
    - its ``Equalize(mode="pil")`` is 21-41 dB from PIL's (and ours), depending on the image;
    - ``Sharpen`` cannot blur: the blurring half of Sharpness (factor < 1) is exported as ``NoOp``, so Sharpness
      changes half as many images;
    - Contrast blends towards the float gray mean where PIL rounds it to a level (a level's difference at most);
    - Cutout's hole lies inside the image, where ours is centred anywhere and cut by the border; for a non-square
      image the hole is half of each side, where ours is a square of half the shorter side;
    - a strength uniform on [0, m] is uniform in shear *angle*, not in shear factor (at most 3 % apart);
    - ``selection="batch"`` (one draw of ops per batch) becomes one draw per image.

    Seed the loaded pipeline with ``set_random_state(np.random.default_rng(s), random.Random(s))``: albumentations'
    ``set_random_seed(s)`` and ``Compose(..., seed=s)`` give every transform its own generator with the same seed,
    so the ops' draws agree with each other (measured: 47 % of images unchanged by the default policy, not 23 %).
    In DataLoader workers, seed it so in a ``worker_init_fn`` from ``get_worker_info().seed``: albumentations
    2.0.8 does not reseed per worker, and forked workers, seeded or not, repeat each other's draws.

    Raises:
        DiffAugError: if ``policy`` is not a policy, or albumentations is not installed (``pip install
            diffaug[export]``).

    Example:
        >>> from diffaug import ReferencePolicy
        >>> spec = to_albumentations(ReferencePolicy(seed=0))
        >>> import albumentations as A, numpy as np
        >>> pipeline = A.from_dict(spec)
        >>> pipeline(image=np.zeros((32, 32, 3), np.uint8))["image"].shape
        (32, 32, 3)
    """
    description = describe(policy)
    A = _albumentations()
    transforms = []
    for name, op in description["ops"].items():
        q, strength, signed = op["effective_probability"], op["effective_strength"], op["signed"]
        if strength["kind"] == "fixed":
            s = strength["value"]
            if signed:
                transforms.append(A.OneOf([_album_op(A, name, s, s, 1.0), _album_op(A, name, -s, -s, 1.0)], p=q))
            else:
                transforms.append(_album_op(A, name, s, s, q))
        elif name == "Posterize":  # bits round(8 - 4 u): a OneOf weighted by each count's probability
            choices = [_album_op(A, name, u, u, w) for u, w in _posterize_bits(strength["high"])]
            transforms.append(A.OneOf(choices, p=q))
        elif name == "Sharpness":
            high = strength["high"]
            transforms.append(A.OneOf([_album_op(A, name, 0.0, high, 1.0), A.NoOp(p=1.0)], p=q))
        else:
            high = strength["high"]
            transforms.append(_album_op(A, name, -high if signed else 0.0, high, q))
    return A.to_dict(A.SomeOf(transforms, n=description["n_ops"], replace=False, p=1.0))


# ----------------------------------------------------------------------------------------------------------------
# kornia


def _kornia_affine(name: str, x: Tensor, magnitude: Tensor) -> Tensor:
    """Our op's map (output pixel p samples the input at L (p - c) + c + shift * size) through kornia's warp_affine,
    which takes the forward map (input to output) in pixel indices."""
    height, width = x.shape[-2:]
    linear, shift = get_op(name).geometry(magnitude.to(x.dtype))  # type: ignore[misc]
    centre = x.new_tensor([(width - 1) / 2, (height - 1) / 2])
    backward = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device)
    backward[:, :2, :2] = linear
    backward[:, :2, 2] = centre - linear @ centre + shift * x.new_tensor([width, height])
    backward[:, 2, 2] = 1
    forward = torch.linalg.inv(backward)[:, :2]
    return kornia.geometry.transform.warp_affine(x, forward, (height, width), mode="bilinear", padding_mode="zeros",
                                                 align_corners=True)


def _kornia_solarize(x: Tensor, threshold: Tensor) -> Tensor:
    # kornia inverts values >= its threshold in [0, 1]; ours above 1 (m < 1/256) inverts nothing. The small
    # allowance lets level k / 255 meet a threshold of k / 255 as ours does.
    solarized = kornia.enhance.solarize(x, (threshold - 1e-3 / 255).clamp(0, 1))
    return torch.where((threshold > 1).view(-1, 1, 1, 1), x, solarized)


# kornia's kernel of each colour and fixed op, given the op table's parameter (Cutout: RandomErasing, in KorniaPolicy).
_KORNIA_KERNELS = {
    "Brightness": kornia.enhance.adjust_contrast,  # PIL's Brightness is a product (kornia's adjust_brightness adds)
    "Color": kornia.enhance.adjust_saturation_with_gray_subtraction,
    "Contrast": kornia.enhance.adjust_contrast_with_mean_subtraction,
    "Sharpness": kornia.enhance.sharpness,
    "Posterize": lambda x, bits: kornia.enhance.posterize(x, bits.long()),
    "Solarize": _kornia_solarize,
    "Equalize": lambda x, _: kornia.enhance.equalize(x),
    "Invert": lambda x, _: kornia.enhance.invert(x),
}


def _kornia_op(name: str, x: Tensor, magnitude: Tensor) -> Tensor:
    """Op ``name`` with kornia's kernels at a signed magnitude per image (the op table's parameter maps)."""
    spec = get_op(name)
    if spec.kind == "affine":
        return _kornia_affine(name, x, magnitude)
    return _KORNIA_KERNELS[name](x, spec.parameter(magnitude.to(x.dtype)))


class KorniaPolicy(nn.Module):
    """An exported policy on float batches in [0, 1], any device: kornia's kernels under the policy's own sampling.

    Each image draws ``n_ops`` ops without replacement, applies each with its effective probability at its
    effective strength (see ``describe``) and a random sign, one after another in table order. Built by
    ``to_kornia``; it holds plain numbers and pickles.

    Shape:
        input: (B, C, H, W) float in [0, 1], C in {1, 3} (un-normalised: apply it before ``Normalize``).
        output: the same.
    """

    def __init__(self, description: Mapping[str, Any]) -> None:
        super().__init__()
        ops = description["ops"]
        self.ops = tuple(ops)
        self.n_ops = int(description["n_ops"])
        strengths = [ops[n]["effective_strength"] for n in self.ops]
        self.register_buffer("probability", torch.tensor([ops[n]["effective_probability"] for n in self.ops]))
        self.register_buffer("strength", torch.tensor([s.get("value", s.get("high")) for s in strengths]))
        self.register_buffer("signed", torch.tensor([ops[n]["signed"] for n in self.ops]))
        self.register_buffer("uniform", torch.tensor([s["kind"] == "uniform" for s in strengths]))
        self._erase: nn.Module | None = None
        if "Cutout" in self.ops:
            area = CUTOUT_FRACTION**2
            self._erase = kornia.augmentation.RandomErasing(scale=(area, area), ratio=(1.0, 1.0), value=0.0, p=1.0)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_images(x)
        unbatched = x.dim() == 3
        images = x.unsqueeze(0) if unbatched else x
        batch, k = images.shape[0], len(self.ops)
        device = self.probability.device

        def noise() -> Tensor:  # drawn where the generator lives, so a CPU generator gives the same draws anywhere
            draw_on = generator.device if generator is not None else device
            return torch.rand(batch, k, generator=generator, device=draw_on).to(device)

        chosen = noise().topk(self.n_ops, dim=1).indices
        selected = torch.zeros(batch, k, dtype=torch.bool, device=device).scatter_(1, chosen, True)
        fires = selected & (noise() < self.probability)
        strength = torch.where(self.uniform, self.strength * noise(), self.strength.expand(batch, k))
        magnitude = torch.where(self.signed & (noise() < 0.5), -strength, strength)
        out = images
        for column, name in enumerate(self.ops):
            index = fires[:, column].nonzero().squeeze(1).to(images.device)
            if index.numel() == 0:
                continue
            part = out.index_select(0, index)
            if name == "Cutout":
                changed = self._erase(part)  # type: ignore[misc]
            else:
                changed = _kornia_op(name, part, magnitude[:, column].to(images.device).index_select(0, index))
            out = out.index_copy(0, index, changed.to(out.dtype))
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"ops={list(self.ops)}, n_ops={self.n_ops}"


def to_kornia(policy: PolicyAugmenter | ReferencePolicy | Mapping[str, Any]) -> KorniaPolicy:
    """The policy as an ``nn.Module`` of kornia kernels for float batches in [0, 1] on any device (``.to(device)``).

    Every op but Cutout runs on kornia's kernel with our parameter maps and equals our reference op within float
    rounding on the shipped photos (PIL's Brightness is kornia's ``adjust_contrast``; Color and Contrast its
    ``*_with_gray_subtraction`` / ``*_with_mean_subtraction``; the affine ops our own maps through ``warp_affine``,
    which sidesteps kornia's sign conventions: its ``shear`` turns the other way from PIL's). Sampling follows
    ``describe`` exactly, per image. What it cannot keep, besides Eq. 5 (see the module docstring):

    - Cutout is kornia's ``RandomErasing`` of a square of the same area, which lies inside the image where ours is
      centred anywhere and cut by the border; it draws from torch's global generator, not ``generator=``;
    - ``selection="batch"`` becomes one draw of ops per image.

    Example:
        >>> from diffaug import ReferencePolicy
        >>> module = to_kornia(ReferencePolicy(seed=0))
        >>> module(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
    """
    return KorniaPolicy(describe(policy))


# ----------------------------------------------------------------------------------------------------------------
# timm

# timm's op names for ours: the "Increasing" variants are our maps (factor 1 +- 0.9 m, threshold 256 (1 - m)),
# PosterizeOriginal keeps 4 to 8 bits as ours, the Rel translations take a fraction of the size.
_TIMM_NAMES = {
    "Brightness": "BrightnessIncreasing", "Color": "ColorIncreasing", "Contrast": "ContrastIncreasing",
    "Sharpness": "SharpnessIncreasing", "Posterize": "PosterizeOriginal", "Solarize": "SolarizeIncreasing",
    "ShearX": "ShearX", "ShearY": "ShearY", "TranslateX": "TranslateXRel", "TranslateY": "TranslateYRel",
    "Rotate": "Rotate", "Equalize": "Equalize", "Invert": "Invert",
}
_TIMM_LEVELS = 10.0  # timm's magnitudes run over [0, 10]


def to_timm(policy: PolicyAugmenter | ReferencePolicy | Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of timm's ``RandAugment`` as plain data, for PIL images.

    Returns ``{"ops": [{"name", "prob", "magnitude", "hparams"}, ...], "num_layers": n_ops, "choice_weights":
    [1 / K] * K, "random_erasing": dict or None, "notes": [...]}``; build the transform with::

        from timm.data.auto_augment import AugmentOp, RandAugment
        spec = to_timm(policy)
        transform = RandAugment([AugmentOp(**op) for op in spec["ops"]], spec["num_layers"], spec["choice_weights"])

    Uniform ``choice_weights`` make timm draw ``num_layers`` ops without replacement, as we do. Each op has its
    effective probability (see ``describe``) and a magnitude on timm's 0-10 scale that means ours, through hparams
    ``translate_pct`` = 150/331, black fill (``img_mean`` 0), bilinear (``interpolation`` 2) and ``magnitude_std``
    inf for a strength uniform on [0, m] (timm then draws the magnitude uniformly below it; a JSON round trip must
    keep that inf). What it cannot keep, besides Eq. 5 (see the module docstring):

    - timm shears about the top-left corner, ours about the centre (a shift of shear * H / 2 between the two);
    - timm has no Cutout: its slot stays (as ``Invert`` at probability 0, so that the other ops are drawn as often)
      and ``random_erasing`` gives the arguments of timm's ``RandomErasing`` at Cutout's rate, which acts on the
      normalised tensor and so fills with the mean colour, not black;
    - under "uniform", Posterize's bits cannot be drawn below the maximum (timm draws the level, which for
      ``PosterizeOriginal`` runs the other way): it is exported at strength m / 2, the mean of its distribution;
    - ``selection="batch"`` becomes one draw per image; timm applies the drawn ops in random order.

    Example:
        >>> from diffaug import ReferencePolicy
        >>> spec = to_timm(ReferencePolicy(seed=0))
        >>> spec["num_layers"], len(spec["ops"]), spec["ops"][10]["name"]
        (4, 14, 'Rotate')
    """
    description = describe(policy)
    k = len(description["ops"])
    ops, notes, random_erasing = [], [], None
    for name, op in description["ops"].items():
        q, strength = op["effective_probability"], op["effective_strength"]
        uniform = strength["kind"] == "uniform"
        level = strength.get("value", strength.get("high"))
        hparams: dict[str, Any] = {"translate_pct": 150 / 331, "img_mean": 0, "interpolation": 2,
                                   "magnitude_std": math.inf if uniform else 0.0}
        if name == "Cutout":
            ops.append({"name": "Invert", "prob": 0.0, "magnitude": 0.0, "hparams": hparams | {"magnitude_std": 0.0}})
            area = CUTOUT_FRACTION**2
            random_erasing = {"probability": op["rate"], "min_area": area, "max_area": area, "min_aspect": 1.0,
                              "max_aspect": 1.0, "mode": "const", "min_count": 1, "max_count": 1}
            notes.append("Cutout: no timm op; its slot is an Invert at probability 0, and random_erasing gives timm's "
                         "RandomErasing at Cutout's rate (mean-colour fill after Normalize)")
            continue
        if name == "Posterize":
            if uniform:
                level, hparams["magnitude_std"] = level / 2, 0.0
                notes.append("Posterize: a strength uniform on [0, m] is exported at m / 2 (timm's level for "
                             "PosterizeOriginal runs the other way)")
            # timm keeps int(0.4 L) + 4 bits at level L: the middle of the levels that keep ours, capped at 10.
            magnitude = min(_TIMM_LEVELS, 2.5 * (_parameter(name, level) - 4) + 1.25)
        else:
            magnitude = _TIMM_LEVELS * level
        ops.append({"name": _TIMM_NAMES[name], "prob": q, "magnitude": magnitude, "hparams": hparams})
    if any(n in description["ops"] for n in ("ShearX", "ShearY")):
        notes.append("ShearX/ShearY: timm shears about the top-left corner, diffaug about the centre")
    notes.append("diffaug sums the drawn ops' residuals (Eq. 5); timm applies them in sequence, in random order")
    return {"ops": ops, "num_layers": description["n_ops"], "choice_weights": [1 / k] * k,
            "random_erasing": random_erasing, "notes": notes}
