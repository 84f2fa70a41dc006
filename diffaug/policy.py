"""The policies as modules: PolicyAugmenter (learnable, over frozen meta-encoders; TST Eq. 4 and 5) and
ReferencePolicy (a fixed policy on the exact reference ops).

Sampling is apart from applying: ``sample(batch_size)`` draws a ``PolicySample`` (which ops each image gets, their
gates, signed magnitudes and Cutout positions; ``diffaug.sampling``), and ``augmenter(x, sample)`` replays it, so a
teacher and a student can see exactly the same augmented batch; ``augmenter(x)`` draws and applies in one call. In
``train()`` mode gates and magnitudes are relaxed-Bernoulli samples that carry gradients to the logits; in ``eval()``
mode they are hard samples of the same distribution.

A policy holds the logits, the settings and their validation, the normalisation and the JSON export. What a drawn
pair does to its image is its renderer's (``diffaug.render``), how the pairs add up is ``diffaug.compose`` (Eq. 5),
and ``compile=`` hands the same work to ``diffaug.compiled``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from .compiled import COMPILE_MODES, CompileMode, Compiled, choose_layout, mark_dynamic
from .compose import GEOMETRIES, Output, Plan, pixels
from .encoders import MetaEncoder
from .errors import DiffAugError, check_images, check_names
from .ops import get_op, op_names
from .render import EncoderRenderer, ReferenceRenderer, Renderer, StraightThroughRenderer
from .sampling import (MAGNITUDE_SAMPLINGS, MagnitudeSampling, PolicySample, draw, noise_width, op_meaning,
                       relaxed_bernoulli, uniform)
from .targets import Augmented, check_targets, move_targets

__all__ = ["GEOMETRIES", "MAGNITUDE_SAMPLINGS", "Policy", "PolicyAugmenter", "PolicySample", "ReferencePolicy",
           "relaxed_bernoulli"]

Geometry = Literal["residual", "composed"]

_EXPORT_FORMAT = 1
# The settings every format-1 dict holds; those added since (geometry, ignore_index) take their defaults if absent.
_FORMAT_1_SETTINGS = ("ops", "n_ops", "temperature", "selection", "magnitude_sampling", "mean", "std")
_LOGITS = ("probability_logits", "magnitude_logits")


def _logit(value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise DiffAugError(f"{what} must be a number strictly between 0 and 1; got {value!r}")
    return math.log(value / (1.0 - value))


def _initial_logits(value: float | Mapping[str, float], names: Sequence[str], what: str) -> Tensor:
    if isinstance(value, Mapping):
        check_names(list(value), names, what=f"{what} op")
        values = [value.get(n, 0.5) for n in names]
    else:
        values = [value] * len(names)
    logits = [_logit(v, f"{what} of {n}") for v, n in zip(values, names, strict=True)]
    return torch.tensor(logits, dtype=torch.float32)


def _logits_from(value: object, name: str, ops: Sequence[str]) -> Tensor:
    """A policy dict's ``name``: a flat list of one finite number per op of ``ops``. A NaN logit would give the
    probability NaN and an infinite one exactly 0 or 1, which the constructor refuses."""
    expected = f"policy dict {name} must be a flat list of {len(ops)} finite numbers, one per op of {list(ops)}"
    try:
        tensor = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise DiffAugError(f"{expected}; got {value!r:.200}") from None
    if tensor.dim() != 1 or tensor.numel() != len(ops):
        raise DiffAugError(f"{expected}; got {'a nested list of' if tensor.dim() > 1 else 'a list of'} shape "
                           f"{tuple(tensor.shape)}")
    bad = [(op, v) for op, v in zip(ops, tensor.tolist(), strict=True) if not math.isfinite(v)]
    if bad:
        raise DiffAugError(f"{expected}; got {', '.join(f'{v} for {op}' for op, v in bad)}")
    return tensor


_PolicyT = TypeVar("_PolicyT", bound="Policy")


class Policy(nn.Module):
    """What PolicyAugmenter and ReferencePolicy share: the logits, the settings, sampling, replay (Eq. 5),
    normalisation, inspection and JSON export. The two differ by their ``renderer`` (what a drawn op does to its
    image) and by what is ``learnable``; neither overrides a step of ``forward``."""

    probability_logits: Tensor
    magnitude_logits: Tensor
    renderer: Renderer

    # Whether the logits are parameters (learned, relaxed samples in train mode) or buffers (a fixed policy, hard
    # samples always).
    learnable: ClassVar[bool] = True
    # The constructor arguments that settings() reports and from_dict() reads back.
    _setting_names: ClassVar[tuple[str, ...]] = (*_FORMAT_1_SETTINGS, "geometry", "ignore_index")

    def __init__(
        self,
        ops: Sequence[str] | None = None,
        *,
        n_ops: int | None = None,
        probability: float | Mapping[str, float] = 0.5,
        magnitude: float | Mapping[str, float] = 0.5,
        temperature: float = 0.05,
        selection: Literal["sample", "batch"] = "sample",
        magnitude_sampling: MagnitudeSampling = "relaxed",
        geometry: Geometry = "residual",
        ignore_index: int = 255,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int | None = None,
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__()
        self.ops = op_names(ops)
        self.magnitude_ops = tuple(n for n in self.ops if get_op(n).has_magnitude)
        n_ops = min(4, len(self.ops)) if n_ops is None else n_ops
        if not isinstance(n_ops, int) or not 1 <= n_ops <= len(self.ops):
            raise DiffAugError(f"n_ops must be an int in [1, {len(self.ops)}] (the number of ops); got {n_ops!r}")
        if not _is_number(temperature) or not 0 < temperature < math.inf:  # inf: every relaxed gate 0.5
            raise DiffAugError(f"temperature must be a positive finite number; got {temperature!r}")
        _check_choice("selection", selection, ("sample", "batch"))
        _check_choice("magnitude_sampling", magnitude_sampling, MAGNITUDE_SAMPLINGS)
        _check_choice("geometry", geometry, GEOMETRIES)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise DiffAugError(f"ignore_index must be an int (the label of pixels from outside the image); got "
                               f"{ignore_index!r}")
        self.geometry = geometry
        self.ignore_index = ignore_index
        self.n_ops = n_ops
        self.temperature = float(temperature)
        self.selection = selection
        self.magnitude_sampling = magnitude_sampling
        logits = {
            "probability_logits": _initial_logits(probability, self.ops, "probability"),
            "magnitude_logits": _initial_logits(magnitude, self.magnitude_ops, "magnitude"),
        }
        for name, value in logits.items():
            if self.learnable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        columns = [self.ops.index(n) for n in self.magnitude_ops]
        self.register_buffer("_magnitude_columns", torch.tensor(columns, dtype=torch.long), persistent=False)
        has_magnitude = [get_op(n).has_magnitude for n in self.ops]
        self.register_buffer("_has_magnitude", torch.tensor(has_magnitude, dtype=torch.bool), persistent=False)
        signed = [get_op(n).signed for n in self.magnitude_ops]
        self.register_buffer("_signed", torch.tensor(signed, dtype=torch.bool), persistent=False)
        self._plan = Plan.of(self.ops, geometry)
        self.renderer = ReferenceRenderer()
        self._set_normalisation(mean, std)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise DiffAugError(f"seed must be an int or None; got {seed!r}")
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._seed, self._worker_seed = seed, None  # see _own_generator
        if compile is not False and compile is not True and compile not in COMPILE_MODES:
            raise DiffAugError(f"compile must be True, False or a torch.compile mode {list(COMPILE_MODES)}; got {compile!r}")
        self.compile_mode = None if compile is False else ("default" if compile is True else compile)
        self._compiled = Compiled(self.compile_mode, self._draw_sample, self._plan) if self.compile_mode else None

    @property
    def relaxed(self) -> bool:
        """Whether ``sample`` draws relaxed (differentiable) gates and magnitudes rather than hard ones: in train
        mode, for a policy that learns."""
        return self.training and self.learnable

    # ----------------------------------------------------------------------------------------------------------
    # Sampling

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> PolicySample:
        """Draw which ops each image gets, their gates and signed magnitudes (relaxed if ``self.relaxed``)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise DiffAugError(f"batch_size must be a positive int; got {batch_size!r}")
        noise = self._noise(batch_size, generator)
        drawn = self._draw_sample(noise) if self._compiled is None else self._compiled.sample(noise)
        return PolicySample(self.ops, *drawn)

    def _noise(self, batch_size: int, generator: torch.Generator | None) -> Tensor:
        """All the uniform noise of a batch's sample in one draw, always eager: the generator gives the same stream,
        compiled or not."""
        if generator is not None and not isinstance(generator, torch.Generator):
            raise DiffAugError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        generator = generator if generator is not None else self._own_generator()
        width = noise_width(len(self.ops), len(self.magnitude_ops))
        noise = uniform((batch_size, width), generator, self.probability_logits.device)
        if self.compile_mode is not None and batch_size > 1:
            mark_dynamic(noise)  # one graph for every batch size
        return noise

    def _own_generator(self) -> torch.Generator | None:
        """The seeded policy's generator, given its own stream in each DataLoader worker.

        A forked worker holds a copy of the generator in the parent's state (and a spawned one its pickled state),
        so every worker would repeat the others' draws. On its first use in a worker, the generator is reseeded
        from the worker's seed (``get_worker_info().seed``: the DataLoader's base seed, drawn from torch's default
        generator or the DataLoader's ``generator=``, plus the worker id) mixed with the policy's seed: workers draw
        differently, and a rerun with the same ``torch.manual_seed`` draws the same. In the main process the stream
        is the seed's own."""
        if self.generator is None:
            return None
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.generator.manual_seed((info.seed * 0x9E3779B97F4A7C15 + self._seed) % 2**64)
        return self.generator

    def __getstate__(self) -> dict[str, Any]:
        # A torch.Generator does not survive pickling (a spawned DataLoader worker cannot unpickle it): carry its
        # state instead, so that a pickled or deep-copied policy continues the same stream.
        state = self.__dict__.copy()
        generator = state.get("generator")
        if generator is not None:
            state["generator"] = None
            # As plain bytes: a tensor would travel to a spawned worker through shared memory, which failed there.
            state["_generator_state"] = (str(generator.device), generator.get_state().numpy().tobytes())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.pop("_generator_state", None)
        super().__setstate__(state)
        if saved is not None:
            device, rng = saved
            self.generator = torch.Generator(device=device)
            self.generator.set_state(torch.frombuffer(bytearray(rng), dtype=torch.uint8))

    def _draw_sample(self, noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``sample``'s arithmetic on a batch's uniform noise (``sampling.draw`` on this policy's logits)."""
        return draw(noise, self.probability_logits, self.magnitude_logits, n_ops=self.n_ops, selection=self.selection,
                    magnitude_sampling=self.magnitude_sampling, relaxed=self.relaxed, temperature=self.temperature,
                    signed=self._signed, magnitude_columns=self._magnitude_columns)

    # ----------------------------------------------------------------------------------------------------------
    # Applying

    def forward(
        self,
        x: Tensor,
        sample: PolicySample | None = None,
        *,
        generator: torch.Generator | None = None,
        masks: Tensor | None = None,
        boxes: Sequence[Tensor] | None = None,
        keypoints: Sequence[Tensor] | None = None,
    ) -> Tensor | Augmented:
        """Augment ``x``: replay ``sample`` (from ``sample()``) on it, or draw a fresh sample (from ``generator``, else
        the policy's own) and apply it; ``aug(x, generator=g)`` equals ``aug(x, aug.sample(len(x), g))``.

        With ``geometry="residual"`` this is Eq. 5: x + sum over the drawn ops of gate * (f(x, m) - x), clipped.
        With ``geometry="composed"`` the drawn affine ops make one map per image (each op's map pulled towards the
        identity by its gate, composed in table order) and one warp; the other ops then add their gated residuals
        to the warped image. Only then can targets follow: ``masks`` (B, H, W) integer labels or (B, K, H, W)
        float masks, ``boxes`` (B tensors (N_i, 4), xyxy pixels) and ``keypoints`` (B tensors (N_i, 2), xy
        pixels), which colour ops, Equalize, Invert and Cutout leave as they are. Given any of them, the result
        is an ``Augmented`` (images, masks, boxes, keypoints, keep); otherwise the images alone.
        """
        self._check_normalisation_channels(x)
        if sample is not None:
            if not isinstance(sample, PolicySample):
                hint = " (pass a generator as generator=)" if isinstance(sample, torch.Generator) else ""
                raise DiffAugError(f"sample must be a PolicySample from sample(){hint}; got {type(sample).__name__}")
            if generator is not None:
                raise DiffAugError("pass sample= (to replay a draw) or generator= (for a fresh one), not both; got "
                                   "both")
        x, scaled = self._check_input(x)
        if sample is None:
            batch_size = 1 if x.dim() == 3 else x.shape[0]
            # The noise alone when compiled: the compiled layout draws it as it wants it.
            sample = self._noise(batch_size, generator) if self.compile_mode is not None else self.sample(batch_size,
                                                                                                           generator)
        return self._augment(x, sample, masks, boxes, keypoints, scaled=scaled)

    def _check_input(self, x: object) -> tuple[Tensor, bool]:
        """The images as the pipeline takes them, and whether they are already in [0, 1] (not normalised).

        uint8 images (as decoders give them) become float32 ``x / 255`` on the policy's device: pixels in [0, 1],
        never taken as normalised, so with mean/std the output is what ``Normalize`` then this policy would give.
        Normalised half-precision images are checked against a range widened by their dtype's rounding (bf16 holds
        ImageNet's -2.1179 as -2.125), the exact check following in float32 after un-normalising."""
        if isinstance(x, Tensor) and x.dtype == torch.uint8:
            if x.dim() not in (3, 4) or x.shape[-3] not in (1, 3) or x.numel() == 0:
                raise DiffAugError(f"uint8 images must have shape (B, C, H, W) or (C, H, W), C in {{1, 3}}, not empty; "
                                   f"got uint8 of shape {tuple(x.shape)}")
            return x.to(self.probability_logits.device, torch.float32) / 255, True
        if isinstance(x, Tensor) and not x.is_floating_point():
            raise DiffAugError(f"images must be float (in [0, 1], or normalised with mean/std) or uint8 (in [0, 255]) "
                               f"tensors; got {str(x.dtype).removeprefix('torch.')} of shape {tuple(x.shape)} "
                               "(convert with x.float() / x.max() of its type, or x.to(torch.uint8) if in [0, 255])")
        lo, hi = self._input_range
        if self.mean is not None and isinstance(x, Tensor):
            slack = torch.finfo(x.dtype).eps * max(abs(lo), abs(hi))
            lo, hi = lo - slack, hi + slack
        check_images(x, self._input_name, (lo, hi))
        assert isinstance(x, Tensor)
        return x, self.mean is None

    def _augment(
        self,
        x: Tensor,
        sample: PolicySample | Tensor,
        masks: Tensor | None = None,
        boxes: Sequence[Tensor] | None = None,
        keypoints: Sequence[Tensor] | None = None,
        *,
        scaled: bool = False,
    ) -> Tensor | Augmented:
        """``forward``'s work on checked images; ``scaled``: they are in [0, 1] already (not normalised)."""
        with_targets = masks is not None or boxes is not None or keypoints is not None
        if with_targets:
            if self.geometry != "composed":
                raise DiffAugError(
                    'masks, boxes and keypoints need one geometry per image: build the augmenter with '
                    'geometry="composed"; this one has geometry="residual" (Eq. 5), whose images can blend '
                    "differently moved copies that no target could follow"
                )
            check_targets(x, masks, boxes, keypoints, self.ignore_index)  # all of it before any pixel work
        unbatched = x.dim() == 3
        images = x.unsqueeze(0) if unbatched else x
        if isinstance(sample, PolicySample) and (sample.ops != self.ops or len(sample) != images.shape[0]):
            raise DiffAugError(
                f"sample must come from this augmenter's sample({images.shape[0]}) (ops {list(self.ops)}); "
                f"got a sample of {len(sample)} images over ops {list(sample.ops)}"
            )
        images = images if scaled else self._unnormalise(images)
        sample = sample.to(images.device)
        layout = choose_layout(self, images)
        if layout == "eager":
            if not isinstance(sample, PolicySample):
                # compile=True running eager: the sample too, as a compiled call's fixed cost (guards, its autograd
                # wrapper) is what this layout avoids.
                sample = PolicySample(self.ops, *self._draw_sample(sample))
            out, linear, shift, moved, grid = self._pixels(images, sample.selected, sample.gates, sample.magnitudes,
                                                           sample.positions)
        else:
            assert self._compiled is not None  # choose_layout is eager without compile
            out, linear, shift, moved, grid = self._compiled.pixels(layout, images, sample, self._has_magnitude,
                                                                    self.renderer)
        out = self._output(self._normalise(out))
        out = out.squeeze(0) if unbatched else out
        if not with_targets:
            return out
        moved_targets = move_targets(linear, shift, moved, masks, boxes, keypoints, tuple(x.shape[-2:]),
                                     self.ignore_index, grid)
        return Augmented(out, *moved_targets)

    def _pixels(self, images: Tensor, selected: Tensor, gates: Tensor, magnitudes: Tensor, positions: Tensor
                ) -> Output:
        """``compose.pixels`` (eager) of a sample's fields on un-normalised ``images``: the augmented images and,
        with ``geometry="composed"``, each image's map, the moved images and their sampling grid."""
        return pixels(self._plan, self.renderer, self._has_magnitude, images, selected, gates, magnitudes, positions)

    # ----------------------------------------------------------------------------------------------------------
    # Normalisation

    def _set_normalisation(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        if (mean is None) != (std is None):
            raise DiffAugError(f"mean and std must be given together; got mean={mean!r}, std={std!r}")
        if mean is None:
            self.register_buffer("mean", None)
            self.register_buffer("std", None)
            self._input_range = (0.0, 1.0)
            self._input_name = "images"
            return
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        finite = bool(torch.isfinite(mean_t).all() and torch.isfinite(std_t).all())
        if mean_t.numel() not in (1, 3) or mean_t.shape != std_t.shape or not finite or not bool((std_t > 0).all()):
            raise DiffAugError(f"mean and std must be 1 or 3 finite numbers each, std > 0; got mean={mean!r}, "
                               f"std={std!r}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))
        # A loose bound: the exact check happens after un-normalising.
        lo = float(((0 - mean_t) / std_t).min()) - 1e-3
        hi = float(((1 - mean_t) / std_t).max()) + 1e-3
        self._input_range = (lo, hi)
        self._input_name = "images normalised with mean/std"

    def _check_normalisation_channels(self, x: object) -> None:
        """3-value mean/std on 1-channel images would broadcast them to 3 channels: refused. Other bad images
        (channels-last ones among them) are left to ``check_images``."""
        if self.mean is None or self.mean.numel() == 1 or not isinstance(x, Tensor) or x.dim() not in (3, 4):
            return
        if x.shape[-3] == 1:
            raise DiffAugError(f"images must have as many channels as mean/std have values ({self.mean.numel()}); "
                               "got 1-channel images")

    def _unnormalise(self, x: Tensor) -> Tensor:
        """[0, 1] images from normalised ones, computed and checked in (at least) float32 and cast back: a half
        input's rounding, scaled by std, is far above the few ulps the check allows in float32."""
        if self.mean is None:
            return x
        wide = torch.promote_types(x.dtype, torch.float32)
        images = x.to(wide) * self.std.to(x.device, wide) + self.mean.to(x.device, wide)
        # Normalising and back costs a few ulps of the input's dtype; anything further out was not normalised with
        # these numbers.
        lo, hi = self._input_range
        slack = 1e-4 + torch.finfo(x.dtype).eps * max(abs(lo), abs(hi)) * float(self.std.max())
        check_images(images, name="images after un-normalising with mean/std", value_range=(-slack, 1 + slack))
        return images.clamp(0.0, 1.0).to(x.dtype)

    def _normalise(self, x: Tensor) -> Tensor:
        if self.mean is None:
            return x
        wide = torch.promote_types(x.dtype, torch.float32)
        return ((x.to(wide) - self.mean.to(x.device, wide)) / self.std.to(x.device, wide)).to(x.dtype)

    def _output(self, x: Tensor) -> Tensor:
        """The output in the policy's output dtype: the pipeline's float, or (``ReferencePolicy``'s
        ``output_dtype=torch.uint8``) uint8, rounded."""
        if getattr(self, "output_dtype", None) != torch.uint8:
            return x
        return (x.detach() * 255).round_().clamp_(0, 255).to(torch.uint8)

    # ----------------------------------------------------------------------------------------------------------
    # Inspection

    def policy(self) -> dict[str, dict[str, Any]]:
        """What the policy does, by op name: its apply ``probability`` p and (magnitude ops) its ``magnitude`` m, the
        two learned numbers, and what they mean under ``magnitude_sampling`` (``sampling.op_meaning``): the
        ``strength`` distribution of an applied op ("relaxed": ``full_or_none``, full strength with probability m,
        else none, the identity; "mean": ``fixed`` at m; "uniform": ``uniform`` on [0, m]), the
        ``effective_probability`` of an application at ``effective_strength`` (p * m at full strength under
        "relaxed"; p otherwise) and a ``summary`` sentence. Under "relaxed", m = 0.3 does not mean strength 0.3.

        Example:
            >>> op = ReferencePolicy(["Solarize"], probability=0.5, magnitude=0.3).policy()["Solarize"]
            >>> round(op["magnitude"], 6), op["strength"]["kind"], round(op["effective_probability"], 6)
            (0.3, 'full_or_none', 0.15)
        """
        probabilities = torch.sigmoid(self.probability_logits.detach()).tolist()
        magnitude_values = torch.sigmoid(self.magnitude_logits.detach()).tolist()
        magnitudes = dict(zip(self.magnitude_ops, magnitude_values, strict=True))
        return {name: op_meaning(p, magnitudes.get(name), self.magnitude_sampling)
                for name, p in zip(self.ops, probabilities, strict=True)}

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that shape sampling, as plain JSON values."""
        return {
            "ops": list(self.ops),
            "n_ops": self.n_ops,
            "temperature": self.temperature,
            "selection": self.selection,
            "magnitude_sampling": self.magnitude_sampling,
            "geometry": self.geometry,
            "ignore_index": self.ignore_index,
            "mean": None if self.mean is None else self.mean.flatten().tolist(),
            "std": None if self.std is None else self.std.flatten().tolist(),
        }

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain JSON: op names, probabilities, magnitudes, settings, the exact logits, and
        ``meaning``: per op, what it does under ``magnitude_sampling`` (``policy()`` less the two numbers, which are
        under ``probability`` and ``magnitude``). ``from_dict`` reads the logits and settings only, so dicts written
        before ``meaning`` existed load the same.

        Example:
            >>> import json
            >>> aug = PolicyAugmenter()
            >>> PolicyAugmenter.from_dict(json.loads(json.dumps(aug.to_dict()))).policy() == aug.policy()
            True
        """
        policy = self.policy()
        return {
            "format": _EXPORT_FORMAT,
            **self.settings(),
            "probability": {n: v["probability"] for n, v in policy.items()},
            "magnitude": {n: v["magnitude"] for n, v in policy.items() if "magnitude" in v},
            "meaning": {n: {k: v[k] for k in v if k not in ("probability", "magnitude")} for n, v in policy.items()},
            # float32 -> Python float -> JSON and back is exact, so samples replay bit for bit.
            "probability_logits": self.probability_logits.detach().cpu().tolist(),
            "magnitude_logits": self.magnitude_logits.detach().cpu().tolist(),
        }

    @classmethod
    def from_dict(cls: type[_PolicyT], data: Mapping[str, Any], **kwargs: Any) -> _PolicyT:
        """Rebuild from ``to_dict()`` output; ``kwargs`` go to the constructor (e.g. ``priors=``, ``seed=``)."""
        if not isinstance(data, Mapping) or data.get("format") != _EXPORT_FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise DiffAugError(f"policy dict must come from to_dict() (format {_EXPORT_FORMAT}); got format {got!r}")
        missing = [k for k in (*_FORMAT_1_SETTINGS, *_LOGITS) if k not in data]
        if missing:
            raise DiffAugError(f"policy dict must hold the keys {[*_FORMAT_1_SETTINGS, *_LOGITS]}; missing {missing}")
        policy = cls(**{k: data[k] for k in cls._setting_names if k in data}, **kwargs)
        values = {name: _logits_from(data[name], name, ops) for name, ops in
                  (("probability_logits", policy.ops), ("magnitude_logits", policy.magnitude_ops))}
        with torch.no_grad():
            for name, value in values.items():
                target = getattr(policy, name)
                target.copy_(value.to(target.dtype))
        return policy

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k not in ("ops", "mean", "std"))


class PolicyAugmenter(Policy):
    """Differentiable AutoAugment policy: one learnable probability per op and one magnitude per magnitude op.

    Args:
        ops: op names to use (default: all 14 of ``diffaug.OPS``, kept in table order).
        n_ops: ops drawn per image without replacement (N_A of the paper; default 4, or all ops if fewer).
        probability: initial apply probability, one float or a dict by op name (others 0.5).
        magnitude: initial magnitude in (0, 1), one float or a dict by op name (others 0.5).
        temperature: relaxed-Bernoulli temperature (tau_l = 0.05 in the paper).
        selection: "sample" draws the ops per image; "batch" draws one set for the whole batch (the paper).
        magnitude_sampling: how a drawn op's strength is sampled from its logit theta_m. "relaxed": like the gates
            (Eq. 4 as written), so an applied op is at strength about 0 or 1; "mean": sigmoid(theta_m) as is, no
            sampling (the authors' code); "uniform": sigmoid(theta_m) * u with u ~ U(0, 1), every strength up to
            the learned one (as TrivialAugment draws them), in train and eval mode alike.
        geometry: "residual" composes by Eq. 5 (the paper: every drawn op's residual added to x, so two affine
            ops give two blended copies); "composed" makes an image's affine ops one map and one warp, which masks,
            boxes and keypoints can follow (see ``forward``).
        ignore_index: with "composed", the label given to mask pixels brought in from outside the image.
        forward: "encoder" outputs the meta-encoders' pixels (the paper); "reference" outputs the exact reference
            ops while gradients flow through the encoders (straight-through).
        priors: "default" (the shipped fitted priors), a priors folder, a dict of encoders by op name, or None
            for freshly initialised, unfitted encoders.
        arch: encoder architecture, "default" or "paper", when priors is "default", a folder or None.
        mean, std: per-channel normalisation of the inputs; images are un-normalised before augmenting.
        seed: seeds the augmenter's own generator, so every draw is reproducible.
        compile: False (eager: only the (image, op) pairs drawn are computed, after one host sync), or True / a
            ``torch.compile`` mode ("default", "reduce-overhead", "max-autotune"): torch.compile fuses the pixel
            path and the arithmetic of ``sample`` (its noise is drawn eagerly, so a seed gives the same draw). On a
            GPU it computes every pair with static shapes, undrawn ones gated to zero, no host sync, ``forward``
            drawing and applying in one graph (CUDA graphs possible). On a CPU each call takes the layout measured
            fastest for its shape and grad mode: static for batches of at most 2,048 pixels a channel (B * H * W);
            the drawn pairs only, compiled with symbolic counts after one host sync (one graph for every batch size
            and draw), for no-grad calls on images of at most 32x32 or on 16 images and more, and for train steps
            on images of at most 32x32; eager otherwise (see ``diffaug.compiled``). The first call in each layout
            compiles. Equal to the eager path on the same sample within 1e-5 (1e-4 next to Solarize's threshold).
            On a CPU it compiles a call only where that measured faster than eager, and runs eager elsewhere (Stage
            II steps on 224 px images, for example); the GPU layout is unmeasured on a GPU. With "reduce-overhead"
            the output lives in CUDA-graph memory that the next call overwrites (torch raises if
            it is read after that): ``.clone()`` what you keep across calls, such as two views of one batch.

    In ``train()`` mode gates and magnitudes are relaxed-Bernoulli samples that carry gradients to the logits;
    in ``eval()`` mode they are hard samples of the same distribution.

    Shape:
        input: (B, C, H, W) or (C, H, W), C in {1, 3}: float with values in [0, 1] (or normalised with mean/std),
            or uint8 in [0, 255], which becomes float32 ``x / 255`` on the augmenter's device (pixels, never taken
            as normalised: with mean/std the output is normalised, as ``Normalize`` then the augmenter would give).
            Other integer dtypes are refused. Normalised fp16/bf16 images are un-normalised and re-normalised in
            float32, then cast back.
        output: same shape and dtype as a float input; float32 for a uint8 input.

    Example:
        >>> aug = PolicyAugmenter(seed=0)
        >>> x = torch.rand(8, 3, 32, 32)
        >>> aug(x).shape
        torch.Size([8, 3, 32, 32])
        >>> s = aug.sample(8); torch.equal(aug(x, s), aug(x, s))
        True
    """

    def __init__(
        self,
        ops: Sequence[str] | None = None,
        *,
        n_ops: int | None = None,
        probability: float | Mapping[str, float] = 0.5,
        magnitude: float | Mapping[str, float] = 0.5,
        temperature: float = 0.05,
        selection: Literal["sample", "batch"] = "sample",
        magnitude_sampling: MagnitudeSampling = "relaxed",
        geometry: Geometry = "residual",
        ignore_index: int = 255,
        forward: Literal["encoder", "reference"] = "encoder",
        priors: str | PathLike | Mapping[str, MetaEncoder] | None = "default",
        arch: str = "default",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int | None = None,
        compile: bool | CompileMode = False,
    ) -> None:
        super().__init__(
            ops, n_ops=n_ops, probability=probability, magnitude=magnitude, temperature=temperature,
            selection=selection, magnitude_sampling=magnitude_sampling, geometry=geometry,
            ignore_index=ignore_index, mean=mean, std=std, seed=seed, compile=compile,
        )
        _check_choice("forward", forward, ("encoder", "reference"))
        self.forward_mode = forward
        self.encoders = nn.ModuleDict(_resolve_encoders(priors, arch, self.magnitude_ops))
        renderer = EncoderRenderer if forward == "encoder" else StraightThroughRenderer
        self.renderer = renderer(self.encoders, self.ops)

    _setting_names = (*Policy._setting_names, "forward")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "forward": self.forward_mode}

    def to_reference(self) -> ReferencePolicy:
        """The learned policy on the exact reference ops, without encoders or gradients: cheap augmentation for
        training after the search. It draws hard samples (as ``eval()`` mode here) whatever its mode."""
        return ReferencePolicy.from_dict(self.to_dict())


class ReferencePolicy(Policy):
    """A fixed policy applied with the exact reference ops (``diffaug.apply_op``): no encoders, no gradients.

    Build it with ``PolicyAugmenter.to_reference()`` or ``ReferencePolicy.from_dict(json)``; its arguments are
    those of ``PolicyAugmenter`` without ``forward``, ``priors`` and ``arch``. Gates and magnitudes are always hard
    samples, and the probabilities and magnitudes are buffers, not parameters.

    ``output_dtype=torch.uint8`` returns uint8 images (the float result * 255, rounded), for DataLoader workers that
    feed a uint8 pipeline; it cannot be combined with ``mean``/``std`` (normalised values are not pixels). Images in
    are float or uint8 either way (see ``PolicyAugmenter``).

    Example:
        >>> ref = PolicyAugmenter(probability={"Rotate": 0.9}).to_reference()
        >>> ref(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4, 3, 32, 32])
        >>> ReferencePolicy(output_dtype=torch.uint8)(torch.zeros(3, 8, 8, dtype=torch.uint8)).dtype
        torch.uint8
    """

    learnable = False

    def __init__(self, ops: Sequence[str] | None = None, *, output_dtype: torch.dtype | None = None,
                 **kwargs: Any) -> None:
        super().__init__(ops, **kwargs)
        if output_dtype not in (None, torch.uint8):
            raise DiffAugError(f"output_dtype must be None (the images' float dtype) or torch.uint8; got "
                               f"{output_dtype!r}")
        if output_dtype == torch.uint8 and self.mean is not None:
            raise DiffAugError("output_dtype=torch.uint8 needs pixels in [0, 1], so it cannot be combined with "
                               f"mean/std; got mean={self.mean.flatten().tolist()}")
        self.output_dtype = output_dtype


def _is_number(value: object) -> bool:
    """A real number, not a bool (True is an int to Python, never a meant number); NaN fails every comparison."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DiffAugError(f"{name} must be one of {list(choices)}; got {value!r}")


def _resolve_encoders(
    priors: str | PathLike | Mapping[str, MetaEncoder] | None, arch: str, names: Sequence[str]
) -> dict[str, MetaEncoder]:
    from .encoders import build_encoder, freeze
    from .priors import load_priors

    if priors is None:
        return {n: freeze(build_encoder(n, arch)) for n in names}
    if isinstance(priors, Mapping):
        encoders = {n: freeze(copy.deepcopy(e)) for n, e in priors.items() if n in names}
    else:
        encoders = load_priors(None if priors == "default" else priors, arch=arch)
    missing = [n for n in names if n not in encoders]
    if missing:
        raise DiffAugError(
            f"priors must hold an encoder for every magnitude op in use; {priors!r} is missing {missing} "
            "(fit them with `diffaug fit-priors --ops ...`, or pass ops= without them)"
        )
    for name in names:
        if get_op(name).kind == "affine" and not callable(getattr(encoders[name], "matrices", None)):
            raise DiffAugError(
                f"the encoder of an affine op must have matrices(magnitude, size) -> (linear, shift), as "
                f"diffaug.encoders.AffineEncoder: the augmenter warps all affine ops at once; {name}'s encoder is a "
                f"{type(encoders[name]).__name__} without it"
            )
    return {n: encoders[n] for n in names}
