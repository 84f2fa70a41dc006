"""The compiled path (``compile=True``) in each of its layouts, against the eager path on the same samples:
"gathered" (the drawn pairs, symbolic counts: a CPU's), "static" (every pair, static shapes: a GPU's and a CPU's for
tiny batches) and "eager" (compile=True running eager, a CPU's for some shapes; sample() stays compiled),
each checked on every batch by setting the layout; the layout each shape takes; no recompilation after warm-up."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from diffaug import DiffAugError, PolicyAugmenter, ReferencePolicy
from diffaug.compiled import choose_layout, force_layout, pair_table
from diffaug.compose import active

# Every op but Solarize: its encoder's step is about a level wide in train mode, so the last-bit differences of a
# fused kernel in its threshold move pixels next to it by up to ~1e-4 (measured 6e-5); it has its own test.
SMOOTH_OPS = [op for op in PolicyAugmenter().ops if op != "Solarize"]


LAYOUTS = ["gathered", "static"]
# And compile=True running eager, as a CPU does for some shapes (a forward's sample too; sample() stays compiled).
EVERY_LAYOUT = [*LAYOUTS, "eager"]


def _compiled(cls: type = PolicyAugmenter, layout: str = "gathered", **kwargs: object) -> PolicyAugmenter:
    module = cls(seed=0, compile=True, **kwargs)
    force_layout(module, layout)  # every call in this layout, whatever its shape and grad mode
    return module


def _pair(layout: str = "gathered", **kwargs: object) -> tuple[PolicyAugmenter, PolicyAugmenter]:
    return PolicyAugmenter(seed=0, **kwargs), _compiled(layout=layout, **kwargs)


def _gradients(module: PolicyAugmenter, out: torch.Tensor) -> list[torch.Tensor]:
    """The logit gradients of a loss that weighs every pixel of ``out``. No gradient (None) where no drawn op reads a
    logit, as zero: the paths may differ in what they leave None."""
    (out * torch.linspace(0, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def _assert_matches(eager: tuple[torch.Tensor, list[torch.Tensor]], fast: tuple[torch.Tensor, list[torch.Tensor]],
                    atol: float, context: object = None) -> None:
    """Outputs within ``atol``; gradients within 1e-4 relative to the gradient's size, as the issue asks."""
    (out_e, grads_e), (out_f, grads_f) = eager, fast
    assert (out_e - out_f).abs().max() <= atol, context
    for g_e, g_f in zip(grads_e, grads_f, strict=True):
        assert (g_e - g_f).norm() <= 1e-4 * g_e.norm() + 1e-9, context


def _run(module: PolicyAugmenter, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and logit gradients for the draw of ``seed`` (the same draw on both: equal logits, equal generator)."""
    for p in module.parameters():
        p.grad = None
    sample = module.sample(len(x), torch.Generator().manual_seed(seed))
    out = module(x, sample)
    if not module.training:
        return out, []
    return out.detach(), _gradients(module, out)


def _close(eager: PolicyAugmenter, fast: PolicyAugmenter, x: torch.Tensor, atol: float) -> None:
    for seed in range(2):
        _assert_matches(_run(eager, x, seed), _run(fast, x, seed), atol)


@pytest.mark.slow
@pytest.mark.parametrize("layout", EVERY_LAYOUT)
@pytest.mark.parametrize("geometry", ["residual", "composed"])
def test_compiled_path_matches_eager_in_train_and_eval(layout: str, geometry: str, images: torch.Tensor) -> None:
    eager, fast = _pair(layout, ops=SMOOTH_OPS, geometry=geometry, probability=0.7)
    x = torch.cat([images, images.flip(3)])
    for training in (True, False):
        eager.train(training)
        fast.train(training)
        _close(eager, fast, x, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_reference_forward_and_solarize(layout: str, images: torch.Tensor) -> None:
    eager, fast = _pair(layout, forward="reference", probability=0.7)
    _close(eager, fast, images, atol=1e-4)  # with Solarize (see SMOOTH_OPS)
    reference = ReferencePolicy(seed=0, probability=0.7)
    fast_reference = _compiled(ReferencePolicy, layout, probability=0.7)
    sample = reference.sample(len(images), torch.Generator().manual_seed(0))
    assert (reference(images, sample) - fast_reference(images, sample)).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [{}, {"selection": "batch", "magnitude_sampling": "uniform"},
                                    {"magnitude_sampling": "mean", "probability": 0.7}])
def test_compiled_sample_equals_the_eager_one(kwargs: dict) -> None:
    """``sample`` draws its noise eagerly and compiles only the arithmetic on it: the same generator gives the same
    draw, to the last bits of a fused sigmoid (relaxed gates in train mode; hard ones in eval mode exactly)."""
    eager, fast = _pair(**kwargs)
    for training in (True, False):
        eager.train(training)
        fast.train(training)
        for batch in (6, 1):
            with torch.set_grad_enabled(training):
                e, f = (m.sample(batch, torch.Generator().manual_seed(batch)) for m in (eager, fast))
            assert torch.equal(e.selected, f.selected) and torch.equal(e.positions, f.positions)
            tolerance = 1e-6 if training else 0.0
            torch.testing.assert_close(f.gates, e.gates, atol=tolerance, rtol=0)
            torch.testing.assert_close(f.magnitudes, e.magnitudes, atol=tolerance, rtol=0)
            assert f.gates.requires_grad == e.gates.requires_grad == training


@pytest.mark.slow
@pytest.mark.parametrize("layout", EVERY_LAYOUT)
def test_compiled_forward_draws_and_applies_as_eager_does(layout: str, images: torch.Tensor) -> None:
    """forward() with compile set draws the sample in a compiled graph, with the pixels where static (one graph),
    before them where gathered (the pairs drawn decide the shapes), eagerly where it runs eager (no graph at all):
    the same generator gives eager forward's images within 1e-5, its logit gradients within 1e-4 relative, and its
    masks and boxes."""
    eager, fast = _pair(layout, ops=SMOOTH_OPS, geometry="composed", probability=0.7)
    x = torch.cat([images, images.flip(3)])
    masks = (x[:, 0] > 0.5).long()
    boxes = [torch.tensor([[4.0, 6.0, 20.0, 28.0]])] * len(x)
    for training in (True, False):
        for seed in range(2):
            results = []
            for module in (eager, fast):
                module.train(training).zero_grad(set_to_none=True)
                with torch.set_grad_enabled(training):
                    out = module(x, generator=torch.Generator().manual_seed(seed), masks=masks, boxes=boxes)
                if training:
                    (out.images * torch.linspace(0, 1, out.images.numel()).view_as(out.images)).sum().backward()
                results.append((out, [p.grad.clone() for p in module.parameters()] if training else []))
            (e, grads_e), (f, grads_f) = results
            assert (e.images - f.images).abs().max() <= 1e-5
            # Labels sampled on grids a few ulps apart can differ where a pixel centre falls on a sampling edge.
            assert (e.masks != f.masks).float().mean() <= 1e-3
            for box_e, box_f in zip(e.boxes, f.boxes, strict=True):
                torch.testing.assert_close(box_f, box_e, atol=1e-4, rtol=0)
            for g_e, g_f in zip(grads_e, grads_f, strict=True):
                assert (g_e - g_f).norm() <= 1e-4 * g_e.norm() + 1e-9
    graphs = {"static": {"draw_and_pixels"}, "gathered": {"draw_pairs", "gathered_pixels"},
              "eager": set()}[layout]
    assert set(fast._compiled.graphs) == graphs


@pytest.mark.slow
def test_more_settings_than_dynamos_default_limit_of_eight() -> None:
    """Every augmenter of a process shares the compiled methods' code, and each setting is a graph of its own: a
    ninth must not hit dynamo's recompile limit (a hard error with fullgraph). Nine values of n_ops, nine graphs."""
    for n_ops in range(1, 10):
        sample = ReferencePolicy(n_ops=n_ops, seed=0, compile=True).sample(4)
        assert sample.selected.sum(1).tolist() == [n_ops] * 4


def _aten_ops(fn) -> int:
    with torch.profiler.profile() as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_calls_dispatch_a_bounded_number_of_ops(layout: str, images: torch.Tensor) -> None:
    """The issue's floor, counted rather than timed: at most 60 aten ops for a no-grad eval forward and 150 for a
    train step (forward and backward to the logits) on the compiled path, against ~640 and ~1,200 eager; inside a
    compiled region only the ops inductor does not fuse are dispatched (gathered: plus the pairs' nonzero)."""
    fast = _compiled(layout=layout)
    step = lambda: fast(images).mean().backward()  # noqa: E731
    for _ in range(2):  # warm-up: compile, then one steady call
        step()
    train_ops = _aten_ops(step)
    fast.eval()
    with torch.no_grad():
        for _ in range(2):
            fast(images)
        eval_ops = _aten_ops(lambda: fast(images))
    assert eval_ops <= 60 and train_ops <= 150, (eval_ops, train_ops)


@pytest.mark.slow
def test_gathered_backward_recomputes_its_forward_and_leaves_the_users_budget(images: torch.Tensor) -> None:
    """Gathered, a train step's graph saves only its inputs for backward (it recomputes the rest, which measured
    faster on a CPU): of the tensors autograd saves, one is as large as the batch, the images themselves, where the
    default partitioner saves the pairs' gathered pixels (tried). The budget is set for our calls only: the user's
    stays as it was."""
    functorch_config = torch._functorch.config  # imported by torch._dynamo, above
    before = functorch_config.activation_memory_budget
    functorch_config.activation_memory_budget = 0.7  # a user's setting, which our calls must not keep
    try:
        fast = _compiled(layout="gathered")
        saved: list[torch.Tensor] = []

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            fast(images).mean().backward()
        assert [t.shape for t in saved if t.numel() >= images.numel()] == [images.shape]
        assert functorch_config.activation_memory_budget == 0.7
    finally:
        functorch_config.activation_memory_budget = before


@pytest.mark.slow
@pytest.mark.parametrize("layout", EVERY_LAYOUT)
def test_no_recompilation_after_warm_up(layout: str, images: torch.Tensor) -> None:
    """After one train and one eval call (and one replay), other batch sizes (an epoch's last batch), mode
    switches, new samples and, gathered, new counts of pairs per op (down to none at 3 images) reuse the graphs;
    the caller's tensors are left unmarked."""
    fast = _compiled(layout=layout)
    fast(images).mean().backward()
    with torch.no_grad():
        fast.eval()(images)
        fast(images, fast.sample(len(images)))
    graphs = counters["stats"]["unique_graphs"]
    for batch in (5, 8, 3, 7):
        fast.train()(images[:batch]).mean().backward()
        with torch.no_grad():
            fast.eval()(images[:batch])
            fast(images[:batch], fast.sample(batch))
    assert counters["stats"]["unique_graphs"] == graphs
    # The marks that keep the batch size dynamic go on aliases, never on the caller's images or sample (whose
    # tensors, outputs of a compiled graph, carry torch's own propagated marks: those stay as they were).
    x, sample = images[:4].clone(), fast.sample(4)
    callers = (x, sample.selected, sample.gates, sample.magnitudes, sample.positions)
    before = [dict(vars(t)) for t in callers]
    fast(x, sample), fast(x)
    assert [dict(vars(t)) for t in callers] == before and not vars(x)
    copied = copy.deepcopy(fast)  # a copy compiles for itself, and is the same policy
    assert torch.equal(copied.probability_logits, fast.probability_logits)


def test_layout_follows_the_device_the_shape_and_the_grad_mode() -> None:
    """Eager without compile. Compiled on a CPU (_CPU_LAYOUT): static up to 2,048 pixels a channel (B * H * W);
    above, train steps gather on images of at most 32x32 and run eager otherwise; no-grad calls gather on images of
    at most 32x32 or on 16 images and more, and run eager otherwise. Static on any other device, whatever the
    shape."""
    assert choose_layout(PolicyAugmenter(), torch.empty(128, 3, 32, 32)) == "eager"
    fast = PolicyAugmenter(compile=True)

    def layouts(*shape: int) -> tuple[str, str]:
        images = torch.empty(*shape)
        with torch.no_grad():
            no_grad = choose_layout(fast, images)
        return no_grad, choose_layout(fast, images)

    assert layouts(8, 3, 8, 8) == layouts(2, 3, 32, 32) == ("static", "static")
    assert layouts(3, 3, 32, 32) == layouts(128, 3, 8, 8) == layouts(512, 3, 32, 32) == ("gathered", "gathered")
    assert layouts(16, 3, 33, 33) == layouts(16, 3, 96, 96) == layouts(32, 3, 224, 224) == ("gathered", "eager")
    assert layouts(15, 3, 33, 33) == layouts(4, 3, 224, 224) == ("eager", "eager")
    fast.requires_grad_(False)  # a frozen policy records no graph, unless its images need a gradient
    assert choose_layout(fast, torch.empty(16, 3, 96, 96)) == "gathered"
    assert choose_layout(fast, torch.empty(16, 3, 96, 96, requires_grad=True)) == "eager"
    assert choose_layout(fast, torch.empty(4, 3, 224, 224, device="meta")) == "static"


@pytest.mark.slow
def test_batches_on_both_sides_of_the_layout_switch_reuse_their_graphs(images: torch.Tensor) -> None:
    """A CPU run whose batches straddle the size at which the layout switches (a tiny last batch) compiles each
    layout once: after a forward and a replay of each, neither recompiles, and both give the eager result on the
    same sample."""
    eager, fast = PolicyAugmenter(seed=0, ops=SMOOTH_OPS), PolicyAugmenter(seed=0, ops=SMOOTH_OPS, compile=True)
    with torch.no_grad():
        fast.eval(), eager.eval()
        for batch in (8, 2):  # warm-up, a forward and a replay: 8 images of 32x32 gather, 2 are static
            fast(images[:batch])
            fast(images[:batch], fast.sample(batch))
        graphs = counters["stats"]["unique_graphs"]
        for batch in (7, 2, 5, 3):  # not 1: a batch of one is a setting of its own (see _noise)
            sample = fast.sample(batch, torch.Generator().manual_seed(batch))
            assert (fast(images[:batch], sample) - eager(images[:batch], sample)).abs().max() <= 1e-5
            fast(images[:batch])
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_gathered_layout_pads_ops_drawn_by_fewer_than_two_images(images: torch.Tensor) -> None:
    """Gathered, each op has at least two pairs, so that no count of 0 or 1 specialises a graph: an op drawn by
    fewer images gets padding rows (images B and B + 1) with a zero gate. With one op an image on two images,
    most ops are drawn by none: the result is still the eager one, gradients too."""
    eager, fast = _pair("gathered", ops=SMOOTH_OPS, n_ops=1, probability=0.99)
    sample = fast.sample(2, torch.Generator().manual_seed(0))
    table, counts = pair_table(active(sample.selected, sample.gates, sample.magnitudes, fast._has_magnitude))
    assert table.shape == (len(SMOOTH_OPS), 4) and (counts >= 2).all()
    assert (table[:, :2].sum(1) == 0).sum() >= len(SMOOTH_OPS) - 2  # most ops padded twice
    assert torch.equal(table[:, :2], active(sample.selected, sample.gates, sample.magnitudes, fast._has_magnitude).t())
    _close(eager, fast, images[:2], atol=1e-5)


def test_compile_argument_is_checked() -> None:
    with pytest.raises(DiffAugError, match="compile must be True, False or a torch.compile mode"):
        PolicyAugmenter(compile="fast")  # type: ignore[arg-type]
    assert PolicyAugmenter(compile="reduce-overhead").compile_mode == "reduce-overhead"
    assert PolicyAugmenter().compile_mode is None
