"""Dense tasks: the segmentation and localisation terms against float64 formulas, the Distiller on them (search,
resume, DDP, AMP, errors), the shipped scenes and the benchmark's smoke run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from diffaug import DiffAugError, PolicyAugmenter, ReferencePolicy
from diffaug.distill import Distiller, Localisation, Segmentation, box_iou
from diffaug.distill.dense import SEGMENTATION_CLASSES, dense_models, digit_scenes
from diffaug.distill.objective import logit_kd

from .test_distill import WORKER, _run

ROOT = Path(__file__).resolve().parents[1]


def _segmentation_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 5, 6, 7, generator=g) * 3
    teacher = torch.randn(3, 5, 6, 7, generator=g) * 3
    masks = torch.randint(0, 5, (3, 6, 7), generator=g)
    masks[0, :2] = 255  # unlabelled pixels
    return student, teacher, masks


def test_segmentation_terms_are_eq1_and_eq2_per_labelled_pixel() -> None:
    student, teacher, masks = _segmentation_batch()
    task = Segmentation()
    valid = masks != 255
    s = student.double().permute(0, 2, 3, 1)[valid]
    t = teacher.double().permute(0, 2, 3, 1)[valid]
    y = masks[valid]
    tau = 4.0
    p_t = torch.softmax(t / tau, 1)
    kl = (p_t * (torch.log_softmax(t / tau, 1) - torch.log_softmax(s / tau, 1))).sum(1).mean()
    expected_kd = F.cross_entropy(s, y) + tau**2 * kl
    got = task.distill_loss(student, teacher, masks, logit_kd("kd", tau), 1.0, 1.0)
    torch.testing.assert_close(got.double(), expected_kd, rtol=1e-5, atol=0)
    p_s = torch.softmax(s, 1).gather(1, y[:, None]).squeeze(1)
    expected = (F.cross_entropy(t, y), -torch.log1p(-p_s).mean())
    for got, want in zip(task.search_terms(teacher, student, masks), expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    # The ignored pixels play no part: changing their logits changes nothing.
    changed = student.clone()
    changed[0, :, :2] = 1e3
    assert torch.equal(task.distill_loss(changed, teacher, masks, logit_kd("kd", tau), 1.0, 1.0),
                       task.distill_loss(student, teacher, masks, logit_kd("kd", tau), 1.0, 1.0))


def test_segmentation_mean_iou_from_the_confusion_matrix() -> None:
    task = Segmentation()
    masks = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    predicted = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 0]]])
    logits = F.one_hot(predicted, 3).permute(0, 3, 1, 2).float()
    # Over the 6 labelled pixels: class 0 is right once of 2 true and 2 predicted (IoU 1/3), class 1 twice of 2
    # true and 3 predicted (2/3), class 2 once of 2 true and 1 predicted (1/2).
    expected = (1 / 3 + 2 / 3 + 1 / 2) / 3
    assert task.metric(task.statistics(logits, masks)) == pytest.approx(expected)


def test_segmentation_batch_without_a_labelled_pixel_has_zero_losses_with_gradients() -> None:
    """A crop or a warp can leave a batch all ignore_index: nothing to learn, not a NaN mean that stops training."""
    student, teacher, masks = _segmentation_batch()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    masks = torch.full_like(masks, 255)
    task = Segmentation()
    teacher_term, student_term = task.search_terms(teacher, student, masks)
    loss = task.distill_loss(student, teacher, masks, logit_kd("kd"), 1.0, 1.0)
    assert [t.item() for t in (teacher_term.detach(), student_term.detach(), loss.detach())] == [0.0, 0.0, 0.0]
    (teacher_term + student_term + loss).backward()
    assert torch.equal(student.grad, torch.zeros_like(student)) and torch.equal(teacher.grad, torch.zeros_like(teacher))


def test_segmentation_refuses_labels_that_are_not_classes_instead_of_clamping_them() -> None:
    """Class 7 of 3 used to be counted as class 2 in the confusion matrix: a wrong mean IoU that looks right."""
    logits = torch.zeros(1, 3, 2, 2)
    with pytest.raises(DiffAugError, match=r"segmentation masks must be class indices in \[0, 2\] or the "
                                           r"ignore_index 255 .*; got values in \[0, 7\]"):
        Segmentation().statistics(logits, torch.tensor([[[0, 7], [255, 1]]]))


def test_box_iou_and_the_bounded_student_box_term() -> None:
    a = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([4 / 28, 1.0, 0.0]))
    task = Localisation(4, 4, (8, 8))
    labels = torch.tensor([0, 1, 2])
    features = torch.zeros(3, 4, 2, 2)
    logits = torch.full((3, 3), -20.0).scatter(1, torch.tensor([[1], [2], [0]]), 20.0)  # confidently wrong
    boxes = torch.tensor([[6.0, 6.0, 8.0, 8.0], [4.0, 4.0, 6.0, 6.0], [0.0, 0.0, 1.0, 1.0]])  # each off its target
    teacher_term, student_term = task.search_terms((logits, b, features), (logits, boxes, features),
                                                   (labels, b, torch.ones(3, dtype=torch.bool)))
    # Wrong classes and disjoint boxes: the student term is at its floor, 0 (it is -log(1 - p) - log(1 - IoU)).
    assert 0 <= float(student_term) < 1e-6
    assert float(teacher_term) > 10  # the teacher's CE on the wrong class
    # A box pushed out of the image (keep False) drops its image from every term.
    keep = torch.tensor([True, False, False])
    _, only_first = task.search_terms((logits, b, features), (logits, b, features), (labels, b, keep))
    _, all_three = task.search_terms((logits[:1], b[:1], features[:1]), (logits[:1], b[:1], features[:1]),
                                     (labels[:1], b[:1], keep[:1]))
    torch.testing.assert_close(only_first, all_three)


def test_localisation_stage_three_has_kd_box_and_mimic_terms() -> None:
    torch.manual_seed(0)
    task = Localisation(3, 5, (8, 8), w_box=2.0, w_mimic=0.5)
    s_logits, t_logits = torch.randn(4, 10), torch.randn(4, 10)
    s_boxes, boxes = torch.rand(4, 4) * 8, torch.rand(4, 4) * 8
    s_features, t_features = torch.randn(4, 3, 2, 2), torch.randn(4, 5, 2, 2)
    labels, keep = torch.randint(0, 10, (4,)), torch.ones(4, dtype=torch.bool)
    got = task.distill_loss((s_logits, s_boxes, s_features), (t_logits, boxes, t_features), (labels, boxes, keep),
                            logit_kd("kd", 4.0), 1.0, 1.0)
    from diffaug.distill import kd_loss

    box = ((s_boxes - boxes) / 8).abs().mean()
    mimic = F.mse_loss(task.mimic(s_features), t_features)
    torch.testing.assert_close(got, kd_loss(s_logits, t_logits, labels) + 2.0 * box + 0.5 * mimic)
    (grad,) = torch.autograd.grad(got, task.mimic.weight)
    assert float(grad.abs().sum()) > 0


def test_digit_scenes_are_disjoint_reproducible_and_labelled() -> None:
    first = digit_scenes("segmentation", seed=0, sizes=(60, 30, 60))
    again = digit_scenes("segmentation", seed=0, sizes=(60, 30, 60))
    assert all(torch.equal(a, b) for s, t in zip(first, again, strict=True) for a, b in zip(s.tensors, t.tensors))
    images, masks = first.train.tensors
    assert images.shape == (60, 3, 32, 32) and masks.dtype == torch.long
    assert set(masks.unique().tolist()) <= set(range(SEGMENTATION_CLASSES)) and bool((masks == 0).any())
    assert all(len(m.unique()) >= 2 for m in masks)  # every scene has digits
    images, labels, boxes = digit_scenes("localisation", seed=0, sizes=(20, 10, 10)).train.tensors
    assert labels.shape == (20,) and boxes.shape == (20, 4)
    assert bool((boxes[:, 2:] > boxes[:, :2]).all()) and bool((boxes >= 0).all()) and bool((boxes <= 32).all())
    with pytest.raises(DiffAugError, match="multiples of 10"):
        digit_scenes("segmentation", sizes=(15, 10, 10))
    with pytest.raises(DiffAugError, match="'segmentation' or 'localisation'"):
        digit_scenes("detection")


def _segmentation_distiller(augmenter: torch.nn.Module, **kwargs) -> tuple[Distiller, DataLoader]:
    splits = digit_scenes("segmentation", seed=0, sizes=(40, 10, 10))
    teacher, student = dense_models("segmentation")
    loader = DataLoader(splits.train, batch_size=20, shuffle=True, generator=torch.Generator())
    return Distiller(teacher, student, augmenter, task="segmentation", lr=0.05, progress=False, **kwargs), loader


def test_segmentation_distiller_searches_and_reports_mean_iou() -> None:
    distiller, loader = _segmentation_distiller(PolicyAugmenter(geometry="composed"), search_epochs=[0],
                                                search_lr=0.5)
    before = distiller.augmenter.probability_logits.detach().clone()
    validation = DataLoader(digit_scenes("segmentation", seed=0, sizes=(40, 10, 10)).validation, batch_size=10)
    history = distiller.fit(loader, 2, validation)
    assert not torch.equal(before, distiller.augmenter.probability_logits.detach())
    assert len(history["search"]) == 2 and all(
        torch.isfinite(torch.tensor([r["teacher_ce"], r["student_term"]])).all() for r in history["search"])
    assert 0 <= history["epochs"][-1]["val_miou"] <= 1
    assert 0 < history["epochs"][-1]["teacher_confidence"] <= 1


def test_search_step_moves_the_masks_with_the_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Stage II scores the teacher against: the masks moved by the same draw as the images."""
    distiller, loader = _segmentation_distiller(PolicyAugmenter(ops=["TranslateX"], n_ops=1, probability=0.99,
                                                                magnitude=0.99, geometry="composed"))
    seen = {}
    original = distiller.task.search_terms

    def spy(teacher_out, student_out, targets):
        seen["masks"] = targets
        return original(teacher_out, student_out, targets)

    monkeypatch.setattr(distiller.task, "search_terms", spy)
    x, y = next(iter(loader))
    distiller.search_step(x, y)
    # A near-full translation brings in pixels from outside: ignore_index in the masks Stage II used.
    assert bool((seen["masks"] == 255).any()) and not bool((y == 255).any())


def test_dense_tasks_refuse_augmenters_whose_targets_cannot_follow() -> None:
    with pytest.raises(DiffAugError, match='geometry="composed"'):
        _segmentation_distiller(PolicyAugmenter())
    with pytest.raises(DiffAugError, match='geometry="composed"'):
        _segmentation_distiller(torch.nn.Upsample(scale_factor=1), search_epochs=[])
    with pytest.raises(DiffAugError, match="ignore_index"):
        _segmentation_distiller(PolicyAugmenter(geometry="composed", ignore_index=0))
    with pytest.raises(DiffAugError, match="task must be one of"):
        Distiller(*dense_models("segmentation"), PolicyAugmenter(), task="detection")
    # Plain KD (no augmentation) and a fixed composed policy are fine.
    _segmentation_distiller(torch.nn.Identity(), search_epochs=[])
    _segmentation_distiller(ReferencePolicy(geometry="composed"), search_epochs=[])


def test_segmentation_under_bf16_autocast_on_the_cpu() -> None:
    distiller, loader = _segmentation_distiller(PolicyAugmenter(geometry="composed"), amp="bf16")
    x, y = next(iter(loader))
    for record in (distiller.search_step(x, y), distiller.train_step(x, y)):
        assert all(torch.isfinite(torch.tensor(v)) for v in record.values())


def test_localisation_resumes_exactly_in_a_fresh_process(tmp_path: Path) -> None:
    """The mimic adapter (the task's own parameters) is checkpointed and resumed with the student."""
    for mode in ("straight", "first", "resume"):
        _run(str(WORKER), mode, str(tmp_path), "localisation")
    straight = torch.load(tmp_path / "straight.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resume.pt", weights_only=False)
    for part in ("student", "augmenter", "task"):
        assert straight[part].keys() == resumed[part].keys() and straight[part]
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)
    assert straight["history"] == resumed["history"]
    assert not torch.equal(straight["task"]["mimic.weight"], Localisation(16, 64, (32, 32)).mimic.weight)


@pytest.mark.slow
def test_localisation_ddp_keeps_the_task_parameters_identical(tmp_path: Path) -> None:
    _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), "ddp", str(tmp_path),
         "localisation")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for part in ("augmenter", "task"):
        for key, value in rank0[part].items():
            assert torch.allclose(value, rank1[part][key]), (part, key)


@pytest.mark.slow
def test_bench_dense_smoke_run(tmp_path: Path) -> None:
    results = tmp_path / "dense.json"
    _run(str(ROOT / "benchmarks" / "bench_dense.py"), "--seeds", "0", "--epochs", "1", "--teacher-epochs", "1",
         "--scenes", "40", "10", "20", "--results", str(results), "--cache-dir", str(tmp_path), "--jobs", "1",
         timeout=1800)
    import json

    runs = json.loads(results.read_text())["runs"]
    assert sorted((r["config"]["task"], r["config"]["arm"]) for r in runs) == sorted(
        (t, a) for t in ("segmentation", "localisation") for a in ("kd", "fixed", "tst"))
    assert all({"validation", "test", "validation_curve"} <= set(r["result"]) for r in runs)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_dense import report

    assert "| tst − kd | 1 |" in report(runs, "test")
    # Search settings other than the defaults make runs of their own; the stored runs keep their identity.
    _run(str(ROOT / "benchmarks" / "bench_dense.py"), "--seeds", "0", "--epochs", "1", "--teacher-epochs", "1",
         "--scenes", "40", "10", "20", "--results", str(results), "--cache-dir", str(tmp_path), "--jobs", "1",
         "--tasks", "localisation", "--search-lr", "0.1", "--search-passes", "2", timeout=1800)
    after = json.loads(results.read_text())["runs"]
    assert len(after) == len(runs) + 1
    assert [r["config"] for r in after if "search_lr" in r["config"]] == [
        {"task": "localisation", "arm": "tst", "seed": 0, "epochs": 1, "teacher_epochs": 1, "scenes": [40, 10, 20],
         "search_lr": 0.1, "search_passes": 2}]


def test_a_batch_without_a_labelled_pixel_logs_no_nan() -> None:
    """A batch all ignore_index trains with zero losses; its step records hold no accuracy or teacher confidence
    (a mean over no pixels would be NaN), and the epoch's and the search block's means are over the steps that
    have them."""
    distiller, loader = _segmentation_distiller(ReferencePolicy(geometry="composed"), search_epochs=[])
    images, masks = (torch.stack(t) for t in zip(*loader.dataset, strict=True))
    masks[20:] = 255  # the second batch: nothing labelled
    batches = DataLoader(torch.utils.data.TensorDataset(images, masks), batch_size=20)
    history = distiller.fit(batches, 1)
    labelled, empty = history["train"]
    assert empty["loss"] == 0 and not {"accuracy", "teacher_confidence", "teacher_confidence_clean"} & set(empty)
    assert 0 <= labelled["accuracy"] <= 1
    epoch = history["epochs"][-1]
    assert epoch["teacher_confidence"] == labelled["teacher_confidence"]
    assert epoch["teacher_confidence_clean"] == labelled["teacher_confidence_clean"]
    assert epoch["train_loss"] == pytest.approx(labelled["loss"] / 2)

    search, _ = _segmentation_distiller(PolicyAugmenter(geometry="composed"))
    x, y = images[20:24], masks[20:24]
    record = search.search_step(x, y)
    assert record["loss"] == 0 and "teacher_accuracy" not in record and "teacher_confidence" not in record
    from diffaug.distill.steps import search_summary

    summary = search_summary(None, [record, search.search_step(images[:4], masks[:4])])
    assert all(math.isfinite(v) for v in summary.values()) and 0 <= summary["teacher_accuracy"] <= 1
