"""The console script: demo, fit-priors (deterministic, atomic, refusing to clobber the shipped priors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffaug import DiffAugError, load_priors
from diffaug.cli import main
import diffaug.fit as fit_module
from diffaug.fit import FitSettings, fit_priors
from diffaug.images import shipped_images_dir
from diffaug.priors import read_manifest, shipped_priors_dir

QUICK = ["--steps", "20", "--refine-iterations", "3", "--batch-size", "8"]


def test_demo_writes_a_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--count", "3", "--rows", "2", "--size", "24"]) == 0
    with Image.open(out) as image:
        assert image.size == (3 * 24, 3 * 24)
    assert "wrote" in capsys.readouterr().out


def test_fit_priors_writes_a_loadable_folder_and_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "priors"
    assert main(["fit-priors", "--ops", "Rotate", "Color", "--out", str(out), *QUICK]) == 0
    report = capsys.readouterr().out
    assert "PSNR 32px" in report and "Rotate" in report and "Color" in report
    assert sorted(load_priors(out)) == ["Color", "Rotate"]
    manifest = read_manifest(out)
    assert manifest["fit"]["steps"] == 20 and isinstance(manifest["ops"]["Rotate"]["fidelity"]["32px"]["psnr"], float)


def test_same_seed_same_weights(tmp_path: Path) -> None:
    settings = FitSettings(steps=15, refine_iterations=3, batch_size=8)
    a, _ = fit_priors(["Solarize"], settings=settings, out=tmp_path / "a", stream=None)
    b, _ = fit_priors(["Solarize"], settings=settings, out=tmp_path / "b", stream=None)
    c, _ = fit_priors(["Solarize"], settings=FitSettings(steps=15, refine_iterations=3, batch_size=8, seed=1),
                      out=tmp_path / "c", stream=None)
    digest = lambda folder: read_manifest(folder)["ops"]["Solarize"]["sha256"]  # noqa: E731
    assert digest(a) == digest(b) != digest(c)


def test_fit_priors_refuses_the_shipped_folder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit-priors", "--ops", "Rotate", "--out", str(shipped_priors_dir()), *QUICK]) == 1
    assert "--overwrite-shipped" in capsys.readouterr().err
    with pytest.raises(DiffAugError, match=r"must not be the priors shipped"):
        fit_priors(["Rotate"], out=shipped_priors_dir("paper"), stream=None)


def test_fit_priors_rejects_unknown_ops(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit-priors", "--ops", "Equalize"])
    assert "invalid choice: 'Equalize'" in capsys.readouterr().err


@pytest.mark.slow
def test_interrupted_fit_leaves_the_previous_priors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C part-way through a fit: the folder still holds the previous, complete priors.

    The interrupt is raised in the fit loop of the second op, where a Ctrl-C's KeyboardInterrupt surfaces. A real
    SIGINT to a ``fit-priors`` subprocess was tried first; under the full suite in a clean clone the child twice
    went on fitting and exited 0 (alone it passed), so the test no longer depends on how signals reach a child."""
    out = tmp_path / "priors"
    fit_priors(["Rotate"], settings=FitSettings(steps=10, refine_iterations=2, batch_size=8), out=out, stream=None)
    before = read_manifest(out)
    fit_encoder = fit_module.fit_encoder

    def interrupt_in_color(op, arch, pool, settings, progress=None):  # noqa: ANN001, ANN202
        def report(step: int, loss: float, total: int) -> None:
            if op == "Color" and step >= 25:
                raise KeyboardInterrupt
            if progress is not None:
                progress(step, loss, total)
        return fit_encoder(op, arch, pool, settings, report)

    monkeypatch.setattr(fit_module, "fit_encoder", interrupt_in_color)
    code = main(["fit-priors", "--ops", "Rotate", "Color", "Contrast", "--out", str(out), "--steps", "60"])
    assert code == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert read_manifest(out) == before
    assert sorted(load_priors(out)) == ["Rotate"]
    assert not list(out.glob(".*.tmp"))


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "diffaug", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "fit-priors" in result.stdout and "demo" in result.stdout


@pytest.mark.parametrize("flags, match", [
    (["--out", "FILE"], r"out must be a priors folder .* which is a file"),
    (["--device", "cuda:99"], r"device must be one this machine has; got 'cuda:99'"),
    (["--images", "CORRUPT"], r"images must be readable image files; .*broken.png is not"),
])
def test_fit_priors_refuses_before_fitting(flags: list[str], match: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """What would make the save fail is found before the fit (minutes of work), in one line and exit status 1."""
    import diffaug.fit

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("fitted before refusing")

    monkeypatch.setattr(diffaug.fit, "fit_encoder", no_fit)
    (tmp_path / "file").write_text("not a folder")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"not a png")
    (corrupt / "fine.png").write_bytes((shipped_images_dir() / "camera.png").read_bytes())
    flags = [{"FILE": str(tmp_path / "file"), "CORRUPT": str(corrupt)}.get(f, f) for f in flags]
    assert main(["fit-priors", "--ops", "Rotate", *QUICK, *flags]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("diffaug fit-priors: error: ")
    assert __import__("re").search(match, err), err


def test_demo_writes_atomically_with_a_plain_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted demo leaves no half-written picture (and the previous one as it was)."""
    out = tmp_path / "demo.png"
    out.write_bytes(b"previous")
    out.chmod(0o644)
    from PIL import Image as PILImage

    def interrupted(self: object, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(PILImage.Image, "save", interrupted)
    assert main(["demo", "--out", str(out), "--count", "2", "--rows", "1", "--size", "8"]) == 130
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["demo.png"]
    monkeypatch.undo()
    assert main(["demo", "--out", str(out), "--count", "2", "--rows", "1", "--size", "8"]) == 0
    assert out.stat().st_mode & 0o777 == 0o644
    with PILImage.open(out) as image:
        assert image.size == (16, 16)


def test_16_bit_images_are_read_at_their_levels(tmp_path: Path) -> None:
    """A 16-bit grayscale PNG (mode I;16) through convert("RGB") comes out almost all white; its levels are kept."""
    import numpy as np

    from diffaug.fit import load_images

    levels = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "gray16.png")
    (image,), _ = load_images(tmp_path)
    assert image.shape == (3, 32, 32)
    torch_levels = image[0].double() * 65535
    assert float((torch_levels - torch.from_numpy(levels.astype(np.float64))).abs().max()) < 0.01  # float32 rounding
