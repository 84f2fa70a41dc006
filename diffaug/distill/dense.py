"""Dense tasks from the shipped real data, and small example models for them.

Scenes are 32x32 crops of the shipped photos with an MNIST digit pasted on each, 16-26 px high at a random
place (the digit's own strokes as the alpha, in a colour that contrasts with the crop). ``"segmentation"``
scenes come with a per-pixel mask (0 background, 1 + d on the strokes of digit d); ``"localisation"`` scenes
with the digit's class and box (the tight xyxy box of its strokes, in pixels). Splits are disjoint in both digits and photo pixels: training crops and
digits, validation crops from the bottom quarter of the photos' left halves and digits of their own, test crops
from the right halves and the remaining digits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..errors import DiffAugError
from .data import Splits, balanced_subsets, mnist_arrays, photo_regions

__all__ = ["SEGMENTATION_CLASSES", "TinyLocaliser", "TinySegmenter", "dense_models", "digit_scenes"]

SIZE = 32
SEGMENTATION_CLASSES = 11  # background and ten digits


def _soften(crop: Tensor) -> Tensor:
    """The crop blurred (two 3x3 box filters) and its contrast halved: the photo's texture at the strokes' scale
    would otherwise look like strokes to a small model (a width-8 segmenter stayed at background alone)."""
    blurred = crop.unsqueeze(0)
    for _ in range(2):
        blurred = F.avg_pool2d(F.pad(blurred, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return 0.25 + 0.5 * blurred.squeeze(0)


def _paste(background: Tensor, digit: Tensor, scale: int, top: int, left: int, generator: torch.Generator
           ) -> tuple[Tensor, Tensor]:
    """The background (3, H, W) with ``digit`` (28, 28) in [0, 1] resized to ``scale`` pasted at (top, left), and
    the digit's stroke mask (H, W) bool: where its alpha exceeds 0.3 (a 2-3 px stroke at these scales)."""
    alpha = F.interpolate(digit.view(1, 1, 28, 28), size=(scale, scale), mode="bilinear", antialias=True,
                          align_corners=False).view(scale, scale).clamp(0, 1)
    background = _soften(background)
    region = background[:, top:top + scale, left:left + scale]
    # Ink that contrasts with what it is written on: light on dark crops, dark on light ones, a random tint.
    light = bool(region.mean() < 0.5)
    tint = torch.rand(3, 1, 1, generator=generator) * 0.3
    ink = 1 - tint if light else tint
    out = background.clone()
    out[:, top:top + scale, left:left + scale] = region * (1 - alpha) + ink * alpha
    mask = torch.zeros(background.shape[-2:], dtype=torch.bool)
    mask[top:top + scale, left:left + scale] = alpha > 0.3
    return out, mask


def _scenes(task: str, backgrounds: Tensor, digits: np.ndarray, labels: np.ndarray, seed: int) -> TensorDataset:
    """One digit per background, at a random scale (16-26 px) and position, with its mask or its label and box."""
    generator = torch.Generator().manual_seed(seed)
    images, masks, boxes = [], [], []
    for i, background in enumerate(backgrounds):
        k = i % len(digits)
        scale = int(torch.randint(16, 27, (1,), generator=generator))
        top, left = (int(v) for v in torch.randint(SIZE - scale + 1, (2,), generator=generator))
        image, strokes = _paste(background, torch.from_numpy(digits[k]).float() / 255, scale, top, left, generator)
        images.append(image)
        masks.append(strokes.long() * (int(labels[k]) + 1))
        rows, columns = strokes.nonzero(as_tuple=True)
        boxes.append(torch.stack([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]).float())
    classes = torch.from_numpy(labels[np.arange(len(backgrounds)) % len(digits)].astype(np.int64))
    if task == "segmentation":
        return TensorDataset(torch.stack(images), torch.stack(masks))
    return TensorDataset(torch.stack(images), classes, torch.stack(boxes))


def digit_scenes(task: str, seed: int = 0, sizes: tuple[int, int, int] = (1000, 300, 600)) -> Splits:
    """Train, validation and test scenes of ``task`` ("segmentation" or "localisation"), ``sizes`` scenes each
    (multiples of 10).

    Segmentation: (images (N, 3, 32, 32), masks (N, 32, 32) long). Localisation: (images, labels (N,),
    boxes (N, 4) xyxy pixels).

    >>> splits = digit_scenes("localisation", sizes=(10, 10, 10))
    >>> [len(s) for s in splits], splits.train.tensors[2].shape
    ([10, 10, 10], torch.Size([10, 4]))
    """
    if task not in ("segmentation", "localisation"):
        raise DiffAugError(f"task must be 'segmentation' or 'localisation'; got {task!r}")
    if len(sizes) != 3 or any(not isinstance(n, int) or n < 10 or n % 10 for n in sizes):
        raise DiffAugError(f"sizes must be three multiples of 10 (train, validation, test); got {sizes!r}")
    regions = [(slice(0, 0.75), slice(0, 0.5)), (slice(0.75, 1), slice(0, 0.5)), (slice(0, 1), slice(0.5, 1))]
    backgrounds = [d.tensors[0] for d in
                   (photo_regions([r], n // 10, SIZE, seed + i)[0] for i, (r, n) in enumerate(zip(regions, sizes)))]
    images, labels = mnist_arrays()
    per_class = [min(200, n // 10) for n in sizes[:2]]  # digits of a class for train and validation
    subsets = balanced_subsets(labels, per_class, seed)
    order = np.random.default_rng(seed + 7)
    splits = []
    for i, (background, index) in enumerate(zip(backgrounds, subsets, strict=True)):
        index = order.permutation(index)
        shuffled = background[torch.from_numpy(order.permutation(len(background)))]
        splits.append(_scenes(task, shuffled, images[index], labels[index], seed * 10 + i))
    return Splits(*splits)


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class TinySegmenter(nn.Module):
    """A small fully-convolutional segmenter: conv stages at full, half and quarter resolution (``width``, 2 and 4
    times ``width`` channels; a receptive field of about 24 px, a whole digit), all upsampled back and joined by a
    1x1 classifier; logits (B, classes, H, W)."""

    def __init__(self, width: int, classes: int = SEGMENTATION_CLASSES, channels: int = 3) -> None:
        super().__init__()
        self.fine = nn.Sequential(*_block(channels, width))
        self.middle = nn.Sequential(nn.MaxPool2d(2), *_block(width, 2 * width))
        self.coarse = nn.Sequential(nn.MaxPool2d(2), *_block(2 * width, 4 * width), *_block(4 * width, 4 * width))
        self.head = nn.Conv2d(7 * width, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        fine = self.fine(x)
        middle = self.middle(fine)
        coarse = self.coarse(middle)
        up = [F.interpolate(t, size=fine.shape[-2:], mode="bilinear", align_corners=False) for t in (middle, coarse)]
        return self.head(torch.cat([fine, *up], dim=1))


class TinyLocaliser(nn.Module):
    """A small single-object detector: a conv backbone to (B, F, 8, 8) features, pooled into a class head and a
    box head (centre and size as fractions of the image, through a sigmoid). Returns ``(logits, boxes xyxy in
    pixels, features)``, as ``diffaug.distill.Localisation`` expects."""

    def __init__(self, width: int, classes: int = 10, channels: int = 3, size: int = SIZE) -> None:
        super().__init__()
        self.features = nn.Sequential(*_block(channels, width), nn.MaxPool2d(2), *_block(width, 2 * width),
                                      nn.MaxPool2d(2), *_block(2 * width, 2 * width))
        self.classify = nn.Linear(2 * width, classes)
        self.locate = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (size // 4) ** 2, 4))
        # Zero weights: the head starts at the centred half-size box with the sigmoid at its steepest. With the
        # default init the sum over 2 * width * 64 positive features saturated the sigmoid at once and the box head
        # never moved (16 px error, 5x a constant guess).
        nn.init.zeros_(self.locate[1].weight)
        nn.init.zeros_(self.locate[1].bias)
        self.size = size

    @property
    def feature_channels(self) -> int:
        return self.classify.in_features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.features(x)
        logits = self.classify(features.mean(dim=(2, 3)))
        centre, extent = torch.sigmoid(self.locate(features)).view(-1, 2, 2).unbind(1)
        boxes = torch.cat([centre - extent / 2, centre + extent / 2], dim=1) * self.size
        return logits, boxes, features


def dense_models(task: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(teacher, student) for a ``digit_scenes`` task: widths 16 and 4 (segmentation, 62k and 4k parameters) or
    32 and 8 (localisation, 74k and 8k)."""
    torch.manual_seed(seed)
    if task == "segmentation":
        return TinySegmenter(16), TinySegmenter(8)
    if task == "localisation":
        return TinyLocaliser(32), TinyLocaliser(8)
    raise DiffAugError(f"task must be 'segmentation' or 'localisation'; got {task!r}")
