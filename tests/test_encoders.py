"""Encoder internals that the augmenter relies on: the paper's spatial transformer in warp's terms, the
straight-through steps of Posterize and Solarize, and the encoders' networks of m evaluated in one pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffaug import PolicyAugmenter
from diffaug.encoders import MagnitudeNet, MagnitudeNetStack, PaperAffineEncoder, _ramp, _step, build_encoder, freeze
from diffaug.ops import get_op


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_paper_affine_encoder_samples_the_grid_of_affine_grid(size: tuple[int, int]) -> None:
    """The augmenter warps the paper's theta with ``warp`` (one call for all affine ops); the grid must be the one
    F.affine_grid builds from theta, the paper's own form, at any aspect ratio."""
    torch.manual_seed(0)
    encoder = PaperAffineEncoder("Rotate")
    with torch.no_grad():
        encoder.fc.weight.normal_(0, 0.3)
    x = torch.rand(4, 3, *size, dtype=torch.float64)
    m = torch.tensor([-1.0, -0.3, 0.5, 1.0])
    theta = encoder.theta(m).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # float64 images, float32 theta: the two grids differ by float32 rounding of the per-axis rescale.
    torch.testing.assert_close(encoder.transform(x, m), expected, atol=1e-6, rtol=0)


def test_surrogate_step_has_the_narrow_value_and_the_wide_gradient() -> None:
    value = torch.rand(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    position = torch.rand(4, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    width = torch.tensor(2 / 255, dtype=torch.float64)
    out = _step(value, position, width, surrogate_width=0.1)
    torch.testing.assert_close(out, _ramp(value, position, width), atol=0, rtol=0)
    weights = torch.rand_like(out)
    got = torch.autograd.grad(out, (value, position), weights)
    wide = torch.autograd.grad(_ramp(value, position, 0.1), (value, position), weights)
    for g, w in zip(got, wide, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)  # float64, the same sums in another order
    assert float(got[1].abs().sum()) > 0  # the test data does reach the wide step


def test_step_without_surrogate_is_the_ramp_with_its_own_gradient() -> None:
    value = (torch.arange(100, dtype=torch.float64) + 0.5) / 100  # none on the ramp's ends
    position = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    out = _step(value, position, torch.tensor(0.1, dtype=torch.float64), surrogate_width=None)
    (grad,) = torch.autograd.grad(out.sum(), position)
    # d/dp of clip((v - p) / w + 1/2) is -1/w on the 10 samples within w / 2 of p (0.455 ... 0.545).
    assert float(grad) == pytest.approx(-10 / 0.1)


def test_magnitude_net_stack_equals_each_net_and_follows_weight_changes() -> None:
    torch.manual_seed(0)
    nets = [MagnitudeNet(3), MagnitudeNet(1, hidden=8), MagnitudeNet(6, hidden=32)]
    for net in nets:
        with torch.no_grad():
            net.hidden[2].weight.normal_(0, 0.5)
    stack = MagnitudeNetStack(nets)
    m = torch.linspace(-1, 1, 9)
    which = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 2])  # 3: the row of zeros
    out = stack(m, which)
    assert out.shape == (9, 6)
    for i in range(9):
        expected = torch.zeros(6) if which[i] == 3 else nets[which[i]](m[i : i + 1])[0]
        # float32; the padded hidden units add exact zeros, the sums differ only in order: a few ulps.
        torch.testing.assert_close(out[i, : expected.numel()], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(out[i, expected.numel() :], torch.zeros(6 - expected.numel()))
    # A frozen net written in place (as load_state_dict does) is seen on the next call.
    frozen = freeze(nets[0])  # MagnitudeNet is an nn.Module; freeze turns its parameters into buffers
    with torch.no_grad():
        frozen.linear.bias.add_(1.0)
    torch.testing.assert_close(stack(m, which)[0, :3], nets[0](m[:1])[0], atol=1e-6, rtol=0)


def test_augmenter_with_batched_nets_equals_eq5_with_each_encoder_alone(images: torch.Tensor) -> None:
    """PolicyAugmenter evaluates all encoders' networks of m in one pass (MagnitudeNetStack) and warps all affine
    ops at once; the output and the logits' gradients must be those of Eq. 5 written with each encoder alone."""
    aug = PolicyAugmenter(seed=0)
    sample = aug.sample(len(images))
    got = aug(images, sample)
    expected = images.clone()
    for k, name in enumerate(sample.ops):
        m = sample.magnitudes[:, k]
        spec = get_op(name)
        changed = aug.encoders[name](images, m) if spec.has_magnitude else spec.reference(images, m, sample.positions)
        # The augmenter skips pairs whose gate or magnitude is below 1e-6 (their share is below a millionth).
        kept = (sample.gates[:, k] >= 1e-6) & ((m.abs() >= 1e-6) | (not spec.has_magnitude))
        expected = expected + (kept * sample.gates[:, k]).view(-1, 1, 1, 1) * (changed - images)
    expected = expected.clamp(0, 1)
    # float32 throughout; the batched nets and the grouped warp sum in another order: a few ulps.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    logits = [aug.probability_logits, aug.magnitude_logits]
    grads = torch.autograd.grad(got.square().sum(), logits, retain_graph=True)  # the sample is shared
    grads_expected = torch.autograd.grad(expected.square().sum(), logits)
    for g, e in zip(grads, grads_expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-3)


def test_a_frozen_encoder_stays_in_eval_mode_inside_a_training_module() -> None:
    """load_priors and PolicyAugmenter freeze their encoders; a model holding one that calls .train() must not turn
    it back into a fitting encoder (Posterize and Solarize would lose their surrogate gradients)."""
    frozen, fitting = freeze(build_encoder("Posterize")), build_encoder("Solarize")
    holder = torch.nn.ModuleDict({"frozen": frozen, "fitting": fitting}).train()
    assert frozen.frozen and not frozen.training
    assert fitting.training and not fitting.frozen
    holder.eval()
    assert not fitting.training


@pytest.mark.parametrize("arch", ["default", "paper"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_shipped_encoders_in_half_precision_match_float32(arch: str, dtype: torch.dtype) -> None:
    """Every shipped encoder on 224 px natural photos in fp16 and bf16 against float32; bounds and reasons as
    test_ops.HALF_MAE (the encoders' geometry and steps run in float32 too)."""
    from diffaug.priors import load_priors

    from .test_ops import HALF_MAE, natural_batch

    x = natural_batch(224)
    for name, encoder in load_priors(arch=arch).items():
        m = torch.tensor([-0.7, 1.0]) if get_op(name).signed else torch.tensor([0.4, 1.0])
        with torch.no_grad():
            expected = encoder.eval()(x, m)
            out = encoder(x.to(dtype), m)
        assert out.dtype == dtype and torch.isfinite(out).all(), name
        mae = (out.float() - expected).abs().mean().item()
        assert mae <= HALF_MAE[dtype], f"{arch} {name}: mean absolute difference {mae:.4f}"


@pytest.mark.parametrize("size", [224, 512])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_augmenters_in_half_precision_match_float32_on_the_same_sample(dtype: torch.dtype, size: int) -> None:
    """PolicyAugmenter (both geometries, both forwards) and ReferencePolicy (both geometries) on natural photos:
    the same sample in fp16 or bf16 against float32; mean bounds and reasons as test_ops.HALF_MAE. High
    probabilities and magnitudes so that most images draw several ops, affine ones among them."""
    from diffaug import ReferencePolicy

    from .test_ops import HALF_MAE, natural_batch

    x = natural_batch(size, 3)
    settings = {"probability": 0.95, "magnitude": 0.9, "n_ops": 6}
    for augmenter in (PolicyAugmenter(**settings), PolicyAugmenter(geometry="composed", **settings),
                      PolicyAugmenter(forward="reference", **settings), ReferencePolicy(**settings),
                      ReferencePolicy(geometry="composed", **settings)):
        augmenter.eval()
        sample = augmenter.sample(len(x), torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected, out = augmenter(x, sample), augmenter(x.to(dtype), sample)
        what = f"{type(augmenter).__name__} {augmenter.geometry} {augmenter.settings().get('forward', '')}"
        assert out.dtype == dtype and torch.isfinite(out).all(), what
        error = (out.float() - expected).abs()
        assert error.mean().item() <= HALF_MAE[dtype], f"{what}: mean {error.mean().item():.4f}"
        # Every pixel: a few roundings of a value <= 1 (bf16 eps 2^-7) stay well under 0.05, whereas maps built
        # from a magnitude rounded to half precision move the pixels near the edges by a visible step (over 0.1).
        assert error.max().item() <= 0.05, f"{what}: max {error.max().item():.4f}"
