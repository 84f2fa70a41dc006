"""What one training step does, apart from the loop around it (``trainer.Trainer``).

- ``Distillation``: TST's two steps over a ``Task`` and a KD loss: Stage II (the policy search, Eq. 2: only the
  augmenter's logits move) and Stage III (distillation, Eq. 1, on cat([x_hat, x])).
- ``Supervised``: plain training of one model with cross-entropy (how a teacher is trained).

Both take a loader's batch, prepare it on the device (the standard augmentation drawn from the run's generator,
then the normalisation), step their optimiser and return a record of plain floats for the history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffAugError
from ..policy import PolicyAugmenter, ReferencePolicy
from ..targets import Augmented
from . import parallel
from .objective import LogitKD
from .settings import Search, StageThree
from .tasks import Task

__all__ = ["Distillation", "Prepare", "Supervised", "normalise"]

# Augmenters that draw from the run's generator and report a policy; other modules use the global RNG.
POLICIES = (PolicyAugmenter, ReferencePolicy)
_SEARCH_LOGGED = ("teacher_ce", "student_term", "teacher_accuracy", "teacher_confidence")
_GRADIENT_LOGGED = ("grad_norm_teacher", "grad_norm_student", "grad_cosine")


def normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(images - mean) / std`` per channel, with ``mean`` and ``std`` (C,) or (1, C, 1, 1) on the images'
    device: the one normalisation of the Distiller, the trainer and the recipe."""
    view = (1, -1, 1, 1)
    return (images - mean.view(view)) / std.view(view)


class Prepare:
    """A loader batch on the device: the images in the models' memory format, the targets as the task unpacks
    them; then ``standard_augment`` (drawn from ``generator``) and the normalisation."""

    def __init__(self, task: Task, device: torch.device, memory_format: torch.memory_format,
                 standard_augment: Callable | None, normalisation: tuple[Tensor, Tensor] | None,
                 generator: torch.Generator) -> None:
        self.task, self.device, self.memory_format = task, device, memory_format
        self.standard_augment, self.generator = standard_augment, generator
        self.normalisation = None if normalisation is None else tuple(t.to(device) for t in normalisation)

    def batch(self, batch: Any) -> tuple[Tensor, Any]:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise DiffAugError(f"train_loader must yield (images, targets) pairs; got {type(batch).__name__}")
        x, y = batch[0].to(self.device, non_blocking=True), self.task.unpack(batch, self.device)
        return x.contiguous(memory_format=self.memory_format), y

    def normalise(self, x: Tensor) -> Tensor:
        if self.normalisation is None:
            return x
        return normalise(x, *self.normalisation).contiguous(memory_format=self.memory_format)

    def standard(self, x: Tensor, y: Any) -> tuple[Tensor, Any]:
        if self.standard_augment is not None:
            x, y = self.task.standard(self.standard_augment, x, y, self.generator)
        return self.normalise(x), y


def autocast(device: torch.device, amp: str | None) -> Any:
    if amp is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def check_finite(loss: Tensor, stage: str, where: str) -> None:
    if not torch.isfinite(loss):
        raise DiffAugError(
            f"the {stage} loss became {loss.item()} at {where}; training stopped before anything was saved, so the "
            "last checkpoint is intact (lower the learning rate or use bf16)"
        )


def term_gradients(teacher_term: Tensor, student_term: Tensor, params: list[nn.Parameter]) -> dict[str, float]:
    """The norms of Eq. 2's two terms' gradients on the policy logits and the cosine between them: whether the
    search follows the teacher (keep views it gets right) or the student (find views it gets wrong). Measured on
    a graph that is kept for the step's own gradient, so the step is the same with or without it."""
    def flat(term: Tensor) -> Tensor:
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g.float()).flatten() for p, g in zip(params, grads)])

    teacher, student = flat(teacher_term), flat(student_term)
    cosine = F.cosine_similarity(teacher, student, dim=0, eps=1e-30)
    return {"grad_norm_teacher": teacher.norm().item(), "grad_norm_student": student.norm().item(),
            "grad_cosine": cosine.item()}


def search_summary(before: dict[str, dict[str, float]] | None, records: list[dict[str, Any]]) -> dict[str, float]:
    """A search block in a few numbers: the mean of each logged quantity over its steps, and how far it moved the
    policy (the largest change of any probability, ``max_dp``, and of any magnitude, ``max_dm``)."""
    if not records:
        return {}
    # Over the steps that logged each: a segmentation batch without a labelled pixel logs no teacher accuracy.
    summary = {k: float(np.mean([r[k] for r in records if k in r])) for k in (*_SEARCH_LOGGED, *_GRADIENT_LOGGED)
               if any(k in r for r in records)}
    if before is not None:
        after = records[-1]["policy"]
        for key, name in (("probability", "max_dp"), ("magnitude", "max_dm")):
            summary[name] = max((abs(after[op][key] - before[op][key]) for op in before if key in before[op]),
                                default=0.0)
    return summary


class Distillation:
    """TST's two steps on ``teacher`` -> ``student`` with ``augmenter`` (searched if it is a PolicyAugmenter),
    for ``task`` with the distillation term ``kd``. ``trained_student`` is the student as trained (a DDP wrapper
    under torchrun). The caller owns the optimisers; the steps own their gradient scalers (fp16)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, trained_student: nn.Module, augmenter: nn.Module,
                 task: Task, kd: LogitKD, stage_three: StageThree, search: Search, prepare: Prepare,
                 optimiser: torch.optim.Optimizer, search_optimiser: torch.optim.Optimizer | None,
                 amp: str | None) -> None:
        self.teacher, self.student, self.trained_student = teacher, student, trained_student
        self.augmenter, self.task, self.kd, self.prepare = augmenter, task, kd, prepare
        self.stage_three, self.search = stage_three, search
        self.optimiser, self.search_optimiser, self.amp = optimiser, search_optimiser, amp
        self.searchable = search_optimiser is not None
        device = prepare.device
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        # Stage II's gradients underflow in fp16 as Stage III's would: scaled the same way, by a scaler of their own.
        self.search_scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.search_step_count = 0
        self.where = "the start"  # set by the trainer: "epoch E, step S", for error messages

    def _autocast(self) -> Any:
        return autocast(self.prepare.device, self.amp)

    def augment(self, x: Tensor, **targets: Any) -> Tensor | Augmented:
        if isinstance(self.augmenter, POLICIES):
            return self.augmenter(x, generator=self.prepare.generator, **targets)
        if targets:  # nn.Identity(), the only other augmenter a task with moving targets accepts
            return Augmented(self.augmenter(x), **targets)
        return self.augmenter(x)  # a module with its own randomness (the global RNG, seeded and checkpointed)

    def policy(self) -> dict[str, dict[str, float]] | None:
        return self.augmenter.policy() if isinstance(self.augmenter, POLICIES) else None

    def before_search(self) -> None:
        """Stage II and evaluation see one student on every rank: rank 0's BatchNorm statistics (DDP broadcasts
        them before each training forward, which then updates each rank's copy with its own batch)."""
        parallel.broadcast_(self.student.buffers())

    def search_step(self, x: Tensor, y: Any) -> dict[str, float]:
        """One Stage II step: only the augmenter's logits move; teacher and student are frozen in eval mode.

        The record's ``teacher_ce`` and ``student_term`` are the task's two terms (for classification, CE of the
        teacher and -log(1 - p_S[y]))."""
        if not self.searchable:
            raise DiffAugError("Stage II needs a PolicyAugmenter; this Distiller has a "
                               f"{type(self.augmenter).__name__}")
        x, y = self.prepare.standard(x, y)
        self.augmenter.train()
        self.student.eval()
        with self._autocast():
            x_hat, y_hat = self.task.augment(self.augment, x, y)
            teacher_out, student_out = self.teacher(x_hat), self.student(x_hat)
            teacher_ce, student_term = self.task.search_terms(teacher_out, student_out, y_hat)
            loss = self.search.alpha * teacher_ce + self.search.beta * student_term  # Eq. 2, terms kept for the log
        check_finite(loss, "Stage II (search)", self.where)
        params = list(self.augmenter.parameters())
        record = {"loss": loss.item(), "teacher_ce": teacher_ce.item(), "student_term": student_term.item(),
                  **self._teacher_on(teacher_out, y_hat)}
        if self.search.diagnostics and self.search_step_count % self.search.diagnostics == 0:
            record.update(term_gradients(teacher_ce, student_term, params))
        self.search_step_count += 1
        grads = torch.autograd.grad(self.search_scaler.scale(loss), params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g.float()
        parallel.average_gradients(params)  # identical logits on every rank
        # Unscales, and skips the step if a gradient overflowed (fp16); a plain step otherwise.
        self.search_scaler.step(self.search_optimiser)
        self.search_scaler.update()
        self.search_optimiser.zero_grad(set_to_none=True)
        return record

    @torch.no_grad()
    def _teacher_on(self, teacher_out: Any, targets: Any) -> dict[str, float]:
        """The teacher's accuracy and mean probability of the true class on x_hat: how well the searched views
        stay within what the teacher handles (the first term of Eq. 2). Empty for a batch without a labelled pixel
        (a mean over no rows would be NaN)."""
        logits, labels, _ = self.task.class_scores(teacher_out, targets)
        if labels.numel() == 0:
            return {}
        probabilities = logits.float().softmax(1)
        return {"teacher_accuracy": (probabilities.argmax(1) == labels).float().mean().item(),
                "teacher_confidence": probabilities.gather(1, labels[:, None]).mean().item()}

    def train_step(self, x: Tensor, y: Any) -> dict[str, float]:
        """One Stage III step: KD (Eq. 1) on cat([x_hat, x]), x_hat drawn from the policy without gradients.

        Besides the loss and the student's accuracy, it records the teacher's mean probability of the true class
        on x_hat and on x (``teacher_confidence``, ``teacher_confidence_clean``): the paper's Fig. 3, its
        diagnosis of a teacher too sure of itself to pass on much beyond the label (Table 8). Each is a mean over
        the labelled pixels (segmentation), and left out of the record where there are none: a mean over no rows
        would be NaN, and the epoch's means are over the steps that have it.
        """
        x, y = self.prepare.standard(x, y)
        self.augmenter.eval()
        self.student.train()
        with torch.no_grad():
            x_hat, y_hat = self.task.augment(self.augment, x, y)
        inputs, targets = torch.cat([x_hat, x]), self.task.cat(y_hat, y)
        stage = self.stage_three
        with self._autocast():
            with torch.no_grad():
                teacher_out = self.teacher(inputs)  # once per step, for x_hat and x together
            student_out = self.trained_student(inputs)
            loss = self.task.distill_loss(student_out, teacher_out, targets, self.kd, stage.w_ce, stage.w_kl)
        check_finite(loss, "Stage III (KD)", self.where)
        self.optimiser.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        parallel.average_gradients(self.task.parameters())  # DDP averages the student's; the task's are ours
        self.scaler.step(self.optimiser)
        self.scaler.update()
        record = {"loss": loss.item()}
        with torch.no_grad():
            logits, labels, _ = self.task.class_scores(student_out, targets)
            if labels.numel():
                record["accuracy"] = (logits.argmax(1) == labels).float().mean().item()
            t_logits, t_labels, t_image = self.task.class_scores(teacher_out, targets)
            confidence = t_logits.float().softmax(1).gather(1, t_labels[:, None]).squeeze(1)
            augmented = t_image < len(x)  # the first half of the batch is x_hat
            for key, half in (("teacher_confidence", augmented), ("teacher_confidence_clean", ~augmented)):
                if bool(half.any()):
                    record[key] = confidence[half].mean().item()
        return record

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> float:
        """The task's metric of the student on ``loader``, over every rank's share."""
        self.student.eval()
        self.before_search()
        statistics: Tensor | None = None
        for batch in loader:
            x, y = self.prepare.batch(batch)
            x = self.prepare.normalise(x)
            with self._autocast():
                batch_statistics = self.task.statistics(self.student(x), y)
            statistics = batch_statistics if statistics is None else statistics + batch_statistics
        if statistics is None:
            raise DiffAugError("evaluate needs a loader with at least one batch; got an empty one")
        return self.task.metric(parallel.sum_(statistics))

    def epoch_summary(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Means over the steps that recorded each quantity (NaN if none did: nothing to average)."""
        summary = {}
        for name, key in (("train_loss", "loss"), ("teacher_confidence", "teacher_confidence"),
                          ("teacher_confidence_clean", "teacher_confidence_clean")):
            values = [r[key] for r in records if key in r]
            summary[name] = float(np.mean(values)) if values else float("nan")
        return summary

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "augmenter": self.augmenter.state_dict(),
            "task": self.task.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "search_optimiser": self.search_optimiser.state_dict() if self.search_optimiser is not None else {},
            "scaler": self.scaler.state_dict(),
            "search_scaler": self.search_scaler.state_dict(),
            "search_step": self.search_step_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.augmenter.load_state_dict(state["augmenter"])
        self.task.load_state_dict(state.get("task", {}))
        self.optimiser.load_state_dict(state["optimiser"])
        if self.search_optimiser is not None:
            self.search_optimiser.load_state_dict(state["search_optimiser"])
        self.scaler.load_state_dict(state["scaler"])
        self.search_scaler.load_state_dict(state.get("search_scaler", {}))
        self.search_step_count = int(state.get("search_step", 0))


class Supervised:
    """Plain training of ``model`` with cross-entropy on (images, labels) batches: ``prepare`` applies the
    standard augmentation and normalisation, then one SGD step of ``optimiser``."""

    searchable = False
    where = "the start"

    def __init__(self, model: nn.Module, optimiser: torch.optim.Optimizer, prepare: Prepare) -> None:
        self.model, self.optimiser, self.prepare = model, optimiser, prepare

    def policy(self) -> None:
        return None

    def before_search(self) -> None:
        pass

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, float]:
        self.model.train()
        x, y = self.prepare.standard(x, y)
        loss = F.cross_entropy(self.model(x), y)
        check_finite(loss, "supervised (cross-entropy)", self.where)
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> float:
        self.model.eval()
        correct = total = 0
        for batch in loader:
            x, y = self.prepare.batch(batch)
            correct += int((self.model(self.prepare.normalise(x)).argmax(1) == y).sum())
            total += len(y)
        return correct / max(total, 1)

    def epoch_summary(self, records: list[dict[str, Any]]) -> dict[str, float]:
        return {"train_loss": float(np.mean([r["loss"] for r in records])) if records else float("nan")}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimiser": self.optimiser.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
