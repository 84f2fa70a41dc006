"""A reference TST training loop: Stage II (policy search) in a few whole passes, Stage III (KD) on every step.

Runs on CPU and CUDA, in one process or under ``torchrun`` with DistributedDataParallel (gloo on CPU, nccl on
GPU), with optional mixed precision and channels_last, and resumes exactly from a checkpoint.

Defaults follow the authors' CIFAR-100 configuration (DESIGN.md, section 5): Stage III SGD nesterov lr 0.1,
momentum 0.9, weight decay 1e-4, steps x0.1 at 150/180/210 of 240 epochs (scaled to the epochs you ask for);
Stage II SGD lr 0.01 momentum 0.9 on the policy logits only, one pass at 1/8 and one at 3/8 of training
(epochs 30 and 90 of 240), so n_encoder << n_student; alpha = beta = 1, KD temperature 4.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffAugError
from ..files import write_atomic
from ..fit import Progress
from ..policy import PolicyAugmenter, ReferencePolicy
from ..targets import Augmented
from .objective import LogitKD, logit_kd
from .tasks import Task, resolve_task

__all__ = ["Distiller", "default_milestones", "end_distributed_process"]

# Augmenters that draw from the Distiller's generator and report a policy; other modules use the global RNG.
_POLICIES = (PolicyAugmenter, ReferencePolicy)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def end_distributed_process(code: int = 0) -> NoReturn:
    """End a torchrun worker that has finished its work: destroy the process group (if there is one), flush
    stdout and stderr, and exit with ``code`` at once, without the interpreter's finalisation.

    Why: with torch 2.13 a DistributedDataParallel wrapper leaves references to its process group behind (its
    constructor raised the group's reference count by 11 and deleting it lowered it by 1, gloo, measured), so no
    ``del`` frees the group and its threads are still running when the interpreter finalises. There they aborted
    a worker that had written all its results ("terminate called without an active exception", SIGABRT: in CI, in
    1 of 12 runs of the recipe's 2-rank test where it was counted; 0 of 25 on an idle machine).
    ``os._exit`` runs no finaliser and no atexit handler: close or write your files before (the Distiller writes
    its checkpoint and history atomically and closes them)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# The paper's CIFAR steps: epochs 150, 180 and 210 of 240.
PAPER_MILESTONES = (150 / 240, 180 / 240, 210 / 240)


def default_milestones(epochs: int, fractions: Sequence[float] = PAPER_MILESTONES) -> list[int]:
    """The epochs at which Stage III's learning rate drops: ``fractions`` of the way through (by default the
    paper's 150, 180 and 210 of 240), scaled to ``epochs``."""
    return [round(epochs * f) for f in fractions]


def _normalisation(mean: Sequence[float] | None, std: Sequence[float] | None,
                   augmenter: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(mean, std) as (1, C, 1, 1) tensors, checked against a policy augmenter's own; None for no normalisation."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise DiffAugError(f"mean and std must be given together; got mean={mean!r}, std={std!r}")
    mean_t, std_t = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in (mean, std))
    if mean_t.shape != std_t.shape or not bool((std_t > 0).all()):
        raise DiffAugError(f"mean and std must be as many numbers each, std > 0; got mean={mean!r}, std={std!r}")
    if isinstance(augmenter, _POLICIES):
        own = (augmenter.mean, augmenter.std)
        if own[0] is None or not (torch.allclose(own[0].flatten().cpu(), mean_t) and
                                  torch.allclose(own[1].flatten().cpu(), std_t)):
            got = "none" if own[0] is None else f"mean={own[0].flatten().tolist()}, std={own[1].flatten().tolist()}"
            raise DiffAugError(f"the augmenter sees normalised images, so it must be built with the Distiller's "
                               f"mean={list(mean)} and std={list(std)} (PolicyAugmenter(mean=..., std=...)); it has {got}")
    return mean_t.view(1, -1, 1, 1), std_t.view(1, -1, 1, 1)


def _term_gradients(teacher_term: Tensor, student_term: Tensor, params: list[nn.Parameter]) -> dict[str, float]:
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


def _search_summary(before: dict[str, dict[str, float]] | None, records: list[dict[str, Any]]) -> dict[str, float]:
    """A search block in a few numbers: the mean of each logged quantity over its steps, and how far it moved the
    policy (the largest change of any probability, ``max_dp``, and of any magnitude, ``max_dm``)."""
    if not records:
        return {}
    summary = {k: float(np.mean([r[k] for r in records if k in r])) for k in records[0] if k in _SEARCH_LOGGED}
    summary |= {k: float(np.mean([r[k] for r in records if k in r])) for k in _GRADIENT_LOGGED
                if any(k in r for r in records)}
    if before is not None:
        after = records[-1]["policy"]
        for key, name in (("probability", "max_dp"), ("magnitude", "max_dm")):
            summary[name] = max((abs(after[op][key] - before[op][key]) for op in before if key in before[op]),
                                default=0.0)
    return summary


_SEARCH_LOGGED = ("teacher_ce", "student_term", "teacher_accuracy", "teacher_confidence")
_GRADIENT_LOGGED = ("grad_norm_teacher", "grad_norm_student", "grad_cosine")


def _numpy_state() -> list[Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]


class Distiller:
    """Distil ``teacher`` into ``student`` on augmentations searched by ``augmenter`` (TST).

    Args:
        teacher, student: models of the task (classifiers mapping images to logits, by default); the teacher is
            frozen throughout.
        augmenter: the PolicyAugmenter whose probability and magnitude logits Stage II learns; or any module
            mapping an image batch to an augmented one (a ``ReferencePolicy``, kornia's ``RandAugment``,
            ``nn.Identity()`` for plain KD) to train on a fixed augmentation with no search (then
            ``search_epochs`` must be empty).
        task: "classification" (labels), "segmentation" (per-pixel labels) or a ``diffaug.distill.Task`` (e.g.
            ``Localisation``): what the loader's targets are, how they follow the augmentation, what Stage II's
            two terms and Stage III's loss are, and the metric of ``evaluate``. Tasks whose targets move (masks,
            boxes) need an augmenter with ``geometry="composed"`` (or ``nn.Identity()``).
        standard_augment: applied to every training batch on the device before both stages, as
            ``standard_augment(images, generator)`` (for tasks whose targets move: ``standard_augment(images,
            targets, generator) -> (images, targets)``); the paper's baselines all use a padded random crop and a
            flip (``diffaug.distill.data.random_crop_flip``). Drawn from the Distiller's seeded generator, so
            runs stay reproducible and resume exactly. Default: none.
        mean, std: the dataset's normalisation (per channel), for loaders that yield images in [0, 1]: applied on
            the device after ``standard_augment``, in both stages and in ``evaluate``, so the models see normalised
            images. A PolicyAugmenter must then be built with the same ``mean`` and ``std`` (it works in [0, 1]
            inside). Default: none (the loader's images go to the models as they are).
        lr, momentum, weight_decay, nesterov: Stage III SGD (the paper's).
        optimiser: instead, a function from the parameters to train to a ``torch.optim.Optimizer`` (e.g.
            ``lambda params: torch.optim.Adam(params, lr=3e-3)``); the milestones scale its learning rates alike.
        milestones: epochs at which the Stage III learning rate is multiplied by ``gamma`` (default 150/180/210
            of 240, scaled to the number of epochs given to ``fit``).
        search_epochs: epochs at whose start Stage II runs (default 1/8 and 3/8 of the epochs).
        search_steps: Stage II steps per search block (default: one whole pass over the data; more than a pass
            runs several passes, each in its own seeded order).
        search_lr, search_momentum: Stage II SGD on the augmenter's logits.
        search_diagnostics: every this many Stage II steps, also record the norms of Eq. 2's two terms' gradients
            and their cosine (two extra backward passes; 0 never). The step itself is unchanged.
        alpha, beta: weights of Eq. 2; temperature, w_ce, w_kl: weights of Eq. 1.
        kd: Stage III's distillation term next to w_ce CE: "kd" (Eq. 1's tau^2 KL), "dkd" (Decoupled KD) or
            "dist" (DIST), at ``temperature``; or a callable ``kd(student_logits, teacher_logits, targets)``.
        device: where to train; amp: None, "bf16" or "fp16" (CUDA; fp16 uses a GradScaler); channels_last: use the
            channels_last memory format for the models.
        seed: seeds the data order, the policy draws (offset by rank) and the global RNGs.
        progress: print a progress line per epoch to stderr (rank 0 only).

    Example (``python -m diffaug.distill`` runs this on MNIST)::

        distiller = Distiller(teacher, student, PolicyAugmenter())
        history = distiller.fit(train_loader, epochs=240, val_loader=val_loader, checkpoint="run/checkpoint.pt")
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        augmenter: nn.Module,
        *,
        task: str | Task = "classification",
        standard_augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = True,
        optimiser: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        milestones: Sequence[int] | None = None,
        gamma: float = 0.1,
        search_epochs: Sequence[int] | None = None,
        search_steps: int | None = None,
        search_lr: float = 0.01,
        search_momentum: float = 0.9,
        search_diagnostics: int = 4,
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 4.0,
        w_ce: float = 1.0,
        w_kl: float = 1.0,
        kd: str | LogitKD = "kd",
        device: str | torch.device = "cpu",
        amp: Literal["bf16", "fp16"] | None = None,
        channels_last: bool = False,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        if not isinstance(augmenter, nn.Module):
            raise DiffAugError(f"augmenter must be a PolicyAugmenter or another nn.Module; got {type(augmenter).__name__}")
        self.searchable = isinstance(augmenter, PolicyAugmenter)
        if not self.searchable and (search_epochs is None or len(search_epochs) > 0):
            raise DiffAugError(f"Stage II searches a PolicyAugmenter's logits; with a {type(augmenter).__name__} "
                               f"augmenter pass search_epochs=[]; got search_epochs={search_epochs!r}")
        self.task = resolve_task(task)
        if self.task.moves_targets and not isinstance(augmenter, nn.Identity):
            geometry = getattr(augmenter, "geometry", None)
            if not isinstance(augmenter, _POLICIES) or geometry != "composed":
                raise DiffAugError(
                    f"a {type(self.task).__name__} task's targets must follow the augmentation: pass a PolicyAugmenter "
                    'or ReferencePolicy with geometry="composed" (or nn.Identity() for none); got a '
                    f"{type(augmenter).__name__}" + (f" with geometry={geometry!r}" if geometry else ""))
            ignore = getattr(self.task, "ignore_index", None)
            if ignore is not None and ignore != augmenter.ignore_index:
                raise DiffAugError(f"the augmenter's ignore_index ({augmenter.ignore_index}) must be the task's "
                                   f"({ignore}): it labels the pixels brought in from outside the image")
        if standard_augment is not None and not callable(standard_augment):
            raise DiffAugError(f"standard_augment must be callable as f(images, generator); got {standard_augment!r}")
        self.standard_augment = standard_augment
        self.normalisation = _normalisation(mean, std, augmenter)
        if amp not in (None, "bf16", "fp16"):
            raise DiffAugError(f"amp must be None, 'bf16' or 'fp16'; got {amp!r}")
        self.device = torch.device(device)
        if amp == "fp16" and self.device.type != "cuda":
            raise DiffAugError(f"amp='fp16' needs a CUDA device; got device {str(self.device)!r} (use 'bf16' or None)")
        self.rank, self.world = _rank(), _world()
        self.seed = seed
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        if self.normalisation is not None:
            self.normalisation = tuple(t.to(self.device) for t in self.normalisation)
        self.teacher = teacher.to(self.device, memory_format=memory_format).eval().requires_grad_(False)
        self.student = student.to(self.device, memory_format=memory_format)
        self.augmenter = augmenter.to(self.device)
        self.task = self.task.to(self.device)
        self.trained_student: nn.Module = self.student
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.trained_student = nn.parallel.DistributedDataParallel(self.student, device_ids=device_ids)
            # Start every rank from rank 0's policy, so the logits stay identical (Stage II averages gradients).
            for p in self.augmenter.parameters():
                dist.broadcast(p.data, src=0)
        # The task's own parameters (a mimic adapter) learn with the student.
        trained = [*self.student.parameters(), *self.task.parameters()]
        if optimiser is None:
            self.optimiser = torch.optim.SGD(trained, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                             nesterov=nesterov)
        else:
            self.optimiser = optimiser(trained)
            if not isinstance(self.optimiser, torch.optim.Optimizer):
                raise DiffAugError(f"optimiser must return a torch.optim.Optimizer; got {type(self.optimiser).__name__}")
        # A fixed augmenter has nothing to search (and may have no parameters at all, which SGD refuses).
        self.search_optimiser = torch.optim.SGD(
            self.augmenter.parameters(), lr=search_lr, momentum=search_momentum) if self.searchable else None
        self.milestones, self.gamma = milestones, gamma
        self.search_epochs, self.search_steps = search_epochs, search_steps
        if not isinstance(search_diagnostics, int) or isinstance(search_diagnostics, bool) or search_diagnostics < 0:
            raise DiffAugError(f"search_diagnostics must be an int >= 0 (every how many Stage II steps; 0 never); "
                               f"got {search_diagnostics!r}")
        self.search_diagnostics = search_diagnostics
        self.search_step_count = 0
        self.alpha, self.beta = alpha, beta
        self.temperature, self.w_ce, self.w_kl = temperature, w_ce, w_kl
        self.kd = logit_kd(kd, temperature)
        self.amp = amp
        self.memory_format = memory_format
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        # Stage II's gradients underflow in fp16 as Stage III's would (measured on CUDA: cosine 0.996 to float32
        # and 4-6 % of the norm lost on 128 photo patches): scaled the same way, by a scaler of their own.
        self.search_scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.progress = progress and self.rank == 0
        self.generator = torch.Generator().manual_seed(seed + 1000 * self.rank)  # policy draws differ per rank
        torch.manual_seed(seed + self.rank)
        self.epoch = 0
        self.step = 0  # Stage III steps
        self.iteration = 0  # Stage II and Stage III steps together, the x axis of the history
        self.history: dict[str, list[dict[str, Any]]] = {"search": [], "train": [], "epochs": []}

    # ----------------------------------------------------------------------------------------------------------

    def _autocast(self) -> Any:
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def _batch(self, batch: Any) -> tuple[Tensor, Any]:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise DiffAugError(f"train_loader must yield (images, targets) pairs; got {type(batch).__name__}")
        x, y = batch[0].to(self.device, non_blocking=True), self.task.unpack(batch, self.device)
        return x.contiguous(memory_format=self.memory_format), y

    def _check_finite(self, loss: Tensor, stage: str) -> None:
        if not torch.isfinite(loss):
            raise DiffAugError(
                f"the {stage} loss became {loss.item()} at epoch {self.epoch}, step {self.step}; training stopped "
                "before anything was saved, so the last checkpoint is intact (lower the learning rate or use bf16)"
            )

    def _normalise(self, x: Tensor) -> Tensor:
        if self.normalisation is None:
            return x
        mean, std = self.normalisation
        return ((x - mean) / std).contiguous(memory_format=self.memory_format)

    def _standard(self, x: Tensor, y: Any) -> tuple[Tensor, Any]:
        if self.standard_augment is not None:
            x, y = self.task.standard(self.standard_augment, x, y, self.generator)
        return self._normalise(x), y

    def _augment(self, x: Tensor, **targets: Any) -> Tensor | Augmented:
        if isinstance(self.augmenter, _POLICIES):
            return self.augmenter(x, generator=self.generator, **targets)
        if targets:  # nn.Identity(), the only other augmenter a task with moving targets accepts
            return Augmented(self.augmenter(x), **targets)
        return self.augmenter(x)  # a module with its own randomness (the global RNG, seeded and checkpointed)

    def _policy(self) -> dict[str, dict[str, float]] | None:
        return self.augmenter.policy() if isinstance(self.augmenter, _POLICIES) else None

    def search_step(self, x: Tensor, y: Any) -> dict[str, float]:
        """One Stage II step: only the augmenter's logits move; teacher and student are frozen in eval mode.

        The record's ``teacher_ce`` and ``student_term`` are the task's two terms (for classification, CE of the
        teacher and -log(1 - p_S[y]))."""
        if not self.searchable:
            raise DiffAugError(f"Stage II needs a PolicyAugmenter; this Distiller has a {type(self.augmenter).__name__}")
        x, y = self._standard(x, y)
        self.augmenter.train()
        self.student.eval()
        with self._autocast():
            x_hat, y_hat = self.task.augment(self._augment, x, y)
            teacher_out, student_out = self.teacher(x_hat), self.student(x_hat)
            teacher_ce, student_term = self.task.search_terms(teacher_out, student_out, y_hat)
            loss = self.alpha * teacher_ce + self.beta * student_term  # Eq. 2, as tst_loss, terms kept for the log
        self._check_finite(loss, "Stage II (search)")
        params = list(self.augmenter.parameters())
        record = {"loss": loss.item(), "teacher_ce": teacher_ce.item(), "student_term": student_term.item(),
                  **self._teacher_on(teacher_out, y_hat)}
        if self.search_diagnostics and self.search_step_count % self.search_diagnostics == 0:
            record.update(_term_gradients(teacher_ce, student_term, params))
        self.search_step_count += 1
        grads = torch.autograd.grad(self.search_scaler.scale(loss), params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g.float()
            if self.world > 1:  # identical logits on every rank: average the gradients before stepping
                dist.all_reduce(p.grad)
                p.grad /= self.world
        # Unscales, and skips the step if a gradient overflowed (fp16); a plain step otherwise.
        self.search_scaler.step(self.search_optimiser)
        self.search_scaler.update()
        self.search_optimiser.zero_grad(set_to_none=True)
        return record

    @torch.no_grad()
    def _teacher_on(self, teacher_out: Any, targets: Any) -> dict[str, float]:
        """The teacher's accuracy and mean probability of the true class on x_hat: how well the searched views
        stay within what the teacher handles (the first term of Eq. 2)."""
        logits, labels, _ = self.task.class_scores(teacher_out, targets)
        probabilities = logits.float().softmax(1)
        return {"teacher_accuracy": (probabilities.argmax(1) == labels).float().mean().item(),
                "teacher_confidence": probabilities.gather(1, labels[:, None]).mean().item()}

    def train_step(self, x: Tensor, y: Any) -> dict[str, float]:
        """One Stage III step: KD (Eq. 1) on cat([x_hat, x]), x_hat drawn from the policy without gradients.

        Besides the loss and the student's accuracy, it records the teacher's mean probability of the true class
        on x_hat and on x (``teacher_confidence``, ``teacher_confidence_clean``): the paper's Fig. 3, its
        diagnosis of a teacher too sure of itself to pass on much beyond the label (Table 8).
        """
        x, y = self._standard(x, y)
        self.augmenter.eval()
        self.student.train()
        with torch.no_grad():
            x_hat, y_hat = self.task.augment(self._augment, x, y)
        inputs, targets = torch.cat([x_hat, x]), self.task.cat(y_hat, y)
        with self._autocast():
            with torch.no_grad():
                teacher_out = self.teacher(inputs)  # once per step, for x_hat and x together
            student_out = self.trained_student(inputs)
            loss = self.task.distill_loss(student_out, teacher_out, targets, self.kd, self.w_ce, self.w_kl)
        self._check_finite(loss, "Stage III (KD)")
        self.optimiser.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.world > 1:  # DDP averages the student's gradients; the task's own parameters are averaged here
            for p in self.task.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        self.scaler.step(self.optimiser)
        self.scaler.update()
        with torch.no_grad():
            logits, labels, _ = self.task.class_scores(student_out, targets)
            accuracy = (logits.argmax(1) == labels).float().mean()
            t_logits, t_labels, t_image = self.task.class_scores(teacher_out, targets)
            confidence = t_logits.float().softmax(1).gather(1, t_labels[:, None]).squeeze(1)
            augmented = t_image < len(x)  # the first half of the batch is x_hat
            halves = [confidence[augmented].mean(), confidence[~augmented].mean()]
        return {"loss": loss.item(), "accuracy": accuracy.item(), "teacher_confidence": halves[0].item(),
                "teacher_confidence_clean": halves[1].item()}

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> float:
        """The task's metric of the student on ``loader``, over every rank's share: top-1 accuracy for
        classification, mean IoU for segmentation, box error in pixels for ``Localisation``."""
        self.student.eval()
        self._sync_buffers()
        statistics: Tensor | None = None
        for batch in loader:
            x, y = self._batch(batch)
            x = self._normalise(x)
            with self._autocast():
                batch_statistics = self.task.statistics(self.student(x), y)
            statistics = batch_statistics if statistics is None else statistics + batch_statistics
        if statistics is None:
            raise DiffAugError("evaluate needs a loader with at least one batch; got an empty one")
        if self.world > 1:
            dist.all_reduce(statistics)
        return self.task.metric(statistics)

    # ----------------------------------------------------------------------------------------------------------

    def _schedule(self, epochs: int) -> tuple[list[int], list[int]]:
        milestones = list(self.milestones) if self.milestones is not None else default_milestones(epochs)
        searches = list(self.search_epochs) if self.search_epochs is not None else sorted(
            {min(epochs - 1, math.floor(epochs * f)) for f in (1 / 8, 3 / 8)}
        )
        return milestones, searches

    def _lr_factor(self, epoch: int, milestones: list[int]) -> float:
        return self.gamma ** sum(epoch >= m for m in milestones)

    def _epoch_order(self, loader: Iterable, epoch: int) -> None:
        """Make the data order a function of (seed, epoch), so that a resumed run sees the same batches."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(self.seed * 100003 + epoch)

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's student buffers (BatchNorm statistics) before the student is used in eval mode.

        DDP broadcasts them before each training forward, but that forward then updates each rank's copy with its
        own batch. Stage II and ``evaluate`` must see one student on every rank, and a run resumed from rank 0's
        checkpoint must search as the uninterrupted run did."""
        if self.world > 1:
            for buffer in self.student.buffers():
                dist.broadcast(buffer, src=0)

    def _search_block(self, train_loader: Iterable) -> list[dict[str, Any]]:
        """Stage II for ``search_steps`` steps (default one pass), in as many passes over the data as that takes."""
        self._sync_buffers()
        records: list[dict[str, Any]] = []
        passes = 0
        while True:
            passes += 1
            self._epoch_order(train_loader, 10**6 * passes + self.epoch)
            before = len(records)
            for batch in train_loader:
                if self.search_steps is not None and len(records) >= self.search_steps:
                    break
                record = {"epoch": self.epoch, "iteration": self.iteration, **self.search_step(*self._batch(batch))}
                records.append({**record, "policy": self._policy()})
                self.iteration += 1
            if self.search_steps is None or len(records) >= self.search_steps or len(records) == before:
                return records

    def fit(self, train_loader: Iterable, epochs: int, val_loader: Iterable | None = None,
            checkpoint: str | os.PathLike | None = None) -> dict[str, list[dict[str, Any]]]:
        """Train from the current epoch up to ``epochs``; save ``checkpoint`` (atomically) after every epoch.

        Returns the history: ``search`` (Stage II steps: losses and the policy), ``train`` (Stage III steps) and
        ``epochs`` (the policy, mean losses and validation accuracy per epoch); every record has its
        ``iteration``, counting Stage II and Stage III steps together. Pass a shuffled DataLoader with a
        ``generator`` (or a DistributedSampler) for an exactly resumable data order.
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise DiffAugError(f"epochs must be a positive int; got {epochs!r}")
        milestones, searches = self._schedule(epochs)
        base_lrs = [g.get("initial_lr", g["lr"]) for g in self.optimiser.param_groups]
        for group, base in zip(self.optimiser.param_groups, base_lrs, strict=True):
            group["initial_lr"] = base
        while self.epoch < epochs:
            started = time.perf_counter()
            epoch_record: dict[str, Any] = {"epoch": self.epoch}
            for group in self.optimiser.param_groups:
                group["lr"] = group["initial_lr"] * self._lr_factor(self.epoch, milestones)
            if self.epoch in searches:
                before = self._policy()
                records = self._search_block(train_loader)
                self.history["search"] += records
                epoch_record["search"] = _search_summary(before, records)
            self._epoch_order(train_loader, self.epoch)
            records = []
            steps = len(train_loader) if hasattr(train_loader, "__len__") else 0
            bar = Progress(f"epoch {self.epoch + 1}/{epochs}", sys.stderr if self.progress and steps else None)
            for batch in train_loader:
                record = {"epoch": self.epoch, "iteration": self.iteration, "step": self.step,
                          **self.train_step(*self._batch(batch))}
                self.history["train"].append(record)
                records.append(record)
                bar(len(records) - 1, record["loss"], steps)
                self.step += 1
                self.iteration += 1
            for name, key in (("train_loss", "loss"), ("teacher_confidence", "teacher_confidence"),
                              ("teacher_confidence_clean", "teacher_confidence_clean")):
                epoch_record[name] = float(np.mean([r[key] for r in records])) if records else float("nan")
            epoch_record["lr"] = self.optimiser.param_groups[0]["lr"]
            epoch_record["iteration"] = self.iteration
            epoch_record["policy"] = self._policy()
            if val_loader is not None:
                epoch_record[f"val_{self.task.metric_name}"] = self.evaluate(val_loader)
            self.history["epochs"].append(epoch_record)
            self.epoch += 1
            if checkpoint is not None:
                self.save(checkpoint)
            if self.progress:
                name = f"val_{self.task.metric_name}"
                val = f" {name.replace('_', ' ')} {epoch_record[name]:.4f}" if name in epoch_record else ""
                search = " (searched)" if "search" in epoch_record else ""
                print(f"epoch {self.epoch}/{epochs}{search}: train loss {epoch_record['train_loss']:.4f}{val} "
                      f"[{time.perf_counter() - started:.1f}s]", file=sys.stderr, flush=True)
        return self.history

    # ----------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "augmenter": self.augmenter.state_dict(),
            "task": self.task.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "search_optimiser": self.search_optimiser.state_dict() if self.search_optimiser is not None else {},
            "scaler": self.scaler.state_dict(),
            "search_scaler": self.search_scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "search_step": self.search_step_count,
            "iteration": self.iteration,
            "history": json.dumps(self.history),
            "rng": self._rng_state(),
        }

    def _rng_state(self) -> dict[str, Any]:
        """This process's random streams: the policy generator and the global ones."""
        return {
            "generator": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": json.dumps(random.getstate()),
            "numpy": json.dumps(_numpy_state()),
        }

    def _set_rng_state(self, rng: dict[str, Any]) -> None:
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        version, internal, *rest = json.loads(rng["python"])
        random.setstate((version, tuple(internal), *rest))
        kind, keys, position, has_gauss, cached = json.loads(rng["numpy"])
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.augmenter.load_state_dict(state["augmenter"])
        self.task.load_state_dict(state.get("task", {}))
        self.optimiser.load_state_dict(state["optimiser"])
        if self.search_optimiser is not None:
            self.search_optimiser.load_state_dict(state["search_optimiser"])
        self.scaler.load_state_dict(state["scaler"])
        self.search_scaler.load_state_dict(state.get("search_scaler", {}))
        self.epoch, self.step, self.iteration = int(state["epoch"]), int(state["step"]), int(state["iteration"])
        self.search_step_count = int(state.get("search_step", 0))
        self.history = json.loads(state["history"])
        # Under DDP every rank resumes its own streams (its policy draws differ from the others'); a run resumed
        # on another number of ranks takes rank 0's, offset as a fresh run's are.
        ranks = state.get("rng_ranks", [])
        if len(ranks) == self.world:
            self._set_rng_state(ranks[self.rank])
        else:
            self._set_rng_state(state["rng"])
            if self.rank:
                self.generator.manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)) + self.rank)

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint atomically (by rank 0, with every rank's random streams): an interruption leaves the
        previous one intact. Call it on every rank."""
        ranks: list[Any] = [None] * self.world
        if self.world > 1:  # every rank's random streams, so that each resumes its own
            dist.all_gather_object(ranks, self._rng_state())
        if self.rank == 0:
            state = self.state_dict()
            if self.world > 1:
                state["rng_ranks"] = ranks
            write_atomic(path, lambda temporary: torch.save(state, temporary))
        if self.world > 1:
            dist.barrier()

    def load(self, path: str | os.PathLike) -> None:
        """Resume from a checkpoint written by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise DiffAugError(f"checkpoint must be a file written by Distiller.save; got {str(path)!r}, which is missing")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as error:
            raise DiffAugError(f"checkpoint {path} could not be read ({error}); is it a Distiller checkpoint?") from None
        self.load_state_dict(state)

    def save_history(self, path: str | os.PathLike) -> None:
        """The history as JSON, written atomically."""
        text = json.dumps(self.history)
        write_atomic(path, lambda temporary: Path(temporary).write_text(text))
