"""Pictures of policies, ops and fits (matplotlib). ``import diffaug`` never imports this module.

Every function returns the matplotlib Figure (and Axes where it draws on given ones) and never calls
``plt.show()``: in a notebook the figure shows itself; in a script, ``fig.savefig(...)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .errors import DiffAugError, check_images
from .fit import FIDELITY_TARGETS
from .ops import MAGNITUDE_OPS, apply_op, get_op
from .policy import Policy

__all__ = ["plot_policy_history", "plot_policy", "plot_teacher_confidence", "plot_search_diagnostics", "show_ops",
           "show_augmented", "plot_fit_report"]


def _load_json(source: Mapping[str, Any] | str | PathLike, what: str) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if not path.is_file():
        raise DiffAugError(f"{what} must be a dict or a JSON file; got {str(path)!r}, which is missing")
    return json.loads(path.read_text())


def _history_series(history: Mapping[str, Any]) -> tuple[list[int], list[dict], list[tuple[int, int]]]:
    """(iterations, policies, Stage II blocks as (first, last) iterations) from a Distiller history."""
    if "search" not in history or "epochs" not in history:
        raise DiffAugError(f"history must be a Distiller history with 'search' and 'epochs'; got keys {list(history)}")
    points = sorted(
        [(r["iteration"], r["policy"]) for r in history["search"]]
        + [(r["iteration"], r["policy"]) for r in history["epochs"]],
        key=lambda point: point[0],
    )
    blocks: dict[int, list[int]] = {}
    for r in history["search"]:
        blocks.setdefault(r["epoch"], []).append(r["iteration"])
    return [p[0] for p in points], [p[1] for p in points], [(min(b), max(b)) for b in blocks.values()]


def plot_policy_history(
    history: Mapping[str, Any] | str | PathLike, ops: Sequence[str] | None = None, ax: Sequence[Axes] | None = None
) -> tuple[Figure, Sequence[Axes]]:
    """Probability and magnitude of each op against the iteration (the paper's Fig. 2), Stage II blocks shaded.
    ``history`` is ``Distiller.fit``'s return value or its JSON file (``Distiller.save_history``)."""
    iterations, policies, blocks = _history_series(_load_json(history, "history"))
    if not policies:
        raise DiffAugError("history must hold at least one recorded policy; got none (was fit() run?)")
    names = list(ops) if ops is not None else list(policies[0])
    if ax is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharex=True, layout="constrained")
    else:
        axes = list(ax)
        fig = axes[0].figure
    colours = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        colour = colours(i % 20)
        axes[0].plot(iterations, [p[name]["probability"] for p in policies], label=name, color=colour)
        if "magnitude" in policies[0][name]:
            axes[1].plot(iterations, [p[name]["magnitude"] for p in policies], label=name, color=colour)
    for first, last in blocks:
        for a in axes:
            a.axvspan(first, last + 1, color="0.88", zorder=0)
    axes[0].set(title="probability (Stage II shaded)", xlabel="iteration", ylim=(0, 1))
    axes[1].set(title="magnitude (Stage II shaded)", xlabel="iteration", ylim=(0, 1))
    axes[0].legend(fontsize="small", ncol=2)
    return fig, axes


def plot_teacher_confidence(
    histories: Mapping[str, Mapping[str, Any] | str | PathLike] | Mapping[str, Any] | str | PathLike,
    ax: Axes | None = None,
) -> tuple[Figure, Axes]:
    """The teacher's mean probability of the true class per Stage III epoch, on x_hat (solid) and on x (dashed):
    the paper's Fig. 3, its sign of a teacher so sure of the label that its logits carry little else (Table 8).

    ``histories`` is one Distiller history (or its JSON file), or a dict of them by label to compare teachers.
    """
    single = isinstance(histories, (str, PathLike)) or (isinstance(histories, Mapping) and "epochs" in histories)
    runs = {"teacher": histories} if single else dict(histories)  # type: ignore[arg-type]
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    else:
        fig = ax.figure
    for i, (label, source) in enumerate(runs.items()):
        epochs = _load_json(source, "history").get("epochs")
        if not epochs or "teacher_confidence" not in epochs[0]:
            raise DiffAugError(f"history {label!r} must be a Distiller history whose epochs record "
                               f"'teacher_confidence'; got {'no epochs' if not epochs else 'keys ' + str(list(epochs[0]))}")
        numbers = [e["epoch"] + 1 for e in epochs]
        colour = plt.get_cmap("tab10")(i % 10)
        ax.plot(numbers, [e["teacher_confidence"] for e in epochs], color=colour, label=f"{label}, on x_hat")
        ax.plot(numbers, [e["teacher_confidence_clean"] for e in epochs], color=colour, linestyle="--",
                label=f"{label}, on x")
    ax.set(title="teacher's probability of the true class", xlabel="epoch", ylabel="mean p_T(y)", ylim=(0, 1.02))
    ax.legend(fontsize="small")
    return fig, ax


# What a magnitude m means under each sampler (``policy()``'s strength kinds), for the plots' labels.
_MAGNITUDE_MEANING = {
    "full_or_none": "magnitude m: P(full strength) when applied (relaxed)",
    "fixed": "magnitude m: the strength (mean)",
    "uniform": "magnitude m: strength uniform on [0, m] (uniform)",
}


def plot_policy(policy: Policy | Mapping[str, Mapping[str, Any]], ax: Axes | None = None) -> tuple[Figure, Axes]:
    """Probability and magnitude of every op at a glance (bars), from an augmenter or its ``policy()``. The
    magnitude's label says what it means under the augmenter's sampler; under "relaxed" a third bar shows the
    probability p * m of a full-strength application (an applied op is otherwise at strength 0, the identity)."""
    values = policy.policy() if isinstance(policy, Policy) else policy
    names = list(values)
    kinds = {values[n]["strength"]["kind"] for n in names if "magnitude" in values[n] and "strength" in values[n]}
    # A dict of the two numbers alone (a Distiller history's) does not say its sampler.
    kind = kinds.pop() if len(kinds) == 1 else None
    relaxed = kind == "full_or_none"
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names)), 3.5), layout="constrained")
    else:
        fig = ax.figure
    positions = range(len(names))
    width = 0.27 if relaxed else 0.4
    offsets = (-width, 0.0, width) if relaxed else (-width / 2, width / 2)
    ax.bar([p + offsets[0] for p in positions], [values[n]["probability"] for n in names], width,
           label="probability p")
    ax.bar([p + offsets[1] for p in positions], [values[n].get("magnitude", float("nan")) for n in names], width,
           label=_MAGNITUDE_MEANING.get(kind, "magnitude m"))
    if relaxed:
        ax.bar([p + offsets[2] for p in positions], [values[n]["effective_probability"] for n in names], width,
               label="p * m: applied at full strength")
    ax.set_xticks(list(positions), names, rotation=45, ha="right")
    ax.set(ylim=(0, 1), title="policy")
    ax.legend(fontsize="small")
    return fig, ax


def plot_search_diagnostics(
    history: Mapping[str, Any] | str | PathLike, ax: Sequence[Axes] | None = None
) -> tuple[Figure, Sequence[Axes]]:
    """What Stage II did, step by step: Eq. 2's two terms; the teacher's accuracy and mean probability of the true
    class on x_hat; and the norms of the two terms' gradients on the policy logits with the cosine between them
    (measured every ``search_diagnostics`` steps). A cosine near -1 with the teacher's norm far above the student's
    means the search mostly follows the teacher: it removes views the teacher fails on rather than finding what the
    student lacks. ``history`` is ``Distiller.fit``'s return value or its JSON file."""
    records = _load_json(history, "history").get("search")
    if not records or not any("teacher_accuracy" in r for r in records):  # a step with no labelled pixel has none
        raise DiffAugError("history must be a Distiller history with Stage II steps that record 'teacher_accuracy'; "
                           f"got {'no Stage II steps' if not records else 'keys ' + str(list(records[0]))}")
    if ax is None:
        fig, ax = plt.subplots(1, 3, figsize=(14, 3.6), layout="constrained")
    else:
        fig = ax[0].figure
    steps = list(range(1, len(records) + 1))
    terms, teacher, gradients = ax
    terms.plot(steps, [r["teacher_ce"] for r in records], label="teacher CE (alpha term)")
    terms.plot(steps, [r["student_term"] for r in records], label="-log(1 - p_S[y]) (beta term)")
    terms.set(title="Eq. 2's terms", xlabel="Stage II step", ylabel="loss")
    teacher.plot(steps, [r.get("teacher_accuracy", math.nan) for r in records], label="accuracy")
    teacher.plot(steps, [r.get("teacher_confidence", math.nan) for r in records], label="mean p_T(y)")
    teacher.set(title="teacher on x_hat", xlabel="Stage II step", ylim=(0, 1.02))
    measured = [(step, r) for step, r in zip(steps, records, strict=True) if "grad_cosine" in r]
    if measured:
        at = [step for step, _ in measured]
        gradients.semilogy(at, [r["grad_norm_teacher"] for _, r in measured], label="|grad| teacher term")
        gradients.semilogy(at, [r["grad_norm_student"] for _, r in measured], label="|grad| student term")
        cosine = gradients.twinx()
        cosine.plot(at, [r["grad_cosine"] for _, r in measured], color="black", linestyle=":", label="cosine")
        cosine.set(ylim=(-1.05, 1.05), ylabel="cosine")
        cosine.legend(fontsize="small", loc="lower right")
    gradients.set(title="gradients on the policy logits", xlabel="Stage II step")
    for axis in ax:
        axis.legend(fontsize="small")
    # Steps of one block are consecutive; a new block starts where the epoch changes.
    for step, (before, after) in enumerate(zip(records, records[1:]), start=1):
        if after["epoch"] != before["epoch"]:
            for axis in ax:
                axis.axvline(step + 0.5, color="grey", linewidth=0.8)
    return fig, ax


def _show(ax: Axes, image: torch.Tensor, title: str | None = None) -> None:
    picture = image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
    ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize="small")


def show_ops(
    images: torch.Tensor,
    magnitudes: Sequence[float] = (-1.0, -0.5, 0.5, 1.0),
    ops: Sequence[str] | None = None,
    priors: Mapping[str, Any] | str | PathLike | None = None,
) -> Figure:
    """For each op and magnitude, the reference op on the first image next to its encoder, with the PSNR (dB)
    of the encoder against the reference over ``images``. Unsigned ops take |m|.

    Args:
        images: (B, C, H, W) in [0, 1]; the first is drawn, all are measured.
        magnitudes: the columns.
        ops: magnitude ops to show (default all).
        priors: a dict of encoders or a priors folder (default: the shipped priors).
    """
    from .priors import load_priors

    check_images(images)
    images = images if images.dim() == 4 else images.unsqueeze(0)
    names = list(ops) if ops is not None else list(MAGNITUDE_OPS)
    encoders = priors if isinstance(priors, Mapping) else load_priors(priors)
    fig, axes = plt.subplots(len(names), 2 * len(magnitudes), figsize=(2 * len(magnitudes) * 1.3, len(names) * 1.45),
                             squeeze=False, layout="constrained")
    for row, name in enumerate(names):
        spec = get_op(name)
        for col, m in enumerate(magnitudes):
            value = float(m) if spec.signed else abs(float(m))
            magnitude = torch.full((len(images),), value)
            reference = apply_op(name, images, magnitude)
            with torch.no_grad():
                encoded = encoders[name](images, magnitude)
            mse = float((encoded - reference).pow(2).mean())
            psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
            _show(axes[row, 2 * col], reference[0], f"{name} {value:+.2f}")
            _show(axes[row, 2 * col + 1], encoded[0], f"encoder {psnr:.1f} dB")
    return fig


def show_augmented(augmenter: Policy, images: torch.Tensor, rows: int = 4,
                   generator: torch.Generator | None = None) -> Figure:
    """The images (top row) and ``rows`` draws of ``augmenter`` on them, each in its current mode."""
    check_images(images)
    images = images if images.dim() == 4 else images.unsqueeze(0)
    fig, axes = plt.subplots(rows + 1, len(images), figsize=(1.3 * len(images), 1.3 * (rows + 1)), squeeze=False,
                             layout="constrained")
    with torch.no_grad():
        draws = [images] + [augmenter(images, generator=generator) for _ in range(rows)]
    for r, batch in enumerate(draws):
        for c, image in enumerate(batch):
            _show(axes[r, c], image, "original" if r == 0 and c == 0 else None)
    return fig


def plot_fit_report(manifest: Mapping[str, Any] | str | PathLike, ax: Axes | None = None) -> tuple[Figure, Axes]:
    """Held-out PSNR of each fitted encoder against its target and against doing nothing (the identity), from a
    priors manifest (dict, ``manifest.json`` or its folder)."""
    source = manifest
    if not isinstance(source, Mapping) and Path(source).is_dir():
        source = Path(source) / "manifest.json"
    data = _load_json(source, "manifest")
    if "ops" not in data or "image_size" not in data:
        raise DiffAugError(f"manifest must be a priors manifest with 'ops' and 'image_size'; got keys {list(data)}")
    size = f"{data['image_size']}px"
    names = list(data["ops"])
    fidelity = [data["ops"][n]["fidelity"][size] for n in names]
    targets = [FIDELITY_TARGETS[n] for n in names]
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 3.8), layout="constrained")
    else:
        fig = ax.figure
    positions = list(range(len(names)))
    ax.bar([p - 0.2 for p in positions], [f["psnr"] for f in fidelity], 0.4, label=f"encoder ({data['arch']})")
    ax.bar([p + 0.2 for p in positions], [f["identity_psnr"] for f in fidelity], 0.4, label="identity", color="0.7")
    ax.scatter(positions, targets, marker="_", s=400, color="red", zorder=3, label="target")
    ax.set_xticks(positions, names, rotation=45, ha="right")
    ax.set(ylabel=f"held-out PSNR at {size} (dB)", title="fidelity of the meta-encoders")
    ax.legend(fontsize="small")
    return fig, ax

