"""Meta-encoders: small frozen networks f_E(x, m) fitted to the reference ops (Stage I), differentiable in m.

Two architectures share one interface, ``encoder(x, magnitude)`` with the contract of ``diffaug.ops.apply_op``:

* ``"paper"`` -- the forms of the TST paper (Sec. 3.5), for reproduction and ablation:
  affine ops  A = reshape(FC([theta_E, m])) applied with affine_grid / grid_sample;
  colour ops  Conv(x * (0.5 + sigmoid(s)) + sigmoid(t) - 0.5) with [s, t] = FC([theta_E, m]).
* ``"default"`` -- same spirit (a tiny network of m holding the prior), but with the inputs each op needs and the
  identity at m = 0 by construction. A network acts per *sample* (m in, a handful of coefficients out) and the
  per-pixel work is a few operations, which is what keeps the augmenter fast:
  blend       clamp(x + m * (a x + b D + c)), D the op's degenerate image (black, gray, mean or blur);
  staircase   x minus the 8-bit residuals below each dropped bit, each gated by a step in m (Posterize);
  threshold   x + step(x - tau(m)) (1 - 2 x): a jump that moves with m, not a smooth fit of it (Solarize);
  affine      one 2x3 map per sample, linear = I + m B(m), shift = m b(m) as a fraction of the size.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import DiffAugError, check_images, check_magnitude
from .ops import clip01, eight_bit_levels, geometry_dtype, get_op, grid_scale, warp

__all__ = ["ARCHS", "MagnitudeNetStack", "MetaEncoder", "build_encoder", "freeze"]

ARCHS = ("default", "paper")


class MagnitudeNet(nn.Module):
    """m (B,) -> m g(m), (B, out): g is a linear term plus a tanh hidden layer. The product with m makes every
    output 0 at m = 0, which is what makes the default encoders the identity there. Evaluated in float32 whatever
    the image dtype."""

    def __init__(self, out_features: int, hidden: int = 16) -> None:
        super().__init__()
        self.linear = nn.Linear(1, out_features)
        self.hidden = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, out_features))
        nn.init.zeros_(self.hidden[2].weight)
        nn.init.zeros_(self.hidden[2].bias)

    def forward(self, m: Tensor) -> Tensor:
        # Outside autocast: half-precision coefficients would cost the encoder its fidelity (~1e-3 relative).
        if torch.is_autocast_enabled(m.device.type):
            with torch.autocast(m.device.type, enabled=False):
                return self.forward(m)
        # The layers' functional form, three kernels and no module calls: at small sizes launches are the cost.
        first, _, last = self.hidden
        m = m.to(first.weight.dtype).unsqueeze(1)
        hidden = torch.tanh(torch.addmm(first.bias, m, first.weight.t()))
        linear = torch.addmm(self.linear.bias + last.bias, m, self.linear.weight.t())
        return m * torch.addmm(linear, hidden, last.weight.t())


class MagnitudeNetStack:
    """Several frozen MagnitudeNets evaluated in one pass: row i of the output is ``nets[which[i]](magnitude[i])``,
    zero-padded to the widest net; ``which == len(nets)`` gives a row of zeros.

    An augmenter runs ten such nets per batch, a dozen kernels each; on small images that launch overhead is a
    sizeable part of a Stage II step, and one pass over all pairs removes most of it. The nets' weights are packed
    into one table (one row per net), kept between calls and rebuilt when a weight is written in place
    (``load_state_dict``: a new version of the tensor) or the nets are moved or cast (``.to()``: new tensors). They
    are detached: the nets must be frozen.
    """

    def __init__(self, nets: Sequence[MagnitudeNet]) -> None:
        self.nets = list(nets)
        self._slots: list[tuple[dict[str, Any], str]] = []  # (the dict holding a weight, its name), for _current
        self._tensors: list[Tensor] = []
        self._versions: list[int] = []
        self._table: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:  # the table is derived: copies and pickles rebuild it
        return {"nets": self.nets}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["nets"])  # type: ignore[misc]

    def __call__(self, magnitude: Tensor, which: Tensor) -> Tensor:
        if torch.is_autocast_enabled(magnitude.device.type):  # float32 coefficients, as MagnitudeNet
            with torch.autocast(magnitude.device.type, enabled=False):
                return self(magnitude, which)
        if not torch.compiler.is_compiling():  # a compiled caller calls refresh() before, in eager
            self.refresh()
        width, out = self._width, self._out
        rows = self._table.index_select(0, which)  # type: ignore[union-attr]
        first_weight, first_bias, last_weight, bias, linear_weight = rows.split([width, width, out * width, out, out], 1)
        m = magnitude.to(rows.dtype).unsqueeze(1)
        hidden = torch.tanh(torch.addcmul(first_bias, m, first_weight))
        # A product and a sum: batched matrix-vector products (bmm) of these tiny sizes are much slower on the CPU.
        hidden_term = (last_weight.view(-1, out, width) * hidden.unsqueeze(1)).sum(2)
        return m * (torch.addcmul(bias, m, linear_weight) + hidden_term)

    def refresh(self) -> None:
        """Rebuild the table if the nets' weights changed since it was packed."""
        if self.nets and not self._current():
            self._pack()

    def _current(self) -> bool:
        """Whether the table still holds the nets' weights: the same tensors (``.to()`` replaces the buffers of a
        frozen net), none of them written since. Read from the modules' own dicts: through ``Module.__getattr__``
        this check, made on every call, would be a visible part of a compiled step on small images."""
        if self._table is None:
            return False
        now = [slots.get(name) for slots, name in self._slots]  # None where freeze() moved it to the buffers
        return all(map(operator.is_, now, self._tensors)) and [t._version for t in self._tensors] == self._versions

    def _pack(self) -> None:
        self._width = max(net.hidden[0].out_features for net in self.nets)
        self._out = max(net.linear.out_features for net in self.nets)
        rows = []
        for net in self.nets:
            first, _, last = net.hidden
            h, o = self._width - first.out_features, self._out - net.linear.out_features
            rows.append(torch.cat([
                F.pad(first.weight[:, 0], (0, h)),
                F.pad(first.bias, (0, h)),
                F.pad(last.weight, (0, h, 0, o)).flatten(),
                F.pad(net.linear.bias + last.bias, (0, o)),
                F.pad(net.linear.weight[:, 0], (0, o)),
            ]))
        # Padding is exact: tanh(0) = 0 meets zero weights. The last row, all zeros, stands for "no net".
        self._table = torch.cat([torch.stack(rows), torch.zeros_like(rows[0]).unsqueeze(0)]).detach()
        layers = [layer for net in self.nets for layer in (net.linear, net.hidden[0], net.hidden[2])]
        self._slots = [(layer._buffers if name in layer._buffers else layer._parameters, name)
                       for layer in layers for name in ("weight", "bias")]
        self._tensors = [slots[name] for slots, name in self._slots]
        self._versions = [t._version for t in self._tensors]


class MetaEncoder(nn.Module):
    """Base of all encoders: validates at the boundary, then calls ``transform`` on a (B, C, H, W) batch.

    Encoders of affine ops also have ``matrices(magnitude, size, coefficients=None)``, the (B, 2, 2) linear maps and
    (B, 2) shifts that ``transform`` passes to ``diffaug.ops.warp``: PolicyAugmenter warps all affine ops of a batch
    in one call. ``coefficients``, where an encoder takes them, is ``magnitude_net()(magnitude)`` computed by the
    caller (see ``MagnitudeNetStack``).
    """

    # Set by ``freeze``: the encoder is a fixed prior, no longer being fitted.
    frozen = False

    def __init__(self, op: str, arch: str) -> None:
        super().__init__()
        self.op = op
        self.arch = arch

    def train(self, mode: bool = True) -> MetaEncoder:
        """Train mode is for fitting. A frozen encoder stays in eval mode whatever a module holding it asks (an
        augmenter in Stage II, a user's model): in train mode Posterize and Solarize would pass their true, nearly
        flat gradients instead of their surrogate ones."""
        return super().train(mode and not self.frozen)

    def forward(self, x: Tensor, magnitude: Tensor) -> Tensor:
        """Apply the encoder; same contract as ``apply_op(self.op, x, magnitude)``."""
        check_images(x)
        unbatched = x.dim() == 3
        batch = x.unsqueeze(0) if unbatched else x
        check_magnitude(magnitude, batch.shape[0], get_op(self.op).signed, self.op)
        out = self.transform(batch, magnitude.to(batch.device))
        return out.squeeze(0) if unbatched else out

    def transform(self, x: Tensor, magnitude: Tensor, coefficients: Tensor | None = None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def magnitude_net(self) -> MagnitudeNet | None:
        """The network of m alone, if the encoder has one (its output is what ``coefficients`` stands for)."""
        return None

    def extra_repr(self) -> str:
        return f"op={self.op!r}, arch={self.arch!r}"


def _ramp(value: Tensor, position: Tensor, width: Tensor | float) -> Tensor:
    """0 below ``position - width / 2``, 1 above ``position + width / 2``, linear between: one multiply-add and a clip
    per element, the per-pixel cost of Solarize."""
    scale = torch.as_tensor(1 / width, dtype=value.dtype, device=value.device)
    return clip01(torch.addcmul(0.5 - position * scale, value, scale))


class _SurrogateStep(torch.autograd.Function):
    """The value of ``_ramp(value, position, width)`` with the gradient of ``_ramp(value, position, surrogate)``
    (straight-through); no gradient reaches ``width``. Written out rather than as ``ramp + (wide - wide.detach())``,
    which would also add the narrow ramp's own gradient and compute the wide ramp's values only to drop them."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, position: Tensor, width: Tensor, surrogate: float) -> Tensor:
        ctx.save_for_backward(value, position)
        ctx.surrogate = surrogate
        return _ramp(value, position, width)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        value, position = ctx.saved_tensors
        inside = (value - position).abs_() < ctx.surrogate / 2
        masked = grad * inside  # the slope 1 / surrogate is applied after summing, on the small tensors
        grad_value = masked.sum_to_size(value.shape) / ctx.surrogate if ctx.needs_input_grad[0] else None
        grad_position = masked.sum_to_size(position.shape) / -ctx.surrogate if ctx.needs_input_grad[1] else None
        return grad_value, grad_position, None, None


def _step(value: Tensor, position: Tensor, width: Tensor, surrogate_width: float | None) -> Tensor:
    """A step at ``position`` that rises linearly over ``width``: finite slope, so gradients reach its position.

    With ``surrogate_width``, the value is the same but the gradient is that of a step ``surrogate_width`` wide
    (straight-through): a narrow step is faithful but passes gradient only for inputs within ``width`` of it.
    """
    if surrogate_width is None or not torch.is_grad_enabled():
        return _ramp(value, position, width)
    return _SurrogateStep.apply(value, position, width, surrogate_width)


class BlendEncoder(MetaEncoder):
    """clamp(x + m (a x + b D + c)), with (a, b, c) from a tiny network of m and D the op's degenerate image."""

    def __init__(self, op: str) -> None:
        super().__init__(op, "default")
        self.degenerate = get_op(op).degenerate
        self.coefficients = MagnitudeNet(3)

    def magnitude_net(self) -> MagnitudeNet:
        return self.coefficients

    def transform(self, x: Tensor, magnitude: Tensor, coefficients: Tensor | None = None) -> Tensor:
        coefficients = self.coefficients(magnitude) if coefficients is None else coefficients[:, :3]
        a, b, c = coefficients.to(x.dtype).view(-1, 3, 1, 1, 1).unbind(1)
        # c + b D first: for Brightness and Contrast D is one value per image, and so is this sum, which leaves
        # one full-size multiply-add (and its backward) instead of two.
        return clip01(torch.addcmul(torch.addcmul(c, self.degenerate(x), b), x, 1 + a))


class StaircaseEncoder(MetaEncoder):
    """Posterize: drop the residual below bit k (k = 1..4) with a gate that steps up in m at ``centre_k``.

    Each gate rises over ``width_k >= min_width`` and starts above m = 0 (softplus), so m = 0 is exactly the
    identity. A frozen encoder passes gradients w.r.t. m through steps ``surrogate_width`` wide: relaxed-Bernoulli
    magnitudes sit near 0 and 1, away from every fitted step, where the true slope is 0 and nothing would learn.
    While fitting (train mode) the true gradient is used.
    """

    bits = 4
    surrogate_width = 0.3

    def __init__(self, op: str, min_width: float = 0.05) -> None:
        super().__init__(op, "default")
        self.min_width = min_width
        # Generic start: evenly spaced guesses; Stage I moves them to where the op switches.
        guesses = torch.arange(1, self.bits + 1, dtype=torch.float32) / (self.bits + 1)
        self.start = nn.Parameter(torch.log(torch.expm1(guesses)))
        self.width = nn.Parameter(torch.zeros(self.bits))
        # (256, bits): what bit k is worth at each 8-bit level; a constant, so not saved with the prior.
        levels = torch.arange(256)
        bit_values = torch.stack([(levels >> k) & 1 for k in range(self.bits)], dim=1) * 2.0 ** torch.arange(self.bits)
        self.register_buffer("bit_values", bit_values / 255, persistent=False)

    def transform(self, x: Tensor, magnitude: Tensor, coefficients: Tensor | None = None) -> Tensor:
        width = self.min_width + F.softplus(self.width)
        centre = F.softplus(self.start) + width / 2
        surrogate = None if self.training else self.surrogate_width
        gates = _step(magnitude.to(centre.dtype).unsqueeze(1), centre, width, surrogate).to(x.dtype)  # (B, bits)
        # Posterize to 8 - k bits subtracts bits 0..k-1 of the 8-bit level; gate k removes bit k - 1. What each
        # image loses at each level is a per-image table of 256 values, so the per-pixel work is one lookup.
        levels = eight_bit_levels(x).long().clamp_(0, 255)
        table = gates @ self.bit_values.to(x.dtype).t()  # (B, 256)
        drop = table.gather(1, levels.flatten(1)).view_as(x)
        return clip01(x - drop)  # as the reference: a value just above a level's midpoint could dip below 0


class ThresholdEncoder(MetaEncoder):
    """Solarize: x + step(x - tau) (1 - 2 x), tau = 256/255 - m h(m), the step (0.25, 2) levels wide.

    The step is at most 2 levels wide and lies above 1 when m = 0, so m = 0 is exactly the identity. A frozen
    encoder passes gradients through a step ``surrogate_width`` wide (in pixel value), so that every pixel near the
    threshold, not only the few within two levels of it, tells the magnitude which way to go. While fitting
    (train mode) the true gradient is used.
    """

    surrogate_width = 0.1

    def __init__(self, op: str) -> None:
        super().__init__(op, "default")
        self.depth = MagnitudeNet(1, hidden=8)
        self.width = nn.Parameter(torch.zeros(()))

    def magnitude_net(self) -> MagnitudeNet:
        return self.depth

    def transform(self, x: Tensor, magnitude: Tensor, coefficients: Tensor | None = None) -> Tensor:
        depth = self.depth(magnitude) if coefficients is None else coefficients
        # The step in float32 for half-precision images: it is 0.25 to 2 levels wide, and 0.5 - tau / width (~10**3)
        # would keep no fraction of a level in half precision.
        wide = geometry_dtype(x)
        tau = (256 / 255 - depth[:, 0]).to(wide).view(-1, 1, 1, 1)
        width = ((0.25 + 1.75 * torch.sigmoid(self.width)) / 255).to(wide)
        surrogate = None if self.training else self.surrogate_width
        return torch.addcmul(x, _step(x.to(wide), tau, width, surrogate).to(x.dtype), 1 - 2 * x)


class AffineEncoder(MetaEncoder):
    """One map per sample: linear = I + m B(m), shift = m b(m) as a fraction of (W, H); m = 0 is the identity."""

    def __init__(self, op: str) -> None:
        super().__init__(op, "default")
        self.coefficients = MagnitudeNet(6, hidden=32)

    def magnitude_net(self) -> MagnitudeNet:
        return self.coefficients

    def matrices(
        self, magnitude: Tensor, size: tuple[int, int], coefficients: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The arguments of ``warp``: (B, 2, 2) linear maps and (B, 2) shifts; resolution-free (``size`` unused)."""
        return self.maps(self.coefficients(magnitude) if coefficients is None else coefficients)

    @staticmethod
    def maps(coefficients: Tensor) -> tuple[Tensor, Tensor]:
        """``matrices`` from the network's output: the same for every op, so PolicyAugmenter computes the maps of
        all its default affine encoders in one call."""
        eye = torch.eye(2, device=coefficients.device, dtype=coefficients.dtype)
        return eye + coefficients[:, :4].view(-1, 2, 2), coefficients[:, 4:6]

    def transform(self, x: Tensor, magnitude: Tensor, coefficients: Tensor | None = None) -> Tensor:
        return warp(x, *self.matrices(magnitude, x.shape[-2:], coefficients))


def _paper_head(theta_e: Tensor, fc: nn.Linear, magnitude: Tensor) -> Tensor:
    """FC([theta_E, m]) of the paper's encoders: the learned prior vector and the magnitude, one row per sample."""
    m = magnitude.to(fc.weight.dtype).unsqueeze(1)
    return fc(torch.cat([theta_e.expand(m.shape[0], -1), m], dim=1))


class PaperAffineEncoder(MetaEncoder):
    """The paper's spatial transformer: theta = reshape(FC([theta_E, m])), grid_sample with zero padding."""

    def __init__(self, op: str, prior_size: int = 8) -> None:
        super().__init__(op, "paper")
        self.theta_e = nn.Parameter(torch.randn(prior_size) * 0.1)
        self.fc = nn.Linear(prior_size + 1, 6)
        nn.init.zeros_(self.fc.weight)
        with torch.no_grad():
            self.fc.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def theta(self, magnitude: Tensor) -> Tensor:
        """(B, 2, 3) maps in grid_sample's [-1, 1] coordinates, as ``F.affine_grid`` takes them."""
        return _paper_head(self.theta_e, self.fc, magnitude).view(-1, 2, 3)

    def matrices(
        self, magnitude: Tensor, size: tuple[int, int], coefficients: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``theta`` in ``warp``'s terms for images of ``size`` (H, W): the grid of ``F.affine_grid(theta)``,
        built the way every affine op builds its grid, so the augmenter warps all of them in one call."""
        theta = self.theta(magnitude)
        return theta[:, :, :2] / grid_scale(*size, theta), theta[:, :, 2] / 2

    def transform(self, x: Tensor, magnitude: Tensor, coefficients: Tensor | None = None) -> Tensor:
        return warp(x, *self.matrices(magnitude, x.shape[-2:]))


class PaperColorEncoder(MetaEncoder):
    """The paper's colour network: Conv3x3(x (0.5 + sigmoid(s)) + sigmoid(t) - 0.5), [s, t] = FC([theta_E, m])."""

    def __init__(self, op: str, prior_size: int = 8) -> None:
        super().__init__(op, "paper")
        self.theta_e = nn.Parameter(torch.randn(prior_size) * 0.1)
        self.fc = nn.Linear(prior_size + 1, 2)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.conv = nn.Conv2d(3, 3, kernel_size=3, padding=1)
        with torch.no_grad():  # start at the identity: a centred delta kernel per channel
            self.conv.weight.zero_()
            self.conv.weight[range(3), range(3), 1, 1] = 1.0
            self.conv.bias.zero_()

    def transform(self, x: Tensor, magnitude: Tensor, coefficients: Tensor | None = None) -> Tensor:
        scale, shift = _paper_head(self.theta_e, self.fc, magnitude).to(x.dtype).unbind(1)
        channels = x.shape[1]
        rgb = x.expand(-1, 3, -1, -1) if channels == 1 else x
        y = rgb * (0.5 + torch.sigmoid(scale)).view(-1, 1, 1, 1) + (torch.sigmoid(shift) - 0.5).view(-1, 1, 1, 1)
        out = F.conv2d(y, self.conv.weight.to(x.dtype), self.conv.bias.to(x.dtype), padding=1)
        return out.mean(dim=1, keepdim=True) if channels == 1 else out


_DEFAULT_FAMILIES = {
    "blend": BlendEncoder,
    "staircase": StaircaseEncoder,
    "threshold": ThresholdEncoder,
    "affine": AffineEncoder,
}


def freeze(encoder: MetaEncoder) -> MetaEncoder:
    """Turn every parameter of ``encoder`` into a buffer: the prior moves with ``.to()`` and is saved in state
    dicts, but no optimiser built from ``.parameters()`` of a module holding it can see or change it. The encoder
    is put in eval mode and stays there (``MetaEncoder.train``)."""
    for module in encoder.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            del module._parameters[name]
            module.register_buffer(name, param.detach())
    encoder.frozen = True
    return encoder.eval()


def build_encoder(op: str, arch: str = "default") -> MetaEncoder:
    """A freshly initialised (unfitted) encoder for ``op``; ``diffaug.load_priors`` gives fitted ones."""
    spec = get_op(op)
    if arch not in ARCHS:
        raise DiffAugError(f"arch must be one of {list(ARCHS)}; got {arch!r}")
    if not spec.has_magnitude:
        raise DiffAugError(f"{op} has no magnitude and no encoder (it is applied directly); got a request for one")
    if arch == "paper":
        return PaperAffineEncoder(op) if spec.kind == "affine" else PaperColorEncoder(op)
    return _DEFAULT_FAMILIES[spec.encoder](op)
