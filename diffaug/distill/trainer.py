"""The loop around the steps of ``steps.py``: epochs, the learning-rate schedule, the data order, Stage II's search
blocks, progress bars, the history, the random streams and the checkpoint files. The same trainer trains a
student (``steps.Distillation``) and a teacher (``steps.Supervised``)."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DiffAugError
from ..files import write_atomic
from . import parallel
from .settings import PAPER_MILESTONES, default_milestones
from .steps import Prepare, Supervised, search_summary
from .tasks import Classification

__all__ = ["PAPER_MILESTONES", "Milestones", "PerStep", "Trainer", "default_milestones", "read_checkpoint"]

# What a checkpoint of this trainer holds besides its stage's modules; a missing one is refused before loading.
COUNTERS = ("epoch", "step", "iteration")
RNG_KEYS = ("generator", "torch", "cuda", "python", "numpy")


class Stage(Protocol):
    """What the trainer steps: ``steps.Distillation`` or ``steps.Supervised``."""

    searchable: bool
    where: str
    prepare: Any

    def train_step(self, x: Any, y: Any) -> dict[str, float]: ...
    def search_step(self, x: Any, y: Any) -> dict[str, float]: ...  # only where ``searchable``
    def evaluate(self, loader: Iterable) -> float: ...
    def epoch_summary(self, records: list[dict[str, Any]]) -> dict[str, float]: ...
    def policy(self) -> dict[str, dict[str, float]] | None: ...
    def before_search(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Milestones:
    """The learning rate x ``gamma`` at each of ``milestones`` (epochs; None: ``fractions`` of the epochs of
    ``fit``), set at the start of every epoch from each group's ``initial_lr``: a resumed run needs no state."""

    def __init__(self, milestones: Sequence[int] | None, gamma: float,
                 fractions: Sequence[float] = PAPER_MILESTONES) -> None:
        self.milestones, self.gamma, self.fractions = milestones, gamma, fractions
        self.resolved: list[int] = []

    def start(self, optimiser: torch.optim.Optimizer, epochs: int, steps_per_epoch: int) -> None:
        self.resolved = list(self.milestones) if self.milestones is not None else \
            default_milestones(epochs, self.fractions)
        for group in optimiser.param_groups:
            group["initial_lr"] = group.get("initial_lr", group["lr"])

    def epoch(self, optimiser: torch.optim.Optimizer, epoch: int) -> None:
        factor = self.gamma ** sum(epoch >= m for m in self.resolved)
        for group in optimiser.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def step(self) -> None:
        pass


class PerStep:
    """A torch learning-rate scheduler stepped after every optimiser step: ``make(optimiser, total_steps)``, e.g.
    a cosine over all steps. Its state lives in the scheduler, so a run using it is not resumed mid-way (a teacher
    is trained in one go and cached)."""

    def __init__(self, make: Callable[[torch.optim.Optimizer, int], Any]) -> None:
        self.make, self.scheduler = make, None

    def start(self, optimiser: torch.optim.Optimizer, epochs: int, steps_per_epoch: int) -> None:
        self.scheduler = self.make(optimiser, epochs * steps_per_epoch)

    def epoch(self, optimiser: torch.optim.Optimizer, epoch: int) -> None:
        pass

    def step(self) -> None:
        self.scheduler.step()


def _numpy_state() -> list[Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def read_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu", what: str = "checkpoint") -> Any:
    """A checkpoint file read with ``weights_only=True`` (a crafted pickle cannot run code), with messages that
    say what is wrong with the file rather than torch's."""
    path = Path(path)
    if path.is_dir():
        raise DiffAugError(f"{what} must be a file; got {str(path)!r}, which is a directory")
    if not path.is_file():
        raise DiffAugError(f"{what} must be a file; got {str(path)!r}, which is missing")
    if path.stat().st_size == 0:
        raise DiffAugError(f"{what} {path} is empty (0 bytes): not a checkpoint; was its writing interrupted?")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001  (torch raises many kinds for a bad file)
        reason = str(error).split("\n")[0].strip()
        if "Weights only load failed" in str(error) or "weights_only" in str(error):
            reason = "it holds Python objects other than tensors and plain containers, refused without running them"
        raise DiffAugError(f"{what} {path} could not be read ({reason}); is it a file written by diffaug?") from None


class Trainer:
    """Runs ``stage`` for epochs: the schedule sets the learning rate, Stage II's search blocks (if the stage
    searches) run at the start of ``searches`` epochs, every batch of the loader is a training step.

    It owns the counters (``epoch``, ``step``: training steps, ``iteration``: Stage II and training steps
    together, the x axis of the history), the history, and the run's random streams: ``generator`` (the policy
    draws and the standard augmentation) and the global ones, saved with every checkpoint. With
    ``reorder_data`` the loader's order is a function of (seed, epoch), so that a resumed run sees the same
    batches; without it the loader's own generator runs on (a run that is not resumed mid-way)."""

    def __init__(self, stage: Stage, optimiser: torch.optim.Optimizer, schedule: Milestones | PerStep, *,
                 seed: int, generator: torch.Generator, progress: bool, label: str = "epoch",
                 searches: Sequence[int] | None = (), search_steps: int | None = None, reorder_data: bool = True,
                 metric_name: str = "metric") -> None:
        self.stage, self.optimiser, self.schedule = stage, optimiser, schedule
        self.seed, self.generator, self.label = seed, generator, label
        self.progress = progress and parallel.rank() == 0
        self.searches, self.search_steps = searches, search_steps
        self.reorder_data, self.metric_name = reorder_data, metric_name
        self.epoch = 0
        self.step = 0
        self.iteration = 0
        self.history: dict[str, list[dict[str, Any]]] = {"search": [], "train": [], "epochs": []}

    # -- the loop ------------------------------------------------------------------------------------------------

    def search_epochs(self, epochs: int) -> list[int]:
        if not self.stage.searchable:
            return []
        if self.searches is not None:
            return list(self.searches)
        return sorted({min(epochs - 1, math.floor(epochs * f)) for f in (1 / 8, 3 / 8)})

    def order(self, loader: Iterable, epoch: int) -> None:
        """Make the data order a function of (seed, epoch), so that a resumed run sees the same batches."""
        if not self.reorder_data:
            return
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(self.seed * 100003 + epoch)

    def search_block(self, loader: Iterable) -> list[dict[str, Any]]:
        """Stage II for ``search_steps`` steps (default one pass), in as many passes over the data as that takes."""
        self.stage.before_search()
        records: list[dict[str, Any]] = []
        passes = 0
        while True:
            passes += 1
            self.order(loader, 10**6 * passes + self.epoch)
            before = len(records)
            for batch in loader:
                if self.search_steps is not None and len(records) >= self.search_steps:
                    break
                self.stage.where = f"epoch {self.epoch}, step {self.step}"
                record = {"epoch": self.epoch, "iteration": self.iteration,
                          **self.stage.search_step(*self.stage.prepare.batch(batch))}
                records.append({**record, "policy": policy_numbers(self.stage.policy())})
                self.iteration += 1
            if self.search_steps is None or len(records) >= self.search_steps or len(records) == before:
                return records

    def fit(self, loader: Iterable, epochs: int, val_loader: Iterable | None = None,
            save: Callable[[], None] | None = None) -> dict[str, list[dict[str, Any]]]:
        """Train from the current epoch up to ``epochs``, calling ``save`` after every epoch; returns the history."""
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise DiffAugError(f"epochs must be a positive int; got {epochs!r}")
        steps = _length(loader)
        if steps == 0:
            raise DiffAugError("train_loader must yield at least one batch an epoch; got an empty one (a dataset "
                               "smaller than the batch with drop_last=True?)")
        searches = self.search_epochs(epochs)
        self.schedule.start(self.optimiser, epochs, steps or 0)
        while self.epoch < epochs:
            started = time.perf_counter()
            record: dict[str, Any] = {"epoch": self.epoch}
            self.schedule.epoch(self.optimiser, self.epoch)
            if self.epoch in searches:
                before = policy_numbers(self.stage.policy())
                records = self.search_block(loader)
                self.history["search"] += records
                record["search"] = search_summary(before, records)
            self.order(loader, self.epoch)
            records = []
            bar = tqdm(total=steps, desc=f"{self.label} {self.epoch + 1}/{epochs}", disable=not self.progress,
                       leave=False, file=sys.stderr, dynamic_ncols=True)
            with bar:
                for batch in loader:
                    self.stage.where = f"epoch {self.epoch}, step {self.step}"
                    step_record = {"epoch": self.epoch, "iteration": self.iteration, "step": self.step,
                                   **self.stage.train_step(*self.stage.prepare.batch(batch))}
                    self.schedule.step()
                    self.history["train"].append(step_record)
                    records.append(step_record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_record['loss']:.4f}", refresh=False)
                    self.step += 1
                    self.iteration += 1
            if not records:
                raise DiffAugError(f"train_loader yielded no batch in epoch {self.epoch}; nothing was trained or saved")
            record |= self.stage.epoch_summary(records)
            record["lr"] = self.optimiser.param_groups[0]["lr"]
            record["iteration"] = self.iteration
            record["policy"] = policy_numbers(self.stage.policy())
            name = f"val_{self.metric_name}"
            if val_loader is not None:
                record[name] = self.stage.evaluate(val_loader)
            self.history["epochs"].append(record)
            self.epoch += 1
            if save is not None:
                save()
            if self.progress:
                val = f" {name.replace('_', ' ')} {record[name]:.4f}" if name in record else ""
                search = " (searched)" if "search" in record else ""
                tqdm.write(f"{self.label} {self.epoch}/{epochs}{search}: train loss {record['train_loss']:.4f}{val} "
                           f"[{time.perf_counter() - started:.1f}s]", file=sys.stderr)
        return self.history

    # -- state ---------------------------------------------------------------------------------------------------

    def rng_state(self) -> dict[str, Any]:
        """This process's random streams: the run's generator and the global ones."""
        return {
            "generator": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": json.dumps(random.getstate()),
            "numpy": json.dumps(_numpy_state()),
        }

    @staticmethod
    def check_rng_state(rng: Any, name: str = "rng") -> None:
        """Refuse random streams that ``set_rng_state`` could not restore, before anything is restored."""
        if not isinstance(rng, dict) or any(k not in rng for k in RNG_KEYS):
            missing = [k for k in RNG_KEYS if not isinstance(rng, dict) or k not in rng]
            raise DiffAugError(f"checkpoint's {name} must hold the random streams {list(RNG_KEYS)}; missing {missing}")
        try:
            torch.Generator().set_state(rng["generator"])
            state = rng["torch"]
            if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8
                    and state.shape == torch.get_rng_state().shape):
                raise ValueError("torch's state is not a uint8 tensor of the right size")
            version, internal, *rest = json.loads(rng["python"])
            random.Random().setstate((version, tuple(internal), *rest))
            kind, keys, position, has_gauss, cached = json.loads(rng["numpy"])
            np.random.RandomState().set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
        except Exception as error:  # noqa: BLE001
            raise DiffAugError(f"checkpoint's {name} could not be restored ({error})") from None

    def set_rng_state(self, rng: dict[str, Any]) -> None:
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        version, internal, *rest = json.loads(rng["python"])
        random.setstate((version, tuple(internal), *rest))
        kind, keys, position, has_gauss, cached = json.loads(rng["numpy"])
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))

    def state_dict(self) -> dict[str, Any]:
        return {**self.stage.state_dict(), "epoch": self.epoch, "step": self.step, "iteration": self.iteration,
                "history": json.dumps(self.history), "rng": self.rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state that was checked (``Distiller.load`` checks everything first)."""
        self.stage.load_state_dict(state)
        self.epoch, self.step, self.iteration = int(state["epoch"]), int(state["step"]), int(state["iteration"])
        self.history = json.loads(state["history"])
        # Under DDP every rank resumes its own streams (its policy draws differ from the others'); a run resumed
        # on another number of ranks takes rank 0's, offset as a fresh run's are.
        ranks, rank = state.get("rng_ranks", []), parallel.rank()
        if len(ranks) == parallel.world():
            self.set_rng_state(ranks[rank])
        else:
            self.set_rng_state(state["rng"])
            if rank:
                self.generator.manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)) + rank)

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write a checkpoint atomically (by rank 0, with every rank's random streams): an interruption leaves the
        previous one intact. Call it on every rank."""
        ranks = parallel.all_gather(self.rng_state()) if parallel.world() > 1 else None
        if parallel.rank() == 0:
            state = {**self.state_dict(), **(extra or {})}
            if ranks is not None:
                state["rng_ranks"] = ranks
            write_atomic(path, lambda temporary: torch.save(state, temporary))
        parallel.barrier()


def train_teacher(model: torch.nn.Module, loader: Iterable, epochs: int, device: str | torch.device = "cpu",
                  standard_augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                  seed: int = 0, lr: float = 0.05, weight_decay: float = 5e-4, milestones: Sequence[int] | None = None,
                  *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  progress: bool = False) -> torch.nn.Module:
    """Plain supervised training of ``model`` (a teacher) by the trainer: SGD nesterov, momentum 0.9, a cosine
    schedule over all steps, or with ``milestones`` the learning rate x0.1 at those epochs. ``standard_augment``
    (e.g. ``data.standard_augment("photos")``) and then the normalisation ``mean``/``std`` are applied to every
    batch on the device, drawn from a generator seeded by ``seed``; the loader's own order runs on. ``progress``
    shows the trainer's bars (the recipe command's teacher does). Returns the model in eval mode."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    if milestones is None:
        schedule = PerStep(lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(opt, total))
    else:
        schedule = PerStep(lambda opt, total: torch.optim.lr_scheduler.MultiStepLR(
            opt, [m * (total // epochs) for m in milestones], gamma=0.1))
    normalisation = None if mean is None else (torch.tensor(mean, dtype=torch.float32),
                                               torch.tensor(std, dtype=torch.float32))
    prepare = Prepare(Classification(), device, torch.preserve_format, standard_augment, normalisation, generator)
    trainer = Trainer(Supervised(model, optimiser, prepare), optimiser, schedule, seed=seed, generator=generator,
                      progress=progress, label="teacher epoch", reorder_data=False, metric_name="accuracy")
    trainer.fit(loader, epochs)
    return model.eval()


def policy_numbers(policy: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, float]] | None:
    """A policy's learned numbers alone (each op's probability and magnitude), as the history records them at every
    Stage II step: what they mean under the sampler is the augmenter's ``policy()``, the same at every step."""
    if policy is None:
        return None
    return {op: {k: v[k] for k in ("probability", "magnitude") if k in v} for op, v in policy.items()}
