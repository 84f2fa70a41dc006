"""Reference ops against PIL on real uint8 photos, and the op table's contract."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import diffaug
from diffaug import DiffAugError, apply_op
from diffaug.ops import MAGNITUDE_OPS, OPS, OPS_TABLE, cutout, get_op, sampling_grid, warp, warp_rows

from .conftest import photo, to_tensor

# PIL rounds every result to an 8-bit level and we do not, so up to half a level of difference is expected on
# every pixel; the issue allows a mean absolute difference of 1 level of 255.
PIL_MAE_LEVELS = 1.0
SIGNED_GRID = (-1.0, -0.6, -0.25, 0.3, 0.7, 1.0)
UNSIGNED_GRID = (0.1, 0.3, 0.5, 0.75, 1.0)
PHOTOS = ("astronaut.png", "coffee.png", "camera.png")


def _pil_affine(image: Image.Image, linear: list[list[float]], shift: tuple[float, float]) -> Image.Image:
    """PIL's Image.transform with our convention: about the centre, shift as a fraction of the size."""
    width, height = image.size
    cx, cy = width / 2, height / 2
    (a, b), (d, e) = linear
    c = cx + shift[0] * width - a * cx - b * cy
    f = cy + shift[1] * height - d * cx - e * cy
    return image.transform(image.size, Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR)


def pil_reference(name: str, image: Image.Image, m: float) -> Image.Image:
    """The PIL op that diffaug's reference op promises to equal."""
    factor = 1 + 0.9 * m
    s, t = 0.3 * m, 150 / 331 * m
    table = {
        "Brightness": lambda: ImageEnhance.Brightness(image).enhance(factor),
        "Color": lambda: ImageEnhance.Color(image).enhance(factor),
        "Contrast": lambda: ImageEnhance.Contrast(image).enhance(factor),
        "Sharpness": lambda: ImageEnhance.Sharpness(image).enhance(factor),
        "Posterize": lambda: ImageOps.posterize(image, int(round(8 - 4 * m))),
        # PIL inverts levels >= its integer threshold; ours is 256 (1 - m) levels.
        "Solarize": lambda: ImageOps.solarize(image, math.ceil(256 * (1 - m))),
        "ShearX": lambda: _pil_affine(image, [[1, s], [0, 1]], (0, 0)),
        "ShearY": lambda: _pil_affine(image, [[1, 0], [s, 1]], (0, 0)),
        "TranslateX": lambda: _pil_affine(image, [[1, 0], [0, 1]], (t, 0)),
        "TranslateY": lambda: _pil_affine(image, [[1, 0], [0, 1]], (0, t)),
        "Rotate": lambda: image.rotate(30 * m, resample=Image.BILINEAR),
        "Equalize": lambda: ImageOps.equalize(image),
        "Invert": lambda: ImageOps.invert(image),
    }
    return table[name]()


def _cases() -> list[tuple[str, str, float]]:
    cases = []
    for name in OPS:
        if name == "Cutout":  # no PIL counterpart; tested on its own below
            continue
        grid = SIGNED_GRID if get_op(name).signed else UNSIGNED_GRID
        cases += [(name, p, m) for p in PHOTOS for m in (grid if get_op(name).has_magnitude else (0.0,))]
    return cases


@pytest.mark.parametrize("name,photo_name,m", _cases())
def test_reference_matches_pil(name: str, photo_name: str, m: float) -> None:
    image = photo(photo_name)
    out = apply_op(name, to_tensor(image), torch.tensor([m]))
    ours = out[0].permute(1, 2, 0).numpy() * 255
    theirs = np.asarray(pil_reference(name, image, m), dtype=np.float64)
    mae = np.abs(ours - theirs).mean()
    assert mae <= PIL_MAE_LEVELS, f"{name} m={m} on {photo_name}: MAE {mae:.3f} levels"


def test_geometry_directions_follow_pil() -> None:
    """A bright dot right of centre: Rotate +m turns it counter-clockwise (up), TranslateX +m samples from the
    right (content moves left), ShearX +m samples further right below the centre (PIL's transform convention)."""
    x = torch.zeros(1, 1, 33, 33)
    x[..., 16, 24] = 1.0
    up = apply_op("Rotate", x, torch.tensor([1.0]))  # 30 degrees
    row, col = divmod(int(up.flatten().argmax()), 33)
    assert row < 16 and col > 16
    left = apply_op("TranslateX", x, torch.tensor([0.25 * 331 / 150]))  # 0.25 of the width
    assert int(left.flatten().argmax()) % 33 < 24


@pytest.mark.parametrize("size", [(32, 32), (17, 40)])
def test_warp_samples_the_documented_map_of_pixel_centres(size: tuple[int, int]) -> None:
    """warp builds its grid as one matrix product with a cached basis. It must sample at linear (p - centre) +
    centre + shift * (W, H), written here point by point in float64, at any aspect ratio; and a basis first cached
    inside inference_mode must still serve autograd afterwards."""
    height, width = size
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, height, width, generator=g, dtype=torch.float64)
    linear = torch.eye(2, dtype=torch.float64) + 0.3 * torch.randn(5, 2, 2, generator=g, dtype=torch.float64)
    shift = 0.2 * torch.randn(5, 2, generator=g, dtype=torch.float64)
    px = (torch.arange(width, dtype=torch.float64) + 0.5 - width / 2).view(1, 1, width)
    py = (torch.arange(height, dtype=torch.float64) + 0.5 - height / 2).view(1, height, 1)
    a = linear.view(5, 4, 1, 1).unbind(1)
    source_x = a[0] * px + a[1] * py + width / 2 + shift[:, :1, None] * width
    source_y = a[2] * px + a[3] * py + height / 2 + shift[:, 1:, None] * height
    grid = torch.stack([source_x / width * 2 - 1, source_y / height * 2 - 1], dim=-1)
    expected = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(warp(x, linear, shift), expected, atol=1e-12, rtol=0)

    x32, linear32, shift32 = x.float(), linear.float().requires_grad_(), shift.float()
    with torch.inference_mode():
        warp(x32[:1], linear32[:1].detach(), shift32[:1])
    out = warp(x32, linear32, shift32)
    out.sum().backward()
    assert linear32.grad is not None and bool(torch.isfinite(linear32.grad).all())
    # float32 coordinates: ~1e-7 of the half-size, ~2e-6 of a pixel at 40 px.
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_compiled_cpu_resample_is_grid_sample_with_its_gradients(mode: str) -> None:
    """Compiled on a CPU, resample calls ATen's grid_sample through a custom op (inductor's decomposition is slower
    there): the op passes torch's own checks (fake tensors, autograd registration) and equals F.grid_sample, values
    and gradients to images and grid, bit for bit (the same ATen kernels). Also inside a compiled function."""
    from diffaug.compiled import grid_sample_cpu
    from diffaug.ops import resample

    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 2, 7, 9, generator=g, requires_grad=True)
    grid = (2.2 * torch.rand(3, 5, 6, 2, generator=g) - 1.1).requires_grad_()
    interpolation = 0 if mode == "bilinear" else 1
    torch.library.opcheck(grid_sample_cpu, (x, grid, interpolation))
    weights = torch.rand(3, 2, 5, 6, generator=g)
    results = []
    for fn in (lambda: torch.nn.functional.grid_sample(x, grid, mode=mode, align_corners=False),
               lambda: grid_sample_cpu(x, grid, interpolation),
               torch.compile(lambda: resample(x, grid, mode), fullgraph=True)):  # type: ignore[arg-type]
        with warnings.catch_warnings():  # compiling raises torch's own deprecation warnings: not ours
            warnings.simplefilter("ignore")
            out = fn()
            results.append((out, *torch.autograd.grad((out * weights).sum(), (x, grid))))
    for got in results[1:]:
        for value, expected in zip(got, results[0], strict=True):
            torch.testing.assert_close(value, expected, atol=0, rtol=0)


@pytest.mark.parametrize("rows", [[], [1, 3], [0, 1, 2, 3]])
def test_warp_rows_warps_those_rows_as_warp_does_and_leaves_the_others(rows: list[int]) -> None:
    """warp_rows skips the gather and scatter when the rows are every image and reuses a grid in the images' dtype:
    either way the rows equal warp's and the other images are returned bit for bit."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 2, 9, 11, generator=g)
    linear = torch.eye(2) + 0.3 * torch.randn(4, 2, 2, generator=g)
    shift = 0.2 * torch.randn(4, 2, generator=g)
    index = torch.tensor(rows, dtype=torch.long)
    expected = x.clone()
    expected[index] = warp(x, linear, shift)[index]
    out, grid = warp_rows(x, linear, shift, index, "nearest" if len(rows) == 2 else "bilinear")
    if len(rows) == 2:  # nearest: the same samples as warp's nearest
        expected[index] = warp(x, linear, shift, "nearest")[index]
    assert torch.equal(out, expected)
    assert grid is None if not rows else grid.shape == (len(rows), 9, 11, 2)
    if rows:
        again, reused = warp_rows(x, linear, shift, index, "nearest" if len(rows) == 2 else "bilinear", grid)
        assert reused is grid and torch.equal(again, out)
        _, rebuilt = warp_rows(x.double(), linear, shift, index, grid=grid)  # another dtype: its own grid
        assert rebuilt.dtype == torch.float64
        torch.testing.assert_close(rebuilt.float(), sampling_grid(x[index], linear[index], shift[index]))


@pytest.mark.parametrize("name", MAGNITUDE_OPS)
def test_magnitude_zero_is_exactly_identity(name: str, images: torch.Tensor) -> None:
    out = apply_op(name, images, torch.zeros(len(images)))
    if get_op(name).kind == "affine":
        # grid_sample at the identity samples pixel centres computed in float32: off by a few ulps.
        torch.testing.assert_close(out, images, atol=1e-5, rtol=0)
    else:
        assert torch.equal(out, images)


@pytest.mark.parametrize("name", OPS)
def test_per_sample_magnitudes_equal_one_by_one(name: str, images: torch.Tensor) -> None:
    spec = get_op(name)
    m = torch.linspace(-1 if spec.signed else 0, 1, len(images))
    position = torch.rand(len(images), 2, generator=torch.Generator().manual_seed(0))
    batched = apply_op(name, images, m, position=position)
    single = torch.cat([apply_op(name, images[i : i + 1], m[i : i + 1], position=position[i : i + 1])
                        for i in range(len(images))])
    # The affine ops' sampling grid is one matrix product (warp), whose summation order depends on the batch size:
    # coordinates differ by an ulp or two (~2e-7 of the half-size), pixels at 32 px by up to ~1e-5.
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", OPS)
def test_dtype_kept_and_input_untouched(name: str, images: torch.Tensor) -> None:
    x = images.double()
    version = x._version
    out = apply_op(name, x, torch.full((len(x),), 0.5, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert x._version == version
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_unbatched_input() -> None:
    x = torch.rand(3, 16, 16)
    assert apply_op("Color", x, torch.tensor([0.5])).shape == (3, 16, 16)


def test_gray_images_are_supported() -> None:
    x = torch.rand(2, 1, 16, 16)
    for name in OPS:
        assert apply_op(name, x, torch.tensor([0.5, 0.2])).shape == x.shape
    # Colour saturation of a gray image is a no-op, as in PIL.
    assert torch.equal(apply_op("Color", x, torch.tensor([1.0, -1.0])), x)


def test_cutout_erases_a_square_of_the_documented_size() -> None:
    x = torch.ones(1, 3, 32, 32)
    out = cutout(x, torch.tensor([[0.5, 0.5]]))
    erased = (out == 0).all(dim=1)
    assert int(erased.sum()) == 16 * 16
    rows, cols = erased[0].nonzero().unbind(1)
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (8, 23, 8, 23)


def test_solarize_threshold_uses_256_levels() -> None:
    levels = torch.arange(256.0).view(1, 1, 16, 16) / 255
    out = apply_op("Solarize", levels, torch.tensor([1 - 200 / 256]))  # threshold at level 200
    inverted = (out != levels).flatten().nonzero().flatten()
    assert int(inverted.min()) == 200 and len(inverted) == 56


def test_op_table_is_declarative_and_complete() -> None:
    assert OPS == (
        "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "ShearX", "ShearY",
        "TranslateX", "TranslateY", "Rotate", "Equalize", "Invert", "Cutout",
    )
    assert diffaug.OPS is OPS and len(MAGNITUDE_OPS) == 11
    for spec in OPS_TABLE:
        assert spec.parameter_range, spec.name
        assert spec.has_magnitude == (spec.kind != "fixed")


def test_magnitude_maps() -> None:
    m = torch.tensor([-1.0, 0.0, 1.0])
    assert get_op("Brightness").parameter(m).tolist() == pytest.approx([0.1, 1.0, 1.9])
    assert get_op("Rotate").parameter(m).tolist() == pytest.approx([-30, 0, 30])
    assert get_op("ShearX").parameter(m).tolist() == pytest.approx([-0.3, 0, 0.3])
    assert get_op("TranslateY").parameter(m).tolist() == pytest.approx([-150 / 331, 0, 150 / 331])
    assert get_op("Posterize").parameter(torch.tensor([0.0, 1.0])).tolist() == [8, 4]
    assert get_op("Solarize").parameter(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([256 / 255, 0])


# ---------------------------------------------------------------------------------------------------------------
# Errors name what was expected and what was given.


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.zeros(4, 32, 32, 3, dtype=torch.uint8), r"float tensor .* got uint8 of shape \(4, 32, 32, 3\)"),
        (torch.rand(32, 32), r"shape \(B, C, H, W\) or \(C, H, W\).*got float32 of shape \(32, 32\)"),
        (torch.rand(2, 4, 8, 8), r"C in \{1, 3\}.*4 channels"),
        (torch.rand(2, 8, 8, 3), r"channels-last\? use x.permute"),
        (torch.full((1, 3, 4, 4), float("nan")), r"NaN or inf"),
        (torch.full((1, 3, 4, 4), float("inf")), r"NaN or inf"),
        (torch.full((1, 3, 4, 4), 255.0), r"in \[0, 1\].*got values in \[255, 255\]"),
        ([[0.5]], r"got list"),
    ],
)
def test_bad_images_raise(x: object, match: str) -> None:
    with pytest.raises(DiffAugError, match=match):
        apply_op("Invert", x, torch.zeros(1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name,m,match",
    [
        ("Rotate", torch.zeros(3), r"magnitude for Rotate must be a float tensor of shape \(2,\).*got float32 of shape \(3,\)"),
        ("Rotate", torch.zeros(2, 1), r"shape \(2,\).*got float32 of shape \(2, 1\)"),
        ("Rotate", torch.tensor([2.0, 0.0]), r"values in \[-1, 1\]; got values in \[0, 2\]"),
        ("Posterize", torch.tensor([-0.5, 0.0]), r"values in \[0, 1\]; got values in \[-0.5, 0\]"),
        ("Rotate", torch.zeros(2, dtype=torch.long), r"got int64"),
        ("Rotate", 0.5, r"got float"),
    ],
)
def test_bad_magnitude_raises(name: str, m: object, match: str) -> None:
    with pytest.raises(DiffAugError, match=match):
        apply_op(name, torch.rand(2, 3, 8, 8), m)  # type: ignore[arg-type]


def test_unknown_op_lists_known_ones() -> None:
    with pytest.raises(DiffAugError, match=r"unknown op name\(s\) \['Rotation'\]; expected names from \['Brightness'"):
        apply_op("Rotation", torch.rand(1, 3, 8, 8), torch.zeros(1))


def test_error_is_a_value_error() -> None:
    assert issubclass(DiffAugError, ValueError)


# Half precision against float32, on natural photos at real resolutions. What is left is the images' own rounding:
# fp16 keeps 11 significant bits (a value in [0.5, 1] is off by up to 2.4e-4), bf16 8 (up to 2e-3), and a few ops
# amplify it (a blend by up to 1.9, a pixel at Solarize's threshold may switch). The bounds on the mean
# absolute difference, 0.01 (fp16) and 0.02 (bf16), sit well above that and well below what a grid built in half
# precision gives (0.07 to 0.1, or NaN: bf16 has about a pixel of resolution at 224 px).
HALF_MAE = {torch.float16: 0.01, torch.bfloat16: 0.02}


def natural_batch(size: int, count: int = 2) -> torch.Tensor:
    return torch.cat([to_tensor(photo(name, (size, size))) for name in PHOTOS[:count]])


@pytest.mark.parametrize("size", [224, 512])
@pytest.mark.parametrize("dtype", list(HALF_MAE), ids=str)
def test_every_op_in_half_precision_matches_float32(dtype: torch.dtype, size: int) -> None:
    x = natural_batch(size)
    position = torch.tensor([[0.3, 0.6], [0.8, 0.2]])
    for spec in OPS_TABLE:
        m = torch.tensor([-0.7, 1.0]) if spec.signed else torch.tensor([0.4, 1.0])
        expected = apply_op(spec.name, x, m, position=position)
        out = apply_op(spec.name, x.to(dtype), m, position=position)
        assert out.dtype == dtype, spec.name
        assert torch.isfinite(out).all(), spec.name
        mae = (out.float() - expected).abs().mean().item()
        assert mae <= HALF_MAE[dtype], f"{spec.name}: mean absolute difference {mae:.4f} at {size} px"


@pytest.mark.parametrize("dtype", list(HALF_MAE), ids=str)
def test_warp_builds_its_grid_in_float32_for_half_images(dtype: torch.dtype) -> None:
    """The grid and the sampling are float32 whatever the images' dtype, and the result comes back in it."""
    x = natural_batch(224, 1)
    linear, shift = torch.eye(2).expand(1, 2, 2) * 1.1, torch.tensor([[0.05, -0.1]])
    assert sampling_grid(x.to(dtype), linear, shift).dtype == torch.float32
    out = warp(x.to(dtype), linear, shift)
    assert out.dtype == dtype
    assert (out.float() - warp(x, linear, shift)).abs().max() <= 2 * torch.finfo(dtype).eps  # one rounding of a value <= 1


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "strided-batch"])
@pytest.mark.parametrize("name", OPS)
def test_every_op_takes_non_contiguous_images(name: str, layout: str) -> None:
    """A transposed view, a channels-last tensor or every other image of a batch gives what the same images
    contiguous give: the same arithmetic, though a kernel may sum in another order for another layout (a few ulps)."""
    base = natural_batch(32, 3)
    x = {
        "transposed": base.permute(0, 1, 3, 2),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "strided-batch": torch.cat([base, base.flip(0)])[::2],
    }[layout]
    assert not x.is_contiguous()
    m = torch.tensor([-0.7, 1.0, 0.4]) if get_op(name).signed else torch.tensor([0.4, 1.0, 0.7])
    position = torch.tensor([[0.3, 0.6], [0.8, 0.2], [0.5, 0.5]])
    expected = apply_op(name, x.contiguous(), m, position=position)
    torch.testing.assert_close(apply_op(name, x, m, position=position), expected, atol=1e-6, rtol=0)
