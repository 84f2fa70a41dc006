"""The Distiller's settings as three small frozen dataclasses, checked when they are built and written into every
checkpoint, so that a resume can refuse a run whose settings changed.

- ``StageThree``: the student's training (SGD, the learning-rate steps, Eq. 1 and its distillation term);
- ``Search``: Stage II (when, how long, its SGD, Eq. 2's weights, diagnostics);
- ``Run``: what makes a run reproducible and where it runs (seed, normalisation, device, precision, progress).

Error messages name a setting by its ``Distiller`` keyword (``search_lr``, not ``Search.lr``): that is how most
users pass it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

from ..errors import DiffAugError
from .objective import KD_LOSSES, LogitKD

__all__ = ["PAPER_MILESTONES", "Run", "Search", "Settings", "StageThree", "default_milestones"]

# The paper's CIFAR steps: epochs 150, 180 and 210 of 240.
PAPER_MILESTONES = (150 / 240, 180 / 240, 210 / 240)


def default_milestones(epochs: int, fractions: Sequence[float] = PAPER_MILESTONES) -> list[int]:
    """The epochs at which Stage III's learning rate drops: ``fractions`` of the way through (by default the
    paper's 150, 180 and 210 of 240), scaled to ``epochs``."""
    return [round(epochs * f) for f in fractions]


def _number(keyword: str, value: Any, low: float, *, strict: bool = True, integer: bool = False) -> None:
    """``value`` must be a finite int/float (an int if ``integer``), > low (>= low unless ``strict``)."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        what = "an int" if integer else "a finite number"
        raise DiffAugError(f"{keyword} must be {what} {'>' if strict else '>='} {low:g}; got {value!r}")


def _epochs(keyword: str, value: Sequence[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        epochs = tuple(value)
    except TypeError:
        raise DiffAugError(f"{keyword} must be a list of epochs (ints >= 0) or None; got {value!r}") from None
    for epoch in epochs:
        _number(keyword, epoch, 0, strict=False, integer=True)
    return epochs


@dataclasses.dataclass(frozen=True)
class StageThree:
    """Stage III: SGD (the paper's: nesterov lr 0.1, momentum 0.9, weight decay 1e-4), the learning rate x ``gamma``
    at each of ``milestones`` (epochs; None: ``milestone_fractions`` of the epochs given to ``fit``, by default the
    paper's 150/180/210 of 240, so that a run resumed to more epochs keeps its settings), and the loss
    ``w_ce`` CE + ``w_kl`` kd at ``temperature``; ``kd`` a name in ``KD_LOSSES`` or a callable
    ``kd(student_logits, teacher_logits, targets)``."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    milestone_fractions: tuple[float, ...] = PAPER_MILESTONES
    kd: str | LogitKD = "kd"
    temperature: float = 4.0
    w_ce: float = 1.0
    w_kl: float = 1.0

    def __post_init__(self) -> None:
        _number("lr", self.lr, 0, strict=False)
        _number("momentum", self.momentum, 0, strict=False)
        _number("weight_decay", self.weight_decay, 0, strict=False)
        _number("gamma", self.gamma, 0)
        _number("temperature", self.temperature, 0)
        _number("w_ce", self.w_ce, 0, strict=False)
        _number("w_kl", self.w_kl, 0, strict=False)
        if not isinstance(self.nesterov, bool):
            raise DiffAugError(f"nesterov must be True or False; got {self.nesterov!r}")
        object.__setattr__(self, "milestones", _epochs("milestones", self.milestones))
        try:
            fractions = tuple(float(f) for f in self.milestone_fractions)
        except (TypeError, ValueError):
            fractions = (-1.0,)
        if not all(0 <= f <= 1 for f in fractions):
            raise DiffAugError(f"milestone_fractions must be numbers in [0, 1]; got {self.milestone_fractions!r}")
        object.__setattr__(self, "milestone_fractions", fractions)
        if not callable(self.kd) and self.kd not in KD_LOSSES:
            raise DiffAugError(f"kd must be one of {list(KD_LOSSES)} or a callable kd(student_logits, teacher_logits, "
                               f"targets); got {self.kd!r}")


@dataclasses.dataclass(frozen=True)
class Search:
    """Stage II: a search block at the start of each of ``epochs`` (None: 1/8 and 3/8 of the epochs; ``()`` never)
    of ``steps`` steps (None: one pass over the data), SGD at ``lr``/``momentum`` on the policy logits, Eq. 2 with
    weights ``alpha`` and ``beta``, and every ``diagnostics`` steps the norms of its two terms' gradients (0
    never)."""

    epochs: tuple[int, ...] | None = None
    steps: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    alpha: float = 1.0
    beta: float = 1.0
    diagnostics: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", _epochs("search_epochs", self.epochs))
        if self.steps is not None:
            _number("search_steps", self.steps, 0, integer=True)
        _number("search_lr", self.lr, 0, strict=False)
        _number("search_momentum", self.momentum, 0, strict=False)
        _number("alpha", self.alpha, 0, strict=False)
        _number("beta", self.beta, 0, strict=False)
        if not isinstance(self.diagnostics, int) or isinstance(self.diagnostics, bool) or self.diagnostics < 0:
            raise DiffAugError(f"search_diagnostics must be an int >= 0 (every how many Stage II steps; 0 never); "
                               f"got {self.diagnostics!r}")


@dataclasses.dataclass(frozen=True)
class Run:
    """``seed`` (the data order, the policy draws, offset by rank, and the global RNGs); ``mean``/``std`` the
    dataset's normalisation per channel, applied on the device (None: none); ``device``; ``amp`` None, "bf16" or
    "fp16" (CUDA); ``channels_last``; ``progress`` bars on stderr (rank 0)."""

    seed: int = 0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    device: str = "cpu"
    amp: Literal["bf16", "fp16"] | None = None
    channels_last: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise DiffAugError(f"seed must be an int >= 0; got {self.seed!r}")
        if (self.mean is None) != (self.std is None):
            raise DiffAugError(f"mean and std must be given together; got mean={self.mean!r}, std={self.std!r}")
        if self.mean is not None:
            try:
                mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
            except (TypeError, ValueError):
                raise DiffAugError(f"mean and std must be sequences of numbers; got mean={self.mean!r}, "
                                   f"std={self.std!r}") from None
            if len(mean) != len(std) or not all(math.isfinite(v) for v in mean) or \
                    not all(math.isfinite(v) and v > 0 for v in std):
                raise DiffAugError(f"mean and std must be as many finite numbers each, std > 0; got "
                                   f"mean={self.mean!r}, std={self.std!r}")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)
        object.__setattr__(self, "device", str(self.device))
        if self.amp not in (None, "bf16", "fp16"):
            raise DiffAugError(f"amp must be None, 'bf16' or 'fp16'; got {self.amp!r}")
        if self.amp == "fp16" and not self.device.startswith("cuda"):
            raise DiffAugError(f"amp='fp16' needs a CUDA device; got device {self.device!r} (use 'bf16' or None)")
        if self.device.startswith("cuda") and not _cuda_available():
            raise DiffAugError(f"device must be one this machine has; got {self.device!r}, and CUDA is not available")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# The Distiller's keywords, by the settings class and field each one sets.
KEYWORDS: dict[str, tuple[str, str]] = {
    **{name: ("stage_three", name) for name in ("lr", "momentum", "weight_decay", "nesterov", "milestones", "gamma",
                                                "milestone_fractions", "kd", "temperature", "w_ce", "w_kl")},
    **{f"search_{name}": ("search", name) for name in ("epochs", "steps", "lr", "momentum", "diagnostics")},
    "alpha": ("search", "alpha"), "beta": ("search", "beta"),
    **{name: ("run", name) for name in ("seed", "mean", "std", "device", "amp", "channels_last", "progress")},
}
# Settings that may change on a resume: where it runs and whether it shows progress.
RESUMABLE_CHANGES = ("device", "progress")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that shapes a Distiller run besides its modules: the three groups above."""

    stage_three: StageThree = StageThree()
    search: Search = Search()
    run: Run = Run()

    @classmethod
    def from_keywords(cls, **keywords: Any) -> Settings:
        """The settings of ``Distiller(..., **keywords)``: each keyword (``search_lr=0.05``) to its group's field."""
        groups: dict[str, dict[str, Any]] = {"stage_three": {}, "search": {}, "run": {}}
        for keyword, value in keywords.items():
            if keyword not in KEYWORDS:
                raise DiffAugError(f"unknown Distiller setting {keyword!r}; expected one of {sorted(KEYWORDS)}")
            group, field = KEYWORDS[keyword]
            groups[group][field] = value
        return cls(StageThree(**groups["stage_three"]), Search(**groups["search"]), Run(**groups["run"]))

    def keywords(self) -> dict[str, Any]:
        """The settings as ``Distiller`` keywords, JSON values (a callable ``kd`` by its qualified name)."""
        flat: dict[str, Any] = {}
        for keyword, (group, field) in KEYWORDS.items():
            value = getattr(getattr(self, group), field)
            if callable(value):
                value = callable_name(value)
            flat[keyword] = list(value) if isinstance(value, tuple) else value
        return flat


def callable_name(function: Any) -> str:
    """A callable as its module and qualified name, the same in every process (never a ``repr`` with a memory
    address): a ``functools.partial`` by its function and arguments, an object by its class. Two lambdas of one
    module share a name, so a checkpoint cannot tell them apart: name the functions a resumed run depends on."""
    if isinstance(function, functools.partial):
        arguments = [repr(a) for a in function.args] + [f"{k}={v!r}" for k, v in sorted(function.keywords.items())]
        return f"partial({callable_name(function.func)}, {', '.join(arguments)})"
    named = function if hasattr(function, "__qualname__") else type(function)
    return f"callable {getattr(named, '__module__', '?')}.{named.__qualname__}"
