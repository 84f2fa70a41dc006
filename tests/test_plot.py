"""diffaug.plot on real outputs: every function returns its figure, draws what it says, and never shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from diffaug import DiffAugError, PolicyAugmenter
from diffaug.distill import Distiller
from diffaug.distill.data import mnist5k, small_models
from diffaug.plot import (plot_fit_report, plot_policy, plot_policy_history, plot_search_diagnostics,
                          plot_teacher_confidence, show_augmented, show_ops)
from diffaug.priors import shipped_priors_dir


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def history() -> dict:
    train, _ = mnist5k(train_size=60)
    teacher, student = small_models(1, 10)
    distiller = Distiller(teacher, student, PolicyAugmenter(), search_epochs=[0, 2], search_steps=3, search_lr=1.0,
                          progress=False)
    return distiller.fit(DataLoader(train, batch_size=20), 3)


def test_import_diffaug_does_not_import_matplotlib() -> None:
    code = "import sys, diffaug, diffaug.distill; assert 'matplotlib' not in sys.modules, 'imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_policy_history_from_dict_and_json(history: dict, tmp_path: Path) -> None:
    fig, (probability, magnitude) = plot_policy_history(history)
    assert isinstance(fig, Figure)
    assert len(probability.lines) == 14 and len(magnitude.lines) == 11
    # One point per search step plus one per epoch, against the iteration.
    xs = probability.lines[0].get_xdata()
    assert len(xs) == 6 + 3 and list(xs) == sorted(xs)
    assert len(probability.patches) == 2  # the two Stage II blocks, shaded
    path = tmp_path / "history.json"
    path.write_text(json.dumps(history))
    fig2, axes = plot_policy_history(path, ops=["Rotate", "Invert"])
    assert [line.get_label() for line in axes[0].lines] == ["Rotate", "Invert"]
    fig2.savefig(tmp_path / "history.png")
    assert (tmp_path / "history.png").stat().st_size > 10_000


def test_teacher_confidence_per_epoch(history: dict, tmp_path: Path) -> None:
    fig, ax = plot_teacher_confidence(history)
    assert isinstance(fig, Figure) and len(ax.lines) == 2  # on x_hat and on x
    assert list(ax.lines[0].get_xdata()) == [1, 2, 3]
    assert list(ax.lines[0].get_ydata()) == [e["teacher_confidence"] for e in history["epochs"]]
    assert list(ax.lines[1].get_ydata()) == [e["teacher_confidence_clean"] for e in history["epochs"]]
    path = tmp_path / "history.json"
    path.write_text(json.dumps(history))
    _, ax = plot_teacher_confidence({"WRN-40-2": history, "from file": path})
    assert [line.get_label() for line in ax.lines][::2] == ["WRN-40-2, on x_hat", "from file, on x_hat"]
    with pytest.raises(DiffAugError, match=r"history 'old' must be a Distiller history whose epochs record"):
        plot_teacher_confidence({"old": {"epochs": [{"epoch": 0}]}})


def test_search_diagnostics_per_stage_two_step(history: dict, tmp_path: Path) -> None:
    fig, (terms, teacher, gradients) = plot_search_diagnostics(history)
    assert isinstance(fig, Figure)
    assert list(terms.lines[0].get_ydata()) == [r["teacher_ce"] for r in history["search"]]
    assert list(teacher.lines[0].get_ydata()) == [r["teacher_accuracy"] for r in history["search"]]
    # Gradients are measured every 4th step by default: steps 1 and 5 of the 6 (3 a block, the count runs on).
    assert list(gradients.lines[0].get_xdata()) == [1, 5]
    assert len([line for line in terms.lines if line.get_xdata()[0] == 3.5]) == 1  # the line between the blocks
    path = tmp_path / "history.json"
    path.write_text(json.dumps(history))
    plot_search_diagnostics(path)[0].savefig(tmp_path / "search.png")
    with pytest.raises(DiffAugError, match=r"history must be a Distiller history with Stage II steps"):
        plot_search_diagnostics({"search": [], "epochs": []})


def test_policy_bars() -> None:
    aug = PolicyAugmenter(probability={"Rotate": 0.9})
    fig, ax = plot_policy(aug)
    heights = [bar.get_height() for bar in ax.patches[:14]]
    assert heights[aug.ops.index("Rotate")] == pytest.approx(0.9)
    plot_policy(aug.policy())


def test_show_ops_draws_reference_next_to_encoder(images: torch.Tensor) -> None:
    fig = show_ops(images[:4], magnitudes=(-1.0, 1.0), ops=["Rotate", "Solarize"])
    assert len(fig.axes) == 2 * 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "Rotate -1.00" and titles[1].startswith("encoder ") and titles[1].endswith(" dB")
    assert titles[4] == "Solarize +1.00"  # unsigned ops take |m|
    assert float(titles[1].split()[1]) > 45  # the shipped Rotate prior is faithful


def test_show_augmented(images: torch.Tensor) -> None:
    fig = show_augmented(PolicyAugmenter(seed=0).eval(), images[:5], rows=3)
    assert len(fig.axes) == 5 * 4


def test_fit_report_from_manifest_folder_or_file() -> None:
    fig, ax = plot_fit_report(shipped_priors_dir())
    assert len(ax.get_xticklabels()) == 11
    plot_fit_report(shipped_priors_dir("paper") / "manifest.json")
    with pytest.raises(DiffAugError, match=r"manifest must be a priors manifest"):
        plot_fit_report({"nope": 1})


def test_plot_errors() -> None:
    with pytest.raises(DiffAugError, match=r"history must be a Distiller history"):
        plot_policy_history({"train": []})
    with pytest.raises(DiffAugError, match=r"which is missing"):
        plot_policy_history("/nonexistent/history.json")


@pytest.mark.parametrize(("sampling", "label"), [("relaxed", "P(full strength)"), ("mean", "the strength"),
                                                 ("uniform", "uniform on [0, m]")])
def test_policy_bars_say_what_the_magnitude_means(sampling: str, label: str) -> None:
    aug = PolicyAugmenter(probability=0.5, magnitude={"Rotate": 0.4}, magnitude_sampling=sampling, priors=None)
    fig, ax = plot_policy(aug)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any(label in t for t in labels), labels
    if sampling == "relaxed":  # the third bar: p * m at full strength
        heights = [bar.get_height() for bar in ax.patches[28:42]]
        assert heights[aug.ops.index("Rotate")] == pytest.approx(0.5 * 0.4)
    # a history's policy (the two numbers alone) still plots, without claiming a sampler
    numbers = {op: {k: v[k] for k in ("probability", "magnitude") if k in v} for op, v in aug.policy().items()}
    _, ax = plot_policy(numbers)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["probability p", "magnitude m"]
