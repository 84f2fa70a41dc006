"""Hypothesis property tests of the invariants every op, encoder and the augmenter must keep."""

from __future__ import annotations

import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffaug import OPS, PolicyAugmenter, load_priors
from diffaug.ops import MAGNITUDE_OPS, apply_op, get_op

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None)


@functools.cache
def _priors():
    return load_priors()


@functools.cache
def _augmenter(n_ops: int, selection: str) -> PolicyAugmenter:
    return PolicyAugmenter(n_ops=n_ops, selection=selection)


@st.composite
def image_batches(draw: st.DrawFn) -> torch.Tensor:
    batch = draw(st.integers(1, 4))
    channels = draw(st.sampled_from([1, 3]))
    height, width = draw(st.integers(3, 20)), draw(st.integers(3, 20))
    seed = draw(st.integers(0, 2**31 - 1))
    x = torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))
    # Include exact 0s and 1s: saturated pixels are where clipping bugs hide.
    if draw(st.booleans()):
        x = (x * 1.4 - 0.2).clamp(0, 1)
    return x


def magnitudes(name: str, batch: int, seed: int) -> torch.Tensor:
    m = torch.rand(batch, generator=torch.Generator().manual_seed(seed))
    return m * 2 - 1 if get_op(name).signed else m


@PROPERTY_SETTINGS
@given(x=image_batches(), name=st.sampled_from(OPS), seed=st.integers(0, 1000))
def test_reference_ops_keep_shape_dtype_range_and_input(x: torch.Tensor, name: str, seed: int) -> None:
    before = x.clone()
    out = apply_op(name, x, magnitudes(name, len(x), seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(x, before)


@PROPERTY_SETTINGS
@given(x=image_batches(), name=st.sampled_from(MAGNITUDE_OPS), seed=st.integers(0, 1000))
def test_encoders_keep_shape_range_and_identity(x: torch.Tensor, name: str, seed: int) -> None:
    encoder = _priors()[name]
    out = encoder(x, magnitudes(name, len(x), seed))
    assert out.shape == x.shape and torch.isfinite(out).all()
    zero = encoder(x, torch.zeros(len(x)))
    # The affine encoders sample at pixel centres computed in float32 (a few ulps off); the others are exact.
    tolerance = 1e-5 if get_op(name).kind == "affine" else 0.0
    torch.testing.assert_close(zero, x, atol=tolerance, rtol=0)


@PROPERTY_SETTINGS
@given(x=image_batches(), n_ops=st.integers(1, 14), selection=st.sampled_from(["sample", "batch"]),
       seed=st.integers(0, 2**31 - 1), training=st.booleans())
def test_augmenter_invariants(x: torch.Tensor, n_ops: int, selection: str, seed: int, training: bool) -> None:
    aug = _augmenter(n_ops, selection).train(training)
    before = x.clone()
    sample = aug.sample(len(x), generator=torch.Generator().manual_seed(seed))
    out = aug(x, sample).detach()
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(x, before)
    # Batched equals per image, for a fixed sample (batch-size independence).
    for i in range(len(x)):
        # Float32 kernels may group sums differently by batch size: a few ulps.
        torch.testing.assert_close(aug(x[i : i + 1], sample[i]), out[i : i + 1], atol=1e-5, rtol=0)
    # Determinism under a seed.
    again = aug(x, aug.sample(len(x), generator=torch.Generator().manual_seed(seed))).detach()
    assert torch.equal(again, out)


@PROPERTY_SETTINGS
@given(x=image_batches(), seed=st.integers(0, 2**31 - 1))
def test_zero_magnitude_and_zero_probability_give_the_identity(x: torch.Tensor, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    # Magnitude ops only: with every magnitude at (relaxed) zero, each op is its identity.
    still = PolicyAugmenter(ops=MAGNITUDE_OPS, magnitude=1e-9, magnitude_sampling="mean", n_ops=4)
    # m = sigmoid(logit) is 1e-9, not 0: the affine encoders then sample a few float32 ulps off the pixel centres,
    # and up to four residuals add.
    torch.testing.assert_close(still(x, generator=generator), x, atol=1e-5, rtol=0)
    never = PolicyAugmenter(probability=1e-9)
    assert torch.equal(never(x, generator=generator), x)
