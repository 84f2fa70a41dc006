"""Targets that follow an augmenter's geometry: label masks, soft masks, boxes and keypoints.

An augmenter with ``geometry="composed"`` moves each image by one map, the arguments of ``ops.warp``: the output
pixel p samples the input at ``linear @ (p - c) + c + shift * (W, H)``, c the image centre. Masks are warped by
the same map (label masks by nearest neighbour, soft masks bilinearly, as the images); points go the other way,
through its inverse, to where their input pixel lands in the output. Coordinates are pixels with the image
spanning [0, W] x [0, H] (pixel centres at i + 0.5), torchvision's detection convention; boxes are ``xyxy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import DiffAugError, describe
from .ops import warp_rows

__all__ = ["Augmented", "check_targets", "move_targets"]


class Augmented(NamedTuple):
    """What an augmenter returns when it is given targets; a field is None where that target was not given.

    Attributes:
        images: the augmented images, as without targets.
        masks: (B, H, W) integer labels (pixels brought in from outside the image are ``ignore_index``) or
            (B, K, H, W) float masks, warped as the images.
        boxes: B tensors (N_i, 4), ``xyxy`` pixels: the box enclosing each box's four moved corners, clipped to
            the image. Every box is returned, in order, so it stays aligned with its labels.
        keypoints: B tensors (N_i, 2), ``xy`` pixels, moved (not clipped: a point may leave the image).
        keep: B bool tensors (N_i,), False for a box with no area left inside the image (drop it, or mask its loss).
    """

    images: Tensor
    masks: Tensor | None = None
    boxes: list[Tensor] | None = None
    keypoints: list[Tensor] | None = None
    keep: list[Tensor] | None = None


def check_targets(
    images: Tensor, masks: Tensor | None, boxes: Sequence[Tensor] | None, keypoints: Sequence[Tensor] | None,
    ignore_index: int | None = None,
) -> None:
    """Raise ``DiffAugError`` for targets that do not fit ``images`` (B, C, H, W), naming what was expected; given
    ``ignore_index``, also label masks whose dtype cannot hold it (or whose labels would not warp exactly)."""
    if images.dim() != 4:
        raise DiffAugError(f"targets need a batch of images (B, C, H, W); got images of shape {tuple(images.shape)} "
                           "(add the batch dimension with x.unsqueeze(0), and to the targets)")
    b, _, h, w = images.shape
    if masks is not None:
        expected = (f"masks must be ({b}, {h}, {w}) integer labels or ({b}, K, {h}, {w}) float masks, matching the "
                    "images")
        if not isinstance(masks, Tensor) or masks.dim() not in (3, 4) or masks.shape[0] != b \
                or tuple(masks.shape[-2:]) != (h, w):
            raise DiffAugError(f"{expected}; got {describe(masks)}")
        if masks.dim() == 3 and (masks.is_floating_point() or masks.is_complex() or masks.dtype == torch.bool):
            raise DiffAugError(f"{expected}; got {describe(masks)} (label masks must be integers, e.g. "
                               "masks.long(); soft masks need the K dimension)")
        if masks.dim() == 4 and not masks.is_floating_point():
            raise DiffAugError(f"{expected}; got {describe(masks)} (a 4-d mask is K float masks per image)")
        if masks.dim() == 3 and ignore_index is not None:
            _check_label_masks(masks, ignore_index)
    for name, points, width in (("boxes", boxes, 4), ("keypoints", keypoints, 2)):
        if points is None:
            continue
        what = "xyxy boxes (N_i, 4)" if width == 4 else "xy keypoints (N_i, 2)"
        expected = f"{name} must be a list of {b} float tensors of {what} in pixels, one per image"
        if isinstance(points, Tensor) or not isinstance(points, Sequence) or len(points) != b:
            got = f"a sequence of {len(points)}" if isinstance(points, Sequence) and not isinstance(points, Tensor) \
                else describe(points)
            raise DiffAugError(f"{expected}; got {got}")
        for i, p in enumerate(points):
            if not isinstance(p, Tensor) or p.dim() != 2 or p.shape[1] != width or not p.is_floating_point():
                raise DiffAugError(f"{expected}; got {describe(p)} for image {i}")
        _check_coordinates(name, points)


def _check_coordinates(name: str, points: Sequence[Tensor]) -> None:
    """Finite coordinates, and boxes with x1 <= x2 and y1 <= y2: an inf would survive the move as a box that
    covers the image, and a reordered box would be a different box. The batch is checked in one pass; only a
    batch that fails is gone through image by image, for the message."""
    present = [p.detach() for p in points if p.numel()]
    if present and len({p.device for p in present}) == 1:
        every = torch.cat(present)
        if bool(torch.isfinite(every).all()) and not (every.shape[1] == 4 and bool((every[:, 2:] < every[:, :2]).any())):
            return
    for i, p in enumerate(points):
        if p.numel() == 0:
            continue
        if not bool(torch.isfinite(p).all()):
            raise DiffAugError(f"{name} must have finite coordinates; got NaN or inf for image {i}: "
                               f"{p[~torch.isfinite(p).all(1)][0].tolist()}")
        if p.shape[1] == 4:
            reversed_ = (p[:, 2:] < p[:, :2]).any(1)
            if bool(reversed_.any()):
                raise DiffAugError(f"boxes must be xyxy with x1 <= x2 and y1 <= y2; got {p[reversed_][0].tolist()} "
                                   f"for image {i} (xywh or yxyx boxes? convert them to xyxy first)")


def _check_label_masks(masks: Tensor, ignore_index: int) -> torch.dtype:
    """The float dtype in which ``masks`` (integer labels) warp exactly, after checking that ``ignore_index`` is a
    value of their dtype (else the padding would wrap, e.g. 255 to -1 in int8)."""
    info = torch.iinfo(masks.dtype)
    if not info.min <= ignore_index <= info.max:
        raise DiffAugError(f"ignore_index must be representable in the masks' dtype {str(masks.dtype).removeprefix('torch.')} "
                           f"(in [{info.min}, {info.max}]) to pad them; got {ignore_index} (use wider masks, e.g. "
                           f"masks.long(), or another ignore_index)")
    if info.bits <= 16 or masks.numel() == 0:  # every label - ignore_index is below 2**24 in magnitude
        return torch.float32
    lo, hi = (int(v) for v in torch.aminmax(masks))
    span = max(abs(lo - ignore_index), abs(hi - ignore_index))
    if span < 2**24:  # float32 integers are exact up to here
        return torch.float32
    if span < 2**53:
        return torch.float64
    raise DiffAugError(f"masks' labels must lie within 2**53 of ignore_index ({ignore_index}) to be warped exactly; "
                       f"got labels in [{lo}, {hi}]")


def _inverse(linear: Tensor) -> Tensor:
    """Inverses of (N, 2, 2) maps, written out: the maps are near rotations and shears, far from singular."""
    a, b, c, d = linear.reshape(-1, 4).unbind(1)
    det = a * d - b * c
    return torch.stack([d, -b, -c, a], dim=1).div(det.unsqueeze(1)).view(-1, 2, 2)


def _flatten(points: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor, list[int]]:
    """Every image's points (N_i, D) in one (sum N_i, D) tensor, the image of each row, and the counts."""
    counts = [len(p) for p in points]
    flat = torch.cat(list(points)).to(device)
    image = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    return flat, image, counts


def _move_points(flat: Tensor, image: Tensor, linear: Tensor, shift: Tensor, is_moved: Tensor, size: Tensor) -> Tensor:
    """Points (N, 2) of images ``image`` (N,) to where their input pixel lands: L^-1 (p - c - shift size) + c."""
    centre = size / 2
    relative = flat - centre - (shift.to(flat.dtype) * size).index_select(0, image)
    inverse = _inverse(linear.to(flat.dtype)).index_select(0, image)
    out = (inverse @ relative.unsqueeze(2)).squeeze(2) + centre
    # Images that did not move keep their points exactly (the identity map would cost rounding).
    return torch.where(is_moved.index_select(0, image).unsqueeze(1), out, flat)


def move_targets(
    linear: Tensor,
    shift: Tensor,
    moved: Tensor,
    masks: Tensor | None,
    boxes: Sequence[Tensor] | None,
    keypoints: Sequence[Tensor] | None,
    size: tuple[int, int],
    ignore_index: int,
    grid: Tensor | None = None,
) -> tuple[Tensor | None, list[Tensor] | None, list[Tensor] | None, list[Tensor] | None]:
    """Move checked targets (``check_targets``) by each image's map.

    Args:
        linear, shift: (B, 2, 2) and (B, 2), each image's map as ``ops.warp`` takes it, for images of ``size``.
        moved: (B,) long, the images whose map is not the identity; the others keep their targets exactly.
        masks, boxes, keypoints: the targets (None where not given).
        ignore_index: the label of pixels brought in from outside the image in integer masks.
        grid: the moved images' sampling grid (``ops.sampling_grid``), if the augmenter has it: the masks reuse it
            where its dtype is theirs (float32 for label masks) instead of building the same grid again.

    Returns:
        masks, boxes, keypoints and the boxes' keep flags (None for what was not given).
    """
    is_moved = torch.zeros(linear.shape[0], dtype=torch.bool, device=linear.device).index_fill(0, moved, True)
    if masks is not None and masks.dim() == 3:
        _check_label_masks(masks, ignore_index)
    if masks is not None:
        masks = _warp_masks(masks.to(linear.device), linear, shift, moved, ignore_index, grid)
    keep = None
    if boxes is not None:
        boxes, keep = _move_boxes(boxes, linear, shift, is_moved, size)
    if keypoints is not None:
        flat, image, counts = _flatten(keypoints, linear.device)
        keypoints = list(_move_points(flat, image, linear, shift, is_moved, _pixels(size, flat)).split(counts))
    return masks, boxes, keypoints, keep


def _pixels(size: tuple[int, int], like: Tensor) -> Tensor:
    """(1, 2) image width and height, in the dtype of the points."""
    height, width = size
    return torch.tensor([[width, height]], dtype=like.dtype, device=like.device)


def _warp_masks(masks: Tensor, linear: Tensor, shift: Tensor, moved: Tensor, ignore_index: int,
                grid: Tensor | None) -> Tensor:
    if masks.dim() == 4:  # soft masks: bilinear, differentiable, as the images
        return warp_rows(masks, linear, shift, moved, grid=grid)[0]
    # Labels - ignore_index as floats warped by nearest neighbour: the zero padding brought in from outside the image
    # then becomes ignore_index when it is added back, as do the pixels that had it. Nearest sampling copies an
    # input value or the padding, so the floats stay exact integers: no rounding, and the arithmetic stays in
    # float32 (cheaper than int64 on the CPU), or float64 for labels 2**24 or more away
    # from ignore_index (then with a float64 grid of its own). No gradient: labels are piecewise constant.
    if moved.numel() == 0:
        return masks
    with torch.no_grad():
        values = masks.to(_check_label_masks(masks, ignore_index)).sub_(ignore_index).unsqueeze(1)
        labels = warp_rows(values, linear, shift, moved, "nearest", grid)[0].squeeze(1)
        return labels.add_(ignore_index).to(masks.dtype)


def _move_boxes(boxes: Sequence[Tensor], linear: Tensor, shift: Tensor, is_moved: Tensor, size: tuple[int, int]
                ) -> tuple[list[Tensor], list[Tensor]]:
    """The box enclosing each box's four moved corners, clipped to the image, and whether any of it is left."""
    flat, image, counts = _flatten(boxes, linear.device)
    corners = flat[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 2)  # (x1 y1) (x2 y1) (x1 y2) (x2 y2) of each box
    pixels = _pixels(size, flat)
    moved = _move_points(corners, image.repeat_interleave(4), linear, shift, is_moved, pixels).view(-1, 4, 2)
    low = torch.minimum(moved.amin(dim=1).clamp(min=0), pixels)
    high = torch.minimum(moved.amax(dim=1).clamp(min=0), pixels)
    keep = ((high - low) > 0).all(dim=1)
    return list(torch.cat([low, high], dim=1).split(counts)), list(keep.split(counts))
