"""The op table and the reference ops: PIL semantics on float tensors in [0, 1], per-sample magnitudes.

Every op takes a magnitude per sample. Signed ops take it in [-1, 1] (the sign is the direction), the others in
[0, 1]; magnitude 0 is exactly the identity for every op that has a magnitude. The map from magnitude to the op's
own parameter is a pure function written next to its range in ``OPS_TABLE``.

Geometry uses the convention of PIL's ``Image.transform``: a 2x2 matrix and a shift map each *output* pixel to
the *input* point it samples, about the image centre, with bilinear sampling and black outside the image (see
``warp`` for the one-pixel rim).
Shear is about the centre (AutoAugment shears about the top-left corner, which adds a translation of
shear * H / 2; centring keeps the op aspect- and resolution-free). Translation is a fraction of the image size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DiffAugError, check_images, check_magnitude, check_names

__all__ = ["OPS", "MAGNITUDE_OPS", "OPS_TABLE", "OpSpec", "apply_op", "get_op", "op_names"]

# ITU-R 601-2 luma, as PIL's convert("L").
_LUMA = (0.299, 0.587, 0.114)
# Side of the Cutout square as a fraction of the shorter image side: 16 px on 32 px CIFAR (DeVries & Taylor, 2017).
CUTOUT_FRACTION = 0.5


# --------------------------------------------------------------------------------------------------------------
# Features shared by the reference ops and the encoders.


def gray(x: Tensor) -> Tensor:
    """Luma (B, 1, H, W) of an RGB batch as PIL's ``convert("L")``; a 1-channel batch is its own gray."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return torch.add(torch.add(r * _LUMA[0], g, alpha=_LUMA[1]), b, alpha=_LUMA[2]).unsqueeze(1)  # 3 kernels, not 5


def smooth(x: Tensor) -> Tensor:
    """PIL's SMOOTH filter, (3x3 box sum + 4 x centre) / 13; border pixels keep their value as PIL does.

    Written as separable sums of shifted slices: a depthwise conv2d costs several times more on the CPU.
    """
    height, width = x.shape[-2:]
    if height < 3 or width < 3:
        return x
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = x.clone()
    out[..., 1:-1, 1:-1] = box.add_(x[..., 1:-1, 1:-1], alpha=4).mul_(1 / 13)
    return out


def eight_bit_levels(x: Tensor) -> Tensor:
    """round(255 x), detached, in float32 or wider: in bf16, 255 x has a spacing of one level above 128."""
    return torch.round(x.detach().to(torch.promote_types(x.dtype, torch.float32)) * 255)


def clip01(x: Tensor) -> Tensor:
    """Clip to [0, 1]. hardtanh, not clamp: the same values and gradients, with a cheaper backward on the CPU."""
    return F.hardtanh(x, 0.0, 1.0)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL ``Image.blend(degenerate, x, factor)``, clipped to [0, 1]; written around x so factor 1 gives x exactly."""
    factor = factor.to(x).view(-1, 1, 1, 1)
    return clip01(x + (factor - 1) * (x - degenerate))


def warp(x: Tensor, linear: Tensor, shift: Tensor, mode: Literal["bilinear", "nearest"] = "bilinear") -> Tensor:
    """Sample ``x`` at ``linear @ (p - centre) + centre + shift * size`` for each output pixel ``p``, bilinearly,
    black outside the image.

    The edge blends with black over half a pixel (grid_sample's zero padding), where PIL repeats the edge pixel up
    to the border and then cuts to black; the two differ only on the one-pixel rim of the sampled area. We keep
    the blend because it makes the output continuous in the matrix: a cut is invisible to gradients, and a
    meta-encoder could then not be fitted closely at the rim (figures in benchmarks/results/layouts.md).

    The sampling grid is one matrix product, as in ``F.affine_grid``, so it follows the float32 matmul precision
    setting (``torch.backends.cuda.matmul.allow_tf32`` and the like) as that does. Geometry is never computed in
    half precision (see ``geometry_dtype``): the grid and the sampling run in float32 for fp16 and bf16 images,
    under autocast or not, and the result is cast back to the images' dtype.

    Args:
        x: (B, C, H, W) images.
        linear: (B, 2, 2) maps in pixel units, output to input (PIL's convention).
        shift: (B, 2) input offsets as a fraction of (W, H).
        mode: "bilinear" for images and soft masks; "nearest" for label maps.
    """
    return resample(x, sampling_grid(x, linear, shift), mode)


def geometry_dtype(x: Tensor) -> torch.dtype:
    """The dtype geometry (matrices, grids, sampling) is computed in for images like ``x``: float32 for fp16 and
    bf16 images, their own dtype otherwise. A bf16 grid has 8 significant bits, about a pixel at 224 px, and fp16
    overflows or rounds grid coordinates alike; the CPU grid_sample in half returns NaN or moved pixels."""
    return torch.promote_types(x.dtype, torch.float32)


def sampling_grid(x: Tensor, linear: Tensor, shift: Tensor) -> Tensor:
    """(B, H, W, 2) grid of ``warp``'s maps for images like ``x`` (their size and device), in ``geometry_dtype(x)``,
    to sample other tensors of the same images by the same maps with ``resample`` (masks after their images)
    without rebuilding it."""
    if torch.is_autocast_enabled(x.device.type):  # a half-precision grid would move pixels by ~1e-3 of the size
        with torch.autocast(x.device.type, enabled=False):
            return sampling_grid(x, linear, shift)
    height, width = x.shape[-2:]
    dtype = geometry_dtype(x)
    scaled = linear.to(dtype) * grid_scale(height, width, linear.new_empty(0, dtype=dtype))
    # Per image: the grid's (x, y) step per unit of u, per unit of v, and its offset; see _grid_basis.
    theta = torch.cat([scaled.transpose(1, 2).reshape(-1, 4), 2 * shift.to(dtype)], dim=1)
    return (theta @ _grid_basis(height, width, dtype, x.device)).view(-1, height, width, 2)


def warp_rows(x: Tensor, linear: Tensor, shift: Tensor, rows: Tensor, mode: Literal["bilinear", "nearest"] = "bilinear",
              grid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``warp`` of the images ``rows`` of ``x`` (sorted, unique), the others as they are, and the grid they were
    sampled at (None if no row). ``linear`` and ``shift`` are the whole batch's; ``grid``, the same rows' grid from
    an earlier call (their images before their masks), is reused where it is in ``geometry_dtype(x)``."""
    if rows.numel() == 0:
        return x, None
    every = rows.numel() == x.shape[0]  # rows are sorted: then they are every image, with no gather or scatter
    part = x if every else x.index_select(0, rows)
    if grid is None or grid.dtype != geometry_dtype(x):
        grid = sampling_grid(part, linear if every else linear.index_select(0, rows),
                             shift if every else shift.index_select(0, rows))
    warped = resample(part, grid, mode)
    return (warped if every else x.index_copy(0, rows, warped)), grid


def resample(x: Tensor, grid: Tensor, mode: Literal["bilinear", "nearest"] = "bilinear") -> Tensor:
    """``x`` sampled at ``grid`` (from ``sampling_grid``), black outside the image: the second half of ``warp``.

    Sampled in ``geometry_dtype(x)`` and returned in ``x``'s dtype: half-precision images are sampled in float32.
    """
    if torch.is_autocast_enabled(x.device.type):  # as without autocast
        with torch.autocast(x.device.type, enabled=False):
            return resample(x, grid, mode)
    dtype = geometry_dtype(x)
    if x.dtype != dtype:
        return resample(x.to(dtype), grid, mode).to(x.dtype)
    grid = grid.to(dtype)
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        # Registered by diffaug.compiled (imported with the package), which says why.
        return torch.ops.diffaug.grid_sample_cpu(x, grid, 0 if mode == "bilinear" else 1)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def grid_scale(height: int, width: int, like: Tensor) -> Tensor:
    """(2, 2) factors that turn a linear map in pixel units into the same map in grid_sample's coordinates, which
    run over [-1, 1] on each axis separately; made with ``like``'s dtype and device."""
    aspect = height / width
    return like.new_tensor([[1.0, aspect], [1.0 / aspect, 1.0]])


@functools.lru_cache(maxsize=8)
def _grid_basis(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(6, 2 H W): grid = theta (B, 6) @ basis is, at pixel (v, u) and axis k, theta_uk u + theta_vk v + theta_1k,
    with u, v the pixel centres in [-1, 1].

    One matrix product builds every image's grid, and its backward is one more. The same sums written as broadcast
    multiply-adds over (B, H, W, 2) cost more on the CPU at small sizes (their innermost dimension is 2), the same at
    224 px (figures in benchmarks/results/layouts.md). Cached: a few sizes
    per process, 12 H W values each.
    """
    with torch.inference_mode(False):  # the cache outlives an inference_mode block, and autograd saves the basis
        f64 = {"device": device, "dtype": torch.float64}
        u = (torch.arange(width, **f64) * 2 + 1) / width - 1
        v = (torch.arange(height, **f64) * 2 + 1) / height - 1
        pixels = torch.stack(torch.broadcast_tensors(u, v.unsqueeze(1), torch.ones(1, **f64)), dim=-1)  # (H, W, 3)
        return torch.kron(pixels.view(-1, 3), torch.eye(2, **f64)).t().to(dtype).contiguous()


def _eye(m: Tensor) -> Tensor:
    return torch.eye(2, dtype=m.dtype, device=m.device).expand(m.shape[0], 2, 2)


# --------------------------------------------------------------------------------------------------------------
# Reference kernels, each a pure function of images and the op's own parameter (or a degenerate image).


def black(x: Tensor) -> Tensor:
    return x.new_zeros(1, 1, 1, 1)  # broadcasts; a full zero image would only cost memory traffic


def gray_mean(x: Tensor) -> Tensor:
    return gray(x).mean(dim=(-3, -2, -1), keepdim=True)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``bits`` of each 8-bit level; whatever lies below a level is kept, so 8 bits is the identity."""
    step = torch.exp2(8 - bits.to(x)).view(-1, 1, 1, 1)
    levels = eight_bit_levels(x).to(x.dtype)
    # A value just above a level's midpoint rounds up and could dip below 0 by half a level; hence the clip.
    return clip01(x - torch.remainder(levels, step) / 255)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert every value at or above ``threshold``; a threshold above 1 (e.g. 256/255) inverts nothing."""
    # Compare in 8-bit levels with a small allowance so that level k/255 meets a threshold of exactly k/255.
    wide = torch.promote_types(x.dtype, torch.float32)  # a bf16 product is a level off above 128
    invert = x.to(wide) * 255 >= threshold.to(wide).view(-1, 1, 1, 1) * 255 - 1e-3
    return torch.where(invert, 1 - x, x)


def equalize(x: Tensor) -> Tensor:
    """PIL's ImageOps.equalize per image and channel, batched (kornia's loops over images)."""
    b, c, h, w = x.shape
    levels = eight_bit_levels(x).long().clamp_(0, 255).reshape(b * c, h * w)  # reshape: x may be a non-contiguous view
    # The histogram and look-up table hold integers; in floating point (exact below 2**24 pixels per channel) their
    # arithmetic is cheaper than in int64, and the table maps straight to values in [0, 1].
    counts = torch.float32 if h * w < 2**24 else torch.float64
    hist = torch.zeros(b * c, 256, dtype=counts, device=x.device)
    hist.scatter_add_(1, levels, hist.new_ones(1, 1).expand_as(levels))
    last_used = hist.gather(1, (hist > 0).cumsum(dim=1).argmax(dim=1, keepdim=True))
    step = torch.div(h * w - last_used, 255, rounding_mode="floor")
    before = hist.cumsum(dim=1) - hist
    lut = torch.div(before + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1), rounding_mode="floor")
    out = lut.clamp_(max=255).div_(255).to(x.dtype).gather(1, levels).view(b, c, h, w)
    unchanged = step == 0  # a channel of one level (or of one level and a single other pixel): PIL returns it as is
    return torch.where(unchanged.view(b, c, 1, 1), x, out)  # always: a test on the host would sync


def invert(x: Tensor) -> Tensor:
    return 1 - x


def cutout(x: Tensor, position: Tensor, fraction: float = CUTOUT_FRACTION) -> Tensor:
    """Zero a square of side ``fraction * min(H, W)`` centred at ``position`` ((B, 2) fractions of (W, H))."""
    height, width = x.shape[-2:]
    half = fraction * min(height, width) / 2
    position = position.to(geometry_dtype(x))  # bf16 pixel indices are exact only up to 256
    cols = torch.arange(width, device=x.device, dtype=position.dtype) + 0.5
    rows = torch.arange(height, device=x.device, dtype=position.dtype) + 0.5
    inside_x = (cols - position[:, :1] * width).abs() < half
    inside_y = (rows - position[:, 1:] * height).abs() < half
    keep = ~(inside_y.unsqueeze(2) & inside_x.unsqueeze(1))
    return x * keep.unsqueeze(1).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# The op table.

Reference = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``reference(x, magnitude, position)``: x (B, C, H, W), magnitude (B,), position (B, 2) uniform in [0, 1)."""


@dataclass(frozen=True)
class OpSpec:
    """One augmentation op.

    Attributes:
        name: the AutoAugment name.
        kind: "colour" (pixel-wise), "affine" (geometry) or "fixed" (no magnitude: only its probability learns).
        signed: the magnitude is in [-1, 1] and its sign is the direction.
        parameter: magnitude (B,) -> the op's own parameter (B,), a pure function; its range is ``parameter_range``.
        parameter_range: the range of ``parameter`` over the magnitude range, for people.
        reference: the exact op, ``reference(x, magnitude, position)``.
        encoder: the family of the default meta-encoder ("blend", "staircase", "threshold", "affine"; "" if none).
        degenerate: for PIL-style blends, the image the op blends away from (black, gray, mean, blur).
        geometry: for affine ops, magnitude (B,) -> (linear (B, 2, 2), shift (B, 2)), the arguments of ``warp``.
    """

    name: str
    kind: Literal["colour", "affine", "fixed"]
    signed: bool
    parameter: Callable[[Tensor], Tensor]
    parameter_range: str
    reference: Reference
    encoder: str = ""
    degenerate: Callable[[Tensor], Tensor] | None = None
    geometry: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None

    @property
    def has_magnitude(self) -> bool:
        return self.kind != "fixed"


def _factor(m: Tensor) -> Tensor:
    return 1 + 0.9 * m  # enhance factor in [0.1, 1.9]


def _bits(m: Tensor) -> Tensor:
    return torch.round(8 - 4 * m)  # bits kept in {4, ..., 8}


def _threshold(m: Tensor) -> Tensor:
    return (256 / 255) * (1 - m)  # in [0, 256/255]; above 1 nothing is inverted


def _shear(m: Tensor) -> Tensor:
    return 0.3 * m  # shear in [-0.3, 0.3]


def _translate(m: Tensor) -> Tensor:
    return (150 / 331) * m  # shift in [-0.453, 0.453] of the image size (150 px of 331 in AutoAugment)


def _rotate(m: Tensor) -> Tensor:
    return 30 * m  # degrees in [-30, 30], counter-clockwise as PIL's Image.rotate


def _shear_linear(s: Tensor, row: int) -> Tensor:
    linear = _eye(s).clone()
    linear[:, row, 1 - row] = s
    return linear


def _rotation_linear(degrees: Tensor) -> Tensor:
    a = -torch.deg2rad(degrees)
    cos, sin = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], dim=1)


def _no_shift(m: Tensor) -> Tensor:
    return m.new_zeros(m.shape[0], 2)


def _axis_shift(t: Tensor, axis: int) -> Tensor:
    return torch.stack([t, torch.zeros_like(t)] if axis == 0 else [torch.zeros_like(t), t], dim=-1)


def _enhance(name: str, degenerate: Callable[[Tensor], Tensor]) -> OpSpec:
    """A PIL ImageEnhance op: blend between ``degenerate(x)`` and x with factor 1 + 0.9 m."""

    def reference(x: Tensor, m: Tensor, _: Tensor) -> Tensor:
        return _blend(degenerate(x), x, _factor(m))

    return OpSpec(name, "colour", True, _factor, "factor 1 + 0.9 m in [0.1, 1.9]", reference, "blend", degenerate)


def _tone(name: str, parameter: Callable, parameter_range: str, kernel: Callable, encoder: str) -> OpSpec:
    return OpSpec(name, "colour", False, parameter, parameter_range, lambda x, m, _: kernel(x, parameter(m)), encoder)


def _affine(name: str, parameter: Callable, parameter_range: str, linear: Callable, shift: Callable) -> OpSpec:
    def geometry(m: Tensor) -> tuple[Tensor, Tensor]:
        p = parameter(m)
        return linear(p), shift(p)

    def reference(x: Tensor, m: Tensor, _: Tensor) -> Tensor:
        return warp(x, *geometry(m.to(geometry_dtype(x))))

    return OpSpec(name, "affine", True, parameter, parameter_range, reference, "affine", geometry=geometry)


def _fixed(name: str, kernel: Callable[[Tensor, Tensor], Tensor]) -> OpSpec:
    return OpSpec(name, "fixed", False, lambda m: m, "no magnitude", lambda x, _, position: kernel(x, position))


# Paper order, as in the official code.
OPS_TABLE: tuple[OpSpec, ...] = (
    _enhance("Brightness", black),  # PIL ImageEnhance.Brightness: f x
    _enhance("Color", gray),  # ImageEnhance.Color: gray + f (x - gray)
    _enhance("Contrast", gray_mean),  # ImageEnhance.Contrast: mean + f (x - mean)
    _enhance("Sharpness", smooth),  # ImageEnhance.Sharpness: blur + f (x - blur)
    _tone("Posterize", _bits, "bits round(8 - 4 m) in {4, ..., 8}", posterize, "staircase"),
    _tone("Solarize", _threshold, "threshold 256/255 (1 - m) in [0, 1.004]", solarize, "threshold"),
    _affine("ShearX", _shear, "shear 0.3 m in [-0.3, 0.3]", lambda s: _shear_linear(s, 0), _no_shift),
    _affine("ShearY", _shear, "shear 0.3 m in [-0.3, 0.3]", lambda s: _shear_linear(s, 1), _no_shift),
    _affine("TranslateX", _translate, "150/331 m of the width", _eye, lambda t: _axis_shift(t, 0)),
    _affine("TranslateY", _translate, "150/331 m of the height", _eye, lambda t: _axis_shift(t, 1)),
    _affine("Rotate", _rotate, "30 m degrees, counter-clockwise", _rotation_linear, _no_shift),
    _fixed("Equalize", lambda x, _: equalize(x)),
    _fixed("Invert", lambda x, _: invert(x)),
    _fixed("Cutout", cutout),
)


def _build_registry(table: tuple[OpSpec, ...]) -> dict[str, OpSpec]:
    registry: dict[str, OpSpec] = {}
    for spec in table:
        if spec.name in registry:
            raise DiffAugError(f"op {spec.name!r} is registered twice")
        registry[spec.name] = spec
    return registry


_REGISTRY = _build_registry(OPS_TABLE)
OPS: tuple[str, ...] = tuple(_REGISTRY)
MAGNITUDE_OPS: tuple[str, ...] = tuple(s.name for s in OPS_TABLE if s.has_magnitude)


def get_op(name: str) -> OpSpec:
    """The ``OpSpec`` of ``name``; an unknown name raises ``DiffAugError`` listing the known ones."""
    check_names([name], OPS)
    return _REGISTRY[name]


def apply_op(
    name: str,
    x: Tensor,
    magnitude: Tensor,
    *,
    position: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Apply the reference op ``name`` with a magnitude per sample.

    Args:
        name: an op from ``OPS``.
        x: float images in [0, 1], (B, C, H, W) or (C, H, W).
        magnitude: (B,) (or (1,) for unbatched x); in [-1, 1] for signed ops, [0, 1] otherwise; ignored by
            Equalize, Invert and Cutout.
        position: (B, 2) centre of the Cutout square as fractions of (W, H); drawn from ``generator`` if omitted.

    Shape:
        output: same as ``x``.

    Example:
        >>> x = torch.rand(2, 3, 32, 32)
        >>> apply_op("Rotate", x, torch.tensor([0.5, -1.0])).shape
        torch.Size([2, 3, 32, 32])
    """
    spec = get_op(name)
    check_images(x)
    unbatched = x.dim() == 3
    batch = x.unsqueeze(0) if unbatched else x
    check_magnitude(magnitude, batch.shape[0], spec.signed, name)
    if position is None:
        position = torch.rand(batch.shape[0], 2, generator=generator, device=generator.device if generator else "cpu")
    out = spec.reference(batch, magnitude.to(batch.device), position.to(batch.device, geometry_dtype(batch)))
    return out.squeeze(0) if unbatched else out


def op_names(ops: object = None) -> tuple[str, ...]:
    """Validate an optional op subset (names in any order) and return it in table order."""
    if ops is None:
        return OPS
    if isinstance(ops, str) or not all(isinstance(n, str) for n in ops):  # type: ignore[union-attr]
        raise DiffAugError(f"ops must be a sequence of op names from {list(OPS)}; got {ops!r}")
    names = list(ops)  # type: ignore[arg-type]
    check_names(names, OPS)
    if not names:
        raise DiffAugError(f"ops must name at least one op from {list(OPS)}; got an empty sequence")
    return tuple(n for n in OPS if n in names)

