"""The TST losses as pure functions of logits: Eq. 1 (knowledge distillation) and Eq. 2 (the policy search).

Both upcast half-precision logits to float32 and use log-sum-exp forms only, so they stay finite and correct for
logits of magnitude 1e4 in float16 and bfloat16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DiffAugError

__all__ = ["kd_loss", "log_one_minus_softmax", "tst_loss", "tst_terms"]


def _check_logits(name: str, logits: Tensor, targets: Tensor, other: Tensor | None = None) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"{logits.dtype} of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise DiffAugError(f"{name} must be float logits of shape (B, num_classes); got {got}")
    if logits.shape[1] < 2:
        raise DiffAugError(f"{name} must have at least 2 classes; got shape {tuple(logits.shape)}")
    if other is not None and other.shape != logits.shape:
        raise DiffAugError(f"teacher and student logits must have the same shape; got {tuple(other.shape)} "
                           f"and {tuple(logits.shape)}")
    if targets.shape != (logits.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
        raise DiffAugError(f"targets must be integer class indices of shape ({logits.shape[0]},); got "
                           f"{targets.dtype} of shape {tuple(targets.shape)}")


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

    Example:
        >>> s, t = torch.randn(4, 10), torch.randn(4, 10)
        >>> kd_loss(s, t, torch.tensor([0, 1, 2, 3])).shape
        torch.Size([])
    """
    _check_logits("student_logits", student_logits, targets, teacher_logits)
    if not temperature > 0:
        raise DiffAugError(f"temperature must be positive; got {temperature!r}")
    s, t = student_logits.float(), teacher_logits.float().detach()
    ce = F.cross_entropy(s, targets.long())
    log_p_student = F.log_softmax(s / temperature, dim=1)
    log_p_teacher = F.log_softmax(t / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return w_ce * ce + w_kl * temperature**2 * kl


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
    _check_logits("teacher_logits", teacher_logits, targets, student_logits)
    teacher_ce = F.cross_entropy(teacher_logits.float(), targets.long())
    student_term = -log_one_minus_softmax(student_logits, targets).mean()
    return teacher_ce, student_term
