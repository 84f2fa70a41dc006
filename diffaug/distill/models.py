"""The model zoo of the paper's experiments, written from the architectures' published descriptions.

CIFAR (32x32 input) — the zoo behind the paper's Table 1 pairs (CRD's): ResNets of depth 6n + 2 with 16/32/64
channels (``resnet8`` ... ``resnet110``) and 4x wider ones (``resnet8x4``, ``resnet32x4``), pre-activation wide
ResNets (``wrn_{depth}_{width}``), VGG with BatchNorm (``vgg8``, ``vgg13``), MobileNetV2 at width 0.5
(``mobilenetv2``), ShuffleNet V1 (groups 3) and V2 (1x). ImageNet (224x224): ``resnet18``, ``resnet34``,
``resnet50`` with torchvision's module names, so a torchvision checkpoint of the same name loads with
``strict=True``.

Parameter counts equal the published ones (tests). Every model is a ``ZooModel``: ``model(x)`` returns logits and
``model.features(x)`` the last feature map before global pooling, ``(B, C, h, w)``, for feature-based losses.

>>> model = MODELS["resnet20"](num_classes=100)
>>> sum(p.numel() for p in model.parameters())
278324
>>> model.features(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 64, 8, 8])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffAugError

__all__ = ["CIFAR_MODELS", "IMAGENET_MODELS", "MODELS", "ZooModel", "build_model"]


class ZooModel(nn.Module):
    """A classifier: ``features(x)`` (the last feature map), global average pooling, and the linear layer ``fc``."""

    fc: nn.Linear

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


def _init(model: nn.Module) -> None:
    """He-normal convolutions (fan out), unit BatchNorm, zero biases: the usual start of all these networks."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


# ---- ResNets (basic and bottleneck blocks), CIFAR and ImageNet stems -------------------------------------------

class BasicBlock(nn.Module):
    """Two 3x3 convolutions and an identity (or 1x1-projected) shortcut, ReLU after the sum."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, width, 3, stride)
        self.conv2, self.bn2 = _conv_bn(width, width)
        self.relu = nn.ReLU(inplace=True)
        out = width * self.expansion
        self.downsample = nn.Sequential(*_conv_bn(cin, out, 1, stride)) if stride != 1 or cin != out else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, torchvision's "v1.5"), 1x1 expand by 4; projected shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, width * self.expansion, 1)
        self.relu = nn.ReLU(inplace=True)
        out = width * self.expansion
        self.downsample = nn.Sequential(*_conv_bn(cin, out, 1, stride)) if stride != 1 or cin != out else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(ZooModel):
    """A ResNet: a stem, one stage per entry of ``widths[1:]`` (the first at stride 1, the others at 2), ``fc``.

    ``stem="cifar"``: one 3x3 convolution to ``widths[0]`` channels; ``stem="imagenet"``: a 7x7 stride-2
    convolution to 64 channels and a 3x3 stride-2 max pool (module names as torchvision's).
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], blocks: Sequence[int], widths: Sequence[int],
                 num_classes: int, stem: str = "cifar"):
        super().__init__()
        if stem == "cifar":
            self.conv1, self.bn1 = _conv_bn(3, widths[0])
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.relu = nn.ReLU(inplace=True)
        channels, stages = widths[0], []
        for index, (count, width) in enumerate(zip(blocks, widths[1:], strict=True)):
            layers = []
            for i in range(count):
                layers.append(block(channels, width, 2 if i == 0 and index > 0 else 1))
                channels = width * block.expansion
            stages.append(nn.Sequential(*layers))
        for index, stage in enumerate(stages, start=1):
            self.add_module(f"layer{index}", stage)
        self.stages = len(stages)
        self.fc = nn.Linear(channels, num_classes)
        _init(self)

    def features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, self.stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return x


def cifar_resnet(depth: int, widths: Sequence[int], num_classes: int = 100) -> ResNet:
    """A CIFAR ResNet of ``depth`` = 6n + 2 layers: three stages of n basic blocks."""
    if (depth - 2) % 6:
        raise DiffAugError(f"a CIFAR ResNet's depth is 6n + 2; got {depth}")
    return ResNet(BasicBlock, [(depth - 2) // 6] * 3, widths, num_classes)


# ---- Wide ResNets (pre-activation) -----------------------------------------------------------------------------

class WideBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut is the identity, or a 1x1 convolution of the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout or stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(ZooModel):
    """WRN-depth-k: a 3x3 stem to 16 channels, three stages of (depth - 4) / 6 blocks at 16k, 32k, 64k, BN-ReLU."""

    def __init__(self, depth: int, k: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise DiffAugError(f"a wide ResNet's depth is 6n + 4; got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(*[
            WideBlock(widths[stage] if i == 0 else widths[stage + 1], widths[stage + 1], 2 if i == 0 and stage else 1)
            for stage in range(3) for i in range(n)])
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.blocks(self.conv1(x))))


# ---- VGG with BatchNorm ------------------------------------------------------------------------------------------

class VGG(ZooModel):
    """Five stages of 3x3 conv-BN-ReLU (convolutions with bias), max-pooled by 2 after the first three (and after
    the fourth on inputs of 64 px or more), then a linear layer on the pooled 512 channels."""

    def __init__(self, stages: Sequence[Sequence[int]], num_classes: int = 100):
        super().__init__()
        channels, built = 3, []
        for widths in stages:
            layers: list[nn.Module] = []
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            built.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(built)
        self.fc = nn.Linear(channels, num_classes)
        _init(self)

    def features(self, x: Tensor) -> Tensor:
        pooled_stages = 4 if x.shape[-2] >= 64 else 3
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index < pooled_stages:
                x = F.max_pool2d(x, 2)
        return x


# ---- MobileNetV2 -----------------------------------------------------------------------------------------------

class InvertedResidual(nn.Module):
    """1x1 expand by t, 3x3 depthwise (carrying the stride), 1x1 linear projection; residual when shapes allow.
    The expansion convolution is kept at t = 1 too, as in the CIFAR zoo."""

    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        self.body = nn.Sequential(*_conv_bn(cin, hidden, 1), nn.ReLU(inplace=True),
                                  *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU(inplace=True),
                                  *_conv_bn(hidden, cout, 1))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(ZooModel):
    """MobileNetV2 for 32-px inputs: a stride-2 3x3 stem, the paper's seven bottleneck stages (t, c, n, s) with
    channels scaled by ``width``, a 1x1 convolution to 1280 channels, ``fc``."""

    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))

    def __init__(self, width: float = 0.5, num_classes: int = 100):
        super().__init__()
        channels = int(32 * width)
        layers: list[nn.Module] = [*_conv_bn(3, channels, 3, 2), nn.ReLU(inplace=True)]
        for t, c, n, s in self.STAGES:
            for i in range(n):
                layers.append(InvertedResidual(channels, int(c * width), s if i == 0 else 1, t))
                channels = int(c * width)
        last = int(1280 * width) if width > 1.0 else 1280
        layers += [*_conv_bn(channels, last, 1), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)
        _init(self)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


# ---- ShuffleNets ------------------------------------------------------------------------------------------------

def _shuffle(x: Tensor, groups: int) -> Tensor:
    """Channel shuffle: (B, g*c, H, W) -> channels reordered c-major, so grouped convolutions mix."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 to a quarter of the width, shuffle, 3x3 depthwise, grouped 1x1; added to the input, or at
    stride 2 concatenated with its 3x3 average pool (so the unit adds ``cout`` channels to ``cin``)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        self.groups = 1 if cin == 24 else groups  # the stem's 24 channels are not grouped
        self.conv1, self.bn1 = _conv_bn(cin, mid, 1, groups=self.groups)
        self.conv2, self.bn2 = _conv_bn(mid, mid, 3, stride, groups=mid)
        self.conv3, self.bn3 = _conv_bn(mid, cout, 1, groups=groups)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = _shuffle(F.relu(self.bn1(self.conv1(x))), self.groups)
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(ZooModel):
    """ShuffleNet V1 for 32-px inputs: a 1x1 stem to 24 channels, stages of 4/8/4 units at 240/480/960 channels
    (groups 3), ``fc``."""

    def __init__(self, num_classes: int = 100, widths: Sequence[int] = (240, 480, 960),
                 blocks: Sequence[int] = (4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(3, 24, 1)
        channels, units = 24, []
        for width, count in zip(widths, blocks, strict=True):
            for i in range(count):
                units.append(ShuffleUnitV1(channels, width - channels if i == 0 else width, 2 if i == 0 else 1, groups))
                channels = width
        self.units = nn.Sequential(*units)
        self.fc = nn.Linear(channels, num_classes)
        _init(self)

    def features(self, x: Tensor) -> Tensor:
        return self.units(F.relu(self.bn1(self.conv1(x))))


class ShuffleUnitV2(nn.Module):
    """At stride 1, half the channels pass and the other half go through 1x1, 3x3 depthwise, 1x1; at stride 2
    both halves are computed from the whole input (a depthwise-pointwise branch and the 3-conv branch). The
    halves are concatenated and shuffled."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        half = cout // 2
        self.stride = stride
        branch_in = cin if stride == 2 else cin // 2
        self.left = nn.Sequential(*_conv_bn(cin, cin, 3, 2, groups=cin), *_conv_bn(cin, half, 1),
                                  nn.ReLU(inplace=True)) if stride == 2 else None
        self.right = nn.Sequential(*_conv_bn(branch_in, half, 1), nn.ReLU(inplace=True),
                                   *_conv_bn(half, half, 3, stride, groups=half),
                                   *_conv_bn(half, half, 1), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        if self.left is None:
            passed, x = x.chunk(2, dim=1)
            return _shuffle(torch.cat([passed, self.right(x)], 1), 2)
        return _shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(ZooModel):
    """ShuffleNet V2 1x for 32-px inputs: a 1x1 stem to 24 channels, three stages (a stride-2 unit then 3/7/3
    stride-1 units) at 116/232/464 channels, a 1x1 convolution to 1024, ``fc``."""

    def __init__(self, num_classes: int = 100, widths: Sequence[int] = (116, 232, 464),
                 blocks: Sequence[int] = (3, 7, 3), last: int = 1024):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(3, 24, 1)
        channels, units = 24, []
        for width, count in zip(widths, blocks, strict=True):
            units.append(ShuffleUnitV2(channels, width, 2))
            units += [ShuffleUnitV2(width, width, 1) for _ in range(count)]
            channels = width
        self.units = nn.Sequential(*units)
        self.conv2, self.bn2 = _conv_bn(channels, last, 1)
        self.fc = nn.Linear(last, num_classes)
        _init(self)

    def features(self, x: Tensor) -> Tensor:
        x = self.units(F.relu(self.bn1(self.conv1(x))))
        return F.relu(self.bn2(self.conv2(x)))


# ---- The registry -----------------------------------------------------------------------------------------------

_NARROW, _WIDE = (16, 16, 32, 64), (32, 64, 128, 256)

CIFAR_MODELS: dict[str, Callable[..., ZooModel]] = {
    **{f"resnet{d}": functools.partial(cifar_resnet, d, _NARROW) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": functools.partial(cifar_resnet, 8, _WIDE),
    "resnet32x4": functools.partial(cifar_resnet, 32, _WIDE),
    **{f"wrn_{d}_{k}": functools.partial(WideResNet, d, k) for d in (16, 40) for k in (1, 2)},
    "vgg8": functools.partial(VGG, [[64], [128], [256], [512], [512]]),
    "vgg13": functools.partial(VGG, [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]),
    "mobilenetv2": functools.partial(MobileNetV2, 0.5),
    "shufflev1": ShuffleNetV1,
    "shufflev2": ShuffleNetV2,
}

IMAGENET_MODELS: dict[str, Callable[..., ZooModel]] = {
    "resnet18": functools.partial(ResNet, BasicBlock, [2, 2, 2, 2], (64, 64, 128, 256, 512), stem="imagenet"),
    "resnet34": functools.partial(ResNet, BasicBlock, [3, 4, 6, 3], (64, 64, 128, 256, 512), stem="imagenet"),
    "resnet50": functools.partial(ResNet, Bottleneck, [3, 4, 6, 3], (64, 64, 128, 256, 512), stem="imagenet"),
}

MODELS: dict[str, Callable[..., ZooModel]] = {**CIFAR_MODELS, **IMAGENET_MODELS}


def build_model(name: str, num_classes: int) -> ZooModel:
    """``MODELS[name](num_classes=num_classes)``, with an error naming the zoo for an unknown name."""
    if name not in MODELS:
        raise DiffAugError(f"model must be one of {', '.join(MODELS)}; got {name!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise DiffAugError(f"num_classes must be a positive int; got {num_classes!r}")
    return MODELS[name](num_classes=num_classes)
