"""The reference TST loop on real data: what Stage II claims, exact resume, DDP on 2 CPU ranks, failure modes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from diffaug import DiffAugError, PolicyAugmenter
from diffaug.distill import Distiller
from diffaug.distill.__main__ import train_teacher
from diffaug.distill.data import cifar, mnist5k, photo_patches, small_models

WORKER = Path(__file__).with_name("distill_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def mnist_pair() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A teacher trained on 500 real digits and a weaker student, plus 256 held-out digits. The student must be
    past chance on x_hat: at chance p_S[y] ~ 0.1 and the student term of Eq. 2 has almost no gradient. After 4
    epochs its logits were still nearly flat (mean p_S[y] 0.12 on x_hat) and whether its CE rose in Stage II
    depended on the random stream (3 of 6 seeds); after 12 (p_S[y] 0.32) it rose for all 6 seeds, by 0.06-0.14."""
    train, test = mnist5k(train_size=500, seed=0)
    teacher, student = small_models(1, 10, seed=0)
    loader = DataLoader(train, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0))
    train_teacher(teacher, loader, epochs=6, device="cpu")
    train_teacher(student, loader, epochs=12, device="cpu")
    x, y = test.tensors
    return teacher, student.eval(), x[:256], y[:256]


def _losses_on_policy(aug: PolicyAugmenter, teacher, student, x, y) -> tuple[float, float]:
    """Teacher CE and student CE on x_hat, averaged over 8 fixed draws of the policy (common random numbers)."""
    t_ce, s_ce = [], []
    with torch.no_grad():
        for seed in range(8):
            x_hat = aug(x, generator=torch.Generator().manual_seed(seed))
            t_ce.append(F.cross_entropy(teacher(x_hat), y))
            s_ce.append(F.cross_entropy(student(x_hat), y))
    return float(torch.stack(t_ce).mean()), float(torch.stack(s_ce).mean())


def test_stage_two_search_does_what_the_paper_claims(mnist_pair) -> None:
    """Over one search block the teacher's CE on x_hat goes down and the student's goes up (DESIGN.md section 6)."""
    teacher, student, x, y = mnist_pair
    augmenter = PolicyAugmenter(seed=0)
    distiller = Distiller(teacher, student, augmenter, search_lr=0.05, progress=False)
    before = _losses_on_policy(augmenter.train(), teacher, student, x, y)
    weights = {k: v.clone() for k, v in {**student.state_dict(), **teacher.state_dict()}.items()}
    for step in range(40):
        index = torch.randint(len(x), (64,), generator=torch.Generator().manual_seed(step))
        distiller.search_step(x[index], y[index])
    after = _losses_on_policy(augmenter.train(), teacher, student, x, y)
    assert after[0] < before[0], (before, after)
    assert after[1] > before[1], (before, after)
    # Only the policy moved: teacher and student weights (BatchNorm statistics included) are as they were.
    after_weights = {**student.state_dict(), **teacher.state_dict()}
    assert all(torch.equal(v, after_weights[k]) for k, v in weights.items())


def test_training_resumes_exactly_in_a_fresh_process(tmp_path: Path) -> None:
    """3 epochs straight == 1 epoch, checkpoint, load in a new process, 2 more epochs (bit for bit)."""
    _run(str(WORKER), "straight", str(tmp_path))
    _run(str(WORKER), "first", str(tmp_path))
    _run(str(WORKER), "resume", str(tmp_path))
    straight = torch.load(tmp_path / "straight.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resume.pt", weights_only=False)
    for part in ("student", "augmenter"):
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
    assert straight["history"] == resumed["history"]
    assert len(straight["history"]["search"]) == 4  # 2 steps at epochs 0 and 1


@pytest.mark.slow
def test_ddp_on_two_cpu_ranks_keeps_the_policy_identical(tmp_path: Path) -> None:
    _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), "ddp", str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for key, value in rank0["augmenter"].items():
        assert torch.equal(value, rank1["augmenter"][key]), key
    assert not torch.equal(rank0["augmenter"]["probability_logits"], PolicyAugmenter().probability_logits.detach())
    for key, value in rank0["student"].items():  # DDP keeps the student's weights in step too
        if "running_" not in key and "num_batches" not in key:  # BatchNorm statistics stay per rank, as in DDP
            assert torch.allclose(value, rank1["student"][key]), key
    assert not torch.equal(rank0["first_draw"], rank1["first_draw"])  # sampling differs per rank


class _Exploding(torch.nn.Module):
    """A student whose logits turn to NaN after a few training steps."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = small_models(1, 10)[1]
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(x)
        return out * float("nan") if self.training and self.calls > 8 else out


def test_non_finite_loss_stops_with_stage_and_step_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    train, _ = mnist5k(train_size=100)
    teacher, _ = small_models(1, 10)
    distiller = Distiller(teacher, _Exploding(), PolicyAugmenter(), search_epochs=[], progress=False)
    loader = DataLoader(train, batch_size=20)
    checkpoint = tmp_path / "checkpoint.pt"
    distiller.fit(loader, 1, checkpoint=checkpoint)  # 5 steps, fine
    saved = checkpoint.read_bytes()
    with pytest.raises(DiffAugError, match=r"Stage III \(KD\) loss became nan at epoch 1, step 8"):
        distiller.fit(loader, 2, checkpoint=checkpoint)
    assert checkpoint.read_bytes() == saved


def test_bad_arguments_raise() -> None:
    teacher, student = small_models(1, 10)
    with pytest.raises(DiffAugError, match=r"augmenter must be a PolicyAugmenter; got Sequential"):
        Distiller(teacher, student, teacher)  # type: ignore[arg-type]
    with pytest.raises(DiffAugError, match=r"amp='fp16' needs a CUDA device"):
        Distiller(teacher, student, PolicyAugmenter(), amp="fp16")
    with pytest.raises(DiffAugError, match=r"checkpoint must be a file"):
        Distiller(teacher, student, PolicyAugmenter()).load("/nonexistent/checkpoint.pt")


def test_offline_datasets() -> None:
    train, test = mnist5k(train_size=1000)
    assert len(train) == 1000 and len(test) == 4000
    assert torch.bincount(train.tensors[1]).tolist() == [100] * 10
    patches_train, patches_test = photo_patches(per_class=5)
    assert patches_train.tensors[0].shape == (50, 3, 32, 32) and len(patches_test) == 50


def test_cifar_pickle_batches_are_read(tmp_path: Path) -> None:
    """The CIFAR python format, written here in its official layout (the data itself cannot be downloaded)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    train, test = cifar(tmp_path)
    assert train.tensors[0].shape == (20, 3, 32, 32) and test.tensors[1].tolist() == [0, 1, 2, 9]
    first = np.frombuffer(pickle.loads((tmp_path / "data_batch_1").read_bytes())[b"data"][0].tobytes(), np.uint8)
    assert torch.equal(train.tensors[0][0], torch.from_numpy(first.reshape(3, 32, 32).astype(np.float32) / 255))
    with pytest.raises(DiffAugError, match=r"CIFAR folder must hold data_batch_1..5"):
        cifar(tmp_path / "missing")
