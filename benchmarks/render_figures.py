"""Render the README's figures into tutorials/figures/ (all drawn by diffaug itself, on shipped real data).

    python benchmarks/render_figures.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from diffaug import PolicyAugmenter  # noqa: E402
from diffaug.distill import Distiller  # noqa: E402
from diffaug.distill.__main__ import train_teacher  # noqa: E402
from diffaug.distill.data import mnist5k, small_models  # noqa: E402
from diffaug.fit import load_images, random_crops  # noqa: E402
from diffaug.plot import plot_fit_report, plot_policy_history, show_augmented, show_ops  # noqa: E402
from diffaug.priors import shipped_priors_dir  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tutorials" / "figures"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    _, held = load_images()
    images = random_crops(held, 8, 64, torch.Generator().manual_seed(3), max_zoom=2.0)
    show_augmented(PolicyAugmenter(seed=0).eval(), images, rows=3).savefig(OUT / "augmented.png", dpi=72)
    show_ops(images[:4], magnitudes=(-1.0, 1.0), ops=["Rotate", "ShearX", "Color", "Contrast", "Solarize"]).savefig(
        OUT / "ops.png", dpi=72)
    plot_fit_report(shipped_priors_dir())[0].savefig(OUT / "fit_report.png", dpi=72)

    train, test = mnist5k(train_size=1000, seed=0)
    teacher, student = small_models(1, 10, seed=0)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    train_teacher(teacher, loader, epochs=10, device="cpu")
    distiller = Distiller(teacher, student, PolicyAugmenter(), lr=0.05, search_epochs=[1, 4], search_lr=0.25,
                          seed=0, progress=False)
    history = distiller.fit(loader, epochs=8)
    plot_policy_history(history)[0].savefig(OUT / "policy_history.png", dpi=72)
    print(f"wrote {sorted(p.name for p in OUT.glob('*.png'))} to {OUT}")


if __name__ == "__main__":
    main()
