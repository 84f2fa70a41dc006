"""Eq. 5 and the composed geometry on the drawn (image, op) pairs: the eager reference every compiled layout matches.

With ``geometry="residual"`` a batch becomes x + sum over the drawn ops of gate * (f(x, m) - x), clipped to [0, 1]
(TST Eq. 5). With ``geometry="composed"`` an image's drawn affine ops first make one map (each op's map pulled
towards the identity by its gate, composed in table order) and one warp; the other ops then add their gated residuals
to the warped image. What f(x, m) is belongs to the renderer (``diffaug.render``).

The pairs are computed op group by op group: each group gathers its images, transforms them in one call and adds its
gated residuals back. How the pairs are laid out is a ``Pairs`` object: ``EAGER`` here computes only the pairs that
change their image; ``diffaug.compiled`` lays them out for torch.compile (every pair, or the drawn ones padded) with
the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import geometry_dtype, get_op, warp_rows
from .render import Renderer

__all__ = ["EAGER", "GEOMETRIES", "NEGLIGIBLE", "Output", "Pairs", "Plan", "active", "compose_maps", "pixels",
           "render_pairs"]

GEOMETRIES: tuple[str, ...] = ("residual", "composed")

# An op whose gate is below this, or whose magnitude is (every op is the identity at m = 0), contributes less than a
# millionth of its residual and of its gradient (d sigmoid(z / tau) / dz = s (1 - s) / tau < 2e-5 there). Skipping
# those pairs saves a large part of the work at p = m = 0.5 in train mode, and more in eval mode (hard samples).
NEGLIGIBLE = 1e-6

Output = tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]


@dataclass(frozen=True)
class Plan:
    """What a policy's ops make of its pairs: the op names (table order), the groups of columns transformed together
    (every affine op in one group, each other op on its own, in table order), which group is the affine one, and
    the geometry."""

    ops: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]
    # One flag per group rather than the affine group's index: a compiled graph with dynamic shapes takes an int
    # attribute for a symbolic one, and a list cannot be split by that.
    is_affine: tuple[bool, ...]
    geometry: str

    @classmethod
    def of(cls, ops: tuple[str, ...], geometry: str) -> Plan:
        # The table lists the affine ops next to each other, and ops keep table order.
        affine = tuple(k for k, n in enumerate(ops) if get_op(n).kind == "affine")
        others = [(k,) for k, n in enumerate(ops) if get_op(n).kind != "affine"]
        groups = tuple(sorted(others + ([affine] if affine else [])))
        return cls(ops, groups, tuple(group == affine for group in groups), geometry)


class Pairs:
    """How a layout lays out the pairs of a batch. This one is eager: only the pairs that change their image, found
    at once (one host sync), their residuals added in place."""

    def warp(self, images: Tensor, linear: Tensor, shift: Tensor, moved: Tensor, has_affine: bool
             ) -> tuple[Tensor, Tensor | None]:
        """The warped batch and, where the layout keeps it, the moved images' sampling grid (for the masks)."""
        return warp_rows(images, linear, shift, moved)

    def add(self, out: Tensor, index: Tensor, residual: Tensor, n_columns: int) -> Tensor:
        """``out`` with a group's gated ``residual`` of the images ``index`` added."""
        return out.index_add_(0, index, residual)

    def clip(self, out: Tensor) -> Tensor:
        return F.hardtanh_(out, 0.0, 1.0)  # clip01, in place

    def compose(self, linear: Tensor, shift: Tensor, index: Tensor, op_linear: Tensor, op_shift: Tensor,
                eye: Tensor) -> tuple[Tensor, Tensor]:
        """The maps of the images ``index`` followed by one op's maps of those images."""
        if index.numel() == 0:
            return linear, shift
        before_l, before_t = linear.index_select(0, index), shift.index_select(0, index)
        linear = linear.index_copy(0, index, before_l @ op_linear)
        shift = shift.index_copy(0, index, (before_l @ op_shift.unsqueeze(2)).squeeze(2) + before_t)
        return linear, shift

    def moved(self, index: Tensor, batch: int) -> Tensor:
        """The indices of the images whose map is not the identity, given the affine group's pairs ``index``."""
        return index.unique()


EAGER = Pairs()


def active(selected: Tensor, gates: Tensor, magnitudes: Tensor, has_magnitude: Tensor) -> Tensor:
    """(B, K) which pairs change their image: drawn, with a gate and (for magnitude ops, ``has_magnitude`` (K)) a
    magnitude."""
    still = has_magnitude & (magnitudes.detach().abs() < NEGLIGIBLE)  # a mask: no graph needed
    return selected & (gates >= NEGLIGIBLE) & ~still


def pixels(plan: Plan, renderer: Renderer, has_magnitude: Tensor, images: Tensor, selected: Tensor, gates: Tensor,
           magnitudes: Tensor, positions: Tensor) -> Output:
    """The augmented images in [0, 1] and, with ``geometry="composed"``, each image's map (linear, shift), the indices
    of the moved images and their sampling grid (for the masks): eager, only the pairs that change their image."""
    changing = active(selected, gates, magnitudes, has_magnitude)
    op_index, image_index = changing.t().nonzero(as_tuple=True)
    counts = changing.sum(0).tolist()
    return render_pairs(plan, renderer, EAGER, images, op_index, image_index, counts, None, gates, magnitudes,
                        positions)


def render_pairs(plan: Plan, renderer: Renderer, pairs: Pairs, images: Tensor, op_index: Tensor, image_index: Tensor,
                 counts: list[int] | Any, real: Tensor | None, sample_gates: Tensor, sample_magnitudes: Tensor,
                 positions: Tensor) -> Output:
    """``pixels`` of the pairs given, op-major, ``counts`` of them per op (``real`` False for padding, which gets a
    zero gate): each group of ops gathers its images, transforms them in one call and adds its gated residuals
    back."""
    group_sizes = [[counts[k] for k in columns] for columns in plan.groups]
    totals = [sum(sizes) for sizes in group_sizes]
    # index_select, not advanced indexing (x[i, j]): the same gather, much cheaper on the CPU.
    flat = image_index * len(plan.ops) + op_index
    magnitudes = sample_magnitudes.reshape(-1).index_select(0, flat)
    gates = sample_gates.reshape(-1).index_select(0, flat)
    if real is not None:  # padding pairs: a zero gate
        gates = torch.where(real, gates, 0.0)
    gates = gates.to(images.dtype).view(-1, 1, 1, 1)
    coefficients = renderer.coefficients(magnitudes, op_index)
    # Split once per tensor rather than slice per group: autograd joins the groups' gradients in one cat.
    per_group = zip(
        plan.groups,
        group_sizes,
        image_index.split(totals),
        positions.index_select(0, image_index).split(totals),
        magnitudes.split(totals),
        gates.split(totals),
        [None] * len(totals) if coefficients is None else coefficients.split(totals),
        strict=True,
    )
    groups = list(per_group)
    base = images
    linear = shift = moved = grid = None
    if plan.geometry == "composed":  # geometry first, one warp per moved image; the other ops act on its output
        affines = [group for group, is_affine in zip(groups, plan.is_affine, strict=True) if is_affine]
        groups = [group for group, is_affine in zip(groups, plan.is_affine, strict=True) if not is_affine]
        affine = affines[0] if affines else None
        linear, shift, moved = compose_maps(plan, renderer, pairs, images, affine)
        base, grid = pairs.warp(images, linear, shift, moved, affine is not None)
    out = base.clone()  # accumulates base + sum of gated residuals: no full-batch temporaries
    # After a warp the other ops' residuals are differentiated as Eq. 5 differentiates every op, on an input
    # that does not move: the geometry's gradient takes the direct path (base), not the path through each
    # colour op. Their own gates and magnitudes keep their gradients; the forward is unchanged. Through every
    # op, the backward would add a full-batch gradient per op group, much of a step's cost.
    source = images if base is images else base.detach()
    for columns, sizes, index, position, magnitude, gate, group_coefficients in groups:
        if index.numel() == 0:
            continue
        part = source.index_select(0, index)
        names = [plan.ops[k] for k in columns]
        changed = renderer.transform(names, sizes, part, magnitude, position, group_coefficients)
        out = pairs.add(out, index, gate * (changed - part), len(columns))
    if torch.is_grad_enabled() and sample_gates.requires_grad and not out.requires_grad:
        # Every pair was negligible (likely for one image: 7 % of draws at p = m = 0.5). Keep the output on the graph, with the zero gradient of
        # skipped pairs, so that a loss on it alone can still backward().
        out = out + 0 * sample_gates.sum()
    return pairs.clip(out), linear, shift, moved, grid


def compose_maps(plan: Plan, renderer: Renderer, pairs: Pairs, images: Tensor, group: tuple | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Each image's drawn affine ops as one map: (B, 2, 2) linear, (B, 2) shift (``warp``'s arguments) and the
    indices of the images whose map is not the identity.

    An op's map is pulled towards the identity by its gate g (I + g (L - I), g t), so the result is differentiable
    in gates and magnitudes; the ops compose in table order, the first drawn acting first.
    """
    batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    dtype = geometry_dtype(images)  # float32 for half-precision images: maps composed in half move pixels
    eye = torch.eye(2, device=images.device, dtype=dtype)
    linear, shift = eye.expand(batch, 2, 2), images.new_zeros(batch, 2, dtype=dtype)
    if group is None or group[2].numel() == 0:
        return linear, shift, group[2] if group is not None else shift.new_zeros(0, dtype=torch.long)
    columns, sizes, index, _, magnitude, gate, coefficients = group
    names = [plan.ops[k] for k in columns]
    op_linear, op_shift = (t.to(dtype) for t in renderer.geometry(names, sizes, magnitude, images, coefficients))
    gate = gate.to(dtype).view(-1, 1, 1)
    size = torch.tensor([width, height], dtype=dtype, device=images.device)
    op_linear, op_shift = eye + gate * (op_linear - eye), gate.view(-1, 1) * op_shift * size
    shift = shift * size  # composed in pixels: the two axes scale differently
    # Output pixel q of op B samples the ops before it at L_B q + t_B, and those sample x at L_A (.) + t_A.
    for idx, op_l, op_t in zip(index.split(sizes), op_linear.split(sizes), op_shift.split(sizes), strict=True):
        linear, shift = pairs.compose(linear, shift, idx, op_l, op_t, eye)
    return linear, shift / size, pairs.moved(index, batch)
