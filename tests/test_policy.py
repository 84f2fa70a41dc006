"""PolicyAugmenter: sampling semantics, gradients to every logit, replay, modes, serialisation and errors."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

from diffaug import OPS, DiffAugError, PolicyAugmenter, PolicySample
from diffaug.encoders import build_encoder
from diffaug.ops import MAGNITUDE_OPS, apply_op, get_op


def _grads_over_batches(aug: PolicyAugmenter, images: torch.Tensor, batches: int, loss_fn) -> dict[str, torch.Tensor]:
    aug.zero_grad()
    generator = torch.Generator().manual_seed(1)
    for _ in range(batches):
        loss_fn(aug(images, generator=generator)).backward()
    # An op subset without magnitude ops has an empty magnitude_logits, which gets no gradient at all.
    return {name: p.grad.clone() for name, p in aug.named_parameters() if p.numel() > 0}


@pytest.mark.parametrize("name", OPS)
def test_every_logit_of_a_single_op_gets_finite_nonzero_gradient(name: str, images: torch.Tensor) -> None:
    aug = PolicyAugmenter(ops=[name], n_ops=1)
    grads = _grads_over_batches(aug, images, batches=4, loss_fn=lambda y: y.mean())
    expected = {"probability_logits", "magnitude_logits"} if get_op(name).has_magnitude else {"probability_logits"}
    assert set(grads) == expected
    for param, grad in grads.items():
        assert torch.isfinite(grad).all(), (name, param)
    assert float(grads["probability_logits"].abs().sum()) > 0, name
    if get_op(name).has_magnitude:
        assert float(grads["magnitude_logits"].abs().sum()) > 0, name


@pytest.mark.parametrize("selection", ["sample", "batch"])
def test_every_logit_gets_gradient_with_all_ops_mixed(images: torch.Tensor, selection: str) -> None:
    aug = PolicyAugmenter(selection=selection)
    target = torch.randint(0, 10, (len(images),), generator=torch.Generator().manual_seed(0))
    head = torch.nn.Linear(3 * 32 * 32, 10)  # a realistic loss: cross-entropy of a classifier on x_hat

    def loss_fn(y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(y.flatten(1)), target)

    target = target.repeat(4)
    # 16 batches: with one op set per batch, an op is left out of all of them with probability (10/14)^16.
    grads = _grads_over_batches(aug, images.repeat(4, 1, 1, 1), batches=16, loss_fn=loss_fn)
    for param, grad in grads.items():
        assert torch.isfinite(grad).all()
        zero = [aug.ops[i] if param == "probability_logits" else aug.magnitude_ops[i]
                for i in (grad == 0).nonzero().flatten().tolist()]
        assert not zero, f"{param} got no gradient for {zero}"


@pytest.mark.parametrize("dark", [True, False])
def test_gradient_step_moves_probability_the_right_way(images: torch.Tensor, dark: bool) -> None:
    """Descending on mean(x_hat): on dark images Invert brightens, so p(Invert) must fall; on bright ones, rise."""
    x = images * 0.4 if dark else 0.6 + images * 0.4
    aug = PolicyAugmenter(ops=["Invert"], n_ops=1)
    optimiser = torch.optim.SGD(aug.parameters(), lr=1.0)
    before = aug.policy()["Invert"]["probability"]
    for _ in range(5):
        optimiser.zero_grad()
        aug(x).mean().backward()
        optimiser.step()
    after = aug.policy()["Invert"]["probability"]
    assert (after < before) == dark


def test_magnitude_step_moves_the_right_way(images: torch.Tensor) -> None:
    """Maximising the mean squared change from x under Brightness must raise its magnitude."""
    aug = PolicyAugmenter(ops=["Brightness"], n_ops=1, probability=0.99, magnitude_sampling="mean")
    optimiser = torch.optim.SGD(aug.parameters(), lr=0.5)
    before = aug.policy()["Brightness"]["magnitude"]
    for _ in range(5):
        optimiser.zero_grad()
        (-(aug(images) - images).pow(2).mean()).backward()
        optimiser.step()
    assert aug.policy()["Brightness"]["magnitude"] > before


@pytest.mark.parametrize("name", ["Posterize", "Solarize"])
def test_train_mode_keeps_the_frozen_encoders_surrogate_gradients(name: str, images: torch.Tensor) -> None:
    """Stage II runs the augmenter in train mode; its frozen encoders must stay in eval mode, where Posterize and
    Solarize pass gradients through their wide surrogate steps (their narrow true steps give almost none)."""
    aug = PolicyAugmenter(ops=[name], n_ops=1, probability=1 - 1e-9, magnitude_sampling="mean", seed=0).train()
    assert aug.training and not any(module.training for e in aug.encoders.values() for module in e.modules())
    weights = torch.rand(images.shape, generator=torch.Generator().manual_seed(2))
    (aug(images) * weights).sum().backward()

    def through_encoder(training: bool) -> torch.Tensor:
        """The same gradient with the encoder called directly, an unfrozen copy (which may be put in train mode):
        the gate is 1 within 1e-6, m = sigmoid(logit)."""
        logit = aug.magnitude_logits.detach().clone().requires_grad_()
        encoder = build_encoder(name)
        encoder.load_state_dict(aug.encoders[name].state_dict())
        encoder.train(training)
        (encoder(images, torch.sigmoid(logit).expand(len(images))) * weights).sum().backward()
        return logit.grad

    expected, true_step = through_encoder(training=False), through_encoder(training=True)
    assert float(expected.abs()) > 0
    torch.testing.assert_close(aug.magnitude_logits.grad, expected, rtol=1e-4, atol=0)  # gates 1 - 1e-6 and over
    assert not torch.allclose(true_step, expected, rtol=0.1)  # the data tells the two gradients apart


def test_encoders_are_frozen_and_not_parameters() -> None:
    aug = PolicyAugmenter()
    names = [n for n, _ in aug.named_parameters()]
    assert names == ["probability_logits", "magnitude_logits"]
    assert aug.probability_logits.shape == (14,) and aug.magnitude_logits.shape == (11,)
    assert any(k.startswith("encoders.") for k in aug.state_dict())


def test_policy_reports_probabilities_and_magnitudes() -> None:
    aug = PolicyAugmenter(probability={"Rotate": 0.9}, magnitude=0.25)
    policy = aug.policy()
    assert list(policy) == list(OPS)
    assert policy["Rotate"]["probability"] == pytest.approx(0.9)
    assert policy["Color"]["probability"] == pytest.approx(0.5) and policy["Color"]["magnitude"] == pytest.approx(0.25)
    for name in ("Equalize", "Invert", "Cutout"):
        assert "probability" in policy[name] and "magnitude" not in policy[name]


def test_sample_draws_n_ops_per_image_without_replacement() -> None:
    aug = PolicyAugmenter(n_ops=3, seed=0)
    sample = aug.sample(64)
    assert sample.selected.shape == (64, 14)
    assert (sample.selected.sum(1) == 3).all()
    assert len({tuple(r) for r in sample.selected.int().tolist()}) > 1  # per image, not per batch
    assert (sample.gates[~sample.selected] == 0).all()


def test_batch_selection_draws_one_set_for_all() -> None:
    sample = PolicyAugmenter(selection="batch", seed=0).sample(16)
    assert (sample.selected == sample.selected[0]).all()


def test_signed_magnitudes_take_both_signs_and_unsigned_stay_positive() -> None:
    aug = PolicyAugmenter(magnitude=0.9, seed=0).eval()
    m = aug.sample(512).magnitudes
    for k, name in enumerate(aug.ops):
        spec = get_op(name)
        if not spec.has_magnitude:
            assert (m[:, k] == 0).all()
        elif spec.signed:
            assert (m[:, k] < 0).any() and (m[:, k] > 0).any()
        else:
            assert (m[:, k] >= 0).all()


def test_relaxed_samples_in_train_mode_hard_in_eval() -> None:
    aug = PolicyAugmenter(seed=0)
    relaxed = aug.train().sample(256)
    assert relaxed.gates.requires_grad
    values = relaxed.gates[relaxed.selected]
    assert ((values > 0) & (values < 1)).any()
    hard = aug.eval().sample(256)
    assert set(hard.gates.unique().tolist()) <= {0.0, 1.0}
    assert set(hard.magnitudes.abs().unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("train", [True, False])
def test_uniform_magnitudes_spread_up_to_the_learned_strength(train: bool) -> None:
    """magnitude_sampling="uniform": |m| = sigmoid(theta_m) * u, u ~ U(0, 1), in train and eval mode alike."""
    aug = PolicyAugmenter(magnitude=0.8, magnitude_sampling="uniform", seed=0).train(train)
    m = aug.sample(4096).magnitudes.detach().abs()
    for k, name in enumerate(aug.ops):
        if get_op(name).has_magnitude:
            column = m[:, k]
            assert float(column.max()) <= 0.8 + 1e-6
            # U(0, 0.8): mean 0.4, and a quarter below 0.2; 4096 draws put both within 0.02 (5 standard errors).
            assert float(column.mean()) == pytest.approx(0.4, abs=0.02)
            assert float((column < 0.2).float().mean()) == pytest.approx(0.25, abs=0.035)


def test_uniform_magnitudes_pass_gradients_to_the_magnitude_logits(images: torch.Tensor) -> None:
    """d|m|/d theta_m = u sigma'(theta_m): a step raising the change from x under Brightness raises its logit."""
    aug = PolicyAugmenter(ops=["Brightness"], n_ops=1, probability=0.99, magnitude_sampling="uniform", seed=0)
    before = aug.magnitude_logits.detach().clone()
    optimiser = torch.optim.SGD(aug.parameters(), lr=1.0)
    for _ in range(3):
        optimiser.zero_grad()
        (-(aug(images) - images).pow(2).mean()).backward()
        assert torch.isfinite(aug.magnitude_logits.grad).all() and aug.magnitude_logits.grad.abs().sum() > 0
        optimiser.step()
    assert float(aug.magnitude_logits.detach()[0]) > float(before[0])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_eval_gates_apply_with_the_reported_probability(p: float) -> None:
    """With logits (not the official code's p-as-logit), the apply rate equals sigmoid(theta_p)."""
    aug = PolicyAugmenter(probability=p, seed=0).eval()
    sample = aug.sample(4000)
    rate = float(sample.gates[sample.selected].mean())
    # 16,000 Bernoulli draws: the standard error is at most 0.004; 5 of them is 0.02.
    assert rate == pytest.approx(p, abs=0.02)


def test_train_mode_gate_mean_matches_probability() -> None:
    aug = PolicyAugmenter(probability=0.3, seed=0)
    with torch.no_grad():
        sample = aug.sample(4000)
    # A relaxed Bernoulli with logits theta has P(gate > 1/2) = sigmoid(theta) exactly.
    assert float((sample.gates[sample.selected] > 0.5).float().mean()) == pytest.approx(0.3, abs=0.02)


def test_same_sample_replays_identically(images: torch.Tensor) -> None:
    aug = PolicyAugmenter(seed=0)
    sample = aug.sample(len(images))
    torch.testing.assert_close(aug(images, sample), aug(images, sample), atol=0, rtol=0)


def test_seed_and_generator_make_draws_reproducible(images: torch.Tensor) -> None:
    a, b = PolicyAugmenter(seed=7), PolicyAugmenter(seed=7)
    assert torch.equal(a(images), b(images))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(PolicyAugmenter()(images, generator=g1), PolicyAugmenter()(images, generator=g2))
    assert not torch.equal(a(images), a(images))  # the generator advances


def test_sample_slices_equal_per_image_application(images: torch.Tensor) -> None:
    aug = PolicyAugmenter(seed=0)
    sample = aug.sample(len(images))
    batched = aug(images, sample)
    for i in range(len(images)):
        # Float32 kernels (grid_sample, the image means) may group sums differently by batch size: a few ulps.
        torch.testing.assert_close(aug(images[i : i + 1], sample[i]), batched[i : i + 1], atol=1e-5, rtol=0)


def test_probability_near_zero_is_the_identity(images: torch.Tensor) -> None:
    aug = PolicyAugmenter(probability=1e-9, seed=0)
    assert torch.equal(aug(images), images)
    assert torch.equal(aug.eval()(images), images)


def test_a_batch_with_only_negligible_pairs_still_backpropagates(images: torch.Tensor) -> None:
    """Every pair skipped (here by p ~ 0; for one image at p = m = 0.5, 7 % of draws): the output is the
    input, still on the graph, and the logits get the zero gradient of the skipped pairs."""
    aug = PolicyAugmenter(probability=1e-9, seed=0)
    out = aug(images[:1])
    assert torch.equal(out, images[:1])
    out.mean().backward()
    assert torch.equal(aug.probability_logits.grad, torch.zeros(len(aug.ops)))


def test_eval_mode_applies_reference_compatible_ops(images: torch.Tensor) -> None:
    """In eval mode with p ~ 1 and one op, the output is that op's encoder at |m| = 1."""
    aug = PolicyAugmenter(ops=["Invert"], n_ops=1, probability=1 - 1e-9).eval()
    torch.testing.assert_close(aug(images), 1 - images)


def test_forward_reference_outputs_exact_pixels_with_encoder_gradients(images: torch.Tensor) -> None:
    ref = PolicyAugmenter(ops=["Rotate"], n_ops=1, forward="reference", seed=0)
    enc = PolicyAugmenter(ops=["Rotate"], n_ops=1, forward="encoder", seed=0)
    sample = ref.sample(len(images))
    exact = apply_op("Rotate", images, sample.magnitudes[:, 0].detach())
    gate = sample.gates[:, 0].detach().view(-1, 1, 1, 1)
    out = ref(images, sample)
    # The augmenter warps only the drawn images: warp's grid (one matrix product) rounds differently by batch
    # size, by an ulp or two of a coordinate, up to ~1e-5 of a pixel at 32 px.
    torch.testing.assert_close(out, (images + gate * (exact - images)).clamp(0, 1), atol=1e-5, rtol=0)
    # The gradient w.r.t. the magnitude is the encoder's: through the same sample it equals the encoder mode's up
    # to where the fitted encoder and the exact op clip differently (the prior is ~69 dB from the op).
    (g_reference,) = torch.autograd.grad(out.sum(), ref.magnitude_logits, retain_graph=True)
    (g_encoder,) = torch.autograd.grad(enc(images, sample).sum(), ref.magnitude_logits)
    assert float(g_reference.abs().sum()) > 0
    torch.testing.assert_close(g_reference, g_encoder, rtol=1e-2, atol=1e-4)


def test_normalised_inputs_round_trip(images: torch.Tensor) -> None:
    # Whole 8-bit levels: normalising and back moves values by ulps, which must not flip Posterize's rounding.
    images = torch.round(images * 255) / 255
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    plain = PolicyAugmenter(seed=0)
    normed = PolicyAugmenter(seed=0, mean=mean, std=std)
    sample = plain.sample(len(images))
    expected = (plain(images, sample) - m) / s
    torch.testing.assert_close(normed((images - m) / s, sample), expected, atol=1e-5, rtol=0)
    with pytest.raises(DiffAugError, match=r"images normalised with mean/std must be a float tensor in \[-2.001"):
        normed(images * 3)  # un-normalised input passed to a normalising augmenter


def test_state_dict_pickle_and_deepcopy_round_trip(images: torch.Tensor) -> None:
    aug = PolicyAugmenter(seed=0, probability={"Rotate": 0.8})
    with torch.no_grad():
        aug.magnitude_logits.add_(0.3)
    sample = aug.sample(len(images))
    expected = aug(images, sample)
    for clone in (copy.deepcopy(aug), pickle.loads(pickle.dumps(aug))):
        torch.testing.assert_close(clone(images, sample), expected, atol=0, rtol=0)
        assert clone.policy() == aug.policy()
    buffer = io.BytesIO()
    torch.save(aug.state_dict(), buffer)
    fresh = PolicyAugmenter()

    def draw(module: PolicyAugmenter) -> torch.Tensor:
        return module(images, generator=torch.Generator().manual_seed(5))

    before = draw(fresh)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert fresh.policy() == aug.policy()
    assert torch.equal(draw(fresh), draw(aug))
    assert not torch.equal(before, draw(aug))  # loading changed behaviour


def test_copies_and_casts_use_their_own_encoder_weights(images: torch.Tensor) -> None:
    """The encoders' networks of m run from one packed table (MagnitudeNetStack): a copy, a pickle or a cast must
    use its own encoders' weights, and a weight written in place must be seen at the next call."""
    aug = PolicyAugmenter(ops=["Color"], n_ops=1, probability=1 - 1e-9, magnitude=0.9, seed=0).eval()
    sample = aug.sample(len(images))
    expected = aug(images, sample)
    for clone in (copy.deepcopy(aug), pickle.loads(pickle.dumps(aug))):
        with torch.no_grad():
            clone.encoders["Color"].coefficients.linear.bias.add_(0.5)
        assert not torch.equal(clone(images, sample), expected)
        assert torch.equal(aug(images, sample), expected)
    double = copy.deepcopy(aug).double()
    # float64 weights and images; the outputs agree to float32 rounding.
    torch.testing.assert_close(double(images.double(), sample).float(), expected, atol=1e-6, rtol=0)


def test_pickled_generator_continues_the_same_stream(images: torch.Tensor) -> None:
    aug = PolicyAugmenter(seed=3)
    aug(images)
    clone = pickle.loads(pickle.dumps(aug))
    assert torch.equal(aug(images), clone(images))


def test_unbatched_and_gray_inputs(images: torch.Tensor) -> None:
    aug = PolicyAugmenter(seed=0)
    assert aug(images[0]).shape == images[0].shape
    gray = images.mean(1, keepdim=True)
    assert aug(gray).shape == gray.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_float_dtypes(images: torch.Tensor, dtype: torch.dtype) -> None:
    out = PolicyAugmenter(seed=0)(images.to(dtype))
    assert out.dtype == dtype and out.shape == images.shape
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ops": ["Rotate", "Spin"]}, r"unknown op name\(s\) \['Spin'\]; expected names from"),
        ({"ops": "Rotate"}, r"ops must be a sequence of op names"),
        ({"ops": []}, r"at least one op"),
        ({"ops": ["Rotate", "Rotate"]}, r"unique; got \['Rotate'\]"),
        ({"n_ops": 15}, r"n_ops must be an int in \[1, 14\].*got 15"),
        ({"ops": ["Rotate", "Color"], "n_ops": 3}, r"n_ops must be an int in \[1, 2\]"),
        ({"n_ops": 0}, r"got 0"),
        ({"probability": 1.0}, r"probability of Brightness must be a number strictly between 0 and 1; got 1.0"),
        ({"magnitude": {"Equalize": 0.5}}, r"unknown magnitude op name\(s\) \['Equalize'\]"),
        ({"temperature": 0}, r"temperature must be a positive finite number; got 0"),
        ({"selection": "image"}, r"selection must be one of \['sample', 'batch'\]; got 'image'"),
        ({"forward": "exact"}, r"forward must be one of \['encoder', 'reference'\]"),
        ({"mean": (0.5, 0.5, 0.5)}, r"mean and std must be given together"),
        ({"mean": (0.5, 0.5), "std": (0.2, 0.2)}, r"1 or 3 finite numbers each"),
        ({"arch": "big"}, r"arch must be one of \['default', 'paper'\]; got 'big'"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(DiffAugError, match=match):
        PolicyAugmenter(**kwargs)


def test_bad_images_raise_at_forward() -> None:
    aug = PolicyAugmenter()
    with pytest.raises(DiffAugError, match=r"or uint8 .*; got int16 of shape \(2, 3, 8, 8\)"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.int16))
    with pytest.raises(DiffAugError, match=r"got values in \[-0.5"):
        aug(torch.full((2, 3, 8, 8), -0.5))


def test_sample_of_another_size_or_augmenter_is_refused(images: torch.Tensor) -> None:
    aug = PolicyAugmenter()
    with pytest.raises(DiffAugError, match=r"sample must come from this augmenter's sample\(8\).*got a sample of 4"):
        aug(images, aug.sample(4))
    other = PolicyAugmenter(ops=["Rotate"], n_ops=1)
    with pytest.raises(DiffAugError, match=r"over ops \['Rotate'\]"):
        aug(images, other.sample(len(images)))
    with pytest.raises(DiffAugError, match=r"batch_size must be a positive int; got 0"):
        aug.sample(0)


def test_input_is_not_modified_in_place(images: torch.Tensor) -> None:
    x = images.clone()
    version = x._version
    PolicyAugmenter(seed=0)(x)
    assert x._version == version and torch.equal(x, images)


def test_policy_sample_is_frozen() -> None:
    sample = PolicyAugmenter().sample(2)
    with pytest.raises(AttributeError):
        sample.gates = torch.zeros(2, 14)  # type: ignore[misc]
    assert isinstance(sample[0], PolicySample) and len(sample[0]) == 1


def test_magnitude_ops_listed_in_table_order() -> None:
    assert PolicyAugmenter(ops=["Rotate", "Invert", "Color"]).magnitude_ops == ("Color", "Rotate")
    assert PolicyAugmenter().magnitude_ops == MAGNITUDE_OPS


# ---------------------------------------------------------------------------------------------------------------
# Export


def test_to_dict_is_plain_json_and_round_trips_samples(images: torch.Tensor) -> None:
    import json

    aug = PolicyAugmenter(ops=["Rotate", "Color", "Invert", "Cutout"], n_ops=2, probability={"Rotate": 0.8},
                          magnitude=0.3, selection="batch", mean=(0.5,), std=(0.25,))
    with torch.no_grad():
        aug.probability_logits.add_(torch.tensor([0.123, -0.4, 0.05, 0.7]))
    data = json.loads(json.dumps(aug.to_dict()))
    assert data["probability"]["Rotate"] == pytest.approx(aug.policy()["Rotate"]["probability"])
    assert "Invert" not in data["magnitude"] and data["n_ops"] == 2 and data["selection"] == "batch"
    clone = PolicyAugmenter.from_dict(data)
    assert clone.policy() == aug.policy()
    for mode in ("train", "eval"):
        getattr(aug, mode)(), getattr(clone, mode)()
        a = aug.sample(len(images), generator=torch.Generator().manual_seed(4))
        b = clone.sample(len(images), generator=torch.Generator().manual_seed(4))
        assert torch.equal(a.gates, b.gates) and torch.equal(a.magnitudes, b.magnitudes)
        x = (images - 0.5) / 0.25
        assert torch.equal(aug(x, a), clone(x, b))


def test_from_dict_rejects_foreign_data() -> None:
    with pytest.raises(DiffAugError, match=r"must come from to_dict\(\) \(format 1\); got format None"):
        PolicyAugmenter.from_dict({"ops": ["Rotate"]})
    data = PolicyAugmenter().to_dict()
    data["probability_logits"] = [0.0]
    with pytest.raises(DiffAugError, match=r"probability_logits must be a flat list of 14 finite numbers, .*; got a list of shape \(1,\)"):
        PolicyAugmenter.from_dict(data)


def test_reference_policy_applies_the_learned_probabilities() -> None:
    """Over many draws each op is applied with its learned probability (a binomial test per op)."""
    from diffaug import ReferencePolicy

    probabilities = {"Rotate": 0.9, "Invert": 0.1, "Color": 0.5, "Cutout": 0.3}
    aug = PolicyAugmenter(ops=list(probabilities), n_ops=4, probability=probabilities, magnitude=0.7)
    reference = aug.to_reference()
    assert isinstance(reference, ReferencePolicy) and list(reference.parameters()) == []
    assert not hasattr(reference, "encoders")
    sample = reference.train().sample(5000, generator=torch.Generator().manual_seed(0))
    for k, name in enumerate(reference.ops):
        rate = float(sample.gates[:, k].mean())
        # 5,000 Bernoulli draws: standard error <= 0.007; allow 4 of them.
        assert rate == pytest.approx(probabilities[name], abs=0.03), name
        assert set(sample.gates[:, k].unique().tolist()) <= {0.0, 1.0}  # hard even in train mode
    m = sample.magnitudes[:, reference.ops.index("Rotate")].abs()
    assert float(m.mean()) == pytest.approx(0.7, abs=0.03)


def test_reference_policy_outputs_exact_ops(images: torch.Tensor) -> None:
    reference = PolicyAugmenter(ops=["Solarize"], n_ops=1, probability=1 - 1e-9, magnitude=1 - 1e-9).to_reference()
    with torch.no_grad():
        out = reference(images)
    torch.testing.assert_close(out, apply_op("Solarize", images, torch.ones(len(images))), atol=0, rtol=0)


def test_module_apply_is_the_inherited_one(images: torch.Tensor) -> None:
    """A sample is replayed by calling the augmenter (``aug(x, sample)``), so ``apply`` is nn.Module's own: a parent's
    ``apply(init_fn)`` reaches the augmenter and its children like any module's."""
    assert PolicyAugmenter.apply is torch.nn.Module.apply
    aug = PolicyAugmenter(seed=0)
    model = torch.nn.Sequential(aug, torch.nn.Conv2d(3, 3, 1))
    seen = []
    assert model.apply(lambda module: seen.append(type(module).__name__)) is model
    assert "PolicyAugmenter" in seen and "Conv2d" in seen
    convs = []

    def init_fn(module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.zeros_(module.weight)
            convs.append(module)

    assert torch.nn.Sequential(aug).apply(init_fn) is not None and convs == []
    model.apply(init_fn)
    assert len(convs) == 1 and not model[1].weight.any()


def test_a_call_takes_a_sample_or_a_generator_not_both(images: torch.Tensor) -> None:
    """``aug(x, sample)`` replays, ``aug(x, generator=g)`` draws: they agree on the same generator; both at once,
    or a generator where the sample goes, is an error that says so."""
    aug = PolicyAugmenter(seed=0)
    drawn = aug(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, aug(images, aug.sample(len(images), torch.Generator().manual_seed(3))))
    with pytest.raises(DiffAugError, match=r"pass sample= .* or generator= .*, not both"):
        aug(images, aug.sample(len(images)), generator=torch.Generator())
    with pytest.raises(DiffAugError, match=r"sample must be a PolicySample from sample\(\) \(pass a generator as "
                                           r"generator=\); got Generator"):
        aug(images, torch.Generator())  # type: ignore[arg-type]


def test_autocast_keeps_the_encoders_coefficients_in_float32(images: torch.Tensor) -> None:
    aug = PolicyAugmenter(ops=["Rotate"], n_ops=1, seed=0)
    sample = aug.sample(len(images))
    expected = aug(images, sample)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(images, sample)
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_grouped_affine_ops_equal_eq5_with_one_op_at_a_time(images: torch.Tensor, seed: int) -> None:
    """All affine ops of a batch go through one warp; the output must be Eq. 5 with each op applied on its own."""
    affine = [n for n in OPS if get_op(n).kind == "affine"]
    reference = PolicyAugmenter(ops=affine + ["Invert"], n_ops=4).to_reference()
    sample = reference.sample(len(images), generator=torch.Generator().manual_seed(seed))
    expected = images.clone()
    for k, name in enumerate(sample.ops):
        change = apply_op(name, images, sample.magnitudes[:, k]) - images
        expected += sample.gates[:, k].view(-1, 1, 1, 1) * change
    # Grid coordinates are float32 whichever way they are batched; a few ulps.
    torch.testing.assert_close(reference(images, sample), expected.clamp(0, 1), atol=1e-5, rtol=0)
    assert int((sample.gates[:, : len(affine)] > 0).any(0).sum()) >= 2  # several affine ops shared the warp


def test_an_affine_encoder_without_matrices_is_refused_at_construction() -> None:
    from diffaug.encoders import MetaEncoder

    class OnlyTransform(MetaEncoder):
        def transform(self, x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(DiffAugError, match=r"affine op must have matrices.*Rotate's encoder is a OnlyTransform"):
        PolicyAugmenter(ops=["Rotate"], priors={"Rotate": OnlyTransform("Rotate", "default")})
    # A colour op needs only transform.
    PolicyAugmenter(ops=["Brightness"], priors={"Brightness": OnlyTransform("Brightness", "default")})


# ----------------------------------------------------------------------------------------------------------------
# What a policy means (issue 31, item 1)


@pytest.mark.parametrize(("sampling", "strength", "effective"), [
    ("relaxed", {"kind": "full_or_none", "full_probability": 0.3}, 0.5 * 0.3),
    ("mean", {"kind": "fixed", "value": 0.3}, 0.5),
    ("uniform", {"kind": "uniform", "low": 0.0, "high": 0.3}, 0.5),
])
def test_policy_states_the_strength_distribution_per_sampler(sampling: str, strength: dict, effective: float) -> None:
    from diffaug import ReferencePolicy

    policy = ReferencePolicy(["Solarize", "Invert"], n_ops=1, probability=0.5, magnitude=0.3,
                             magnitude_sampling=sampling).policy()
    solarize = policy["Solarize"]
    # float32 logits round 0.3 to within 1e-7
    assert solarize["probability"] == pytest.approx(0.5) and solarize["magnitude"] == pytest.approx(0.3)
    assert solarize["strength"] == pytest.approx(strength)
    assert solarize["effective_probability"] == pytest.approx(effective)
    assert "magnitude" not in policy["Invert"] and policy["Invert"]["strength"] == {"kind": "fixed", "value": 1.0}


def test_relaxed_meaning_matches_the_draws() -> None:
    """Under "relaxed", eval-mode draws of an applied op are at strength 0 or 1, full with probability m: what
    policy() says. 4,000 draws: the binomial standard error at m = 0.3 is 0.007, so 0.03 is over 4 sigma."""
    aug = PolicyAugmenter(["Solarize"], n_ops=1, probability=0.5, magnitude=0.3, priors=None, seed=0).eval()
    sample = aug.sample(4000)
    applied = sample.gates[:, 0] > 0.5
    strength = sample.magnitudes[applied, 0].abs()
    assert set(strength.unique().tolist()) <= {0.0, 1.0}
    assert float((strength == 1).float().mean()) == pytest.approx(aug.policy()["Solarize"]["strength"]["full_probability"], abs=0.03)


def test_to_dict_carries_the_meaning_and_reads_an_old_dict_the_same() -> None:
    import json
    from pathlib import Path

    from diffaug import ReferencePolicy

    old = json.loads((Path(__file__).parent / "data" / "policy_format1_before_meaning.json").read_text())
    assert "meaning" not in old  # written before to_dict carried it
    policy = ReferencePolicy.from_dict(old)
    data = json.loads(json.dumps(policy.to_dict()))
    assert data["meaning"]["Solarize"]["strength"]["kind"] == "full_or_none"
    assert data["meaning"]["Solarize"]["effective_probability"] == pytest.approx(0.3 * 0.3)
    assert data["probability_logits"] == old["probability_logits"] and data["magnitude_logits"] == old["magnitude_logits"]
    assert ReferencePolicy.from_dict(data).policy() == policy.policy()


# ----------------------------------------------------------------------------------------------------------------
# A seeded ReferencePolicy in DataLoader workers


def test_pickling_carries_the_generator_state() -> None:
    from diffaug import ReferencePolicy

    policy = ReferencePolicy(seed=3)
    policy.sample(4)  # move the stream on: the copy must continue from here, not from the seed
    copy_ = pickle.loads(pickle.dumps(policy))
    deep = copy.deepcopy(policy)
    expected = policy.sample(5)
    for other in (copy_, deep):
        assert other.generator is not policy.generator
        assert torch.equal(other.sample(5).gates, expected.gates)


def _worker_batches(context: str, seed: int) -> list[torch.Tensor]:
    from diffaug import ReferencePolicy

    from .workers_dataset import Augmented

    torch.manual_seed(seed)  # the DataLoader's base seed, hence the workers' seeds
    loader = torch.utils.data.DataLoader(Augmented(ReferencePolicy(seed=0, probability=0.7)), batch_size=4,
                                         num_workers=2, multiprocessing_context=context)
    return list(loader)


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_seeded_reference_policy_in_dataloader_workers(context: str) -> None:
    first, second = _worker_batches(context, seed=1)  # batch i comes from worker i
    assert not torch.equal(first, second)  # each worker its own stream
    again = _worker_batches(context, seed=1)
    assert torch.equal(again[0], first) and torch.equal(again[1], second)  # a rerun draws the same
    other = _worker_batches(context, seed=2)
    assert not torch.equal(other[0], first)  # another base seed (another epoch), other draws
