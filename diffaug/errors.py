"""The one exception type of diffaug and the input checks that raise it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DiffAugError", "check_images", "check_magnitude", "describe"]


class DiffAugError(ValueError):
    """Raised for any input diffaug cannot use; the message names what was expected and what was given."""


def describe(x: object) -> str:
    """What an argument is, for an error message: "float32 of shape (4, 3, 32, 32)" for a tensor, else its type."""
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')} of shape {tuple(x.shape)}"
    return type(x).__name__


def format_bound(value: float, low: float, high: float) -> str:
    """``value`` with 4 significant digits, or as many more as it takes to show on which side of [low, high] it
    lies: 1.00001 is out of [0, 1], and "1" would say it is not."""
    inside = low <= value <= high
    for digits in range(4, 18):
        text = f"{value:.{digits}g}"
        if (low <= float(text) <= high) == inside:
            return text
    return repr(value)


def format_range(low_value: float, high_value: float, low: float, high: float) -> str:
    """"[min, max]" of values checked against [low, high], each written by ``format_bound``."""
    return f"[{format_bound(low_value, low, high)}, {format_bound(high_value, low, high)}]"


def check_images(x: object, name: str = "images", value_range: tuple[float, float] = (0.0, 1.0)) -> None:
    """Check the image contract: float (B, C, H, W) or (C, H, W), C in {1, 3}, finite values in ``value_range``.

    The range check is one reduction (``aminmax``), which also catches NaN and inf, so the happy path is cheap.
    """
    expected = f"{name} must be a float tensor in [{value_range[0]:g}, {value_range[1]:g}] with shape (B, C, H, W) or (C, H, W), C in {{1, 3}}"
    if not isinstance(x, torch.Tensor):
        raise DiffAugError(f"{expected}; got {type(x).__name__}")
    if not x.is_floating_point():
        raise DiffAugError(f"{expected}; got {describe(x)} (convert with x.float() / 255)")
    if x.dim() not in (3, 4):
        raise DiffAugError(f"{expected}; got {describe(x)}")
    channels = x.shape[-3]
    if channels not in (1, 3):
        permute = "x.permute(2, 0, 1)" if x.dim() == 3 else "x.permute(0, 3, 1, 2)"
        hint = f" (channels-last? use {permute})" if x.shape[-1] in (1, 3) else ""
        raise DiffAugError(f"{expected}; got {describe(x)} with {channels} channels{hint}")
    if x.numel() == 0:
        raise DiffAugError(f"{expected}; got an empty tensor of shape {tuple(x.shape)}")
    # Compared as Python floats: two reads, where tensor comparisons would dispatch 14 more ops on every call.
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (lo >= value_range[0] and hi <= value_range[1]):
        if not torch.isfinite(x).all():
            raise DiffAugError(f"{expected}; got {describe(x)} containing NaN or inf")
        raise DiffAugError(f"{expected}; got values in {format_range(lo, hi, *value_range)}")


def check_magnitude(magnitude: object, batch: int, signed: bool, op: str) -> torch.Tensor:
    """Check a per-sample magnitude: a float tensor of shape (batch,), in [-1, 1] if ``signed`` else [0, 1]."""
    lo = -1.0 if signed else 0.0
    expected = f"magnitude for {op} must be a float tensor of shape ({batch},) with values in [{lo:g}, 1]"
    if not isinstance(magnitude, torch.Tensor):
        raise DiffAugError(f"{expected}; got {type(magnitude).__name__}")
    if not magnitude.is_floating_point() or tuple(magnitude.shape) != (batch,):
        raise DiffAugError(f"{expected}; got {describe(magnitude)}")
    mlo, mhi = (float(v) for v in torch.aminmax(magnitude.detach()))
    if not (mlo >= lo and mhi <= 1.0):  # NaN fails both
        raise DiffAugError(f"{expected}; got values in {format_range(mlo, mhi, lo, 1.0)}")
    return magnitude


def check_names(names: Sequence[str], known: Sequence[str], what: str = "op") -> None:
    """Raise for any name not in ``known``, listing the known ones."""
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DiffAugError(f"unknown {what} name(s) {unknown}; expected names from {list(known)}")
    duplicated = sorted({n for n in names if list(names).count(n) > 1})
    if duplicated:
        raise DiffAugError(f"{what} names must be unique; got {duplicated} more than once")
