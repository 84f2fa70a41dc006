"""geometry="composed" and targets: each affine op's masks, boxes and keypoints against the same op's reference
geometry (a rectangle moved by ``apply_op``), composed ops against the ops applied in turn, the core's invariants
and the errors."""

from __future__ import annotations

import pytest
import torch

from diffaug import DiffAugError, PolicyAugmenter, PolicySample, ReferencePolicy, apply_op
from diffaug.ops import OPS
from diffaug.targets import Augmented

AFFINE = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
SIZE = 32
# A 12x14 rectangle off centre (box, mask) and a 2x2 dot (keypoint), both kept inside the image by every
# magnitude below, so the moved shapes can be measured whole in the augmented image.
RECTANGLE = (11.0, 9.0, 23.0, 21.0)  # x1, y1, x2, y2 in pixels
DOT = (18.0, 13.0)  # the dot covers pixels [17, 19) x [12, 14); this is its centre


def _shapes() -> torch.Tensor:
    """(2, 1, H, W): image 0 holds the rectangle, image 1 the dot."""
    x = torch.zeros(2, 1, SIZE, SIZE)
    x1, y1, x2, y2 = (int(v) for v in RECTANGLE)
    x[0, 0, y1:y2, x1:x2] = 1
    x[1, 0, int(DOT[1]) - 1:int(DOT[1]) + 1, int(DOT[0]) - 1:int(DOT[0]) + 1] = 1
    return x


def _targets() -> dict:
    return {"masks": (_shapes()[:, 0] > 0.5).long(),
            "boxes": [torch.tensor([RECTANGLE]), torch.zeros(0, 4)],
            "keypoints": [torch.zeros(0, 2), torch.tensor([DOT])]}


def _sample(policy, magnitudes: dict[str, float], batch: int = 2) -> PolicySample:
    """Hard gates on exactly the ops named, at the magnitudes given, for every image of the batch."""
    selected = torch.zeros(batch, len(policy.ops), dtype=torch.bool)
    values = torch.zeros(batch, len(policy.ops))
    for name, m in magnitudes.items():
        selected[:, policy.ops.index(name)] = True
        values[:, policy.ops.index(name)] = m
    return PolicySample(policy.ops, selected, selected.float(), values, torch.full((batch, 2), 0.5))


def _seen(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shape in an augmented (1, H, W) image: its mask, enclosing box (xyxy pixels) and centroid."""
    mask = image[0] > 0.5
    rows, cols = mask.nonzero(as_tuple=True)
    box = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float()
    weight = image[0]
    centres = torch.arange(SIZE, dtype=torch.float32) + 0.5
    centroid = torch.stack([(weight.sum(0) * centres).sum(), (weight.sum(1) * centres).sum()]) / weight.sum()
    return mask, box, centroid


def _check_against(reference: torch.Tensor, out: Augmented) -> None:
    mask, box, _ = _seen(reference[0])
    _, _, centroid = _seen(reference[1])
    # The enclosing box of the moved corners against the bright pixels: within 1.5 px (a pixel of rasterisation
    # and half a pixel of bilinear rim).
    torch.testing.assert_close(out.boxes[0][0], box, atol=1.5, rtol=0)
    moved = out.masks[0] == 1
    assert float((moved & mask).sum() / (moved | mask).sum()) >= 0.9
    # The dot's centroid is the moved centre exactly up to bilinear weights: within 1 px.
    torch.testing.assert_close(out.keypoints[1][0], centroid, atol=1.0, rtol=0)
    assert bool(out.keep[0].all())


def _policies(**kwargs) -> list:
    return [ReferencePolicy(geometry="composed", **kwargs),
            PolicyAugmenter(geometry="composed", forward="reference", **kwargs),
            PolicyAugmenter(geometry="composed", **kwargs)]  # the fitted encoders' own maps


@pytest.mark.parametrize("name", AFFINE)
@pytest.mark.parametrize("m", [0.6, -0.5])
def test_each_affine_op_moves_its_targets_as_its_reference_moves_the_image(name: str, m: float) -> None:
    x = _shapes()
    reference = apply_op(name, x, torch.full((2,), m))
    for policy in _policies():
        out = policy.eval()(x, _sample(policy, {name: m}), **_targets())
        if not isinstance(policy, PolicyAugmenter) or policy.forward_mode == "reference":
            torch.testing.assert_close(out.images, reference, atol=1e-5, rtol=0)
        _check_against(reference, out)
        # Against the augmenter's own output too: its targets follow its pixels.
        _check_against(out.images, out)


@pytest.mark.parametrize("first, second", [("ShearX", "Rotate"), ("TranslateX", "TranslateY"),
                                           ("Rotate", "TranslateY"), ("ShearY", "ShearX")])
def test_composed_ops_move_targets_as_the_ops_applied_in_turn(first: str, second: str) -> None:
    x = _shapes()
    m = {first: 0.4, second: -0.35}
    # Table order decides which acts first.
    order = sorted(m, key=OPS.index)
    reference = x
    for name in order:
        reference = apply_op(name, reference, torch.full((2,), m[name]))
    for policy in _policies():
        out = policy.eval()(x, _sample(policy, m), **_targets())
        _check_against(reference, out)


def test_all_five_affine_ops_compose_into_one_warp() -> None:
    x = _shapes()
    m = {"ShearX": 0.2, "ShearY": -0.2, "TranslateX": 0.1, "TranslateY": -0.1, "Rotate": 0.3}
    reference = x
    for name in AFFINE:
        reference = apply_op(name, reference, torch.full((2,), m[name]))
    policy = ReferencePolicy(geometry="composed")
    out = policy(x, _sample(policy, m), **_targets())
    _check_against(reference, out)
    # One warp, not five: the interior of the rectangle is sampled once, so it stays at 1 where five bilinear
    # resamplings would blur it; the two images agree away from the rectangle's rim.
    assert float((out.images - reference).abs().mean()) < 0.01


def test_colour_and_fixed_ops_and_zero_magnitudes_leave_targets_exactly() -> None:
    x, targets = _shapes(), _targets()
    policy = ReferencePolicy(geometry="composed")
    for m in ({"Brightness": 0.5, "Solarize": 0.7, "Cutout": 0.0, "Invert": 0.0, "Equalize": 0.0},
              {"Rotate": 0.0, "TranslateX": 0.0}):
        out = policy(x, _sample(policy, m), **targets)
        assert torch.equal(out.masks, targets["masks"])
        for got, given in zip(out.boxes + out.keypoints, targets["boxes"] + targets["keypoints"], strict=True):
            assert torch.equal(got, given)
    out = policy(x, _sample(policy, {"Rotate": 0.0, "TranslateX": 0.0}), **targets)
    assert torch.equal(out.images, x)  # m = 0 is the identity, images too


def test_targets_replay_and_never_change_the_images(images: torch.Tensor) -> None:
    aug = PolicyAugmenter(geometry="composed", seed=0)
    sample = aug.sample(len(images))
    masks = torch.randint(0, 10, (len(images), 32, 32))
    soft = torch.rand(len(images), 2, 32, 32)
    boxes = [torch.tensor([[4.0, 5.0, 20.0, 27.0], [0.0, 0.0, 32.0, 32.0]]) for _ in images]
    alone = aug(images, sample)
    first = aug(images, sample, masks=masks, boxes=boxes)
    again = aug(images, sample, masks=masks, boxes=boxes)
    assert isinstance(alone, torch.Tensor) and torch.equal(first.images, alone)
    assert torch.equal(first.masks, again.masks)
    assert all(torch.equal(a, b) for a, b in zip(first.boxes, again.boxes, strict=True))
    assert first.keypoints is None and aug(images, sample, masks=soft).masks.shape == soft.shape


def test_batched_equals_per_image_and_inputs_are_not_modified(images: torch.Tensor) -> None:
    aug = PolicyAugmenter(geometry="composed", seed=1).eval()
    sample = aug.sample(len(images))
    masks = torch.randint(0, 10, (len(images), 32, 32))
    boxes = [torch.tensor([[4.0 + i, 5.0, 20.0, 27.0]]) for i in range(len(images))]
    keypoints = [torch.tensor([[10.0, 12.0 + i]]) for i in range(len(images))]
    copies = images.clone(), masks.clone(), [b.clone() for b in boxes]
    batched = aug(images, sample, masks=masks, boxes=boxes, keypoints=keypoints)
    assert torch.equal(images, copies[0]) and torch.equal(masks, copies[1])
    assert all(torch.equal(b, c) for b, c in zip(boxes, copies[2], strict=True))
    for i in range(len(images)):
        one = aug(images[i:i + 1], sample[i], masks=masks[i:i + 1], boxes=boxes[i:i + 1],
                        keypoints=keypoints[i:i + 1])
        # warp's grid is one matrix product, which rounds differently by batch size (an ulp of a coordinate).
        torch.testing.assert_close(one.images, batched.images[i:i + 1], atol=1e-5, rtol=0)
        assert float((one.masks != batched.masks[i:i + 1]).float().mean()) < 0.01
        torch.testing.assert_close(one.boxes[0], batched.boxes[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(one.keypoints[0], batched.keypoints[i], atol=1e-4, rtol=0)


@pytest.mark.parametrize("moving", ["some", "every"])
def test_masks_on_the_images_grid_equal_masks_on_a_grid_of_their_own(images: torch.Tensor, moving: str) -> None:
    """The augmenter hands the images' sampling grid to the masks (where the dtype matches) instead of building it
    again; that must give exactly what ``move_targets`` gives from the maps alone, with some images left unmoved
    (gather and scatter) and with every image moved (neither)."""
    from diffaug.targets import move_targets

    aug = PolicyAugmenter(geometry="composed", seed=2).eval()
    sample = _sample(aug, {"Rotate": 1.0, "TranslateY": 1.0, "Brightness": 0.3}, batch=len(images))
    angles = torch.linspace(-0.8, 0.8, len(images)).unsqueeze(1)  # a different map for every image
    magnitudes = sample.magnitudes * torch.where(torch.tensor([op in AFFINE for op in aug.ops]), angles, 1.0)
    still = (torch.arange(len(images)) % 3 == 0) & (moving == "some")
    sample = PolicySample(aug.ops, sample.selected & ~still.unsqueeze(1), sample.gates * ~still.unsqueeze(1),
                          magnitudes, sample.positions)
    labels = torch.randint(0, 10, (len(images), 32, 32), generator=torch.Generator().manual_seed(0))
    soft = torch.rand(len(images), 2, 32, 32, generator=torch.Generator().manual_seed(1))
    inputs = (images, sample.selected, sample.gates, sample.magnitudes, sample.positions)
    _, linear, shift, moved, grid = aug._pixels(*inputs)
    assert grid is not None and len(moved) == (len(images) if moving == "every" else len(images) - 3)
    for masks in (labels, soft):
        out = aug(images, sample, masks=masks).masks
        rebuilt, *_ = move_targets(linear, shift, moved, masks, None, None, (32, 32), aug.ignore_index)
        assert torch.equal(out, rebuilt)
        unmoved = torch.ones(len(images), dtype=torch.bool).index_fill(0, moved, False)
        assert torch.equal(out[unmoved], masks[unmoved])


def test_pixels_from_outside_get_ignore_index_and_boxes_that_leave_are_flagged() -> None:
    x = _shapes()
    targets = _targets()
    targets["boxes"] = [torch.tensor([[0.0, 0.0, 6.0, 6.0], list(RECTANGLE)]), torch.zeros(0, 4)]
    shift = 0.9 * 150 / 331 * SIZE  # TranslateX by m = -0.9 moves the content right by 13.05 px
    for ignore in (255, -1):
        policy = ReferencePolicy(geometry="composed", ignore_index=ignore)
        out = policy(x, _sample(policy, {"TranslateX": -0.9}), **targets)
        assert bool((out.masks[:, :, :13] == ignore).all())
        assert not bool((out.masks[:, :, 14:] == ignore).any())
        expected = torch.tensor([[shift, 0.0, 6 + shift, 6.0], [11 + shift, 9.0, SIZE, 21.0]])  # clipped at W
        torch.testing.assert_close(out.boxes[0], expected)
        assert out.keep[0].tolist() == [True, True]
    out = policy(x, _sample(policy, {"TranslateX": 0.9}), **targets)  # content moves left by 13.05 px
    # The corner box leaves the image: flagged, with no area; the rectangle is cut at the left edge.
    assert out.keep[0].tolist() == [False, True]
    torch.testing.assert_close(out.boxes[0], torch.tensor([[0.0, 0.0, 0.0, 6.0], [0.0, 9.0, 23 - shift, 21.0]]))


def test_pixels_labelled_ignore_index_move_as_any_label() -> None:
    """Labels are warped shifted by ignore_index (the padding is its zero): a pixel already labelled ignore_index
    must move as a label that is not, and a label far from it (1000) must come back exactly."""
    x = _shapes()
    labels = _targets()["masks"] * 1000
    labels[:, 5:9, 20:26] = 255
    stand_in = torch.where(labels == 255, 9, labels)  # 9 is not in labels
    policy = ReferencePolicy(geometry="composed")
    sample = _sample(policy, {"Rotate": 0.4, "ShearY": -0.3})
    out, reference = policy(x, sample, masks=labels).masks, policy(x, sample, masks=stand_in).masks
    assert bool((reference == 9).any()) and bool((out == 1000).any())
    assert torch.equal(out, torch.where(reference == 9, 255, reference))


def test_composed_gradients_reach_every_logit_and_soft_masks_carry_them(images: torch.Tensor) -> None:
    batch = images.repeat(4, 1, 1, 1)
    head = torch.nn.Linear(3 * 32 * 32, 10)  # a realistic loss: cross-entropy of a classifier on x_hat
    labels = torch.randint(0, 10, (len(batch),), generator=torch.Generator().manual_seed(0))
    for forward in ("encoder", "reference"):
        aug = PolicyAugmenter(geometry="composed", forward=forward, seed=0)
        soft = torch.rand(len(batch), 1, 32, 32, generator=torch.Generator().manual_seed(1))
        # 16 batches of 32, as for the residual geometry: most relaxed gates round to exactly 0 or 1 at tau = 0.05
        # (no gradient there), so an op needs a few dozen draws to get one.
        for _ in range(16):
            out = aug(batch, masks=soft)
            loss = torch.nn.functional.cross_entropy(head(out.images.flatten(1)), labels) + out.masks.mean()
            loss.backward()
        for name, p in aug.named_parameters():
            assert torch.isfinite(p.grad).all() and bool((p.grad != 0).all()), (forward, name, p.grad)
    # A soft mask alone is enough for gradients to reach the affine magnitudes.
    aug = PolicyAugmenter(ops=["Rotate"], n_ops=1, probability=0.99, geometry="composed", seed=0)
    out = aug(images, masks=torch.rand(len(images), 1, 32, 32) * torch.linspace(0, 1, 32))
    (grad,) = torch.autograd.grad(out.masks.mean(), aug.magnitude_logits)
    assert float(grad.abs().sum()) > 0


def test_composed_equals_residual_when_an_image_draws_one_affine_op(images: torch.Tensor) -> None:
    kwargs = {"ops": list(AFFINE), "n_ops": 1, "seed": 3}
    composed, residual = PolicyAugmenter(geometry="composed", **kwargs).eval(), PolicyAugmenter(**kwargs).eval()
    sample = composed.sample(len(images))
    # With hard gates (eval) one warp at the op's map is the op's residual at gate 1. (Relaxed gates differ: the
    # composed form moves the image part of the way, the residual blends the moved and the unmoved image.)
    torch.testing.assert_close(composed(images, sample), residual(images, sample), atol=1e-5, rtol=0)


def test_geometry_round_trips_through_to_dict_and_to_reference() -> None:
    aug = PolicyAugmenter(geometry="composed", ignore_index=7)
    rebuilt = PolicyAugmenter.from_dict(aug.to_dict())
    assert rebuilt.geometry == "composed" and rebuilt.ignore_index == 7
    assert aug.to_reference().geometry == "composed"
    legacy = {k: v for k, v in aug.to_dict().items() if k not in ("geometry", "ignore_index")}  # before them
    assert PolicyAugmenter.from_dict(legacy).geometry == "residual"


@pytest.mark.parametrize("targets, match", [
    ({"masks": torch.zeros(2, 32, 32, dtype=torch.long)}, 'geometry="composed"'),
])
def test_targets_on_a_residual_augmenter_are_refused(targets: dict, match: str) -> None:
    with pytest.raises(DiffAugError, match=match):
        PolicyAugmenter()(_shapes(), **targets)


@pytest.mark.parametrize("targets, match", [
    ({"masks": torch.zeros(2, 32, 32)}, "label masks must be integers"),
    ({"masks": torch.zeros(3, 32, 32, dtype=torch.long)}, r"masks must be \(2, 32, 32\)"),
    ({"masks": torch.zeros(2, 16, 16, dtype=torch.long)}, "got int64 of shape"),
    ({"masks": torch.zeros(2, 1, 32, 32, dtype=torch.long)}, "K float masks"),
    ({"boxes": [torch.zeros(1, 3), torch.zeros(0, 4)]}, r"xyxy boxes \(N_i, 4\).*image 0"),
    ({"boxes": [torch.zeros(1, 4)]}, "a list of 2 float tensors.*a sequence of 1"),
    ({"boxes": torch.zeros(2, 1, 4)}, "list of 2 float tensors.*got float32"),
    ({"keypoints": [torch.zeros(1, 2, dtype=torch.long)] * 2}, r"xy keypoints \(N_i, 2\)"),
])
def test_bad_targets_are_refused(targets: dict, match: str) -> None:
    with pytest.raises(DiffAugError, match=match):
        PolicyAugmenter(geometry="composed")(_shapes(), **targets)
    with pytest.raises(DiffAugError, match="batch of images"):
        PolicyAugmenter(geometry="composed")(_shapes()[0], masks=torch.zeros(1, 32, 32, dtype=torch.long))
    with pytest.raises(DiffAugError, match="geometry must be one of"):
        PolicyAugmenter(geometry="stacked")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.int32, torch.int64], ids=str)
def test_label_masks_of_every_integer_dtype_are_padded_with_ignore_index(dtype: torch.dtype) -> None:
    """int8 masks with ignore_index -1 (representable) get -1 from outside and their labels back; 255 did wrap to -1."""
    ignore = 0 if dtype == torch.uint8 else -1
    policy = ReferencePolicy(geometry="composed", ignore_index=ignore)
    masks = _targets()["masks"].to(dtype) + 1  # labels 1 and 2
    out = policy(_shapes(), _sample(policy, {"TranslateX": -0.9}), masks=masks).masks
    assert out.dtype == dtype
    assert bool((out[:, :, :13] == ignore).all()) and set(out[:, :, 14:].unique().tolist()) <= {1, 2}


def test_labels_far_from_ignore_index_come_back_exactly() -> None:
    """A float32 warp would round 2**40 + 1 (float32 integers are exact only below 2**24): the labels move in
    float64 then; labels 2**53 or more away from it, which no float holds exactly, are refused."""
    policy = ReferencePolicy(geometry="composed")
    sample = _sample(policy, {"Rotate": 0.4})
    small = _targets()["masks"]
    big = small * (2**40 + 1)
    out, reference = policy(_shapes(), sample, masks=big).masks, policy(_shapes(), sample, masks=small).masks
    assert torch.equal(out, torch.where(reference == 255, 255, reference * (2**40 + 1)))
    with pytest.raises(DiffAugError, match=r"within 2\*\*53 of ignore_index \(255\) .*got labels in \[0, 1152921504606846976\]"):
        policy(_shapes(), sample, masks=small * 2**60)


@pytest.mark.parametrize("compile", [False, True])
def test_an_ignore_index_the_masks_cannot_hold_is_refused_before_any_pixel_work(
    compile: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int8 masks cannot be padded with 255: the policy refuses them with the other targets' checks, before it
    renders anything (the renderer is never reached), eager or compiled."""
    aug = ReferencePolicy(geometry="composed", probability=0.9, compile=compile)

    def render(*args: object) -> None:
        raise AssertionError("rendered before the masks were checked")

    monkeypatch.setattr(aug.renderer, "transform", render)
    monkeypatch.setattr(aug.renderer, "geometry", render)
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.int8)
    with pytest.raises(DiffAugError, match=r"ignore_index must be representable in the masks' dtype int8"):
        aug(_shapes(), aug.sample(2), masks=masks)
