"""uint8 and half precision at the policies' boundary (issue 31 item 2): uint8 in is exactly x.float() / 255, a
ReferencePolicy can hand back uint8, and normalised bf16/fp16 images are checked in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from diffaug import PolicyAugmenter, ReferencePolicy

from .conftest import photo

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().to(torch.uint8)


def _policy(kind: str, **kwargs) -> PolicyAugmenter | ReferencePolicy:
    if kind == "augmenter":
        return PolicyAugmenter(priors=None, seed=0, **kwargs)
    return ReferencePolicy(seed=0, **kwargs)


@pytest.mark.parametrize("kind", ["augmenter", "reference"])
@pytest.mark.parametrize("train", [True, False])
def test_uint8_in_equals_float_over_255(kind: str, train: bool, images: torch.Tensor) -> None:
    policy = _policy(kind, probability=0.7).train(train)
    x = _uint8(images)
    sample = policy.sample(len(x))
    out = policy(x, sample)
    assert out.dtype == torch.float32
    assert torch.equal(out, policy(x.float() / 255, sample))
    # unbatched (C, H, W) too
    one = policy.sample(1)
    assert torch.equal(policy(x[0], one), policy(x[0].float() / 255, one))


@pytest.mark.parametrize("kind", ["augmenter", "reference"])
@pytest.mark.parametrize("train", [True, False])
def test_uint8_in_with_targets(kind: str, train: bool, images: torch.Tensor) -> None:
    policy = _policy(kind, probability=0.7, geometry="composed").train(train)
    x = _uint8(images)
    masks = torch.randint(0, 5, (len(x), *x.shape[-2:]))
    boxes = [torch.tensor([[2.0, 3.0, 20.0, 25.0]]) for _ in range(len(x))]
    sample = policy.sample(len(x))
    ours = policy(x, sample, masks=masks, boxes=boxes)
    theirs = policy(x.float() / 255, sample, masks=masks, boxes=boxes)
    assert ours.images.dtype == torch.float32 and torch.equal(ours.images, theirs.images)
    assert torch.equal(ours.masks, theirs.masks)
    assert all(torch.equal(a, b) for a, b in zip(ours.boxes, theirs.boxes, strict=True))


@pytest.mark.parametrize("kind", ["augmenter", "reference"])
def test_uint8_in_with_mean_std_is_normalize_then_the_policy(kind: str, images: torch.Tensor) -> None:
    policy = _policy(kind, probability=0.7, mean=MEAN, std=STD).eval()
    x = _uint8(images)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    sample = policy.sample(len(x))
    out = policy(x, sample)
    expected = policy((x.float() / 255 - mean) / std, sample)
    # The float path un-normalises its input (a few float32 ulps of values up to 2.7) and the uint8 one does not.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_reference_policy_returns_uint8(images: torch.Tensor) -> None:
    policy = ReferencePolicy(seed=0, probability=0.7, output_dtype=torch.uint8)
    x = _uint8(images)
    sample = policy.sample(len(x))
    out = policy(x, sample)
    assert out.dtype == torch.uint8
    as_float = ReferencePolicy.from_dict(policy.to_dict())(x, sample)
    assert torch.equal(out, (as_float * 255).round().to(torch.uint8))


# PIL's ops on uint8 that the reference op equals exactly (the others resample or blend, and round differently):
# magnitudes whose thresholds and bit counts are exact in float32.
PIL_EXACT = {
    "Posterize": (0.5, lambda image: ImageOps.posterize(image, 6)),
    "Solarize": (0.5, lambda image: ImageOps.solarize(image, 128)),
    "Invert": (None, ImageOps.invert),
    "Equalize": (None, ImageOps.equalize),
}


@pytest.mark.parametrize("name", list(PIL_EXACT))
def test_uint8_out_equals_pil_on_uint8(name: str) -> None:
    magnitude, pil_op = PIL_EXACT[name]
    image = photo("astronaut.png", (64, 64))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    # "mean" applies the op at exactly m; probability just below 1, and the test checks the op was applied.
    policy = ReferencePolicy([name], n_ops=1, probability=1 - 1e-6, magnitude=magnitude or 0.5,
                             magnitude_sampling="mean", output_dtype=torch.uint8, seed=0)
    sample = policy.sample(1)
    assert bool(sample.gates.flatten()[0] == 1)
    out = policy(x, sample)
    theirs = torch.from_numpy(np.array(pil_op(image))).permute(2, 0, 1)
    assert out.dtype == torch.uint8
    assert torch.equal(out, theirs), f"{name}: {int((out.int() - theirs.int()).abs().max())} levels apart"


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.int8, torch.bool])
def test_other_integer_dtypes_are_refused_naming_what_is_accepted(dtype: torch.dtype) -> None:
    from diffaug import DiffAugError

    with pytest.raises(DiffAugError, match=r"float .* or uint8 .*; got (int|bool)"):
        ReferencePolicy()(torch.zeros(2, 3, 8, 8, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["augmenter", "reference"])
def test_normalised_half_precision_is_accepted_and_matches_float32(dtype: torch.dtype, kind: str,
                                                                   images: torch.Tensor) -> None:
    """bf16 holds ImageNet's lowest normalised value -2.1179 as -2.125: refused before, as out of range."""
    policy = _policy(kind, probability=0.7, mean=MEAN, std=STD).eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = (images - mean) / std
    x[:, :, 0, 0] = ((0 - mean) / std).view(1, 3)  # every channel's extreme values, as black and white pixels
    x[:, :, 0, 1] = ((1 - mean) / std).view(1, 3)
    sample = policy.sample(len(x))
    half = policy(x.to(dtype), sample)
    assert half.dtype == dtype and bool(half.isfinite().all())
    full = policy(x, sample)
    # the bound on natural images: a mean absolute difference of at most 0.02 for bf16 (8 significant
    # bits), 0.01 for fp16; in normalised units, so times 1 / std (about 4.4)
    bound = (0.02 if dtype == torch.bfloat16 else 0.01) / min(STD)
    assert float((half.float() - full).abs().mean()) <= bound
