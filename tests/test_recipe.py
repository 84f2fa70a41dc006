"""The one-command recipe (``python -m diffaug.distill``): zoo pairs, teacher checkpoints, image folders,
normalisation on the device, and a torchrun job that survives a killed rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from diffaug import DiffAugError, PolicyAugmenter
from diffaug.distill import Distiller
from diffaug.distill.__main__ import main
from diffaug.distill.data import ImageFolder, channel_statistics, small_models
from diffaug.distill.models import build_model
from diffaug.fit import shipped_images_dir

WORKER = Path(__file__).with_name("distill_worker.py")
ROOT = Path(__file__).resolve().parents[1]
# Two zoo models small enough for the CPU suite, and data to match.
QUICK = ["--teacher", "resnet8", "--student", "resnet8", "--teacher-epochs", "1", "--epochs", "1", "--batch-size", "50"]


def test_photos_with_zoo_models_trains_caches_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", "photos", "--train-size", "100", *QUICK, "--kd", "dkd", "--cache-dir", str(tmp_path / "cache"),
              "--out", str(tmp_path / "run")]
    assert main(common) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["student"] == "resnet8" and report["kd"] == "dkd" and 0 <= report["val_accuracy"] <= 1
    assert len(list((tmp_path / "cache").glob("teacher-photos-resnet8-*.pt"))) == 1
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["epochs"]) == 1
    # The same command with --resume continues from the checkpoint to the new --epochs.
    assert main([*common, "--resume", "--epochs", "2"]) == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [0, 1]


def test_a_teacher_checkpoint_loads_strictly_or_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(3)
    teacher = build_model("resnet14", 10)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")  # the {"model": ...} layout of CRD's zoo
    common = ["--data", "photos", "--train-size", "100", *QUICK, "--teacher", "resnet14",
              "--teacher-checkpoint", str(tmp_path / "teacher.pth"), "--out", str(tmp_path / "run"),
              "--cache-dir", str(tmp_path / "cache")]
    assert main(common) == 0
    assert not (tmp_path / "cache").exists()  # nothing trained
    capsys.readouterr()
    assert main([*common[:-6], "--teacher", "resnet20", *common[-6:]]) == 2
    assert "does not fit --teacher" in capsys.readouterr().err


def test_bad_recipes_are_refused_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--data", "mnist", "--teacher", "resnet20", "--student", "resnet8"], "RGB images"),
        (["--data", "folder"], "--data-dir"),
        (["--data", "cifar"], "--cifar-dir"),
        (["--data", "photos", "--teacher", "small", "--student", "resnet8"], "both --teacher and --student"),
        (["--data", "photos", "--epochs", "-1"], "--epochs must be positive"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "run")]) == 2, argv
        assert message in capsys.readouterr().err, argv


def _image_folder(root: Path, classes: int = 2, per_class: int = 3) -> None:
    """Shipped photos of different sizes and aspect ratios as an ImageNet-style tree, a class per photo."""
    photos = sorted(shipped_images_dir().glob("*.png"))[:classes]
    for split in ("train", "val"):
        for index, path in enumerate(photos):
            folder = root / split / path.stem
            folder.mkdir(parents=True)
            with Image.open(path) as image:
                rgb = image.convert("RGB")
                for i in range(per_class):
                    w, h = rgb.size
                    rgb.resize((w // (i + 2), h // (i + 3))).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
            (folder / "notes.txt").write_text("not an image")


def test_image_folder_crops_flips_and_centre_crops(tmp_path: Path) -> None:
    _image_folder(tmp_path)
    train = ImageFolder(tmp_path / "train", train=True, size=48)
    val = ImageFolder(tmp_path / "val", train=False, size=48, classes=train.classes)
    assert len(train) == 6 and train.classes == val.classes and [s[1] for s in train.samples] == [0, 0, 0, 1, 1, 1]
    torch.manual_seed(0)
    image, label = train[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    torch.manual_seed(0)
    assert torch.equal(train[0][0], image)  # drawn from torch's RNG: reproducible from the seed
    # Evaluation: the shorter side to 48 / 0.875 = 55 px, the centre 48 px; the reference done with PIL directly.
    path = val.samples[1][0]
    with Image.open(path) as opened:
        rgb = opened.convert("RGB")
    scale = 55 / min(rgb.size)
    w, h = max(48, round(rgb.size[0] * scale)), max(48, round(rgb.size[1] * scale))
    reference = rgb.resize((w, h), Image.BILINEAR).crop(((w - 48) // 2, (h - 48) // 2, (w - 48) // 2 + 48, (h - 48) // 2 + 48))
    expected = torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(val[1][0], expected)


def test_image_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DiffAugError, match="directory"):
        ImageFolder(tmp_path / "missing", train=True)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DiffAugError, match="no image"):
        ImageFolder(tmp_path / "empty", train=True)
    _image_folder(tmp_path / "data")
    with pytest.raises(DiffAugError, match="classes the training folder lacks"):
        ImageFolder(tmp_path / "data" / "val", train=False, classes=["other"])
    broken = tmp_path / "broken" / "a"
    broken.mkdir(parents=True)
    (broken / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DiffAugError, match="images must be readable image files"):
        ImageFolder(tmp_path / "broken", train=True)[0]


def test_folder_recipe_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _image_folder(tmp_path / "data", classes=2, per_class=4)
    argv = ["--data", "folder", "--data-dir", str(tmp_path / "data"), "--image-size", "32", "--workers", "0",
            *QUICK, "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["val_accuracy"] is not None


def test_the_distiller_normalises_on_the_device_and_checks_the_augmenter() -> None:
    torch.manual_seed(0)
    images, labels = torch.rand(20, 3, 16, 16), torch.randint(10, (20,))
    mean, std = channel_statistics(images)
    assert np.allclose(mean, images.mean((0, 2, 3)).tolist(), atol=1e-6)
    teacher, student = small_models(3, 10)
    distiller = Distiller(teacher, student, PolicyAugmenter(mean=mean, std=std), mean=mean, std=std, progress=False)
    loader = DataLoader(TensorDataset(images, labels), batch_size=10)
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = (student.eval()(normalised).argmax(1) == labels).float().mean().item()
    assert distiller.evaluate(loader) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(DiffAugError, match="PolicyAugmenter\\(mean=..., std=...\\)"):
        Distiller(teacher, student, PolicyAugmenter(), mean=mean, std=std)
    with pytest.raises(DiffAugError, match="together"):
        Distiller(teacher, student, PolicyAugmenter(), mean=mean)


@pytest.mark.slow
def test_torchrun_job_killed_mid_epoch_restarts_and_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    """2 gloo ranks under torchrun --max-restarts 1; rank 1 is SIGKILLed in epoch 1's Stage III on the first
    attempt. The restarted job resumes from the epoch-0 checkpoint and must end bit for bit where the uninterrupted
    job does: student, policy and history. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 as the README says: with the
    store shared between torchrun's agent and the workers (torch's default) the restarted gloo group is handed
    the previous attempt's addresses and fails to connect (pytorch/pytorch#135712)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", "1", str(WORKER), "elastic"]
    results = {}
    for name, kill in (("straight", "0"), ("killed", "1")):
        out = tmp_path / name
        out.mkdir()
        run = subprocess.run([*command, str(out)], env={**env, "KILL_MID_EPOCH": kill}, capture_output=True,
                             text=True, timeout=1800)
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = torch.load(out / "elastic.pt", weights_only=False)
    straight, killed = results["straight"], results["killed"]
    assert (straight["attempts"], killed["attempts"]) == (1, 2)  # the kill did happen, and one restart recovered
    for part in ("student", "augmenter"):
        for key, value in straight[part].items():
            assert torch.equal(value, killed[part][key]), (part, key)
    assert straight["history"] == killed["history"]


@pytest.mark.slow
def test_the_recipe_runs_under_torchrun_with_the_batch_split_over_ranks(tmp_path: Path) -> None:
    """The same command under torchrun (2 gloo ranks): rank 0 trains and caches the teacher, the other waits and
    loads it; both train; rank 0 writes the history and prints the report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "diffaug.distill", "--data", "photos", "--train-size", "100", *QUICK, "--batch-size", "20",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["val_accuracy"] is not None
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["train"]) == 100 // 20  # 5 steps: each rank takes 10 of the 20 images a step


def test_the_cifar_recipe_starts_on_files_in_the_official_layout(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """CIFAR-100's python files (``train``, ``test``, fine labels), written here in their layout with random
    pixels (the data cannot be downloaded): the README's command with small models and one epoch."""
    import pickle

    rng = np.random.default_rng(0)
    for name, count in (("train", 100), ("test", 20)):
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b"fine_labels": [int(v) for v in rng.integers(0, 100, count)], b"coarse_labels": [0] * count}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=2))
    argv = ["--data", "cifar", "--cifar-dir", str(tmp_path), *QUICK, "--kd", "dist",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["kd"] == "dist"
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["student"]["fc.weight"].shape == (100, 64)  # 100 classes, from the fine labels
