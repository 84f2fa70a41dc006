"""Render the README's figures into tutorials/figures/ (all drawn by diffaug itself, on shipped real data).

    python benchmarks/render_figures.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench_distill import DEFAULTS, EPOCHS, setup, teacher_path, train_cached_teacher  # noqa: E402  (beside this file)
from diffaug import PolicyAugmenter  # noqa: E402
from diffaug.distill import default_milestones  # noqa: E402
from diffaug.fit import load_images, random_crops  # noqa: E402
from diffaug.plot import (  # noqa: E402
    plot_fit_report, plot_policy_history, plot_teacher_confidence, show_augmented, show_ops)
from diffaug.priors import shipped_priors_dir  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tutorials" / "figures"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # as the benchmark's workers: the search is sensitive to the last bit of rounding
    torch.manual_seed(0)
    _, held = load_images()
    images = random_crops(held, 8, 64, torch.Generator().manual_seed(3), max_zoom=2.0)
    show_augmented(PolicyAugmenter(seed=0).eval(), images, rows=3).savefig(OUT / "augmented.png", dpi=72)
    show_ops(images[:4], magnitudes=(-1.0, 1.0), ops=["Rotate", "ShearX", "Color", "Contrast", "Solarize"]).savefig(
        OUT / "ops.png", dpi=72)
    plot_fit_report(shipped_priors_dir())[0].savefig(OUT / "fit_report.png", dpi=72)

    # The TST arm of the README's experiment, seed 0 on MNIST, with the library's defaults (bench_distill.py).
    cache = Path("runs/teachers")
    config = {"task": "mnist", "arm": "tst", "seed": 0, "epochs": EPOCHS["mnist"], "teacher_epochs": 60,
              "split": "validation", "settings": DEFAULTS}
    if not teacher_path(cache, "mnist", 0, 60).is_file():
        train_cached_teacher("mnist", 0, 60, cache)
    splits, loader, _, distiller = setup(config, cache)
    assert distiller is not None
    # The policy stops moving after the second search block (3/8 of the epochs), so the figure trains only up to
    # it, with the full run's schedule written out: the same first epochs as the benchmark's run, at 2/5 the cost.
    epochs = config["epochs"]
    distiller.milestones = default_milestones(epochs)
    distiller.search_epochs = [epochs // 8, 3 * epochs // 8]
    history = distiller.fit(loader, 3 * epochs // 8 + 1, DataLoader(splits.validation, batch_size=500))
    plot_policy_history(history)[0].savefig(OUT / "policy_history.png", dpi=72)
    print("learned policy:", {k: {n: round(v, 2) for n, v in p.items()} for k, p in history["epochs"][-1]["policy"].items()})
    plot_teacher_confidence(history)[0].savefig(OUT / "teacher_confidence.png", dpi=72)
    print(f"wrote {sorted(p.name for p in OUT.glob('*.png'))} to {OUT}")


if __name__ == "__main__":
    main()
