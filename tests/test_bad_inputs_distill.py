"""Bad and edge inputs of ``python -m diffaug.distill``: every one gets its exit status (2 a bad flag or input,
nothing trained; 1 a failure while training; 130 Ctrl-C) and one line that says what is wrong, never a
traceback; and the image reader's edge cases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffaug import DiffAugError
from diffaug.distill import Distiller
from diffaug.distill.__main__ import main
from diffaug.images import open_rgb, read_image, shipped_images_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "mnist", "--train-size", "40", "--teacher-epochs", "1", "--epochs", "1", "--batch-size", "20"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be positive; got 0"),
    (["--epochs", "-3"], "--epochs must be positive; got -3"),
    (["--teacher-epochs", "0"], "--teacher-epochs must be positive; got 0"),
    (["--batch-size", "0"], "--batch-size must be positive; got 0"),
    (["--train-size", "0"], "--train-size must be positive; got 0"),
    (["--lr", "0"], "--lr must be positive; got 0.0"),
    (["--lr", "-1"], "--lr must be positive; got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number; got nan"),
    (["--lr", "inf"], "--lr must be a finite number; got inf"),
    (["--search-steps", "0"], "--search-steps must be positive; got 0"),
    (["--search-lr", "-0.01"], "--search-lr must be positive; got -0.01"),
    (["--search-lr", "nan"], "--search-lr must be a finite number; got nan"),
    (["--workers", "-1"], "--workers must be >= 0; got -1"),
    (["--seed", "-1"], "--seed must be >= 0; got -1"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--device", "bogus"], "argument --device: expected cpu, cuda or cuda:N; got 'bogus'"),
    (["--device", "meta"], "argument --device: expected cpu, cuda or cuda:N; got 'meta'"),
    (["--kd", "crd"], "argument --kd: invalid choice: 'crd'"),
    (["--amp", "fp16"], "amp='fp16' needs a CUDA device; got device 'cpu'"),
    pytest.param(["--device", "cuda"], "CUDA is not available", marks=NO_CUDA),
    pytest.param(["--device", "cuda", "--amp", "bf16"], "CUDA is not available", marks=NO_CUDA),
    (["--data", "folder"], "--data folder needs --data-dir"),
    (["--data", "cifar"], "--data cifar needs --cifar-dir"),
    (["--data", "mnist", "--teacher", "resnet8", "--student", "resnet8"], "the zoo's models take RGB images"),
    (["--teacher", "small", "--student", "resnet8"], "give it as both --teacher and --student"),
    (["--teacher-checkpoint", "{tmp}/missing.pt"], "--teacher-checkpoint must be a file; got '{tmp}/missing.pt', which is missing"),
    (["--teacher-checkpoint", "{tmp}"], "which is a directory"),
])
def test_bad_flags_exit_2_with_one_message_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           argv: list[str], message: str) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main([*TINY, *argv, "--out", str(out), "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err
    assert not out.exists() and not cache.exists()  # nothing trained, nothing written


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One finished tiny run: its folders, to resume and to break."""
    root = tmp_path_factory.mktemp("finished")
    common = [*TINY, "--out", str(root / "run"), "--cache-dir", str(root / "cache")]
    assert main(common) == 0
    return {"root": root, "common": common}


@pytest.mark.parametrize("change, message", [
    (["--kd", "dkd"], "checkpoint was written with kd='kd'; this Distiller has kd='dkd'"),
    (["--lr", "0.2"], "checkpoint was written with lr=0.05; this Distiller has lr=0.2"),
    (["--seed", "5"], "checkpoint was written with seed=0; this Distiller has seed=5"),
    (["--search-steps", "7"], "checkpoint was written with search_steps=None; this Distiller has search_steps=7"),
])
def test_a_resume_with_changed_flags_is_refused_before_a_teacher_is_trained(finished: dict[str, Any], change: list[str],
                                                                          message: str,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    cached = sorted((finished["root"] / "cache").iterdir())
    checkpoint = (finished["root"] / "run" / "checkpoint.pt").read_bytes()
    assert main([*finished["common"], "--resume", *change]) == 2
    assert message in capsys.readouterr().err
    assert sorted((finished["root"] / "cache").iterdir()) == cached  # no teacher trained for the new seed
    assert (finished["root"] / "run" / "checkpoint.pt").read_bytes() == checkpoint


def test_a_corrupt_teacher_cache_is_refused_with_what_to_do(finished: dict[str, Any], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (cache,) = (finished["root"] / "cache").iterdir()
    copy = tmp_path / "cache"
    copy.mkdir()
    (copy / cache.name).write_bytes(cache.read_bytes()[:100])  # cut short, as a full disk would leave it
    capsys.readouterr()
    argv = [*TINY, "--out", str(tmp_path / "run"), "--cache-dir", str(copy)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"teacher cache {copy / cache.name} could not be read" in err and "delete it" in err
    (copy / cache.name).write_bytes(b"")
    assert main(argv) == 2
    assert "is empty (0 bytes)" in capsys.readouterr().err


def test_a_teacher_cache_of_other_data_is_not_used(finished: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """The cache is keyed by the data's identity: another training set (here another seed's digits, same size and
    flags otherwise) trains and caches a teacher of its own."""
    before = sorted((finished["root"] / "cache").iterdir())
    argv = [*TINY, "--train-size", "50", "--out", str(finished["root"] / "other"),
            "--cache-dir", str(finished["root"] / "cache")]
    assert main(argv) == 0
    assert len(sorted((finished["root"] / "cache").iterdir())) == len(before) + 1


def test_ctrl_c_exits_130_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Distiller, "fit", interrupted)
    assert main([*TINY, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]) == 130
    err = capsys.readouterr().err
    assert "interrupted; the last checkpoint (if any) is intact" in err and "Traceback" not in err


def test_a_failure_while_training_exits_1_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    def diverges(*args: Any, **kwargs: Any) -> None:
        raise DiffAugError("the Stage III (KD) loss became nan at epoch 0, step 3")

    monkeypatch.setattr(Distiller, "fit", diverges)
    assert main([*TINY, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]) == 1
    assert capsys.readouterr().err.strip().endswith("error: the Stage III (KD) loss became nan at epoch 0, step 3")


def test_bad_flags_print_no_traceback_from_the_real_command() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "diffaug.distill", "--device", "bogus"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 2 and "expected cpu, cuda or cuda:N" in run.stderr and "Traceback" not in run.stderr


def _folder(root: Path, per_class: int, size: tuple[int, int] = (40, 30)) -> None:
    photos = sorted(shipped_images_dir().glob("*.png"))[:2]
    for split in ("train", "val"):
        for path in photos:
            folder = root / split / path.stem
            folder.mkdir(parents=True)
            with Image.open(path) as image:
                for i in range(per_class):
                    image.convert("RGB").resize(size).save(folder / f"{i}.png")


def test_a_folder_smaller_than_the_batch_trains_on_smaller_batches_said_once(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Four training images and the recipe's batches of 256 (drop_last): the batches shrink to 4, said once for
    the teacher and once for the student, and both train for a step an epoch instead of none."""
    _folder(tmp_path / "data", per_class=2)
    argv = ["--data", "folder", "--data-dir", str(tmp_path / "data"), "--image-size", "32", "--workers", "0",
            "--teacher", "resnet8", "--student", "resnet8", "--teacher-epochs", "1", "--epochs", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("fewer than the teacher's batch of 256: training on batches of 4") == 1
    assert err.count("fewer than the batch of 256: training on batches of 4") == 1
    import json

    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["train"]) == 1


def test_a_decompression_bomb_in_the_folder_fails_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """PIL refuses images of more than twice MAX_IMAGE_PIXELS; lowered here so that a small image is such a bomb."""
    _folder(tmp_path / "data", per_class=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    argv = ["--data", "folder", "--data-dir", str(tmp_path / "data"), "--image-size", "32", "--workers", "0",
            "--teacher", "resnet8", "--student", "resnet8", "--teacher-epochs", "1", "--epochs", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "is too large" in err and "Traceback" not in err


def test_sixteen_bit_pngs_are_scaled_from_65535(tmp_path: Path) -> None:
    values = np.array([[0, 32768], [65535, 4096]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode.startswith("I")  # what PIL makes of a 16-bit gray PNG
    expected = torch.from_numpy(values.astype(np.float64) / 65535).float()
    image = read_image(tmp_path / "deep.png")
    assert image.shape == (3, 2, 2) and torch.equal(image[0], expected) and torch.equal(image[2], expected)
    # The 8-bit PIL image of an ImageFolder: the nearest of 256 levels, not 255 everywhere.
    eight = np.asarray(open_rgb(tmp_path / "deep.png"))[..., 0]
    assert eight.tolist() == [[0, 128], [255, 16]]


@pytest.mark.parametrize("content, message", [
    (b"", "images must be readable image files"),
    (b"\x89PNG\r\n\x1a\n garbage", "images must be readable image files"),
])
def test_unreadable_images_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DiffAugError, match=message):
        read_image(path)
    with pytest.raises(DiffAugError, match=message):
        open_rgb(path)


def test_a_resume_with_another_student_is_refused_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", "photos", "--train-size", "20", "--teacher", "resnet8", "--teacher-epochs", "1", "--epochs",
              "1", "--batch-size", "20", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--student", "resnet8"]) == 0
    checkpoint = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main([*common, "--student", "resnet14", "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint was written with student.shapes." in err and "Traceback" not in err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == checkpoint


def test_an_error_in_a_dataloader_worker_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An undecodable image met by a DataLoader worker: the worker's traceback is not printed, the message is."""
    _folder(tmp_path / "data", per_class=2)
    (tmp_path / "data" / "train" / sorted(os.listdir(tmp_path / "data" / "train"))[0] / "9.png").write_bytes(b"")
    argv = ["--data", "folder", "--data-dir", str(tmp_path / "data"), "--image-size", "32", "--workers", "1",
            "--teacher", "resnet8", "--student", "resnet8", "--teacher-epochs", "1", "--epochs", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "9.png is not" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == err.strip().splitlines()[-1:]
