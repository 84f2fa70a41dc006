"""Sampling: a batch's uniform noise -> a ``PolicySample``, as pure functions of the logits and the settings.

A policy draws all the noise of a batch in one call (``uniform``) and turns it into which ops each image gets, their
gates, signed magnitudes and Cutout positions (``draw``). The draw is kept apart from its application (``render``,
``compose``): a ``PolicySample`` can be replayed on other images, so that a teacher and a student see exactly the
same augmented batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import DiffAugError

__all__ = ["MAGNITUDE_SAMPLINGS", "MagnitudeSampling", "PolicySample", "draw", "noise_width", "op_meaning",
           "relaxed_bernoulli", "uniform"]

MagnitudeSampling = Literal["relaxed", "mean", "uniform"]
MAGNITUDE_SAMPLINGS: tuple[str, ...] = ("relaxed", "mean", "uniform")


def op_meaning(probability: float, magnitude: float | None, sampling: str) -> dict[str, Any]:
    """What one drawn op with apply probability p and magnitude m (None: an op without one) does under the
    magnitude sampler ``sampling``: the distribution of its strength when applied, the effective probability and
    strength with the identity taken out (under "relaxed", strength 0 is the identity, so the op is applied at full
    strength with probability p * m), and a sentence. Plain numbers in and out: ``Policy.policy()``, ``to_dict()``,
    the plots and ``diffaug.export.describe`` all state a policy through this one function.

    Example:
        >>> op_meaning(0.5, 0.3, "uniform")["summary"]
        'applied with probability p = 0.5 at a strength uniform on [0, m = 0.3]'
    """
    p, m = probability, magnitude
    applied = f"applied with probability p = {p:.3g}"
    if m is None:
        return {"probability": p, "strength": {"kind": "fixed", "value": 1.0}, "effective_probability": p,
                "effective_strength": {"kind": "fixed", "value": 1.0}, "summary": f"{applied} (no magnitude)"}
    if sampling == "relaxed":
        strength: dict[str, float | str] = {"kind": "full_or_none", "full_probability": m}
        effective, q = {"kind": "fixed", "value": 1.0}, p * m
        summary = (f"{applied} at full strength with probability m = {m:.3g}, else not at all: at full strength "
                   f"with probability p * m = {q:.3g}")
    elif sampling == "mean":
        strength, effective, q = {"kind": "fixed", "value": m}, {"kind": "fixed", "value": m}, p
        summary = f"{applied} at strength m = {m:.3g}"
    elif sampling == "uniform":
        strength, q = {"kind": "uniform", "low": 0.0, "high": m}, p
        effective = dict(strength)
        summary = f"{applied} at a strength uniform on [0, m = {m:.3g}]"
    else:
        raise DiffAugError(f"sampling must be one of {list(MAGNITUDE_SAMPLINGS)}; got {sampling!r}")
    return {"probability": p, "magnitude": m, "strength": strength, "effective_probability": q,
            "effective_strength": effective, "summary": summary}


def relaxed_bernoulli(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """sigmoid((logits + L) / temperature), L ~ Logistic(0, 1): ``RelaxedBernoulli(logits=...).rsample()``."""
    return _relaxed_bernoulli(logits, uniform(logits.shape, generator, logits.device), temperature)


def _relaxed_bernoulli(logits: Tensor, noise: Tensor, temperature: float) -> Tensor:
    # logit(u) of a uniform u is Logistic(0, 1) noise; u is kept 1e-6 away from 0 and 1.
    return torch.sigmoid((logits + torch.logit(noise, eps=1e-6)) / temperature)


def uniform(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U(0, 1) noise of ``shape`` on ``device``, drawn on the generator's own device (so a CPU generator gives the
    same stream whatever device the policy is on)."""
    draw_on = generator.device if generator is not None else device
    noise = torch.rand(tuple(shape), generator=generator, device=draw_on)
    return noise if noise.device == device else noise.to(device)


def noise_width(n_ops: int, n_magnitude_ops: int) -> int:
    """Uniforms per image of ``draw``: a selection key and a gate per op, a magnitude and a sign per magnitude op,
    and a Cutout position (x, y)."""
    return 2 * n_ops + 2 * n_magnitude_ops + 2


@dataclass(frozen=True)
class PolicySample:
    """One draw of the policy for a batch; replay it with ``augmenter(x, sample)``.

    Attributes:
        ops: the op names, one per column below.
        selected: (B, K) bool, the ops drawn for each image.
        gates: (B, K) weight of each op's residual in [0, 1] (0 where not selected); relaxed in train mode.
        magnitudes: (B, K) signed magnitudes (0 for ops without one).
        positions: (B, 2) Cutout centres as fractions of (W, H).
    """

    ops: tuple[str, ...]
    selected: Tensor
    gates: Tensor
    magnitudes: Tensor
    positions: Tensor

    def __len__(self) -> int:
        return self.selected.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> PolicySample:
        """The sample of a subset of the batch (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "ops"})

    def to(self, device: torch.device | str) -> PolicySample:
        if self.selected.device == torch.device(device):  # the common case, without five no-op dispatches
            return self
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "ops"})

    def detach(self) -> PolicySample:
        return replace(self, **{f.name: getattr(self, f.name).detach() for f in fields(self) if f.name != "ops"})


def _bernoulli(logits: Tensor, noise: Tensor, relaxed: bool, temperature: float) -> Tensor:
    """Relaxed (differentiable) or hard Bernoulli samples of ``logits`` from uniform ``noise`` of the batch's shape."""
    if relaxed:
        return _relaxed_bernoulli(logits, noise, temperature)
    return (noise < torch.sigmoid(logits)).float()


def draw(
    noise: Tensor,
    probability_logits: Tensor,
    magnitude_logits: Tensor,
    *,
    n_ops: int,
    selection: str,
    magnitude_sampling: str,
    relaxed: bool,
    temperature: float,
    signed: Tensor,
    magnitude_columns: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A batch's ``PolicySample`` fields (selected, gates, magnitudes, positions) from its uniform ``noise``
    (B, ``noise_width``): ``n_ops`` ops per image (or one set for the batch with ``selection="batch"``), their gates
    from ``probability_logits`` (K), and for the magnitude ops (``magnitude_columns`` of the K, ``signed`` where the
    sign is drawn too) their magnitudes from ``magnitude_logits`` as ``magnitude_sampling`` says. Pure arithmetic:
    what ``compile=True`` compiles."""
    batch_size, k, n_magnitudes = noise.shape[0], probability_logits.shape[0], magnitude_logits.shape[0]
    # Op selection keys, gate noise, magnitude noise and signs, positions.
    keys, gate_noise, magnitude_noise, sign_noise, positions = noise.split([k, k, n_magnitudes, n_magnitudes, 2], 1)
    if selection == "batch":
        keys = keys[:1]
    chosen = keys.topk(n_ops, dim=1).indices
    selected = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, chosen, True).expand(batch_size, k)
    gates = _bernoulli(probability_logits, gate_noise, relaxed, temperature)
    magnitudes = torch.zeros(batch_size, k, device=noise.device)
    if n_magnitudes:
        if magnitude_sampling == "mean":
            drawn = torch.sigmoid(magnitude_logits).expand(batch_size, -1)
        elif magnitude_sampling == "uniform":  # the same in train and eval: u is continuous already
            drawn = torch.sigmoid(magnitude_logits) * magnitude_noise
        else:
            drawn = _bernoulli(magnitude_logits, magnitude_noise, relaxed, temperature)
        drawn = torch.where(signed & (sign_noise < 0.5), -drawn, drawn)
        magnitudes = magnitudes.index_copy(1, magnitude_columns, drawn)
    return selected, gates * selected, magnitudes, positions.contiguous()
