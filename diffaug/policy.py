"""PolicyAugmenter: learnable per-op probabilities and magnitudes over frozen meta-encoders (TST Eq. 4 and 5).

Sampling is apart from applying: ``sample(batch_size)`` draws a ``PolicySample`` (which ops each image gets,
their gates, signed magnitudes and Cutout positions), and ``apply(x, sample)`` replays it, so a teacher and a
student can see exactly the same augmented batch. In ``train()`` mode gates and magnitudes are relaxed-Bernoulli
samples that carry gradients to the logits; in ``eval()`` mode they are hard samples of the same distribution.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from os import PathLike
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import AffineEncoder, MagnitudeNetStack, MetaEncoder
from .errors import DiffAugError, check_images, check_names
from .ops import get_op, op_names, warp, warp_rows
from .targets import Augmented, check_targets, move_targets

__all__ = ["GEOMETRIES", "MAGNITUDE_SAMPLINGS", "PolicyAugmenter", "PolicySample", "ReferencePolicy", "relaxed_bernoulli"]

MagnitudeSampling = Literal["relaxed", "mean", "uniform"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")
MAGNITUDE_SAMPLINGS: tuple[str, ...] = ("relaxed", "mean", "uniform")
Geometry = Literal["residual", "composed"]
GEOMETRIES: tuple[str, ...] = ("residual", "composed")
Layout = Literal["eager", "static", "gathered"]  # see _Policy._layout
# compile=True's layout on a CPU (_Policy._layout), from train steps and no-grad forwards of the default augmenter
# timed side by side on one thread (2026-12-04; ms eager / gathered / static):
# - static up to 2,048 pixels a channel (B * H * W), where a call's fixed cost outweighs the pixels: train steps
#   2.40 / 1.28 / 1.09 at 16x3x8x8, 2.56 / 1.35 / 1.42 at 32x3x8x8, 2.75 / 1.60 / 2.14 at 64x3x8x8 (no-grad
#   forwards cross later: static was still the fastest at 4x3x32x32, 1.09 / 0.97 / 0.78);
# - above, train steps gather on images of at most 32x32 and run eager otherwise (2026-12-07, two runs, the gathered
#   backward recomputing its forward: 48x3x32x32 4.7 / 3.4, 128x3x32x32 8.8 / 7.0, 256x3x32x32 14.1 / 13.1,
#   512x3x32x32 26.4 / 26.7; larger images at best even: 8x3x64x64 3.5 / 4.1 and 3.6 / 4.1, 32x3x64x64 9.2 / 10.3
#   and 8.4 / 7.7, 16x3x224x224 39.6 / 50.2 and 42.8 / 43.4, 4x3x224x224 11.8 / 35.6);
# - no-grad forwards gather on images of at most 32x32 or on 16 images and more, and run eager otherwise: on a few
#   larger images the padding (every op at least two pairs) outweighs the fusion (4x3x64x64: 1.67 / 1.86; 8x3x96x96:
#   1.89 / 2.02; 4x3x224x224: 3.04 / 8.83; but 16x3x96x96: 4.93 / 3.69; 128x3x32x32: 2.94 / 1.76).
_CPU_LAYOUT = {"static_pixels": 2048, "gathered_image": 1024, "gathered_batch": 16}

_EXPORT_FORMAT = 1
# The settings every format-1 dict holds; those added since (geometry, ignore_index) take their defaults if absent.
_FORMAT_1_SETTINGS = ("ops", "n_ops", "temperature", "selection", "magnitude_sampling", "mean", "std")

# An op whose gate is below this, or whose magnitude is (every op is the identity at m = 0), contributes less than a
# millionth of its residual and of its gradient (d sigmoid(z / tau) / dz = s (1 - s) / tau < 2e-5 there). Skipping
# those pairs saves about a third of the work at p = m = 0.5 in train mode, and half in eval mode (hard samples).
_NEGLIGIBLE = 1e-6
# Graphs the compiled path may hold per method, over every augmenter of the process (see _compiled_path).
_RECOMPILE_LIMIT = 64
# The same torch.compile modes less their CUDA graphs, whose outputs share memory from call to call.
_WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def relaxed_bernoulli(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """sigmoid((logits + L) / temperature), L ~ Logistic(0, 1): ``RelaxedBernoulli(logits=...).rsample()``."""
    return _relaxed_bernoulli(logits, _uniform(logits.shape, generator, logits.device), temperature)


def _relaxed_bernoulli(logits: Tensor, uniform: Tensor, temperature: float) -> Tensor:
    # logit(u) of a uniform u is Logistic(0, 1) noise; u is kept 1e-6 away from 0 and 1.
    return torch.sigmoid((logits + torch.logit(uniform, eps=1e-6)) / temperature)


def _uniform(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    draw_on = generator.device if generator is not None else device
    noise = torch.rand(tuple(shape), generator=generator, device=draw_on)
    return noise if noise.device == device else noise.to(device)


@dataclass(frozen=True)
class PolicySample:
    """One draw of the policy for a batch; replay it with ``PolicyAugmenter.apply``.

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


def _logit(value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise DiffAugError(f"{what} must be a number strictly between 0 and 1; got {value!r}")
    return math.log(value / (1.0 - value))


def _initial_logits(value: float | Mapping[str, float], names: Sequence[str], what: str) -> Tensor:
    if isinstance(value, Mapping):
        check_names(list(value), names, what=f"{what} op")
        values = [value.get(n, 0.5) for n in names]
    else:
        values = [value] * len(names)
    logits = [_logit(v, f"{what} of {n}") for v, n in zip(values, names, strict=True)]
    return torch.tensor(logits, dtype=torch.float32)


_PolicyT = TypeVar("_PolicyT", bound="_Policy")


class _Policy(nn.Module):
    """What PolicyAugmenter and ReferencePolicy share: the logits, sampling, replay (Eq. 5), normalisation,
    inspection and JSON export. Subclasses say how one op transforms a batch (``_transform``)."""

    probability_logits: Tensor
    magnitude_logits: Tensor

    # Whether the logits are parameters (learned) or buffers (a fixed policy).
    _learnable = True
    # The constructor arguments that settings() reports and from_dict() reads back.
    _setting_names: tuple[str, ...] = (*_FORMAT_1_SETTINGS, "geometry", "ignore_index")

    def __init__(
        self,
        ops: Sequence[str] | None = None,
        *,
        n_ops: int | None = None,
        probability: float | Mapping[str, float] = 0.5,
        magnitude: float | Mapping[str, float] = 0.5,
        temperature: float = 0.05,
        selection: Literal["sample", "batch"] = "sample",
        magnitude_sampling: MagnitudeSampling = "relaxed",
        geometry: Geometry = "residual",
        ignore_index: int = 255,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int | None = None,
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__()
        self.ops = op_names(ops)
        self.magnitude_ops = tuple(n for n in self.ops if get_op(n).has_magnitude)
        n_ops = min(4, len(self.ops)) if n_ops is None else n_ops
        if not isinstance(n_ops, int) or not 1 <= n_ops <= len(self.ops):
            raise DiffAugError(f"n_ops must be an int in [1, {len(self.ops)}] (the number of ops); got {n_ops!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise DiffAugError(f"temperature must be a positive number; got {temperature!r}")
        _check_choice("selection", selection, ("sample", "batch"))
        _check_choice("magnitude_sampling", magnitude_sampling, MAGNITUDE_SAMPLINGS)
        _check_choice("geometry", geometry, GEOMETRIES)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise DiffAugError(f"ignore_index must be an int (the label of pixels from outside the image); got "
                               f"{ignore_index!r}")
        self.geometry = geometry
        self.ignore_index = ignore_index
        self.n_ops = n_ops
        self.temperature = float(temperature)
        self.selection = selection
        self.magnitude_sampling = magnitude_sampling
        logits = {
            "probability_logits": _initial_logits(probability, self.ops, "probability"),
            "magnitude_logits": _initial_logits(magnitude, self.magnitude_ops, "magnitude"),
        }
        for name, value in logits.items():
            if self._learnable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        columns = [self.ops.index(n) for n in self.magnitude_ops]
        self.register_buffer("_magnitude_columns", torch.tensor(columns, dtype=torch.long), persistent=False)
        has_magnitude = [get_op(n).has_magnitude for n in self.ops]
        self.register_buffer("_has_magnitude", torch.tensor(has_magnitude, dtype=torch.bool), persistent=False)
        signed = [get_op(n).signed for n in self.magnitude_ops]
        self.register_buffer("_signed", torch.tensor(signed, dtype=torch.bool), persistent=False)
        # Columns transformed together (see _render): every affine op in one group, each other op on its own. The
        # table lists the affine ops next to each other, and self.ops keeps table order.
        affine = tuple(k for k, n in enumerate(self.ops) if get_op(n).kind == "affine")
        others = [(k,) for k, n in enumerate(self.ops) if get_op(n).kind != "affine"]
        self._groups = tuple(sorted(others + ([affine] if affine else [])))
        self._affine_group = self._groups.index(affine) if affine else None
        self._set_normalisation(mean, std)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if compile is not False and compile is not True and compile not in COMPILE_MODES:
            raise DiffAugError(f"compile must be True, False or a torch.compile mode {list(COMPILE_MODES)}; got {compile!r}")
        self.compile_mode = None if compile is False else ("default" if compile is True else compile)
        self._compiled: dict[str, Any] = {}

    def _compiled_path(self, name: str, cuda_graphs: bool = True, dynamic: bool | None = None,
                       recompute: bool = False) -> Any:
        """The method ``name``, compiled in ``compile``'s mode on first use when that is set (without CUDA graphs
        unless ``cuda_graphs``; ``dynamic`` as torch.compile takes it; with ``recompute``, its backward recomputes
        the forward from the inputs instead of saving what the forward computed), else as it is (per instance: a
        copy compiles its own)."""
        if self.compile_mode is None:
            return getattr(self, name)
        if name not in self._compiled:
            mode = self.compile_mode if cuda_graphs else _WITHOUT_CUDA_GRAPHS.get(self.compile_mode, self.compile_mode)
            compiled = torch.compile(getattr(self, name), mode=mode, fullgraph=True, dynamic=dynamic)

            def quietly(*args: Tensor) -> Any:
                # Tracing raises torch's internal warnings (a .grad it reads, an autograd Function): not the user's.
                # Every augmenter of a process shares the method's code, and each setting that changes the graph
                # (ops, mode, grad mode, selection, sampling, a batch of one) adds one: dynamo's default limit of 8
                # per code, a hard error with fullgraph, would fail a user's ninth setting. Storms are tested apart.
                # Raised for these calls only, by hand: config.patch costs 25 us a call, this 4. The memory budget
                # is read when a graph is partitioned into forward and backward, in the call that compiles it; 0
                # saves only the graph's inputs. A torch without the setting saves what its partitioner chooses.
                dynamo, functorch = torch._dynamo.config, torch._functorch.config
                limit = dynamo.recompile_limit
                budget = getattr(functorch, "activation_memory_budget", None) if recompute else None
                dynamo.recompile_limit = max(limit, _RECOMPILE_LIMIT)
                if budget is not None:
                    functorch.activation_memory_budget = 0.0
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return compiled(*args)
                finally:
                    dynamo.recompile_limit = limit
                    if budget is not None:
                        functorch.activation_memory_budget = budget

            self._compiled[name] = quietly
        return self._compiled[name]

    def _pixel_path(self, name: str = "_pixels", dynamic: bool | None = None, recompute: bool = False) -> Any:
        """``_pixels`` (or ``_draw_and_pixels``, ``_gathered_pixels``), compiled when ``compile`` is set."""
        return self._compiled_path(name, dynamic=dynamic, recompute=recompute)

    def _layout(self, images: Tensor) -> Layout:
        """How the pixel path lays out the (image, op) pairs of ``images`` (B, C, H, W): "eager" (the drawn pairs, not
        compiled), "static" (every pair, compiled: no host sync, CUDA graphs possible) or "gathered" (the drawn pairs,
        compiled with symbolic counts after one host sync, every op padded to two pairs). A GPU takes static. A CPU,
        where the sync costs nothing and pixels do, takes the layout measured fastest for the batch's shape and for
        whether the call records a graph for backward (see ``_CPU_LAYOUT``)."""
        if self.compile_mode is None:
            return "eager"
        if images.device.type != "cpu":
            return "static"
        batch, image = images.shape[0], images.shape[-2] * images.shape[-1]
        if batch * image <= _CPU_LAYOUT["static_pixels"]:
            return "static"
        records = torch.is_grad_enabled() and any(t.requires_grad for t in (images, *self.parameters(recurse=False)))
        small = image <= _CPU_LAYOUT["gathered_image"]
        return "gathered" if small or (not records and batch >= _CPU_LAYOUT["gathered_batch"]) else "eager"

    def _sample_path(self) -> Any:
        """``_draw_sample``, compiled when ``compile`` is set; never into CUDA graphs, which hand every call's outputs
        the same memory: a PolicySample is kept across calls (drawn once, replayed on teacher and student)."""
        return self._compiled_path("_draw_sample", cuda_graphs=False)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_compiled": {}}  # compiled for this instance: deepcopy and pickle recompile

    @property
    def relaxed(self) -> bool:
        """Whether ``sample`` draws relaxed (differentiable) gates and magnitudes rather than hard ones."""
        return self.training

    # ----------------------------------------------------------------------------------------------------------
    # Sampling

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> PolicySample:
        """Draw which ops each image gets, their gates and signed magnitudes (relaxed if ``self.relaxed``)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DiffAugError(f"batch_size must be a positive int; got {batch_size!r}")
        return PolicySample(self.ops, *self._sample_path()(self._noise(batch_size, generator)))

    def _noise(self, batch_size: int, generator: torch.Generator | None) -> Tensor:
        """All the uniform noise of a batch's sample in one draw, always eager: the generator gives the same stream,
        compiled or not."""
        generator = generator if generator is not None else self.generator
        k, n_magnitudes = len(self.ops), len(self.magnitude_ops)
        noise = _uniform((batch_size, 2 * k + 2 * n_magnitudes + 2), generator, self.probability_logits.device)
        if self.compile_mode is not None and batch_size > 1:
            torch._dynamo.maybe_mark_dynamic(noise, 0)  # one graph for every batch size
        return noise

    def _draw_sample(self, noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``sample``'s arithmetic on a batch's uniform noise: which ops each image gets, their gates, signed
        magnitudes and Cutout positions. What ``compile=True`` compiles (with ``_pixels``)."""
        batch_size, k, n_magnitudes = noise.shape[0], len(self.ops), len(self.magnitude_ops)
        device = noise.device
        # Op selection keys, gate noise, magnitude noise and signs, positions.
        keys, gate_noise, magnitude_noise, sign_noise, positions = noise.split([k, k, n_magnitudes, n_magnitudes, 2], 1)
        if self.selection == "batch":
            keys = keys[:1]
        chosen = keys.topk(self.n_ops, dim=1).indices
        selected = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, chosen, True).expand(batch_size, k)
        gates = self._draw(self.probability_logits, gate_noise)
        magnitudes = torch.zeros(batch_size, k, device=device)
        if self.magnitude_ops:
            if self.magnitude_sampling == "mean":
                drawn = torch.sigmoid(self.magnitude_logits).expand(batch_size, -1)
            elif self.magnitude_sampling == "uniform":  # the same in train and eval: u is continuous already
                drawn = torch.sigmoid(self.magnitude_logits) * magnitude_noise
            else:
                drawn = self._draw(self.magnitude_logits, magnitude_noise)
            drawn = torch.where(self._signed & (sign_noise < 0.5), -drawn, drawn)
            magnitudes = magnitudes.index_copy(1, self._magnitude_columns, drawn)
        return selected, gates * selected, magnitudes, positions.contiguous()

    def _draw_and_pixels(self, images: Tensor, noise: Tensor
                         ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``_pixels`` on the sample ``_draw_sample`` makes of ``noise``: the compiled forward, one graph."""
        return self._pixels(images, *self._draw_sample(noise))

    def _draw_pairs(self, noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``_draw_sample`` and its ``_pair_table``: the first graph of the gathered path's forward."""
        drawn = self._draw_sample(noise)
        return (*drawn, *self._pair_table(*drawn[:3]))

    def _pair_table(self, selected: Tensor, gates: Tensor, magnitudes: Tensor) -> tuple[Tensor, Tensor]:
        """(K, B + 2) which images each op changes (``_active``) and how many, at least two: an op with fewer gets
        padding, images B and B + 1 (no image), so that a compiled graph never specialises on a count of 0 or 1."""
        active = self._active(selected, gates, magnitudes).t()
        padding = (2 - active.sum(1, keepdim=True)) > torch.arange(2, device=active.device)
        table = torch.cat([active, padding], 1)
        return table, table.sum(1)

    def _draw(self, logits: Tensor, noise: Tensor) -> Tensor:
        """Relaxed (train) or hard (eval) Bernoulli samples of ``logits`` from uniform ``noise`` of the batch's shape."""
        if self.relaxed:
            return _relaxed_bernoulli(logits, noise, self.temperature)
        return (noise < torch.sigmoid(logits)).float()

    # ----------------------------------------------------------------------------------------------------------
    # Applying

    def forward(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        masks: Tensor | None = None,
        boxes: Sequence[Tensor] | None = None,
        keypoints: Sequence[Tensor] | None = None,
    ) -> Tensor | Augmented:
        """Augment ``x`` with a fresh sample of the policy; targets given move with it (see ``apply``)."""
        check_images(x, self._input_name, self._input_range)
        batch_size = 1 if x.dim() == 3 else x.shape[0]
        if self.compile_mode is not None:  # the noise alone: _augment draws the sample as the layout wants it
            return self._augment(x, self._noise(batch_size, generator), masks, boxes, keypoints)
        return self._augment(x, self.sample(batch_size, generator), masks, boxes, keypoints)

    def apply(  # type: ignore[override]
        self,
        x: Tensor,
        sample: PolicySample | None = None,
        *,
        masks: Tensor | None = None,
        boxes: Sequence[Tensor] | None = None,
        keypoints: Sequence[Tensor] | None = None,
    ) -> Tensor | Augmented:
        """Replay ``sample`` on ``x``.

        With ``geometry="residual"`` this is Eq. 5: x + sum over the drawn ops of gate * (f(x, m) - x), clipped.
        With ``geometry="composed"`` the drawn affine ops make one map per image (each op's map pulled towards the
        identity by its gate, composed in table order) and one warp; the other ops then add their gated residuals
        to the warped image. Only then can targets follow: ``masks`` (B, H, W) integer labels or (B, K, H, W)
        float masks, ``boxes`` (B tensors (N_i, 4), xyxy pixels) and ``keypoints`` (B tensors (N_i, 2), xy
        pixels), which colour ops, Equalize, Invert and Cutout leave as they are. Given any of them, the result
        is an ``Augmented`` (images, masks, boxes, keypoints, keep); otherwise the images alone.

        Called with a function alone, this is ``nn.Module.apply(fn)``, as a parent module calls it (for example
        ``model.apply(init_weights)`` on a model holding the augmenter).
        """
        if sample is None and callable(x) and not isinstance(x, Tensor):
            return super().apply(x)  # type: ignore[return-value]
        if not isinstance(sample, PolicySample):
            raise DiffAugError(f"sample must be a PolicySample from sample(); got {type(sample).__name__}")
        check_images(x, self._input_name, self._input_range)
        return self._augment(x, sample, masks, boxes, keypoints)

    def _augment(
        self,
        x: Tensor,
        sample: PolicySample | Tensor,
        masks: Tensor | None = None,
        boxes: Sequence[Tensor] | None = None,
        keypoints: Sequence[Tensor] | None = None,
    ) -> Tensor | Augmented:
        with_targets = masks is not None or boxes is not None or keypoints is not None
        if with_targets:
            if self.geometry != "composed":
                raise DiffAugError(
                    'masks, boxes and keypoints need one geometry per image: build the augmenter with '
                    'geometry="composed"; this one has geometry="residual" (Eq. 5), whose images can blend '
                    "differently moved copies that no target could follow"
                )
            check_targets(x, masks, boxes, keypoints)
        unbatched = x.dim() == 3
        images = x.unsqueeze(0) if unbatched else x
        if isinstance(sample, PolicySample) and (sample.ops != self.ops or len(sample) != images.shape[0]):
            raise DiffAugError(
                f"sample must come from this augmenter's sample({images.shape[0]}) (ops {list(self.ops)}); "
                f"got a sample of {len(sample)} images over ops {list(sample.ops)}"
            )
        images = self._unnormalise(images)
        sample = sample.to(images.device)
        layout = self._layout(images)
        if layout == "eager" and not isinstance(sample, PolicySample):
            # compile=True running eager (see _layout): the sample too, as a compiled call's fixed cost (guards, its
            # autograd wrapper) made train steps 0.3-0.6 ms slower (2026-12-04, 128x3x32x32 and 4x3x224x224).
            sample = PolicySample(self.ops, *self._draw_sample(sample))
        counts: tuple[Any, ...] = ()
        if layout == "gathered":  # draw (compiled), find the drawn pairs (one host sync, eager), apply (compiled)
            if isinstance(sample, PolicySample):
                drawn = (sample.selected, sample.gates, sample.magnitudes, sample.positions)
                table, op_counts = self._pair_table(*drawn[:3])
            else:
                *drawn, table, op_counts = self._compiled_path("_draw_pairs", cuda_graphs=False)(sample)
            inputs: tuple[Tensor, ...] = (images, *drawn[1:], table.nonzero())
            # Its backward recomputes the forward's pixels rather than reading them back: on a CPU, where this
            # layout runs, that made a 128x3x32x32 train step 42 % faster (7.1 against 12.2 ms, 2026-12-07).
            path = self._pixel_path("_gathered_pixels", dynamic=True, recompute=True)
            counts = (op_counts.tolist(),)
        elif isinstance(sample, PolicySample):
            inputs = (images, sample.selected, sample.gates, sample.magnitudes, sample.positions)
            path = self._pixels if layout == "eager" else self._pixel_path()
        else:  # compiled forward: the sample's noise, drawn and applied in one graph
            inputs, path = (images, sample), self._pixel_path("_draw_and_pixels")
        if layout != "eager" and images.shape[0] > 1:
            # One graph for every batch size (an epoch's last batch too; gathered graphs are dynamic anyway, but a
            # mark they lacked would fail their guards). The marks go on aliases: a mark stays on its tensor, and the
            # caller's images and sample must reach another compiled function as they came.
            inputs = tuple(tensor.view(tensor.shape) for tensor in inputs)
            for tensor in inputs:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        out, linear, shift, moved, grid = path(*inputs, *counts)
        out = self._normalise(out)
        out = out.squeeze(0) if unbatched else out
        if not with_targets:
            return out
        moved_targets = move_targets(linear, shift, moved, masks, boxes, keypoints, tuple(x.shape[-2:]),
                                     self.ignore_index, grid)
        return Augmented(out, *moved_targets)

    def _pairs(self, active: Tensor, layout: Layout) -> tuple[Tensor, Tensor, list[int]]:
        """The (op, image) pairs to compute, op-major, and how many each op has.

        Eager: only the active pairs, found at once (one host sync, not one per op). Static: every pair, so that no
        shape depends on the draw; inactive ones get a zero gate."""
        batch, k = active.shape
        if layout == "eager":
            op_index, image_index = active.t().nonzero(as_tuple=True)
            return op_index, image_index, active.sum(0).tolist()
        op_index = torch.arange(k, device=active.device).repeat_interleave(batch)
        image_index = torch.arange(batch, device=active.device).repeat(k)
        return op_index, image_index, [batch] * k

    def _active(self, selected: Tensor, sample_gates: Tensor, sample_magnitudes: Tensor) -> Tensor:
        """(B, K) which pairs change their image: drawn, with a gate and (for magnitude ops) a magnitude."""
        still = self._has_magnitude & (sample_magnitudes.detach().abs() < _NEGLIGIBLE)  # a mask: no graph needed
        return selected & (sample_gates >= _NEGLIGIBLE) & ~still

    def _pixels(self, images: Tensor, selected: Tensor, sample_gates: Tensor, sample_magnitudes: Tensor,
                positions: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """The augmented images in [0, 1] and, with ``geometry="composed"``, each image's map (linear, shift), the
        indices of the moved images and, in eager mode, their sampling grid (for the masks; a compiled graph would
        have to write it out for every call). Eager, or what ``compile=True`` compiles in the static layout: no shape
        depends on the draw, no host sync."""
        layout: Layout = "static" if torch.compiler.is_compiling() else "eager"  # compiled: static only
        active = self._active(selected, sample_gates, sample_magnitudes)
        op_index, image_index, counts = self._pairs(active, layout)
        if layout == "static":
            sample_gates = torch.where(active, sample_gates, 0.0)
        return self._render_pairs(layout, images, op_index, image_index, counts, None, sample_gates,
                                  sample_magnitudes, positions)

    def _gathered_pixels(self, images: Tensor, sample_gates: Tensor, sample_magnitudes: Tensor, positions: Tensor,
                         pairs: Tensor, counts: list[int]
                         ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``_pixels`` on the drawn pairs only: ``pairs`` are the (op, image) rows of ``_pair_table``'s nonzero
        entries, op-major, ``counts`` how many each op has (images B and B + 1 are padding, with a zero gate). What
        ``compile=True`` compiles in the gathered layout."""
        op_index, index = pairs.unbind(1)
        real = index < images.shape[0]
        return self._render_pairs("gathered", images, op_index, torch.where(real, index, 0), counts, real,
                                  sample_gates, sample_magnitudes, positions)

    def _render_pairs(self, layout: Layout, images: Tensor, op_index: Tensor, image_index: Tensor, counts: list[int],
                      real: Tensor | None, sample_gates: Tensor, sample_magnitudes: Tensor, positions: Tensor
                      ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """``_pixels`` of the pairs given (``real`` False for padding): each group of ops gathers its images,
        transforms them in one call and adds its gated residuals back."""
        group_sizes = [[counts[k] for k in columns] for columns in self._groups]
        totals = [sum(sizes) for sizes in group_sizes]
        # index_select, not advanced indexing (x[i, j]): the same gather at a tenth of the cost on the CPU.
        pairs = image_index * len(self.ops) + op_index
        magnitudes = sample_magnitudes.reshape(-1).index_select(0, pairs)
        gates = sample_gates.reshape(-1).index_select(0, pairs)
        if real is not None:  # padding pairs: a zero gate
            gates = torch.where(real, gates, 0.0)
        gates = gates.to(images.dtype).view(-1, 1, 1, 1)
        coefficients = self._coefficients(magnitudes, op_index)
        # Split once per tensor rather than slice per group: autograd joins the groups' gradients in one cat.
        per_group = zip(
            self._groups,
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
        if self.geometry == "composed":  # geometry first, one warp per moved image; the other ops act on its output
            affine = groups.pop(self._affine_group) if self._affine_group is not None else None
            linear, shift, moved = self._compose(images, affine, layout)
            if layout != "eager":
                base = warp(images, linear, shift) if affine is not None else images
            else:
                base, grid = warp_rows(images, linear, shift, moved)
        out = base.clone()  # accumulates base + sum of gated residuals in place: no full-batch temporaries
        # After a warp the other ops' residuals are differentiated as Eq. 5 differentiates every op, on an input
        # that does not move: the geometry's gradient takes the direct path (base), not the path through each
        # colour op. Their own gates and magnitudes keep their gradients; the forward is unchanged. Through every
        # op, the backward would add a full-batch gradient per op group, 1.6x the step (measured, 128x3x32x32).
        source = images if base is images else base.detach()
        for columns, sizes, index, position, magnitude, gate, group_coefficients in groups:
            if index.numel() == 0:
                continue
            part = source.index_select(0, index)
            names = [self.ops[k] for k in columns]
            changed = self._transform(names, sizes, part, magnitude, position, group_coefficients)
            residual = gate * (changed - part)
            if layout == "static":  # every op of the group has the whole batch, op-major: a sum, not a scatter
                out = out + residual.view(len(columns), *images.shape).sum(0)
            elif layout == "gathered":
                out = out.index_add(0, index, residual)
            else:
                out.index_add_(0, index, residual)
        if torch.is_grad_enabled() and sample_gates.requires_grad and not out.requires_grad:
            # Every pair was negligible (likely for one image: 7 % of draws at p = m = 0.5). Keep the output on
            # the graph, with the zero gradient of skipped pairs, so that a loss on it alone can still backward().
            out = out + 0 * sample_gates.sum()
        out = F.hardtanh_(out, 0.0, 1.0) if layout == "eager" else F.hardtanh(out, 0.0, 1.0)  # clip01 (in place: eager)
        return out, linear, shift, moved, grid

    def _compose(self, images: Tensor, group: tuple | None, layout: Layout) -> tuple[Tensor, Tensor, Tensor]:
        """Each image's drawn affine ops as one map: (B, 2, 2) linear, (B, 2) shift (``warp``'s arguments) and the
        indices of the images whose map is not the identity.

        An op's map is pulled towards the identity by its gate g (I + g (L - I), g t), so the result is
        differentiable in gates and magnitudes; the ops compose in table order, the first drawn acting first.
        """
        batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        eye = torch.eye(2, device=images.device)
        linear, shift = eye.expand(batch, 2, 2), images.new_zeros(batch, 2, dtype=torch.float32)
        if group is None or group[2].numel() == 0:
            return linear, shift, group[2] if group is not None else shift.new_zeros(0, dtype=torch.long)
        columns, sizes, index, _, magnitude, gate, coefficients = group
        names = [self.ops[k] for k in columns]
        op_linear, op_shift = (t.float() for t in self._geometry(names, sizes, magnitude, images, coefficients))
        gate = gate.float().view(-1, 1, 1)
        pixels = torch.tensor([width, height], dtype=torch.float32, device=images.device)
        op_linear, op_shift = eye + gate * (op_linear - eye), gate.view(-1, 1) * op_shift * pixels
        shift = shift * pixels  # composed in pixels: the two axes scale differently
        # Output pixel q of op B samples the ops before it at L_B q + t_B, and those sample x at L_A (.) + t_A.
        for idx, op_l, op_t in zip(index.split(sizes), op_linear.split(sizes), op_shift.split(sizes), strict=True):
            if layout == "gathered":  # every image's map of this op: identity where not drawn (padding adds zero)
                # Added to zeros, not to eye.expand(): inductor writes an index_add into an expanded tensor's one
                # shared row (pytorch/pytorch#183986; torch 2.13 still does), giving every image the sum of maps.
                op_l = eye + op_l.new_zeros(batch, 2, 2).index_add(0, idx, op_l - eye)
                op_t = op_t.new_zeros(batch, 2).index_add(0, idx, op_t)
            if layout != "eager":  # every image has every op (identity where not drawn): no gather
                linear, shift = linear @ op_l, (linear @ op_t.unsqueeze(2)).squeeze(2) + shift
                continue
            if idx.numel() == 0:
                continue
            before_l, before_t = linear.index_select(0, idx), shift.index_select(0, idx)
            linear = linear.index_copy(0, idx, before_l @ op_l)
            shift = shift.index_copy(0, idx, (before_l @ op_t.unsqueeze(2)).squeeze(2) + before_t)
        moved = torch.arange(batch, device=images.device) if layout != "eager" else index.unique()
        return linear, shift / pixels, moved

    def _geometry(self, names: list[str], sizes: list[int], magnitude: Tensor, x: Tensor,
                  coefficients: Tensor | None) -> tuple[Tensor, Tensor]:
        """The affine group's maps (linear, shift), one per pair; here the exact ones."""
        return self._matrices(names, sizes, magnitude, x)

    def _coefficients(self, magnitude: Tensor, columns: Tensor) -> Tensor | None:
        """The encoders' networks of m for every pair (magnitude, op column), if the subclass has them."""
        return None

    def _transform(
        self, names: list[str], sizes: list[int], x: Tensor, magnitude: Tensor, position: Tensor,
        coefficients: Tensor | None,
    ) -> Tensor:
        """One group's output: ``sizes[i]`` consecutive images of ``x`` go through op ``names[i]``; here the
        reference ops."""
        return self._render(names, sizes, x, magnitude, position)

    @staticmethod
    def _render(
        names: list[str],
        sizes: list[int],
        x: Tensor,
        magnitude: Tensor,
        position: Tensor,
        encoders: Mapping[str, MetaEncoder] | None = None,
        coefficients: Tensor | None = None,
    ) -> Tensor:
        """One group through its meta-encoders, or through the reference ops if ``encoders`` is None. A group is one
        op, or every affine op in use: those differ only in their matrices, so they share one grid_sample call.
        ``coefficients`` are the encoders' networks of m, already evaluated (``MagnitudeNetStack``), or None."""
        spec = get_op(names[0])
        if spec.kind == "affine":
            return warp(x, *_Policy._matrices(names, sizes, magnitude, x, encoders, coefficients))
        if encoders is None or not spec.has_magnitude:
            return spec.reference(x, magnitude, position)
        return encoders[spec.name].transform(x, magnitude, coefficients)

    @staticmethod
    def _matrices(
        names: list[str],
        sizes: list[int],
        magnitude: Tensor,
        x: Tensor,
        encoders: Mapping[str, MetaEncoder] | None = None,
        coefficients: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The maps (linear, shift) of an affine group's pairs, from the encoders or (``encoders`` None) exact; ``x``
        gives the image size and the dtype of the exact maps."""
        if coefficients is not None and all(type(encoders[n]) is AffineEncoder for n in names):  # type: ignore[index]
            # The default encoders differ only in their networks of m, already evaluated: one map computation.
            return AffineEncoder.maps(coefficients)
        matrices = []
        pieces = coefficients.split(sizes) if coefficients is not None else [None] * len(sizes)
        for name, m, c in zip(names, magnitude.split(sizes), pieces, strict=True):
            if m.numel() == 0:
                continue
            if encoders is None:
                matrices.append(get_op(name).geometry(m.to(x.dtype)))  # type: ignore[misc]
            else:
                matrices.append(encoders[name].matrices(m, x.shape[-2:], c))
        linear, shift = (torch.cat(t) for t in zip(*matrices, strict=True))
        return linear, shift

    # ----------------------------------------------------------------------------------------------------------
    # Normalisation

    def _set_normalisation(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        if (mean is None) != (std is None):
            raise DiffAugError(f"mean and std must be given together; got mean={mean!r}, std={std!r}")
        if mean is None:
            self.register_buffer("mean", None)
            self.register_buffer("std", None)
            self._input_range = (0.0, 1.0)
            self._input_name = "images"
            return
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() not in (1, 3) or mean_t.shape != std_t.shape or not bool((std_t > 0).all()):
            raise DiffAugError(f"mean and std must be 1 or 3 numbers each, std > 0; got mean={mean!r}, std={std!r}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))
        # A loose bound: the exact check happens after un-normalising.
        lo = float(((0 - mean_t) / std_t).min()) - 1e-3
        hi = float(((1 - mean_t) / std_t).max()) + 1e-3
        self._input_range = (lo, hi)
        self._input_name = "images normalised with mean/std"

    def _unnormalise(self, x: Tensor) -> Tensor:
        if self.mean is None:
            return x
        images = x * self.std.to(x) + self.mean.to(x)
        # Normalising and back costs a few ulps; anything further out was not normalised with these numbers.
        check_images(images, name="images after un-normalising with mean/std", value_range=(-1e-4, 1 + 1e-4))
        return images.clamp(0.0, 1.0)

    def _normalise(self, x: Tensor) -> Tensor:
        return x if self.mean is None else (x - self.mean.to(x)) / self.std.to(x)

    # ----------------------------------------------------------------------------------------------------------
    # Inspection

    def policy(self) -> dict[str, dict[str, float]]:
        """Current apply probability of every op and magnitude of every magnitude op, by op name."""
        probabilities = torch.sigmoid(self.probability_logits.detach()).tolist()
        magnitude_values = torch.sigmoid(self.magnitude_logits.detach()).tolist()
        magnitudes = dict(zip(self.magnitude_ops, magnitude_values, strict=True))
        result: dict[str, dict[str, float]] = {}
        for name, p in zip(self.ops, probabilities, strict=True):
            result[name] = {"probability": p} | ({"magnitude": magnitudes[name]} if name in magnitudes else {})
        return result

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that shape sampling, as plain JSON values."""
        return {
            "ops": list(self.ops),
            "n_ops": self.n_ops,
            "temperature": self.temperature,
            "selection": self.selection,
            "magnitude_sampling": self.magnitude_sampling,
            "geometry": self.geometry,
            "ignore_index": self.ignore_index,
            "mean": None if self.mean is None else self.mean.flatten().tolist(),
            "std": None if self.std is None else self.std.flatten().tolist(),
        }

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain JSON: op names, probabilities, magnitudes, settings, and the exact logits.

        Example:
            >>> import json
            >>> aug = PolicyAugmenter()
            >>> PolicyAugmenter.from_dict(json.loads(json.dumps(aug.to_dict()))).policy() == aug.policy()
            True
        """
        policy = self.policy()
        return {
            "format": _EXPORT_FORMAT,
            **self.settings(),
            "probability": {n: v["probability"] for n, v in policy.items()},
            "magnitude": {n: v["magnitude"] for n, v in policy.items() if "magnitude" in v},
            # float32 -> Python float -> JSON and back is exact, so samples replay bit for bit.
            "probability_logits": self.probability_logits.detach().cpu().tolist(),
            "magnitude_logits": self.magnitude_logits.detach().cpu().tolist(),
        }

    @classmethod
    def from_dict(cls: type[_PolicyT], data: Mapping[str, Any], **kwargs: Any) -> _PolicyT:
        """Rebuild from ``to_dict()`` output; ``kwargs`` go to the constructor (e.g. ``priors=``, ``seed=``)."""
        if not isinstance(data, Mapping) or data.get("format") != _EXPORT_FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise DiffAugError(f"policy dict must come from to_dict() (format {_EXPORT_FORMAT}); got format {got!r}")
        missing = [k for k in _FORMAT_1_SETTINGS if k not in data]
        if missing:
            raise DiffAugError(f"policy dict must hold the settings {list(_FORMAT_1_SETTINGS)}; missing {missing}")
        policy = cls(**{k: data[k] for k in cls._setting_names if k in data}, **kwargs)
        with torch.no_grad():
            for name in ("probability_logits", "magnitude_logits"):
                target = getattr(policy, name)
                value = torch.tensor(data[name], dtype=target.dtype)
                if value.shape != target.shape:
                    raise DiffAugError(f"policy dict {name} must have {target.numel()} values; got {value.numel()}")
                target.copy_(value)
        return policy

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k not in ("ops", "mean", "std"))


class PolicyAugmenter(_Policy):
    """Differentiable AutoAugment policy: one learnable probability per op and one magnitude per magnitude op.

    Args:
        ops: op names to use (default: all 14 of ``diffaug.OPS``, kept in table order).
        n_ops: ops drawn per image without replacement (N_A of the paper; default 4, or all ops if fewer).
        probability: initial apply probability, one float or a dict by op name (others 0.5).
        magnitude: initial magnitude in (0, 1), one float or a dict by op name (others 0.5).
        temperature: relaxed-Bernoulli temperature (tau_l = 0.05 in the paper).
        selection: "sample" draws the ops per image; "batch" draws one set for the whole batch (the paper).
        magnitude_sampling: how a drawn op's strength is sampled from its logit theta_m. "relaxed": like the gates
            (Eq. 4 as written), so an applied op is at strength about 0 or 1; "mean": sigmoid(theta_m) as is, no
            sampling (the authors' code); "uniform": sigmoid(theta_m) * u with u ~ U(0, 1), every strength up to
            the learned one (as TrivialAugment draws them), in train and eval mode alike.
        geometry: "residual" composes by Eq. 5 (the paper: every drawn op's residual added to x, so two affine
            ops give two blended copies); "composed" makes an image's affine ops one map and one warp, which masks,
            boxes and keypoints can follow (see ``apply``).
        ignore_index: with "composed", the label given to mask pixels brought in from outside the image.
        forward: "encoder" outputs the meta-encoders' pixels (the paper); "reference" outputs the exact reference
            ops while gradients flow through the encoders (straight-through).
        priors: "default" (the shipped fitted priors), a priors folder, a dict of encoders by op name, or None
            for freshly initialised, unfitted encoders.
        arch: encoder architecture, "default" or "paper", when priors is "default", a folder or None.
        mean, std: per-channel normalisation of the inputs; images are un-normalised before augmenting.
        seed: seeds the augmenter's own generator, so every draw is reproducible.
        compile: False (eager: only the (image, op) pairs drawn are computed, after one host sync), or True / a
            ``torch.compile`` mode ("default", "reduce-overhead", "max-autotune"): torch.compile fuses the pixel
            path and the arithmetic of ``sample`` (its noise is drawn eagerly, so a seed gives the same draw). On a
            GPU it computes every pair with static shapes, undrawn ones gated to zero, no host sync, ``forward``
            drawing and applying in one graph (CUDA graphs possible). On a CPU each call takes the layout measured
            fastest for its shape and grad mode: static for batches of at most 2,048 pixels a channel (B * H * W);
            the drawn pairs only, compiled with symbolic counts after one host sync (one graph for every batch size
            and draw), for no-grad calls on images of at most 32x32 or on 16 images and more, and for train steps
            on images of at most 32x32; eager otherwise (see the README). The first call in each layout compiles.
            Equal to the eager path on the same sample within 1e-5 (1e-4 next to Solarize's threshold). On a CPU
            it compiles a call only where that measured faster than eager, and runs eager elsewhere (Stage II steps
            on 224 px images, for example); the GPU layout is unmeasured on a GPU. With
            "reduce-overhead" the output lives in CUDA-graph memory that the next call overwrites (torch raises if
            it is read after that): ``.clone()`` what you keep across calls, such as two views of one batch.

    In ``train()`` mode gates and magnitudes are relaxed-Bernoulli samples that carry gradients to the logits;
    in ``eval()`` mode they are hard samples of the same distribution.

    Shape:
        input: (B, C, H, W) or (C, H, W) float, C in {1, 3}, values in [0, 1] (or normalised with mean/std).
        output: same as input.

    Example:
        >>> aug = PolicyAugmenter(seed=0)
        >>> x = torch.rand(8, 3, 32, 32)
        >>> aug(x).shape
        torch.Size([8, 3, 32, 32])
        >>> s = aug.sample(8); torch.equal(aug.apply(x, s), aug.apply(x, s))
        True
    """

    def __init__(
        self,
        ops: Sequence[str] | None = None,
        *,
        n_ops: int | None = None,
        probability: float | Mapping[str, float] = 0.5,
        magnitude: float | Mapping[str, float] = 0.5,
        temperature: float = 0.05,
        selection: Literal["sample", "batch"] = "sample",
        magnitude_sampling: MagnitudeSampling = "relaxed",
        geometry: Geometry = "residual",
        ignore_index: int = 255,
        forward: Literal["encoder", "reference"] = "encoder",
        priors: str | PathLike | Mapping[str, MetaEncoder] | None = "default",
        arch: str = "default",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int | None = None,
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__(
            ops, n_ops=n_ops, probability=probability, magnitude=magnitude, temperature=temperature,
            selection=selection, magnitude_sampling=magnitude_sampling, geometry=geometry,
            ignore_index=ignore_index, mean=mean, std=std, seed=seed, compile=compile,
        )
        _check_choice("forward", forward, ("encoder", "reference"))
        self.forward_mode = forward
        self.encoders = nn.ModuleDict(_resolve_encoders(priors, arch, self.magnitude_ops))
        # The encoders' networks of m run for all pairs of a batch in one pass; ops without one (no magnitude, or
        # an encoder without a MagnitudeNet) point at the stack's row of zeros.
        nets = {n: net for n in self.magnitude_ops if (net := self.encoders[n].magnitude_net()) is not None}
        self._net_ops = tuple(nets)
        net_of_column = [self._net_ops.index(n) if n in nets else len(nets) for n in self.ops]
        self.register_buffer("_net_of_column", torch.tensor(net_of_column, dtype=torch.long), persistent=False)
        self._magnitude_nets = MagnitudeNetStack(list(nets.values()))

    _setting_names = (*_Policy._setting_names, "forward")

    def _pixel_path(self, name: str = "_pixels", dynamic: bool | None = None, recompute: bool = False) -> Any:
        if self.compile_mode is not None:  # in eager: a compiled path reads the packed table as it is
            self._magnitude_nets.refresh()
        return super()._pixel_path(name, dynamic, recompute)

    def _needs_encoders(self, magnitude: Tensor) -> bool:
        return self.forward_mode == "encoder" or (torch.is_grad_enabled() and magnitude.requires_grad)

    def _coefficients(self, magnitude: Tensor, columns: Tensor) -> Tensor | None:
        if not self._net_ops or not self._needs_encoders(magnitude):
            return None
        return self._magnitude_nets(magnitude, self._net_of_column.index_select(0, columns))

    def _transform(
        self, names: list[str], sizes: list[int], x: Tensor, magnitude: Tensor, position: Tensor,
        coefficients: Tensor | None,
    ) -> Tensor:
        if not get_op(names[0]).has_magnitude:
            return self._render(names, sizes, x, magnitude, position)
        return self._through_encoders(  # type: ignore[return-value]
            magnitude, coefficients, lambda m, e, c: self._render(names, sizes, x, m, position, e, c))

    def _geometry(self, names: list[str], sizes: list[int], magnitude: Tensor, x: Tensor,
                  coefficients: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._through_encoders(  # type: ignore[return-value]
            magnitude, coefficients, lambda m, e, c: self._matrices(names, sizes, m, x, e, c))

    def _through_encoders(
        self, magnitude: Tensor, coefficients: Tensor | None, render: Any
    ) -> Tensor | tuple[Tensor, ...]:
        """``render(magnitude, encoders, coefficients)`` (pixels or maps) as the forward mode wants it: through the
        encoders, or exact (``encoders`` None) with the encoders' gradient (straight-through) when one is needed."""
        encoded = render(magnitude, self.encoders, coefficients) if self._needs_encoders(magnitude) else None
        if self.forward_mode == "encoder":
            return encoded
        exact = render(magnitude.detach(), None, None)
        if encoded is None:
            return exact
        if isinstance(exact, Tensor):
            return exact + (encoded - encoded.detach())
        return tuple(e + (n - n.detach()) for e, n in zip(exact, encoded, strict=True))

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "forward": self.forward_mode}

    def to_reference(self) -> ReferencePolicy:
        """The learned policy on the exact reference ops, without encoders or gradients: cheap augmentation for
        training after the search. It draws hard samples (as ``eval()`` mode here) whatever its mode."""
        return ReferencePolicy.from_dict(self.to_dict())


class ReferencePolicy(_Policy):
    """A fixed policy applied with the exact reference ops (``diffaug.apply_op``): no encoders, no gradients.

    Build it with ``PolicyAugmenter.to_reference()`` or ``ReferencePolicy.from_dict(json)``; its arguments are
    those of ``PolicyAugmenter`` without ``forward``, ``priors`` and ``arch``. Gates and magnitudes are always hard
    samples, and the probabilities and magnitudes are buffers, not parameters.

    Example:
        >>> ref = PolicyAugmenter(probability={"Rotate": 0.9}).to_reference()
        >>> ref(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
    """

    _learnable = False

    @property
    def relaxed(self) -> bool:
        return False


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DiffAugError(f"{name} must be one of {list(choices)}; got {value!r}")


def _resolve_encoders(
    priors: str | PathLike | Mapping[str, MetaEncoder] | None, arch: str, names: Sequence[str]
) -> dict[str, MetaEncoder]:
    from .encoders import build_encoder, freeze
    from .priors import load_priors

    if priors is None:
        return {n: freeze(build_encoder(n, arch)) for n in names}
    if isinstance(priors, Mapping):
        encoders = {n: freeze(copy.deepcopy(e)) for n, e in priors.items() if n in names}
    else:
        encoders = load_priors(None if priors == "default" else priors, arch=arch)
    missing = [n for n in names if n not in encoders]
    if missing:
        raise DiffAugError(
            f"priors must hold an encoder for every magnitude op in use; {priors!r} is missing {missing} "
            "(fit them with `diffaug fit-priors --ops ...`, or pass ops= without them)"
        )
    for name in names:
        if get_op(name).kind == "affine" and not callable(getattr(encoders[name], "matrices", None)):
            raise DiffAugError(
                f"the encoder of an affine op must have matrices(magnitude, size) -> (linear, shift), as "
                f"diffaug.encoders.AffineEncoder: the augmenter warps all affine ops at once; {name}'s encoder is a "
                f"{type(encoders[name]).__name__} without it"
            )
    return {n: encoders[n] for n in names}
