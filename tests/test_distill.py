"""The reference TST loop on real data: what Stage II claims, exact resume, DDP on 2 CPU ranks, failure modes."""

from __future__ import annotations

import functools
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
from diffaug.distill import train_teacher
from diffaug.distill.data import cifar, mnist5k, photo_patches, random_crop_flip, small_models, task_splits

WORKER = Path(__file__).with_name("distill_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 1800) -> None:
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


def test_end_distributed_process_destroys_the_group_flushes_and_skips_finalisation(tmp_path: Path) -> None:
    """A one-rank gloo group, unflushed output on both streams and an atexit handler: the process must exit with
    the code given, having destroyed the group (a wrapped destroy_process_group prints) and written both streams
    out, and without running the handler (it is the interpreter's finalisation that the helper skips)."""
    script = (
        "import atexit, sys, torch.distributed as dist\n"
        "from diffaug.distill import end_distributed_process\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        f"atexit.register(lambda: open(r'{tmp_path / 'finalised'}', 'w').close())\n"
        "import diffaug.distill.loop as loop\n"
        "destroy = dist.destroy_process_group\n"
        "loop.dist.destroy_process_group = lambda: (print('destroyed', end=''), destroy())\n"
        "sys.stdout.write(' out'); sys.stderr.write('err')\n"
        "end_distributed_process(3)\n"
    )
    # Pipes, and no PYTHONUNBUFFERED: Python buffers stdout, so only a flush writes it out before os._exit.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONUNBUFFERED", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1800)
    assert (result.returncode, result.stdout, result.stderr[-3:]) == (3, " outdestroyed", "err"), result.stderr
    assert not (tmp_path / "finalised").exists()


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
    with pytest.raises(DiffAugError, match=r"augmenter must be a PolicyAugmenter or another nn.Module; got function"):
        Distiller(teacher, student, lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(DiffAugError, match=r"with a Identity augmenter pass search_epochs=\[\]; got search_epochs=None"):
        Distiller(teacher, student, torch.nn.Identity())
    with pytest.raises(DiffAugError, match=r"standard_augment must be callable"):
        Distiller(teacher, student, PolicyAugmenter(), standard_augment=4)  # type: ignore[arg-type]
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


class _Payload:
    """Unpickling this would create a file: what a crafted 'CIFAR' file could do with a bare pickle.load."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_cifar_files_are_read_with_a_restricted_unpickler(tmp_path: Path) -> None:
    import pickle

    import numpy as np

    from diffaug.distill.data import read_cifar_batch

    marker = tmp_path / "ran"
    crafted = tmp_path / "data_batch_1"
    crafted.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Payload(marker)]}))
    with pytest.raises(DiffAugError, match=r"asks for pathlib.Path.touch, refused without running it"):
        read_cifar_batch(crafted)
    assert not marker.exists()
    for protocol in (2, 5):  # the archives' protocol, and what numpy 2 writes by default
        crafted.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 4]}, protocol=protocol))
        assert read_cifar_batch(crafted)[b"labels"] == [3, 4]
    crafted.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [3, 4]}))
    with pytest.raises(DiffAugError, match=r"b'data' \(N, 3072\) uint8"):
        read_cifar_batch(crafted)
    crafted.write_bytes(b"not a pickle")
    with pytest.raises(DiffAugError, match="is not a CIFAR python batch"):
        read_cifar_batch(crafted)


def test_task_splits_are_disjoint_balanced_and_reproducible() -> None:
    mnist = task_splits("mnist", seed=3)
    assert [len(s) for s in mnist] == [1000, 1000, 3000]
    for split in mnist[:2]:
        assert torch.bincount(split.tensors[1]).tolist() == [100] * 10
    # No digit in two splits (the shipped digits are distinct images, so equal pixels mean the same digit).
    keys = [{bytes(x.numpy()) for x in split.tensors[0]} for split in mnist]
    assert sum(map(len, keys)) == len(set.union(*keys)) == 5000
    assert torch.equal(task_splits("mnist", seed=3).validation.tensors[0], mnist.validation.tensors[0])
    assert not torch.equal(task_splits("mnist", seed=4).train.tensors[0], mnist.train.tensors[0])
    photos = task_splits("photos", per_class=20)
    assert [s.tensors[0].shape for s in photos] == [(200, 3, 32, 32)] * 3
    with pytest.raises(DiffAugError, match=r"task must be 'mnist' or 'photos'; got 'cifar'"):
        task_splits("cifar")


def test_photo_splits_come_from_disjoint_regions() -> None:
    """Every patch is found in its own region of its photo (train: top 3/4 of the left half; validation: the
    bottom quarter of it; test: the right half), so no pixel is shared between splits."""
    from diffaug.images import read_image as _read_image, shipped_images_dir

    splits = task_splits("photos", per_class=3, seed=1)
    photos = [_read_image(p) for p in sorted(shipped_images_dir().glob("*.png"))]
    regions = {"train": (0, 0.75, 0, 0.5), "validation": (0.75, 1, 0, 0.5), "test": (0, 1, 0.5, 1)}
    for name, split in zip(("train", "validation", "test"), splits, strict=True):
        top, bottom, left, right = regions[name]
        for x, y in zip(*split.tensors, strict=True):
            photo = photos[int(y)]
            h, w = photo.shape[-2:]
            region = photo[:, round(top * h):round(bottom * h), round(left * w):round(right * w)]
            windows = region.unfold(1, 32, 1).unfold(2, 32, 1)  # (C, rows, columns, 32, 32)
            found = (windows == x[:, None, None]).flatten(3).all(3).all(0)
            assert found.any(), (name, int(y))


def _crop_flip_candidates(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every output torchvision's RandomCrop(size, padding) + RandomHorizontalFlip could give for one image."""
    padded = F.pad(image, (padding,) * 4)
    h, w = image.shape[-2:]
    crops = [padded[:, i:i + h, j:j + w] for i in range(2 * padding + 1) for j in range(2 * padding + 1)]
    return crops + [c.flip(-1) for c in crops]


@pytest.mark.parametrize("flip", [True, False])
def test_random_crop_flip_gives_a_padded_crop_of_each_image(flip: bool) -> None:
    x = torch.rand(64, 3, 9, 7)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2, flip=flip)
    assert out.shape == x.shape and out.dtype == x.dtype
    offsets, mirrored = set(), 0
    for image, result in zip(x, out, strict=True):
        candidates = _crop_flip_candidates(image, 2)
        matches = [k for k, c in enumerate(candidates) if torch.equal(c, result)]
        assert matches, "not a padded crop of its own image"
        offsets.add(matches[0] % 25)
        mirrored += matches[0] >= 25 and not any(k < 25 for k in matches)
    assert len(offsets) >= 20  # 64 draws over 25 offsets reach almost all of them
    assert (16 <= mirrored <= 48) if flip else mirrored == 0  # Binomial(64, 1/2): 4 standard deviations


def test_random_crop_flip_is_reproducible_and_identity_without_padding_or_flip() -> None:
    x = torch.rand(8, 1, 28, 28)
    a = random_crop_flip(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, random_crop_flip(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, random_crop_flip(x, torch.Generator().manual_seed(6)))
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    assert torch.equal(random_crop_flip(x, padding=3, flip=False, fill=0.5)[x.new_zeros(8, dtype=torch.bool)], x[:0])
    with pytest.raises(DiffAugError, match=r"images must be a \(B, C, H, W\) tensor; got shape \(1, 28, 28\)"):
        random_crop_flip(x[0])
    with pytest.raises(DiffAugError, match=r"padding must be a non-negative int; got -1"):
        random_crop_flip(x, padding=-1)


def test_fixed_augmenter_with_standard_augment_records_the_teachers_confidence() -> None:
    """Plain KD (nn.Identity) on cropped batches: the crop is drawn from the Distiller's generator before both
    models see the batch, and the step records the teacher's mean probability of the true class (Fig. 3)."""
    train, _ = mnist5k(train_size=40)
    teacher, student = small_models(1, 10)
    crop = functools.partial(random_crop_flip, flip=False)
    distiller = Distiller(teacher, student, torch.nn.Identity(), standard_augment=crop, search_epochs=[], progress=False)
    x, y = next(iter(DataLoader(train, batch_size=20)))
    state = distiller.generator.get_state()
    record = distiller.train_step(x, y)
    with torch.no_grad():
        cropped = crop(x, torch.Generator().set_state(state))
        expected = float(teacher(cropped).softmax(1).gather(1, y[:, None]).mean())
    assert record["teacher_confidence"] == pytest.approx(expected, rel=1e-5)  # x_hat = x under nn.Identity
    assert record["teacher_confidence_clean"] == pytest.approx(expected, rel=1e-5)
    assert not torch.equal(cropped, x)  # the crop did change what the teacher saw
    with pytest.raises(DiffAugError, match=r"Stage II needs a PolicyAugmenter; this Distiller has a Identity"):
        distiller.search_step(x, y)
    history = distiller.fit(DataLoader(train, batch_size=20), 1)
    epoch = history["epochs"][0]
    assert epoch["policy"] is None
    steps = [r["teacher_confidence"] for r in history["train"]]
    assert epoch["teacher_confidence"] == pytest.approx(sum(steps) / len(steps))


def test_search_blocks_longer_than_a_pass_run_several_passes() -> None:
    train, _ = mnist5k(train_size=40)
    teacher, student = small_models(1, 10)
    distiller = Distiller(teacher, student, PolicyAugmenter(), search_epochs=[0], search_steps=5, progress=False)
    history = distiller.fit(DataLoader(train, batch_size=20, shuffle=True, generator=torch.Generator()), 1)
    assert len(history["search"]) == 5  # 2 steps a pass: 2 + 2 + 1
    assert [r["iteration"] for r in history["search"]] == list(range(5))
    # every step records the two learned numbers per op, not what they mean (the same at every step)
    assert all(set(v) <= {"probability", "magnitude"} for r in history["search"] for v in r["policy"].values())
    assert set(history["search"][0]["policy"]["Rotate"]) == {"probability", "magnitude"}


def test_stage_three_takes_dkd_dist_or_a_callable_as_its_distillation_term() -> None:
    from diffaug.distill import dist_loss, dkd_loss

    train, _ = mnist5k(train_size=40)
    x, y = train.tensors[0][:20], train.tensors[1][:20]
    seen = []

    def custom(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(len(s))
        return dkd_loss(s, t, labels) + dist_loss(s, t)

    for kd in ("kd", "dkd", "dist", custom):
        teacher, student = small_models(1, 10)
        distiller = Distiller(teacher, student, torch.nn.Identity(), kd=kd, search_epochs=[], progress=False)
        assert torch.isfinite(torch.tensor(distiller.train_step(x, y)["loss"]))
    assert seen == [40]  # on cat([x_hat, x])
    with pytest.raises(DiffAugError, match="kd must be one of"):
        Distiller(*small_models(1, 10), torch.nn.Identity(), kd="crd", search_epochs=[])
    with pytest.raises(DiffAugError, match="optimiser must return a torch.optim.Optimizer"):
        Distiller(*small_models(1, 10), torch.nn.Identity(), optimiser=lambda p: None, search_epochs=[])


def test_search_diagnostics_measure_both_terms_and_leave_the_step_unchanged() -> None:
    """Every k-th Stage II step records the norms of Eq. 2's two gradients and their cosine, checked here against
    gradients taken one term at a time; the policy after a block is bit-identical with and without them."""
    train, _ = mnist5k(train_size=40)
    loader = DataLoader(train, batch_size=20, shuffle=True, generator=torch.Generator())
    logits = {}
    for every in (0, 2):
        teacher, student = small_models(1, 10, seed=0)
        distiller = Distiller(teacher, student, PolicyAugmenter(), search_epochs=[0], search_steps=4,
                              search_diagnostics=every, progress=False)
        history = distiller.fit(loader, 1)
        logits[every] = distiller.augmenter.probability_logits.detach().clone()
        measured = [r for r in history["search"] if "grad_cosine" in r]
        assert len(measured) == (0 if every == 0 else 2)  # steps 0 and 2 of 4
        block = history["epochs"][0]["search"]
        assert 0 <= block["teacher_accuracy"] <= 1 and 0 < block["teacher_confidence"] < 1
        assert block["max_dp"] > 0 and block["max_dm"] > 0  # four SGD steps moved the policy
    assert torch.equal(logits[0], logits[2])
    for record in measured:
        assert record["grad_norm_teacher"] > 0 and record["grad_norm_student"] > 0
        assert -1 <= record["grad_cosine"] <= 1

    # The recorded numbers are those of the two terms' own gradients on the same draw.
    teacher, student = small_models(1, 10, seed=0)
    augmenter = PolicyAugmenter()
    distiller = Distiller(teacher, student, augmenter, search_epochs=[0], search_diagnostics=1, progress=False)
    x, y = next(iter(DataLoader(train, batch_size=20)))
    state = distiller.generator.get_state()
    record = distiller.search_step(x, y)
    from diffaug.distill.objective import tst_terms

    augmenter_copy = PolicyAugmenter()  # the logits before the step
    augmenter.train()
    x_hat = augmenter_copy.train()(x, generator=torch.Generator().set_state(state))
    teacher_term, student_term = tst_terms(teacher(x_hat), student.eval()(x_hat), y)
    params = list(augmenter_copy.parameters())
    g_t = torch.cat([g.flatten() for g in torch.autograd.grad(teacher_term, params, retain_graph=True)])
    g_s = torch.cat([g.flatten() for g in torch.autograd.grad(student_term, params)])
    # float32 sums over the same graph in another order: a relative 1e-4 covers the rounding.
    assert record["grad_norm_teacher"] == pytest.approx(float(g_t.norm()), rel=1e-4)
    assert record["grad_norm_student"] == pytest.approx(float(g_s.norm()), rel=1e-4)
    assert record["grad_cosine"] == pytest.approx(float(F.cosine_similarity(g_t, g_s, dim=0)), abs=1e-4)
    with pytest.raises(DiffAugError, match=r"search_diagnostics must be an int >= 0.*got -1"):
        Distiller(*small_models(1, 10), PolicyAugmenter(), search_diagnostics=-1)
