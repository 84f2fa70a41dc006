"""Encoder internals that the augmenter relies on: the paper's spatial transformer in warp's terms, and the
straight-through steps of Posterize and Solarize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffaug.encoders import PaperAffineEncoder, _ramp, _step


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
