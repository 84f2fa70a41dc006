"""Render the README's figures into tutorials/figures/ (all drawn by diffaug itself, on shipped real data).

    python benchmarks/render_figures.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench_distill import (  # noqa: E402  (beside this file)
    DEFAULTS, EPOCHS, LONG_SEARCH_STEPS, RESULTS, STUDENT_LR, setup, teacher_path, train_cached_teacher)
from diffaug import PolicyAugmenter  # noqa: E402
from diffaug.distill import Distiller, default_milestones  # noqa: E402
from diffaug.distill.data import standard_augment  # noqa: E402
from diffaug.fit import load_images, random_crops  # noqa: E402
from diffaug.plot import (  # noqa: E402
    plot_fit_report, plot_policy_history, plot_search_diagnostics, plot_teacher_confidence, show_augmented, show_ops)
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
    history = _replay("tst")
    plot_policy_history(history)[0].savefig(OUT / "policy_history.png", dpi=72)
    print("learned policy:", {k: {n: round(v, 2) for n, v in p.items()} for k, p in history["epochs"][-1]["policy"].items()})
    plot_teacher_confidence(history)[0].savefig(OUT / "teacher_confidence.png", dpi=72)
    # The dose experiment's tst-long arm, seed 0: what its Stage II did, step by step.
    plot_search_diagnostics(_replay("tst-long"))[0].savefig(OUT / "search_diagnostics.png", dpi=72)
    print(f"wrote {sorted(p.name for p in OUT.glob('*.png'))} to {OUT}")


def _replay(arm: str, cache: Path = Path(os.environ.get("TEACHER_CACHE", "runs/teachers"))) -> dict:
    """The first 3/8 of the benchmark's seed-0 MNIST run of ``arm``, up to the end of its second search block
    (where the policy stops moving), with the full run's schedule written out: the same first epochs as the
    benchmark's run, at 2/5 the cost."""
    epochs = EPOCHS["mnist"]
    config = {"task": "mnist", "arm": arm, "seed": 0, "epochs": epochs, "teacher_epochs": 60, "settings": DEFAULTS}
    if arm == "tst-long":
        config["search_steps"] = LONG_SEARCH_STEPS
    if not teacher_path(cache, "mnist", 0, 60).is_file():
        train_cached_teacher("mnist", 0, 60, cache)
    splits, loader, student, distiller = setup(config, cache, RESULTS)
    assert distiller is not None
    distiller = Distiller(distiller.teacher, student, distiller.augmenter, standard_augment=standard_augment("mnist"),
                          lr=STUDENT_LR, seed=0, progress=False, milestones=default_milestones(epochs),
                          search_epochs=[epochs // 8, 3 * epochs // 8], search_lr=DEFAULTS["search_lr"],
                          search_steps=config.get("search_steps", DEFAULTS["search_passes"] * len(loader)))
    return distiller.fit(loader, 3 * epochs // 8 + 1, DataLoader(splits.validation, batch_size=500))


if __name__ == "__main__":
    main()
