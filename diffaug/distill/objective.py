"""The TST losses as pure functions of logits: Eq. 1 (knowledge distillation) and Eq. 2 (the policy search), and the
logit-distillation losses the paper compares with, DKD and DIST.

All upcast half-precision logits to float32 and use log-sum-exp forms only, so they stay finite and correct for
logits of magnitude 1e4 in float16 and bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DiffAugError, describe

__all__ = ["KD_LOSSES", "LogitKD", "check_class_indices", "dist_loss", "dkd_loss", "kd_loss", "log_one_minus_softmax", "logit_kd", "soft_kl",
           "stage_three_loss", "tst_loss", "tst_terms"]

LogitKD = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``kd(student_logits, teacher_logits, targets) -> scalar``: the distillation term of Stage III, next to CE."""
KD_LOSSES: dict[str, Callable[[float], LogitKD]] = {
    "kd": lambda temperature: lambda s, t, y: soft_kl(s, t, temperature),
    "dkd": lambda temperature: lambda s, t, y: dkd_loss(s, t, y, temperature=temperature),
    "dist": lambda temperature: lambda s, t, y: dist_loss(s, t, temperature=temperature),
}
"""Stage III's distillation terms by name: ``name -> factory(temperature) -> LogitKD``, with each paper's other
defaults. ``Distiller(kd=...)`` and ``python -m diffaug.distill --kd`` take their names from here, so a new KD loss
is one entry."""


def check_class_indices(targets: Tensor, classes: int, name: str = "targets", ignore_index: int | None = None) -> None:
    """Raise ``DiffAugError`` unless every value of ``targets`` is a class index in [0, ``classes``) or
    ``ignore_index``. One reduction and a read: torch would raise a bare IndexError (CPU) or a device assert (CUDA).

    The losses of this module take no ``ignore_index``: every sample counts in the KD and DKD terms, so a -100
    (``F.cross_entropy``'s default ignore index, which its CE term alone would skip) is refused, not half-ignored.
    Drop unlabelled samples before the loss, as ``Segmentation`` does with its pixels.
    """
    values = targets if ignore_index is None else targets[targets != ignore_index]
    if values.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(values.detach()))
    if lo < 0 or hi >= classes:
        besides = "" if ignore_index is None else f" or the ignore_index {ignore_index}"
        hint = " (these losses have no ignore_index: drop unlabelled samples first)" \
            if ignore_index is None and lo == -100 else ""
        raise DiffAugError(f"{name} must be class indices in [0, {classes - 1}]{besides} for logits of {classes} "
                           f"classes; got values in [{lo}, {hi}]{hint}")


def _check_logits(name: str, logits: Tensor, targets: Tensor | None, other: Tensor | None = None,
                  other_name: str = "teacher_logits") -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise DiffAugError(f"{name} must be float logits of shape (B, num_classes); got {describe(logits)}")
    if logits.shape[1] < 2:
        raise DiffAugError(f"{name} must have at least 2 classes; got shape {tuple(logits.shape)}")
    if other is not None and (not isinstance(other, Tensor) or other.shape != logits.shape
                              or not other.is_floating_point()):
        raise DiffAugError(f"{name} and {other_name} must be float logits of the same shape; got {name} "
                           f"{describe(logits)} and {other_name} {describe(other)}")
    if targets is None:
        return
    if not isinstance(targets, Tensor) or targets.shape != (logits.shape[0],) \
            or targets.dtype not in (torch.int64, torch.int32):
        raise DiffAugError(f"targets must be integer class indices of shape ({logits.shape[0]},); got "
                           f"{describe(targets)}")
    check_class_indices(targets, logits.shape[1])


def log_one_minus_softmax(logits: Tensor, targets: Tensor) -> Tensor:
    """log(1 - softmax(logits)[y]) per sample, as logsumexp over the other classes minus logsumexp over all.

    Never computed as log(1 - p + eps): when p_y rounds to 1 that form loses every digit (and eps biases it).
    """
    z = logits.float()
    others = z.scatter(1, targets.long().unsqueeze(1), float("-inf"))
    return torch.logsumexp(others, dim=1) - torch.logsumexp(z, dim=1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float = 4.0,
    w_ce: float = 1.0,
    w_kl: float = 1.0,
) -> Tensor:
    """Eq. 1: w_ce CE(student, y) + w_kl tau^2 KL(softmax(teacher / tau) || softmax(student / tau)), batch mean.

    Every target must be a class in [0, C): there is no ignore_index (-100 included; see ``check_class_indices``).

    Example:
        >>> s, t = torch.randn(4, 10), torch.randn(4, 10)
        >>> kd_loss(s, t, torch.tensor([0, 1, 2, 3])).shape
        torch.Size([])
    """
    return stage_three_loss(student_logits, teacher_logits, targets, logit_kd("kd", temperature), w_ce, w_kl)


def _check_temperature(temperature: float) -> None:
    # inf would make every softened distribution uniform and tau^2 KL = inf * 0 = NaN; NaN fails the comparison.
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise DiffAugError(f"temperature must be a positive finite number; got {temperature!r}")


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """tau^2 KL(softmax(teacher / tau) || softmax(student / tau)), batch mean: Eq. 1's distillation term."""
    _check_logits("student_logits", student_logits, None, teacher_logits)
    _check_temperature(temperature)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float().detach() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): tau^2 (alpha TCKD + beta NCKD), batch mean; no CE inside.

    TCKD is the KL between the teacher's and the student's binary distributions (p_y, 1 - p_y); NCKD the KL
    between their distributions over the other classes alone, each at temperature tau and summed over classes.
    Written with log-sum-exp forms only (log(1 - p_y) from ``log_one_minus_softmax``), so it stays finite when p_y
    rounds to 1.
    """
    _check_logits("student_logits", student_logits, targets, teacher_logits)
    _check_temperature(temperature)
    s, t = student_logits.float() / temperature, teacher_logits.float().detach() / temperature
    y = targets.long().unsqueeze(1)
    log_s, log_t = F.log_softmax(s, 1).gather(1, y).squeeze(1), F.log_softmax(t, 1).gather(1, y).squeeze(1)
    log_not_s, log_not_t = log_one_minus_softmax(s, targets), log_one_minus_softmax(t, targets)
    tckd = log_t.exp() * (log_t - log_s) + log_not_t.exp() * (log_not_t - log_not_s)
    others = torch.zeros_like(s, dtype=torch.bool).scatter_(1, y, True)
    log_q_s = F.log_softmax(s.masked_fill(others, float("-inf")), 1)
    log_q_t = F.log_softmax(t.masked_fill(others, float("-inf")), 1)
    # The target class has probability 0 in both: its term is 0 (not 0 * (-inf + inf)).
    nckd = torch.where(others, 0.0, log_q_t.exp() * (log_q_t - log_q_s)).sum(1)
    return temperature**2 * (alpha * tckd + beta * nckd).mean()


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + 1e-8)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022): tau^2 (beta (1 - mean per-sample Pearson correlation) + gamma (1 - mean
    per-class Pearson correlation over the batch)) of the softened distributions softmax(logits / tau)."""
    _check_logits("student_logits", student_logits, None, teacher_logits)
    _check_temperature(temperature)
    p_s = F.softmax(student_logits.float() / temperature, 1)
    p_t = F.softmax(teacher_logits.float().detach() / temperature, 1)
    inter = 1 - _pearson(p_s, p_t, 1).mean()
    intra = 1 - _pearson(p_s, p_t, 0).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def tst_loss(
    teacher_logits: Tensor,
    student_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> Tensor:
    """Eq. 2: alpha CE(teacher, y) + beta CE(1 - p_student, y), batch mean.

    The second term is -log(1 - p_student[y]): it grows as the student gets the augmented sample right, so
    minimising the sum searches for samples the teacher classifies and the student does not.

    Example:
        >>> t, s = torch.randn(4, 10), torch.randn(4, 10)
        >>> tst_loss(t, s, torch.tensor([0, 1, 2, 3])).shape
        torch.Size([])
    """
    teacher_ce, student_term = tst_terms(teacher_logits, student_logits, targets)
    return alpha * teacher_ce + beta * student_term


def tst_terms(teacher_logits: Tensor, student_logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The two terms of Eq. 2 apart, batch means: CE(teacher, y) and -log(1 - p_student[y])."""
    _check_logits("teacher_logits", teacher_logits, targets, student_logits, "student_logits")
    teacher_ce = F.cross_entropy(teacher_logits.float(), targets.long())
    student_term = -log_one_minus_softmax(student_logits, targets).mean()
    return teacher_ce, student_term


def logit_kd(kind: str | LogitKD, temperature: float = 4.0) -> LogitKD:
    """The distillation term named ``kind`` in ``KD_LOSSES`` at ``temperature``; a callable is returned as it is."""
    _check_temperature(temperature)
    if callable(kind):
        return kind
    if not isinstance(kind, str) or kind not in KD_LOSSES:
        raise DiffAugError(f"kd must be one of {list(KD_LOSSES)} or a callable kd(student_logits, teacher_logits, "
                           f"targets); got {kind!r}")
    return KD_LOSSES[kind](temperature)


def stage_three_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, kd: LogitKD,
                     w_ce: float = 1.0, w_kl: float = 1.0) -> Tensor:
    """w_ce CE(student, y) + w_kl kd(student, teacher, y): Eq. 1 with ``kd = logit_kd("kd")``."""
    _check_logits("student_logits", student_logits, targets, teacher_logits)
    return w_ce * F.cross_entropy(student_logits.float(), targets.long()) + w_kl * kd(student_logits, teacher_logits, targets)
