"""What f(x, m) is: the renderer a policy passes its drawn (image, op) pairs to.

A policy hands each group of pairs (one op, or every affine op in use: those differ only in their maps and share one
warp) to its renderer, which says how the group's images change:

- ``ReferenceRenderer``: the exact reference ops (``ReferencePolicy``; no gradient to the magnitudes);
- ``EncoderRenderer``: the frozen meta-encoders, differentiable in m (``PolicyAugmenter``, the paper);
- ``StraightThroughRenderer``: the exact reference ops forward, the encoders' gradient backward
  (``PolicyAugmenter(forward="reference")``).

A renderer is a module for its buffers to follow ``.to()``; the encoders it reads are the policy's own (registered
and saved there, not here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .encoders import AffineEncoder, MagnitudeNetStack, MetaEncoder
from .ops import geometry_dtype, get_op, warp

__all__ = ["EncoderRenderer", "ReferenceRenderer", "Renderer", "StraightThroughRenderer", "render", "matrices"]


def render(
    names: list[str],
    sizes: list[int],
    x: Tensor,
    magnitude: Tensor,
    position: Tensor,
    encoders: Mapping[str, MetaEncoder] | None = None,
    coefficients: Tensor | None = None,
) -> Tensor:
    """One group through its meta-encoders, or through the reference ops if ``encoders`` is None: ``sizes[i]``
    consecutive images of ``x`` go through op ``names[i]``. A group is one op, or every affine op in use: those
    differ only in their matrices, so they share one grid_sample call. ``coefficients`` are the encoders' networks
    of m, already evaluated (``MagnitudeNetStack``), or None."""
    spec = get_op(names[0])
    if spec.kind == "affine":
        return warp(x, *matrices(names, sizes, magnitude, x, encoders, coefficients))
    if encoders is None or not spec.has_magnitude:
        return spec.reference(x, magnitude, position)
    return encoders[spec.name].transform(x, magnitude, coefficients)


def matrices(
    names: list[str],
    sizes: list[int],
    magnitude: Tensor,
    x: Tensor,
    encoders: Mapping[str, MetaEncoder] | None = None,
    coefficients: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The maps (linear, shift) of an affine group's pairs, from the encoders or (``encoders`` None) exact; ``x``
    gives the image size, and the exact maps are in ``geometry_dtype(x)``: a magnitude rounded to bf16 (8
    significant bits) would turn or shear the whole image a little, moving the pixels far from its centre."""
    if coefficients is not None and all(type(encoders[n]) is AffineEncoder for n in names):  # type: ignore[index]
        # The default encoders differ only in their networks of m, already evaluated: one map computation.
        return AffineEncoder.maps(coefficients)
    maps = []
    pieces = coefficients.split(sizes) if coefficients is not None else [None] * len(sizes)
    for name, m, c in zip(names, magnitude.split(sizes), pieces, strict=True):
        if m.numel() == 0:
            continue
        if encoders is None:
            maps.append(get_op(name).geometry(m.to(geometry_dtype(x))))  # type: ignore[misc]
        else:
            maps.append(encoders[name].matrices(m, x.shape[-2:], c))
    linear, shift = (torch.cat(t) for t in zip(*maps, strict=True))
    return linear, shift


class Renderer(nn.Module):
    """How one group of (image, op) pairs changes its images. The base renders with the exact reference ops."""

    def coefficients(self, magnitude: Tensor, columns: Tensor) -> Tensor | None:
        """The encoders' networks of m for every pair (``magnitude``, op ``columns``), evaluated in one pass, or
        None where the renderer has none."""
        return None

    def transform(self, names: list[str], sizes: list[int], x: Tensor, magnitude: Tensor, position: Tensor,
                  coefficients: Tensor | None) -> Tensor:
        """One group's output: ``sizes[i]`` consecutive images of ``x`` go through op ``names[i]``."""
        return render(names, sizes, x, magnitude, position)

    def geometry(self, names: list[str], sizes: list[int], magnitude: Tensor, x: Tensor,
                 coefficients: Tensor | None) -> tuple[Tensor, Tensor]:
        """The affine group's maps (linear, shift), one per pair."""
        return matrices(names, sizes, magnitude, x)

    def prepare(self) -> None:
        """Called eagerly before a compiled call, which reads what is prepared here as it is."""


class ReferenceRenderer(Renderer):
    """The exact reference ops (``diffaug.apply_op``), forward and backward."""


class EncoderRenderer(Renderer):
    """The frozen meta-encoders of ``encoders`` (by op name; the policy's own, read here, not registered)."""

    net_of_column: Tensor

    def __init__(self, encoders: Mapping[str, MetaEncoder], ops: Sequence[str]) -> None:
        super().__init__()
        # Held, not registered: the policy registers and saves its encoders (its state dict keeps their names).
        self.__dict__["encoders"] = encoders
        # The encoders' networks of m run for all pairs of a batch in one pass; ops without one (no magnitude, or
        # an encoder without a MagnitudeNet) point at the stack's row of zeros.
        nets = {n: net for n in encoders if (net := encoders[n].magnitude_net()) is not None}
        self.net_ops = tuple(nets)
        net_of_column = [self.net_ops.index(n) if n in nets else len(nets) for n in ops]
        self.register_buffer("net_of_column", torch.tensor(net_of_column, dtype=torch.long), persistent=False)
        self.nets = MagnitudeNetStack(list(nets.values()))

    def needs_encoders(self, magnitude: Tensor) -> bool:
        return True

    def coefficients(self, magnitude: Tensor, columns: Tensor) -> Tensor | None:
        if not self.net_ops or not self.needs_encoders(magnitude):
            return None
        return self.nets(magnitude, self.net_of_column.index_select(0, columns))

    def transform(self, names: list[str], sizes: list[int], x: Tensor, magnitude: Tensor, position: Tensor,
                  coefficients: Tensor | None) -> Tensor:
        if not get_op(names[0]).has_magnitude:
            return render(names, sizes, x, magnitude, position)
        return self._through_encoders(  # type: ignore[return-value]
            magnitude, coefficients, lambda m, e, c: render(names, sizes, x, m, position, e, c))

    def geometry(self, names: list[str], sizes: list[int], magnitude: Tensor, x: Tensor,
                 coefficients: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._through_encoders(  # type: ignore[return-value]
            magnitude, coefficients, lambda m, e, c: matrices(names, sizes, m, x, e, c))

    def prepare(self) -> None:
        self.nets.refresh()  # in eager the stack refreshes itself; a compiled graph reads the packed table as it is

    def _through_encoders(self, magnitude: Tensor, coefficients: Tensor | None,
                          draw: Callable[..., Tensor | tuple[Tensor, ...]]) -> Tensor | tuple[Tensor, ...]:
        """``draw(magnitude, encoders, coefficients)`` (pixels or maps) through the encoders."""
        return draw(magnitude, self.encoders, coefficients)


class StraightThroughRenderer(EncoderRenderer):
    """The exact reference ops forward, with the encoders' gradient (straight-through) where one is needed."""

    def needs_encoders(self, magnitude: Tensor) -> bool:
        return torch.is_grad_enabled() and magnitude.requires_grad

    def _through_encoders(self, magnitude: Tensor, coefficients: Tensor | None,
                          draw: Callable[..., Tensor | tuple[Tensor, ...]]) -> Tensor | tuple[Tensor, ...]:
        """Exact (``encoders`` None), plus the encoders' output less its value where a gradient is needed."""
        encoded = draw(magnitude, self.encoders, coefficients) if self.needs_encoders(magnitude) else None
        exact = draw(magnitude.detach(), None, None)
        if encoded is None:
            return exact
        if isinstance(exact, Tensor):
            return exact + (encoded - encoded.detach())
        return tuple(e + (n - n.detach()) for e, n in zip(exact, encoded, strict=True))
