"""The model zoo against published parameter counts, torchvision's layout, and the ZooModel interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffaug import DiffAugError
from diffaug.distill.models import CIFAR_MODELS, IMAGENET_MODELS, MODELS, build_model

# Published counts at 100 classes: the CRD zoo's table (the numbers the issue quotes) and torchvision's model
# cards at 1,000 classes.
PUBLISHED = {
    "resnet20": 278_324, "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860, "wrn_16_2": 703_284, "wrn_40_2": 2_255_156, "vgg8": 3_965_028, "vgg13": 9_462_180,
}
TORCHVISION = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
# Published to two decimals in millions (the zoo tables of the KD literature, 100 classes).
PUBLISHED_MILLIONS = {"mobilenetv2": 0.81, "shufflev1": 0.95, "shufflev2": 1.36, "wrn_40_1": 0.57, "resnet32": 0.47}
# ShuffleNetV2 1x at 10 classes, a count asserted exactly by a public CIFAR implementation of the same network.
SHUFFLEV2_AT_10 = 1_263_278


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def basic_resnet_count(n: int, widths: tuple[int, ...], classes: int) -> int:
    """Closed form of a CIFAR ResNet with n basic blocks a stage: convolutions without bias, BatchNorm (2 per
    channel), a 1x1 projection (and its BN) where the width changes, the linear head."""
    total, cin = 9 * 3 * widths[0] + 2 * widths[0], widths[0]
    for width in widths[1:]:
        for _ in range(n):
            total += 9 * cin * width + 9 * width * width + 4 * width
            total += (cin * width + 2 * width) if cin != width else 0
            cin = width
    return total + cin * classes + classes


def wide_resnet_count(depth: int, k: int, classes: int) -> int:
    """Closed form of WRN-depth-k: pre-activation blocks (BN on the input and after the first convolution), a
    1x1 shortcut where the width changes, a final BN and the head."""
    n, widths = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
    total, cin = 9 * 3 * 16, 16
    for width in widths[1:]:
        for _ in range(n):
            total += 2 * cin + 9 * cin * width + 2 * width + 9 * width * width + (cin * width if cin != width else 0)
            cin = width
    return total + 2 * cin + cin * classes + classes


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_cifar_counts_equal_the_published_ones(name: str) -> None:
    assert count(build_model(name, 100)) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_imagenet_counts_equal_torchvisions(name: str) -> None:
    assert count(build_model(name, 1000)) == TORCHVISION[name]


def test_the_closed_forms_reproduce_the_published_counts() -> None:
    """The formulas the remaining depths are checked with are first checked on every published count."""
    assert basic_resnet_count(3, (16, 16, 32, 64), 100) == PUBLISHED["resnet20"]
    assert basic_resnet_count(9, (16, 16, 32, 64), 100) == PUBLISHED["resnet56"]
    assert basic_resnet_count(18, (16, 16, 32, 64), 100) == PUBLISHED["resnet110"]
    assert basic_resnet_count(1, (32, 64, 128, 256), 100) == PUBLISHED["resnet8x4"]
    assert basic_resnet_count(5, (32, 64, 128, 256), 100) == PUBLISHED["resnet32x4"]
    assert wide_resnet_count(16, 2, 100) == PUBLISHED["wrn_16_2"]
    assert wide_resnet_count(40, 2, 100) == PUBLISHED["wrn_40_2"]


@pytest.mark.parametrize("depth", [8, 14, 32, 44])
def test_other_resnet_depths_follow_the_closed_form(depth: int) -> None:
    for classes in (10, 100):
        assert count(build_model(f"resnet{depth}", classes)) == basic_resnet_count((depth - 2) // 6, (16, 16, 32, 64), classes)


@pytest.mark.parametrize("name", ["wrn_16_1", "wrn_40_1"])
def test_other_wide_resnets_follow_the_closed_form(name: str) -> None:
    depth, k = (int(v) for v in name.split("_")[1:])
    assert count(build_model(name, 100)) == wide_resnet_count(depth, k, 100)


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_counts_published_in_millions(name: str) -> None:
    assert round(count(build_model(name, 100)) / 1e6, 2) == PUBLISHED_MILLIONS[name]


def test_shufflev2_at_ten_classes_equals_a_published_count() -> None:
    assert count(build_model("shufflev2", 10)) == SHUFFLEV2_AT_10


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_cifar_models_return_logits_and_features_and_train(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10)
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    features = model.features(x)
    assert logits.shape == (4, 10) and features.dim() == 4 and features.shape[0] == 4
    assert features.shape[1] == model.fc.in_features
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_imagenet_resnets_have_torchvisions_layout_and_load_strictly(tmp_path: Path) -> None:
    """Key names and shapes as torchvision's (its 1.5 variant: the stride on the bottleneck's 3x3), so a
    torchvision checkpoint loads with strict=True; here a state_dict saved from our own model."""
    model = build_model("resnet50", 1000)
    state = model.state_dict()
    expected_shapes = {
        "conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.num_batches_tracked": (), "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer4.2.bn3.weight": (2048,), "fc.weight": (1000, 2048), "fc.bias": (1000,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    # torchvision's resnet50 state_dict has 320 entries: 53 convolutions, 53 BNs of 5 entries, fc weight and bias.
    assert len(state) == 53 + 53 * 5 + 2
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    assert "layer1.0.downsample.0.weight" not in build_model("resnet18", 1000).state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    fresh = IMAGENET_MODELS["resnet50"](num_classes=1000)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_unknown_models_and_class_counts_are_refused() -> None:
    with pytest.raises(DiffAugError, match="resnet20.*got 'resnet21'"):
        build_model("resnet21", 100)
    with pytest.raises(DiffAugError, match="num_classes"):
        build_model("resnet20", 0)
    assert set(MODELS) == set(CIFAR_MODELS) | set(IMAGENET_MODELS)
