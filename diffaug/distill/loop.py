"""The Distiller: TST's reference training, Stage II (policy search) in a few whole passes and Stage III (KD) on
every step, put together from its parts: the typed settings (``settings.py``), the two stage steps over a Task and
a KD loss (``steps.Distillation``), the trainer that owns the loop, schedule, checkpoints and random streams
(``trainer.Trainer``) and the DDP helpers (``parallel``).

Runs on CPU and CUDA, in one process or under ``torchrun`` with DistributedDataParallel (gloo on CPU, nccl on
GPU), with optional mixed precision and channels_last, and resumes exactly from a checkpoint, which records the
settings and refuses to resume a run whose settings, modules or data changed.

Defaults follow the authors' CIFAR-100 configuration (DESIGN.md, section 5): Stage III SGD nesterov lr 0.1,
momentum 0.9, weight decay 1e-4, steps x0.1 at 150/180/210 of 240 epochs (scaled to the epochs you ask for);
Stage II SGD lr 0.01 momentum 0.9 on the policy logits only, one pass at 1/8 and one at 3/8 of training
(epochs 30 and 90 of 240), so n_encoder << n_student; alpha = beta = 1, KD temperature 4.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist  # noqa: F401  (tests patch torch.distributed through this module)
from torch import Tensor, nn

from ..errors import DiffAugError
from ..files import write_atomic
from ..policy import PolicyAugmenter
from . import parallel
from .data import data_identity
from .objective import LogitKD, logit_kd
from .parallel import end_distributed_process
from .settings import (PAPER_MILESTONES, RESUMABLE_CHANGES, Run, Search, Settings, StageThree, callable_name,
                       default_milestones)
from .steps import POLICIES, Distillation, Prepare
from .tasks import Task, resolve_task
from .trainer import COUNTERS, Milestones, Trainer, read_checkpoint

__all__ = ["FORMAT_VERSION", "PAPER_MILESTONES", "Distiller", "default_milestones", "end_distributed_process"]

# The checkpoint format: 2 added the settings record ("settings") that ``load`` checks before resuming.
FORMAT_VERSION = 2
_STATE_KEYS = ("student", "augmenter", "task", "optimiser", "search_optimiser", "scaler", "search_scaler",
               *COUNTERS, "history", "rng", "settings")


def _module_record(module: nn.Module, weights: bool = False) -> dict[str, Any]:
    """A module's class and the shape of every tensor of its state (and, for a frozen teacher, a hash of them)."""
    state = module.state_dict()
    record: dict[str, Any] = {"class": f"{type(module).__module__}.{type(module).__qualname__}",
                              "shapes": {k: list(v.shape) for k, v in state.items()}}
    if weights:
        digest = hashlib.sha256()
        for key, value in state.items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        record["sha256"] = digest.hexdigest()
    return record


def _first_difference(saved: Any, current: Any, path: str) -> tuple[str, Any, Any] | None:
    """The first (path, saved, current) at which two JSON-like records differ; None if they are equal."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in [*saved, *(k for k in current if k not in saved)]:
            found = _first_difference(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    return None if saved == current else (path, saved, current)


def check_record(state: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a checkpoint ``state`` whose recorded settings differ from ``current`` (a ``Distiller.record()``,
    or only its ``"settings"`` part: then only the settings are compared), naming the first that differs."""
    saved = state.get("settings")
    if not isinstance(saved, dict):
        raise DiffAugError(f"checkpoint's settings must be a dict; got {type(saved).__name__}")
    if set(current) == {"settings"}:
        saved = {"settings": saved.get("settings")}
    found = _first_difference(saved, current, "")
    if found is not None:
        path, was, now = found
        name = path.removeprefix("settings.")
        raise DiffAugError(f"checkpoint was written with {name}={was!r}; this Distiller has {name}={now!r} "
                           "(resume with the settings, modules and data the run started with)")


def resumable_keywords(settings: Settings) -> dict[str, Any]:
    """The settings a resume must keep, by keyword (all but where it runs and whether it shows progress)."""
    return {k: v for k, v in settings.keywords().items() if k not in RESUMABLE_CHANGES}


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
        optimiser: instead of Stage III's SGD, a function from the parameters to train to a
            ``torch.optim.Optimizer`` (e.g. ``lambda params: torch.optim.Adam(params, lr=3e-3)``); the milestones
            scale its learning rates alike.
        settings: the run's ``Settings`` (``StageThree``, ``Search``, ``Run``); or, as keywords, each setting by
            its name (listed with its group in ``settings.KEYWORDS``):
            Stage III (``StageThree``): lr, momentum, weight_decay, nesterov (the paper's SGD), milestones, gamma
            (the learning rate x gamma at those epochs; default milestone_fractions of the epochs of ``fit``, the
            paper's 150/180/210 of 240), kd ("kd" Eq. 1's tau^2 KL, "dkd", "dist": the names of
            ``objective.KD_LOSSES``, or a callable
            ``kd(student_logits, teacher_logits, targets)``), temperature, w_ce, w_kl (Eq. 1's weights).
            Stage II (``Search``): search_epochs (epochs at whose start it runs; default 1/8 and 3/8 of the
            epochs), search_steps (steps a block; default one pass over the data, more runs several passes, each
            in its own seeded order), search_lr, search_momentum (SGD on the logits), alpha, beta (Eq. 2's
            weights), search_diagnostics (every this many steps, also record the norms of Eq. 2's two gradients
            and their cosine; 0 never; the step itself is unchanged).
            The run (``Run``): seed (the data order, the policy draws offset by rank, the global RNGs), mean, std
            (the dataset's normalisation, applied on the device after ``standard_augment``, in both stages and
            in ``evaluate``; a PolicyAugmenter must then be built with the same ``mean`` and ``std``), device,
            amp (None, "bf16" or "fp16" on CUDA with a GradScaler), channels_last, progress (bars on stderr,
            rank 0 only).

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
        optimiser: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        lr: float = StageThree.lr,
        momentum: float = StageThree.momentum,
        weight_decay: float = StageThree.weight_decay,
        nesterov: bool = StageThree.nesterov,
        milestones: Sequence[int] | None = StageThree.milestones,
        gamma: float = StageThree.gamma,
        milestone_fractions: Sequence[float] = StageThree.milestone_fractions,
        kd: str | LogitKD = StageThree.kd,
        temperature: float = StageThree.temperature,
        w_ce: float = StageThree.w_ce,
        w_kl: float = StageThree.w_kl,
        search_epochs: Sequence[int] | None = Search.epochs,
        search_steps: int | None = Search.steps,
        search_lr: float = Search.lr,
        search_momentum: float = Search.momentum,
        search_diagnostics: int = Search.diagnostics,
        alpha: float = Search.alpha,
        beta: float = Search.beta,
        seed: int = Run.seed,
        mean: Sequence[float] | None = Run.mean,
        std: Sequence[float] | None = Run.std,
        device: str | torch.device = Run.device,
        amp: Literal["bf16", "fp16"] | None = Run.amp,
        channels_last: bool = Run.channels_last,
        progress: bool = Run.progress,
    ) -> None:
        given = {k: v for k, v in locals().items() if k in _KEYWORDS}
        self._build(teacher, student, augmenter, task, standard_augment, optimiser, Settings.from_keywords(**given))

    @classmethod
    def from_settings(cls, teacher: nn.Module, student: nn.Module, augmenter: nn.Module, settings: Settings, *,
                      task: str | Task = "classification", standard_augment: Callable | None = None,
                      optimiser: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None) -> Distiller:
        """The Distiller of ``settings`` (the keywords of ``Distiller(...)`` grouped as typed objects; a setting
        is given one way or the other, never both)."""
        distiller = cls.__new__(cls)
        distiller._build(teacher, student, augmenter, task, standard_augment, optimiser, settings)
        return distiller

    def _build(self, teacher: nn.Module, student: nn.Module, augmenter: nn.Module, task: str | Task,
               standard_augment: Callable | None, optimiser: Callable | None, settings: Settings) -> None:
        if not isinstance(settings, Settings):
            raise DiffAugError(f"settings must be a diffaug.distill.Settings; got {type(settings).__name__}")
        stage_three, search, run = settings.stage_three, settings.search, settings.run
        if not isinstance(augmenter, nn.Module):
            raise DiffAugError("augmenter must be a PolicyAugmenter or another nn.Module; got "
                               f"{type(augmenter).__name__}")
        searchable = isinstance(augmenter, PolicyAugmenter)
        if not searchable and (search.epochs is None or len(search.epochs) > 0):
            given = None if search.epochs is None else list(search.epochs)
            raise DiffAugError(f"Stage II searches a PolicyAugmenter's logits; with a {type(augmenter).__name__} "
                               f"augmenter pass search_epochs=[]; got search_epochs={given!r}")
        task = resolve_task(task)
        if task.moves_targets and not isinstance(augmenter, nn.Identity):
            geometry = getattr(augmenter, "geometry", None)
            if not isinstance(augmenter, POLICIES) or geometry != "composed":
                raise DiffAugError(
                    f"a {type(task).__name__} task's targets must follow the augmentation: pass a PolicyAugmenter "
                    'or ReferencePolicy with geometry="composed" (or nn.Identity() for none); got a '
                    f"{type(augmenter).__name__}" + (f" with geometry={geometry!r}" if geometry else ""))
            ignore = getattr(task, "ignore_index", None)
            if ignore is not None and ignore != augmenter.ignore_index:
                raise DiffAugError(f"the augmenter's ignore_index ({augmenter.ignore_index}) must be the task's "
                                   f"({ignore}): it labels the pixels brought in from outside the image")
        if standard_augment is not None and not callable(standard_augment):
            raise DiffAugError(f"standard_augment must be callable as f(images, generator); got {standard_augment!r}")
        normalisation = _normalisation(run, augmenter)
        self.settings = settings
        self.device = torch.device(run.device)
        self.rank, self.world = parallel.rank(), parallel.world()
        self.seed = run.seed
        memory_format = torch.channels_last if run.channels_last else torch.preserve_format
        self.teacher = teacher.to(self.device, memory_format=memory_format).eval().requires_grad_(False)
        self.student = student.to(self.device, memory_format=memory_format)
        self.augmenter = augmenter.to(self.device)
        self.task = task.to(self.device)
        self.trained_student = parallel.wrap(self.student, self.device)
        # Start every rank from rank 0's policy, so the logits stay identical (Stage II averages gradients).
        parallel.broadcast_(p.data for p in self.augmenter.parameters())
        # The task's own parameters (a mimic adapter) learn with the student.
        trained = [*self.student.parameters(), *self.task.parameters()]
        if optimiser is None:
            self.optimiser = torch.optim.SGD(trained, lr=stage_three.lr, momentum=stage_three.momentum,
                                             weight_decay=stage_three.weight_decay, nesterov=stage_three.nesterov)
        else:
            self.optimiser = optimiser(trained)
            if not isinstance(self.optimiser, torch.optim.Optimizer):
                raise DiffAugError("optimiser must return a torch.optim.Optimizer; got "
                                   f"{type(self.optimiser).__name__}")
        # A fixed augmenter has nothing to search (and may have no parameters at all, which SGD refuses).
        self.search_optimiser = torch.optim.SGD(
            self.augmenter.parameters(), lr=search.lr, momentum=search.momentum) if searchable else None
        self.generator = torch.Generator().manual_seed(run.seed + 1000 * self.rank)  # policy draws differ per rank
        prepare = Prepare(self.task, self.device, memory_format, standard_augment, normalisation, self.generator)
        self.stages = Distillation(self.teacher, self.student, self.trained_student, self.augmenter, self.task,
                                   logit_kd(stage_three.kd, stage_three.temperature), stage_three, search, prepare,
                                   self.optimiser, self.search_optimiser, run.amp)
        self.trainer = Trainer(self.stages, self.optimiser, _schedule(stage_three), seed=run.seed,
                               generator=self.generator, progress=run.progress, searches=search.epochs, search_steps=search.steps, metric_name=task.metric_name)
        self._teacher_record = _module_record(self.teacher, weights=True)
        self._standard_augment = None if standard_augment is None else callable_name(standard_augment)
        self._data: dict[str, Any] | None = None  # the training data's identity, from fit or from a checkpoint
        torch.manual_seed(run.seed + self.rank)

    # -- the settings that tests and scripts still read (and a few set) as attributes --------------------------

    @property
    def searchable(self) -> bool:
        return self.stages.searchable

    @property
    def epoch(self) -> int:
        return self.trainer.epoch

    @property
    def history(self) -> dict[str, list[dict[str, Any]]]:
        return self.trainer.history

    @property
    def milestones(self) -> tuple[int, ...] | None:
        return self.settings.stage_three.milestones

    @milestones.setter
    def milestones(self, value: Sequence[int] | None) -> None:
        stage_three = dataclasses.replace(self.settings.stage_three, milestones=value)
        self.settings = dataclasses.replace(self.settings, stage_three=stage_three)
        self.stages.stage_three = stage_three
        self.trainer.schedule = Milestones(stage_three.milestones, stage_three.gamma, stage_three.milestone_fractions)

    @property
    def search_epochs(self) -> tuple[int, ...] | None:
        return self.settings.search.epochs

    @search_epochs.setter
    def search_epochs(self, value: Sequence[int] | None) -> None:
        search = dataclasses.replace(self.settings.search, epochs=value)
        self.settings = dataclasses.replace(self.settings, search=search)
        self.stages.search = search
        self.trainer.searches = search.epochs

    # -- training ------------------------------------------------------------------------------------------------

    def search_step(self, x: Tensor, y: Any) -> dict[str, float]:
        """One Stage II step (``steps.Distillation.search_step``): only the augmenter's logits move."""
        return self.stages.search_step(x, y)

    def train_step(self, x: Tensor, y: Any) -> dict[str, float]:
        """One Stage III step (``steps.Distillation.train_step``): KD on cat([x_hat, x])."""
        return self.stages.train_step(x, y)

    def evaluate(self, loader: Iterable) -> float:
        """The task's metric of the student on ``loader``, over every rank's share: top-1 accuracy for
        classification, mean IoU for segmentation, box error in pixels for ``Localisation``."""
        return self.stages.evaluate(loader)

    def fit(self, train_loader: Iterable, epochs: int, val_loader: Iterable | None = None,
            checkpoint: str | os.PathLike | None = None) -> dict[str, list[dict[str, Any]]]:
        """Train from the current epoch up to ``epochs``; save ``checkpoint`` (atomically) after every epoch.

        Returns the history: ``search`` (Stage II steps: losses and the policy), ``train`` (Stage III steps) and
        ``epochs`` (the policy, mean losses and validation accuracy per epoch); every record has its
        ``iteration``, counting Stage II and Stage III steps together. Pass a shuffled DataLoader with a
        ``generator`` (or a DistributedSampler) for an exactly resumable data order. A run resumed from a
        checkpoint must be given the data it was trained on (when its identity is known: see
        ``data.data_identity``).
        """
        identity = data_identity(train_loader)
        if self._data is not None and identity is not None and identity != self._data:
            raise DiffAugError(f"the checkpoint was written for training data {self._data}; this train_loader has "
                               f"{identity}: resume with the data the run started on")
        self._data = identity if identity is not None else self._data
        save = None if checkpoint is None else (lambda: self.save(checkpoint))
        return self.trainer.fit(train_loader, epochs, val_loader, save)

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """What a checkpoint records of this run besides its state: the settings (by keyword), the modules'
        classes and tensor shapes (and the teacher's weights' hash), the augmenter's settings, the optimiser and
        the training data's identity. ``load`` refuses a checkpoint whose record differs."""
        keywords = resumable_keywords(self.settings)
        augmenter = _module_record(self.augmenter)
        if hasattr(self.augmenter, "settings") and callable(self.augmenter.settings):
            augmenter["settings"] = self.augmenter.settings()
        optimiser = {"class": type(self.optimiser).__name__,
                     "groups": [len(group["params"]) for group in self.optimiser.param_groups],
                     "defaults": {k: v for k, v in self.optimiser.defaults.items()
                                  if isinstance(v, (bool, int, float, str, type(None)))}}
        return {"settings": keywords, "teacher": self._teacher_record, "student": _module_record(self.student),
                "augmenter": augmenter, "task": _module_record(self.task), "optimiser": optimiser,
                "standard_augment": self._standard_augment, "data": self._data}

    def state_dict(self) -> dict[str, Any]:
        return {**self.trainer.state_dict(), "format": FORMAT_VERSION, "settings": self.record()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` after checking all of it: its format, every part a resume needs, the recorded
        settings, modules and optimiser against this Distiller's, and that every part loads (into copies). Any
        mismatch raises a DiffAugError naming it, and then nothing has changed."""
        self._check(state)
        self.trainer.load_state_dict(state)
        self._data = state["settings"].get("data")

    def _check(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise DiffAugError(f"checkpoint must hold a dict written by Distiller.save; got {type(state).__name__}")
        if state.get("format") != FORMAT_VERSION:
            raise DiffAugError(f"checkpoint must be format {FORMAT_VERSION} (a Distiller checkpoint with its settings "
                               f"recorded); got format {state.get('format')!r}, which cannot be checked, so it is "
                               "not resumed")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise DiffAugError(f"checkpoint must hold {list(_STATE_KEYS)}; missing {missing}")
        for key in COUNTERS:
            value = state[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DiffAugError(f"checkpoint's {key} must be an int >= 0; got {value!r}")
        try:
            history = json.loads(state["history"])
        except (TypeError, ValueError):
            history = None
        lists = ("search", "train", "epochs")
        if not (isinstance(history, dict) and all(isinstance(history.get(k), list) for k in lists)):
            raise DiffAugError("checkpoint's history must be the JSON of a dict with the lists 'search', 'train' and "
                               f"'epochs'; got {str(state['history'])[:60]!r}")
        Trainer.check_rng_state(state["rng"])
        for rank, rng in enumerate(state.get("rng_ranks", [])):
            Trainer.check_rng_state(rng, f"rng_ranks[{rank}]")
        current = self.record()
        current["data"] = state["settings"].get("data") if isinstance(state["settings"], dict) else None
        check_record(state, current)  # the data is checked by fit, which sees the loader
        # Every part must load; tried on copies, so that a failure leaves this Distiller as it was.
        trials = [(copy.deepcopy(self.student), "student"), (copy.deepcopy(self.augmenter), "augmenter"),
                  (copy.deepcopy(self.task), "task"), (copy.deepcopy(self.optimiser), "optimiser"),
                  (copy.deepcopy(self.stages.scaler), "scaler"),
                  (copy.deepcopy(self.stages.search_scaler), "search_scaler")]
        if self.search_optimiser is not None:
            trials.append((copy.deepcopy(self.search_optimiser), "search_optimiser"))
        for target, key in trials:
            try:
                target.load_state_dict(state[key])
            except Exception as error:  # noqa: BLE001  (torch raises RuntimeError, KeyError, ValueError)
                reason = str(error).split("\n")[0]
                raise DiffAugError(f"checkpoint's {key} does not fit this Distiller's ({reason})") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint atomically (by rank 0, with every rank's random streams): an interruption leaves the
        previous one intact. Call it on every rank."""
        self.trainer.save(path, {"format": FORMAT_VERSION, "settings": self.record()})

    def load(self, path: str | os.PathLike, train_loader: Iterable | None = None) -> None:
        """Resume from a checkpoint written by ``save``: everything is checked first (``load_state_dict``). Give the
        ``train_loader`` the run will continue on to have its data checked here too, before anything changes;
        otherwise ``fit`` checks it, before training but after the state was loaded."""
        state = read_checkpoint(path, self.device)
        identity = None if train_loader is None else data_identity(train_loader)
        saved = state.get("settings", {}).get("data") if isinstance(state, dict) and isinstance(
            state.get("settings"), dict) else None
        if identity is not None and saved is not None and identity != saved:
            raise DiffAugError(f"the checkpoint was written for training data {saved}; this train_loader has "
                               f"{identity}: resume with the data the run started on")
        self.load_state_dict(state)

    def save_history(self, path: str | os.PathLike) -> None:
        """The history as JSON, written atomically."""
        text = json.dumps(self.history)
        write_atomic(path, lambda temporary: Path(temporary).write_text(text))


_KEYWORD_DEFAULTS = Distiller.__init__.__kwdefaults__
_KEYWORDS = frozenset(_KEYWORD_DEFAULTS) - {"task", "standard_augment", "optimiser"}


def _schedule(stage_three: StageThree) -> Milestones:
    return Milestones(stage_three.milestones, stage_three.gamma, stage_three.milestone_fractions)


def _normalisation(run: Run, augmenter: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(mean, std) as (C,) tensors, checked against a policy augmenter's own; None for no normalisation."""
    if run.mean is None:
        return None
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32) for v in (run.mean, run.std))
    if isinstance(augmenter, POLICIES):
        own = (augmenter.mean, augmenter.std)
        if own[0] is None or not (torch.allclose(own[0].flatten().cpu(), mean_t) and
                                  torch.allclose(own[1].flatten().cpu(), std_t)):
            got = "none" if own[0] is None else f"mean={own[0].flatten().tolist()}, std={own[1].flatten().tolist()}"
            raise DiffAugError(f"the augmenter sees normalised images, so it must be built with the Distiller's "
                               f"mean={list(run.mean)} and std={list(run.std)} (PolicyAugmenter(mean=..., std=...)); "
                               f"it has {got}")
    return mean_t, std_t
