"""What a Distiller needs to know about a task: its targets, how they travel with the augmentation, the two terms
of Stage II (Eq. 2), the Stage III loss (Eq. 1) and the metric it reports.

Built in: ``Classification`` (labels; the paper's CIFAR and ImageNet), ``Segmentation`` (per-pixel labels with an
ignore index; Cityscapes in the paper) and ``Localisation`` (one box and one label per image, with the paper's
detection terms: a box loss for the teacher, a bounded box term for the student, and a feature mimic loss in
Stage III). Write a ``Task`` for anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffAugError
from ..targets import Augmented
from .objective import LogitKD, check_class_indices, log_one_minus_softmax, stage_three_loss, tst_terms

__all__ = ["Classification", "Localisation", "Segmentation", "Task", "box_iou", "resolve_task"]

Augment = Callable[..., Any]
"""``augment(images, **targets)``: the Distiller's augmenter, called with its generator; returns images alone, or an
``Augmented`` when targets are given."""


class Task(nn.Module):
    """The task-specific parts of the Distiller. A module, so that it can hold parameters trained with the student
    (``Localisation``'s mimic adapter); they are optimised, checkpointed and averaged over ranks with it.

    Subclasses define the methods below; ``targets`` is whatever ``unpack`` makes of the loader's batch.
    """

    metric_name = "metric"
    # Whether the augmenter must move the targets (masks, boxes): then it needs geometry="composed".
    moves_targets = False

    def unpack(self, batch: Sequence[Any], device: torch.device) -> Any:
        """The targets of a loader batch ``(images, *rest)``, on ``device``."""
        return batch[1].to(device, non_blocking=True)

    def standard(self, function: Callable, images: Tensor, targets: Any, generator: torch.Generator) -> tuple[Tensor, Any]:
        """The Distiller's ``standard_augment`` on a batch. Tasks whose targets move get
        ``function(images, targets, generator) -> (images, targets)``."""
        return function(images, targets, generator)

    def augment(self, augment: Augment, images: Tensor, targets: Any) -> tuple[Tensor, Any]:
        """x_hat and its targets."""
        raise NotImplementedError

    def cat(self, first: Any, second: Any) -> Any:
        """The targets of ``torch.cat([x_hat, x])``; here targets that are one tensor (labels, masks)."""
        return torch.cat([first, second])

    def search_terms(self, teacher_out: Any, student_out: Any, targets: Any) -> tuple[Tensor, Tensor]:
        """Stage II's two terms, minimised as alpha * first + beta * second: the teacher's loss, and a term bounded
        below that falls as the student gets the sample wrong (Eq. 2's -log(1 - p_y))."""
        raise NotImplementedError

    def distill_loss(self, student_out: Any, teacher_out: Any, targets: Any, kd: LogitKD, w_ce: float,
                     w_kl: float) -> Tensor:
        """Stage III's loss on cat([x_hat, x]): Eq. 1 for the task's outputs, with ``kd`` (``objective.logit_kd``)
        as its distillation term on class logits."""
        raise NotImplementedError

    def class_scores(self, outputs: Any, targets: Any) -> tuple[Tensor, Tensor, Tensor]:
        """(logits (N, C), labels (N,), image (N,)): the class decisions in a batch and the image of each, for the
        training log's accuracy and the teacher's confidence on the true class (the paper's Fig. 3)."""
        raise NotImplementedError

    def statistics(self, outputs: Any, targets: Any) -> Tensor:
        """A 1-d float64 tensor summed over evaluation batches (and ranks); ``metric`` turns the sum into a number."""
        raise NotImplementedError

    def metric(self, statistics: Tensor) -> float:
        raise NotImplementedError


class Classification(Task):
    """Labels (B,) and logits (B, C): CE and KD (Eq. 1, or DKD / DIST), CE(teacher) and -log(1 - p_S[y]) (Eq. 2),
    top-1 accuracy."""

    metric_name = "accuracy"

    def standard(self, function: Callable, images: Tensor, targets: Tensor, generator: torch.Generator
                 ) -> tuple[Tensor, Tensor]:
        return function(images, generator), targets  # labels do not move

    def augment(self, augment: Augment, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return augment(images), targets

    def search_terms(self, teacher_out: Tensor, student_out: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return tst_terms(teacher_out, student_out, targets)

    def distill_loss(self, student_out: Tensor, teacher_out: Tensor, targets: Tensor, kd: LogitKD, w_ce: float,
                     w_kl: float) -> Tensor:
        return stage_three_loss(student_out, teacher_out, targets, kd, w_ce, w_kl)

    def class_scores(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return outputs, targets, torch.arange(len(targets), device=targets.device)

    def statistics(self, outputs: Tensor, targets: Tensor) -> Tensor:
        correct = (outputs.argmax(1) == targets).sum()
        return torch.stack([correct, torch.tensor(len(targets), device=correct.device)]).double()

    def metric(self, statistics: Tensor) -> float:
        return float(statistics[0] / statistics[1].clamp(min=1))


class Segmentation(Task):
    """Masks (B, H, W) of class indices, ``ignore_index`` where unlabelled; logits (B, C, H, W).

    Every loss is Eq. 1 or Eq. 2 per pixel, averaged over the labelled pixels: per-pixel CE and KD with temperature
    in Stage III, per-pixel CE(teacher) and -log(1 - p_S[y]) in Stage II. The metric is the mean IoU over the
    classes present in the labels or the predictions. Pixels the augmentation brings in from outside the image are
    ``ignore_index`` too (the augmenter's own, which must be this one). A batch without a labelled pixel has
    nothing to learn from: its losses are 0 (with gradients, all zero) rather than the NaN mean of no pixels.
    A label that is neither a class of the logits nor ``ignore_index`` raises ``DiffAugError``.
    """

    metric_name = "miou"
    moves_targets = True

    def __init__(self, ignore_index: int = 255) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"

    def augment(self, augment: Augment, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        out = augment(images, masks=targets)
        return out.images, out.masks

    def _pixels(self, logits: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The labelled pixels as rows: logits (N, C), labels (N,) and the image of each."""
        if not isinstance(logits, Tensor) or logits.dim() != 4 or logits.shape[-2:] != masks.shape[-2:] \
                or logits.shape[0] != masks.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise DiffAugError(f"segmentation models must return logits (B, C, H, W) at the masks' size "
                               f"{tuple(masks.shape)}; got {got}")
        check_class_indices(masks, logits.shape[1], "segmentation masks", self.ignore_index)
        valid = masks != self.ignore_index
        rows = logits.permute(0, 2, 3, 1)[valid]
        image = torch.arange(masks.shape[0], device=masks.device).view(-1, 1, 1).expand_as(masks)[valid]
        return rows, masks[valid].long(), image

    def search_terms(self, teacher_out: Tensor, student_out: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        teacher, labels, _ = self._pixels(teacher_out, targets)
        student, _, _ = self._pixels(student_out, targets)
        if labels.numel() == 0:  # no labelled pixel: zero terms, still on the graph of both outputs
            return teacher_out.float().sum() * 0, student_out.float().sum() * 0
        return tst_terms(teacher, student, labels)

    def distill_loss(self, student_out: Tensor, teacher_out: Tensor, targets: Tensor, kd: LogitKD, w_ce: float,
                     w_kl: float) -> Tensor:
        student, labels, _ = self._pixels(student_out, targets)
        teacher, _, _ = self._pixels(teacher_out, targets)
        if labels.numel() == 0:
            return student_out.float().sum() * 0
        return stage_three_loss(student, teacher, labels, kd, w_ce, w_kl)

    def class_scores(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._pixels(outputs, targets)

    def statistics(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The confusion matrix (C x C, true class by row), flattened."""
        classes = outputs.shape[1]
        logits, labels, _ = self._pixels(outputs, targets)
        cells = labels * classes + logits.argmax(1)  # labels are checked to be classes by _pixels
        return torch.bincount(cells, minlength=classes * classes).double()

    def metric(self, statistics: Tensor) -> float:
        classes = int(round(statistics.numel() ** 0.5))
        if statistics.dim() != 1 or classes * classes != statistics.numel():
            raise DiffAugError(f"segmentation statistics must be a flattened C x C confusion matrix (from statistics()); "
                               f"got shape {tuple(statistics.shape)}")
        confusion = statistics.view(classes, classes)
        hit = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - hit
        present = union > 0
        return float((hit[present] / union[present]).mean()) if bool(present.any()) else float("nan")


def box_iou(first: Tensor, second: Tensor) -> Tensor:
    """IoU of paired xyxy boxes (N, 4) and (N, 4), differentiable; 0 for boxes without area."""
    low = torch.maximum(first[:, :2], second[:, :2])
    high = torch.minimum(first[:, 2:], second[:, 2:])
    overlap = (high - low).clamp(min=0).prod(1)

    def area(b: Tensor) -> Tensor:
        return (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)

    return overlap / (area(first) + area(second) - overlap).clamp(min=1e-9)


class Localisation(Task):
    """One object per image: targets (labels (B,), boxes (B, 4) xyxy pixels); models return
    ``(logits (B, C), boxes (B, 4) xyxy pixels, features (B, F, h, w))``.

    The paper's detection terms, for a single-object detector:
    - Stage II: the teacher's CE and box loss (L1 of the box corners as fractions of the image size), minimised;
      and the student's -log(1 - p_S[y]) plus ``w_box`` times -log(1 - IoU(student box, box)), each bounded
      below by 0 and falling as the student gets the class or the box wrong (Eq. 2's form, for boxes).
    - Stage III: KD (Eq. 1) on the class logits, ``w_box`` times the student's box loss, and ``w_mimic`` times
      the feature mimic loss: the student's features mapped to the teacher's by a 1x1 convolution (trained with
      the student) and matched by mean squared error.
    A box the augmentation pushes out of the image (``Augmented.keep`` False) drops that image from every term.
    The metric is the mean L1 box error in pixels (lower is better).

    Args:
        student_channels, teacher_channels: F of the student's and the teacher's features.
        image_size: (H, W) of the images, the scale of the box loss.
        w_box, w_mimic: weights of the box terms and of the mimic loss.
    """

    metric_name = "box_error"
    moves_targets = True

    def __init__(self, student_channels: int, teacher_channels: int, image_size: tuple[int, int], *,
                 w_box: float = 1.0, w_mimic: float = 1.0) -> None:
        super().__init__()
        self.mimic = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        height, width = image_size
        self.register_buffer("scale", torch.tensor([width, height, width, height], dtype=torch.float32),
                             persistent=False)
        self.w_box, self.w_mimic = w_box, w_mimic

    def unpack(self, batch: Sequence[Any], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if len(batch) < 3:
            raise DiffAugError(f"a localisation loader must yield (images, labels, boxes); got {len(batch)} items")
        labels, boxes = (t.to(device, non_blocking=True) for t in batch[1:3])
        if boxes.dim() != 2 or boxes.shape != (len(labels), 4) or not boxes.is_floating_point():
            raise DiffAugError(f"localisation boxes must be float ({len(labels)}, 4), xyxy pixels; got "
                               f"{boxes.dtype} of shape {tuple(boxes.shape)}")
        return labels, boxes, torch.ones(len(labels), dtype=torch.bool, device=device)

    def augment(self, augment: Augment, images: Tensor, targets: tuple[Tensor, Tensor, Tensor]
                ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        labels, boxes, keep = targets
        out: Augmented = augment(images, boxes=list(boxes.unsqueeze(1)))
        moved_keep = torch.cat(out.keep) if out.keep is not None else torch.ones_like(keep)
        return out.images, (labels, torch.cat(out.boxes), keep & moved_keep)

    def cat(self, first: tuple, second: tuple) -> tuple:
        return tuple(torch.cat([a, b]) for a, b in zip(first, second, strict=True))

    def _outputs(self, outputs: Any) -> tuple[Tensor, Tensor, Tensor]:
        if not (isinstance(outputs, (tuple, list)) and len(outputs) == 3):
            raise DiffAugError("localisation models must return (logits, boxes, features); got "
                               f"{type(outputs).__name__}")
        return outputs  # type: ignore[return-value]

    def _box_loss(self, predicted: Tensor, boxes: Tensor) -> Tensor:
        """Per image: the mean L1 distance of the corners as fractions of the image size."""
        return ((predicted.float() - boxes.float()) / self.scale).abs().mean(1)

    def _kept_mean(self, values: Tensor, keep: Tensor) -> Tensor:
        return (values * keep).sum() / keep.sum().clamp(min=1)

    def search_terms(self, teacher_out: Any, student_out: Any, targets: tuple) -> tuple[Tensor, Tensor]:
        labels, boxes, keep = targets
        (t_logits, t_boxes, _), (s_logits, s_boxes, _) = self._outputs(teacher_out), self._outputs(student_out)
        check_class_indices(labels, t_logits.shape[1], "localisation labels")
        teacher = F.cross_entropy(t_logits.float(), labels, reduction="none") + self._box_loss(t_boxes, boxes)
        iou = box_iou(s_boxes.float(), boxes).clamp(max=1 - 1e-6)
        student = -log_one_minus_softmax(s_logits, labels) - self.w_box * torch.log1p(-iou)
        return self._kept_mean(teacher, keep), self._kept_mean(student, keep)

    def distill_loss(self, student_out: Any, teacher_out: Any, targets: tuple, kd: LogitKD, w_ce: float,
                     w_kl: float) -> Tensor:
        labels, boxes, keep = targets
        (t_logits, _, t_features), (s_logits, s_boxes, s_features) = self._outputs(teacher_out), self._outputs(student_out)
        kept = keep.nonzero().squeeze(1)
        logits = stage_three_loss(s_logits.index_select(0, kept), t_logits.index_select(0, kept),
                                  labels.index_select(0, kept), kd, w_ce, w_kl) if kept.numel() else s_logits.sum() * 0
        box = self._kept_mean(self._box_loss(s_boxes, boxes), keep)
        mapped = self.mimic(s_features.to(self.mimic.weight.dtype))
        if mapped.shape[-2:] != t_features.shape[-2:]:
            mapped = F.interpolate(mapped, size=t_features.shape[-2:], mode="bilinear", align_corners=False)
        mimic = F.mse_loss(mapped.float(), t_features.float().detach())
        return logits + self.w_box * box + self.w_mimic * mimic

    def class_scores(self, outputs: Any, targets: tuple) -> tuple[Tensor, Tensor, Tensor]:
        labels = targets[0]
        return self._outputs(outputs)[0], labels, torch.arange(len(labels), device=labels.device)

    def statistics(self, outputs: Any, targets: tuple) -> Tensor:
        _, boxes, keep = targets
        error = (self._outputs(outputs)[1].float() - boxes).abs().mean(1)
        return torch.stack([(error * keep).sum(), keep.sum()]).double()

    def metric(self, statistics: Tensor) -> float:
        return float(statistics[0] / statistics[1].clamp(min=1))


def resolve_task(task: str | Task) -> Task:
    """A ``Task`` from ``"classification"``, ``"segmentation"`` or a ``Task`` itself."""
    if isinstance(task, Task):
        return task
    built = {"classification": Classification, "segmentation": Segmentation}
    if task not in built:
        raise DiffAugError(f"task must be one of {list(built)} or a diffaug.distill.Task (e.g. Localisation(...), "
                           f"which needs its models' feature sizes); got {task!r}")
    return built[task]()
