"""Everything torch.compile: the compiled layouts of a policy's pairs, the rule that picks one, and the one custom op.

Why a module of its own: the compiler has its own needs (shapes that do not depend on the draw, symbolic batch
sizes, settings of ``torch._dynamo`` / ``torch._functorch`` raised around our calls, an op inductor must not
decompose), and they change with every torch release. Here, and nowhere else in the package, is that code; the
eager path (``diffaug.compose``) is the reference each layout is tested against (tests/test_compile.py).

Layouts of the (image, op) pairs of a batch (``choose_layout``):

- "eager": the drawn pairs, not compiled (``diffaug.compose``);
- "static": every pair, compiled, undrawn ones gated to zero: no shape depends on the draw, no host sync, CUDA
  graphs possible. A GPU's layout, and a CPU's for tiny batches, where a call's fixed cost outweighs the pixels;
- "gathered": the drawn pairs, compiled with symbolic counts after one host sync (every op padded to two pairs, so
  that no count of 0 or 1 specialises a graph). A CPU's, where the sync costs nothing and pixels do, on small
  images; on a few large images the padding outweighs the fusion, and such calls run eager.

Tests and benchmarks pin a layout with ``force_layout(policy, layout)``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch._dynamo  # noqa: F401  (torch.compile's config, read and set around our calls)
import torch._functorch.config  # noqa: F401
from torch import Tensor, nn

from .compose import Output, Pairs, Plan, active, render_pairs
from .errors import DiffAugError
from .ops import warp
from .render import Renderer
from .sampling import PolicySample

__all__ = ["COMPILE_MODES", "LAYOUTS", "CompileMode", "Compiled", "Layout", "choose_layout", "force_layout",
           "grid_sample_cpu", "mark_dynamic", "pair_table"]

CompileMode = Literal["default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")
Layout = Literal["eager", "static", "gathered"]
LAYOUTS: tuple[str, ...] = ("eager", "static", "gathered")

# compile=True's layout on a CPU, from train steps and no-grad forwards timed side by side (the measurements are in
# benchmarks/results/layouts.md): static up to this many pixels a channel (B * H * W); above, train steps gather on
# images of at most gathered_image pixels and run eager otherwise; no-grad forwards gather on such images or on
# gathered_batch images and more.
_CPU_LAYOUT = {"static_pixels": 2048, "gathered_image": 1024, "gathered_batch": 16}
# Graphs a compiled function may hold, over every policy of the process (see Compiled.function).
_RECOMPILE_LIMIT = 64
# The same torch.compile modes less their CUDA graphs, whose outputs share memory from call to call.
_WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}

_FORCED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------------------------
# grid_sample on a CPU


@torch.library.custom_op("diffaug::grid_sample_cpu", mutates_args=())
def grid_sample_cpu(x: Tensor, grid: Tensor, interpolation: int) -> Tensor:
    """``F.grid_sample(x, grid, zero padding, align_corners=False)`` (``interpolation`` 0 bilinear, 1 nearest) as an
    op inductor cannot see into: compiled on a CPU, it stays ATen's vectorised kernel, where inductor's decomposition
    gathers one element at a time. ``diffaug.ops.resample`` calls it while compiling on a CPU; on a GPU the
    decomposition stays."""
    return torch.grid_sampler_2d(x, grid, interpolation, 0, False)


@grid_sample_cpu.register_fake
def _(x: Tensor, grid: Tensor, interpolation: int) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], grid.shape[1], grid.shape[2])


def _grid_sample_cpu_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x, grid = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_x, grad_grid = torch.ops.aten.grid_sampler_2d_backward(grad, x, grid, ctx.interpolation, 0, False, mask)
    return (grad_x if mask[0] else None), (grad_grid if mask[1] else None), None


def _grid_sample_cpu_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, grid, interpolation = inputs
    ctx.save_for_backward(x, grid)
    ctx.interpolation = interpolation


grid_sample_cpu.register_autograd(_grid_sample_cpu_backward, setup_context=_grid_sample_cpu_context)


# --------------------------------------------------------------------------------------------------------------
# The layout rule


def force_layout(policy: nn.Module, layout: Layout | None) -> None:
    """Test hook: every call of ``policy`` (built with ``compile=``) takes ``layout`` whatever its shape, device and
    grad mode, until ``force_layout(policy, None)``. A policy without ``compile`` stays eager.

    Example:
        >>> from diffaug import PolicyAugmenter
        >>> fast = PolicyAugmenter(compile=True)
        >>> force_layout(fast, "gathered")
        >>> choose_layout(fast, torch.empty(2, 3, 8, 8))
        'gathered'
    """
    if layout is not None and layout not in LAYOUTS:
        raise DiffAugError(f"layout must be one of {list(LAYOUTS)} or None; got {layout!r}")
    if layout is None:
        _FORCED.pop(policy, None)
    else:
        _FORCED[policy] = layout


def choose_layout(policy: nn.Module, images: Tensor) -> Layout:
    """How ``policy``'s call on ``images`` (B, C, H, W) lays out its pairs: "eager" without ``compile``; else the
    forced layout if any (``force_layout``); else "static" on a GPU; on a CPU, the layout measured fastest for the
    batch's shape and for whether the call records a graph for backward (the logits or the images need a gradient)."""
    if getattr(policy, "compile_mode", None) is None:
        return "eager"
    forced = _FORCED.get(policy)
    if forced is not None:
        return forced  # type: ignore[return-value]
    if images.device.type != "cpu":
        return "static"
    batch, image = images.shape[0], images.shape[-2] * images.shape[-1]
    if batch * image <= _CPU_LAYOUT["static_pixels"]:
        return "static"
    records = torch.is_grad_enabled() and any(t.requires_grad for t in (images, *policy.parameters(recurse=False)))
    small = image <= _CPU_LAYOUT["gathered_image"]
    return "gathered" if small or (not records and batch >= _CPU_LAYOUT["gathered_batch"]) else "eager"


def mark_dynamic(tensor: Tensor) -> None:
    """Mark the batch dimension of ``tensor`` dynamic: one graph for every batch size (an epoch's last batch too)."""
    torch._dynamo.maybe_mark_dynamic(tensor, 0)


# --------------------------------------------------------------------------------------------------------------
# The compiled layouts: compose's arithmetic, laid out for the compiler


class StaticPairs(Pairs):
    """Every pair of the batch, op-major (each op has the whole batch): a group's residuals are a sum, its maps a
    batch of products, and every image is warped; nothing is done in place."""

    def warp(self, images: Tensor, linear: Tensor, shift: Tensor, moved: Tensor, has_affine: bool
             ) -> tuple[Tensor, Tensor | None]:
        # No grid: a compiled graph would have to write it out for every call; the masks rebuild it.
        return (warp(images, linear, shift) if has_affine else images), None

    def add(self, out: Tensor, index: Tensor, residual: Tensor, n_columns: int) -> Tensor:
        return out + residual.view(n_columns, *out.shape).sum(0)

    def clip(self, out: Tensor) -> Tensor:
        return torch.nn.functional.hardtanh(out, 0.0, 1.0)

    def compose(self, linear: Tensor, shift: Tensor, index: Tensor, op_linear: Tensor, op_shift: Tensor,
                eye: Tensor) -> tuple[Tensor, Tensor]:
        return linear @ op_linear, (linear @ op_shift.unsqueeze(2)).squeeze(2) + shift

    def moved(self, index: Tensor, batch: int) -> Tensor:
        return torch.arange(batch, device=index.device)


class GatheredPairs(StaticPairs):
    """The drawn pairs, op-major, padded: residuals scatter into the batch, maps are the identity where not drawn."""

    def add(self, out: Tensor, index: Tensor, residual: Tensor, n_columns: int) -> Tensor:
        return out.index_add(0, index, residual)

    def compose(self, linear: Tensor, shift: Tensor, index: Tensor, op_linear: Tensor, op_shift: Tensor,
                eye: Tensor) -> tuple[Tensor, Tensor]:
        # Every image's map of this op: identity where not drawn (padding adds zero). Added to zeros, not to
        # eye.expand(): inductor writes an index_add into an expanded tensor's one shared row (pytorch/pytorch#183986;
        # torch 2.13 still does), giving every image the sum of maps.
        batch = linear.shape[0]
        op_linear = eye + op_linear.new_zeros(batch, 2, 2).index_add(0, index, op_linear - eye)
        op_shift = op_shift.new_zeros(batch, 2).index_add(0, index, op_shift)
        return super().compose(linear, shift, index, op_linear, op_shift, eye)


STATIC, GATHERED = StaticPairs(), GatheredPairs()


def static_pixels(plan: Plan, renderer: Renderer, has_magnitude: Tensor, images: Tensor, selected: Tensor,
                  gates: Tensor, magnitudes: Tensor, positions: Tensor) -> Output:
    """``compose.pixels`` on every pair, inactive ones with a zero gate: no shape depends on the draw."""
    changing = active(selected, gates, magnitudes, has_magnitude)
    batch, k = changing.shape
    op_index = torch.arange(k, device=changing.device).repeat_interleave(batch)
    image_index = torch.arange(batch, device=changing.device).repeat(k)
    gates = torch.where(changing, gates, 0.0)
    return render_pairs(plan, renderer, STATIC, images, op_index, image_index, [batch] * k, None, gates, magnitudes,
                        positions)


def gathered_pixels(plan: Plan, renderer: Renderer, images: Tensor, gates: Tensor, magnitudes: Tensor,
                    positions: Tensor, pairs: Tensor, counts: list[int]) -> Output:
    """``compose.pixels`` on the drawn pairs only: ``pairs`` are the (op, image) rows of ``pair_table``'s nonzero
    entries, op-major, ``counts`` how many each op has (images B and B + 1 are padding, with a zero gate)."""
    op_index, index = pairs.unbind(1)
    real = index < images.shape[0]
    return render_pairs(plan, renderer, GATHERED, images, op_index, torch.where(real, index, 0), counts, real, gates,
                        magnitudes, positions)


def pair_table(changing: Tensor) -> tuple[Tensor, Tensor]:
    """(K, B + 2) which images each op changes (``changing``, (B, K), from ``compose.active``) and how many, at least
    two: an op with fewer gets padding, images B and B + 1 (no image), so that a compiled graph never specialises on
    a count of 0 or 1."""
    table = changing.t()
    padding = (2 - table.sum(1, keepdim=True)) > torch.arange(2, device=table.device)
    table = torch.cat([table, padding], 1)
    return table, table.sum(1)


Draw = Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


class Compiled:
    """The compiled functions of one policy, compiled in ``mode`` on first use (per policy: a copy compiles its own).

    ``draw`` is the policy's sampling arithmetic on a batch's noise (``sampling.draw`` on its logits), ``plan``
    what its pairs become (``compose``)."""

    def __init__(self, mode: str, draw: Draw, plan: Plan) -> None:
        self.mode = mode
        self.draw, self.plan = draw, plan
        self.graphs: dict[str, Callable[..., Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "graphs": {}}  # compiled for this instance: deepcopy and pickle recompile

    def function(self, name: str, fn: Callable[..., Any], cuda_graphs: bool = True, dynamic: bool | None = None,
                 recompute: bool = False) -> Callable[..., Any]:
        """``fn`` compiled as ``name`` on first use (without CUDA graphs unless ``cuda_graphs``; ``dynamic`` as
        torch.compile takes it; with ``recompute``, its backward recomputes the forward from the inputs instead of
        saving what the forward computed)."""
        if name in self.graphs:
            return self.graphs[name]
        mode = self.mode if cuda_graphs else _WITHOUT_CUDA_GRAPHS.get(self.mode, self.mode)
        compiled = torch.compile(fn, mode=mode, fullgraph=True, dynamic=dynamic)

        def quietly(*args: Any) -> Any:
            # Tracing raises torch's internal warnings (a .grad it reads, an autograd Function): not the user's.
            # Every policy of a process shares the function's code, and each setting that changes the graph (ops,
            # mode, grad mode, selection, sampling, a batch of one) adds one: dynamo's default limit of 8 per code,
            # a hard error with fullgraph, would fail a user's ninth setting. Storms are tested apart. Raised for
            # these calls only, by hand: config.patch costs more per call than the call's own guards. The memory
            # budget is read when a graph is partitioned into forward and backward, in the call that compiles it;
            # 0 saves only the graph's inputs. A torch without the setting saves what its partitioner chooses.
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

        self.graphs[name] = quietly
        return quietly

    def sample(self, noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``draw`` compiled; never into CUDA graphs, which hand every call's outputs the same memory: a PolicySample
        is kept across calls (drawn once, replayed on teacher and student)."""
        return self.function("draw", self.draw, cuda_graphs=False)(noise)

    def pixels(self, layout: Layout, images: Tensor, sample: PolicySample | Tensor, has_magnitude: Tensor,
               renderer: Renderer) -> Output:
        """``compose.pixels`` of ``sample`` (a ``PolicySample``, or a batch's noise, drawn and applied in one go) on
        ``images`` in a compiled ``layout``, "static" or "gathered", with the policy's ``renderer`` (the first call
        of each layout compiles with it)."""
        plan = self.plan
        renderer.prepare()  # in eager: a compiled graph reads what it prepares as it is
        counts: tuple[Any, ...] = ()
        if layout == "gathered":  # draw (compiled), find the drawn pairs (one host sync, eager), apply (compiled)
            if isinstance(sample, PolicySample):
                drawn = (sample.selected, sample.gates, sample.magnitudes, sample.positions)
                table, op_counts = pair_table(active(*drawn[:3], has_magnitude))
            else:
                draw = self.draw

                def draw_pairs(noise: Tensor, has_magnitude: Tensor) -> tuple[Tensor, ...]:
                    drawn = draw(noise)
                    return (*drawn, *pair_table(active(*drawn[:3], has_magnitude)))

                *drawn, table, op_counts = self.function("draw_pairs", draw_pairs, cuda_graphs=False)(
                    sample, has_magnitude)
            inputs: tuple[Tensor, ...] = (images, *drawn[1:], table.nonzero())
            extras: tuple[Any, ...] = ()

            def gathered(images: Tensor, gates: Tensor, magnitudes: Tensor, positions: Tensor, pairs: Tensor,
                         counts: list[int]) -> Output:
                return gathered_pixels(plan, renderer, images, gates, magnitudes, positions, pairs, counts)

            # Its backward recomputes the forward's pixels rather than reading them back: on a CPU, where this
            # layout runs, that is faster than saving them (benchmarks/results/layouts.md).
            path = self.function("gathered_pixels", gathered, dynamic=True, recompute=True)
            counts = (op_counts.tolist(),)
        elif isinstance(sample, PolicySample):
            inputs = (images, sample.selected, sample.gates, sample.magnitudes, sample.positions)
            extras = (has_magnitude,)

            def static(images: Tensor, selected: Tensor, gates: Tensor, magnitudes: Tensor, positions: Tensor,
                       has_magnitude: Tensor) -> Output:
                return static_pixels(plan, renderer, has_magnitude, images, selected, gates, magnitudes, positions)

            path = self.function("static_pixels", static)
        else:  # compiled forward: the sample's noise, drawn and applied in one graph
            inputs, extras = (images, sample), (has_magnitude,)
            draw = self.draw

            def draw_and_pixels(images: Tensor, noise: Tensor, has_magnitude: Tensor) -> Output:
                return static_pixels(plan, renderer, has_magnitude, images, *draw(noise))

            path = self.function("draw_and_pixels", draw_and_pixels)
        if images.shape[0] > 1:
            # One graph for every batch size (gathered graphs are dynamic anyway, but a mark they lacked would fail
            # their guards). The marks go on aliases: a mark stays on its tensor, and the caller's images and sample
            # must reach another compiled function as they came.
            inputs = tuple(tensor.view(tensor.shape) for tensor in inputs)
            for tensor in inputs:
                mark_dynamic(tensor)
        return path(*inputs, *extras, *counts)
