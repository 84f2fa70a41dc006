"""Checkpoints record the Distiller's settings; a resume checks everything first and refuses any mismatch with a
message naming it, leaving every tensor, counter and random stream as it was."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from diffaug import DiffAugError, PolicyAugmenter
from diffaug.distill import FORMAT_VERSION, KD_LOSSES, Distiller, Run, Search, Settings, StageThree, kd_loss
from diffaug.distill.data import mnist5k, small_models

COMMON = {"search_epochs": [0], "search_steps": 2, "lr": 0.05, "progress": False}


def _loader(size: int = 40, seed: int = 0) -> DataLoader:
    train, _ = mnist5k(train_size=size, seed=seed)
    return DataLoader(train, batch_size=20, shuffle=True, generator=torch.Generator())


def _distiller(augmenter: torch.nn.Module | None = None, teacher_seed: int = 0, wide_student: bool = False,
               **keywords: Any) -> Distiller:
    teacher, _ = small_models(1, 10, seed=teacher_seed)
    wide, student = small_models(1, 10, seed=0)
    student = wide if wide_student else student
    return Distiller(teacher, student, PolicyAugmenter() if augmenter is None else augmenter, **{**COMMON, **keywords})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    _distiller().fit(_loader(), 1, checkpoint=path)
    return path


def _snapshot(distiller: Distiller) -> dict[str, Any]:
    """Everything a load could change: every tensor of the modules and optimisers, the counters, the history and
    the random streams."""
    tensors = {}
    for name, module in (("student", distiller.student), ("augmenter", distiller.augmenter), ("task", distiller.task)):
        tensors |= {f"{name}.{k}": v.clone() for k, v in module.state_dict().items()}
    for name, optimiser in (("optimiser", distiller.optimiser), ("search_optimiser", distiller.search_optimiser)):
        if optimiser is not None:
            for index, state in optimiser.state_dict()["state"].items():
                tensors |= {f"{name}.{index}.{k}": v.clone() for k, v in state.items() if torch.is_tensor(v)}
    tensors["generator"] = distiller.generator.get_state()
    tensors["torch"] = torch.get_rng_state()
    return {"tensors": tensors, "counters": (distiller.epoch, distiller.trainer.step, distiller.trainer.iteration),
            "history": json.dumps(distiller.history)}


def _assert_unchanged(distiller: Distiller, before: dict[str, Any]) -> None:
    after = _snapshot(distiller)
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key
    assert after["counters"] == before["counters"] and after["history"] == before["history"]


def _refused(distiller: Distiller, load: Any, match: str) -> None:
    """``load()`` must raise a DiffAugError matching ``match`` and change nothing of ``distiller``, which has
    trained an epoch of its own first (so that it has optimiser state, a history and moved random streams)."""
    distiller.fit(_loader(seed=1), 1)
    before = _snapshot(distiller)
    with pytest.raises(DiffAugError, match=match):
        load()
    _assert_unchanged(distiller, before)


@pytest.mark.parametrize("name, value, shown", [
    ("kd", "dkd", "'kd'"), ("seed", 5, "0"), ("lr", 0.2, "0.05"), ("momentum", 0.5, "0.9"), ("gamma", 0.5, "0.1"),
    ("milestones", [1], "None"), ("temperature", 2.0, "4.0"), ("w_kl", 0.5, "1.0"), ("search_lr", 0.05, "0.01"),
    ("search_steps", 3, "2"), ("search_epochs", [0, 1], r"\[0\]"), ("alpha", 0.5, "1.0"),
    ("search_diagnostics", 0, "4"), ("kd", kd_loss, "'kd'"),
])
def test_a_resume_with_a_changed_setting_is_refused_and_changes_nothing(checkpoint: Path, name: str, value: Any,
                                                                        shown: str) -> None:
    distiller = _distiller(**{name: value})
    _refused(distiller, lambda: distiller.load(checkpoint),
             rf"checkpoint was written with {name}={shown}; this Distiller has {name}=")


@pytest.mark.parametrize("build, match", [
    (lambda: _distiller(wide_student=True),
     r"written with student\.shapes\.0\.weight=\[8, 1, 3, 3\]; this Distiller has student\.shapes\.0\.weight=\[32, 1, 3, 3\]"),
    (lambda: _distiller(teacher_seed=1), r"written with teacher\.sha256="),
    (lambda: _distiller(PolicyAugmenter(n_ops=2)), r"written with augmenter\.settings\.n_ops=4; this Distiller has "
                                                   r"augmenter\.settings\.n_ops=2"),
    (lambda: _distiller(PolicyAugmenter(["Rotate", "Invert"])), r"written with augmenter\.shapes"),
    (lambda: _distiller(optimiser=lambda p: torch.optim.Adam(p, lr=1e-3)), r"written with optimiser\.class='SGD'"),
    (lambda: _distiller(torch.nn.Identity(), search_epochs=[]), r"written with search_epochs=\[0\]"),
])
def test_a_resume_with_other_modules_is_refused_and_changes_nothing(checkpoint: Path, build: Any, match: str) -> None:
    distiller = build()
    _refused(distiller, lambda: distiller.load(checkpoint), match)


def _edited(checkpoint: Path, edit: Any) -> dict[str, Any]:
    state = torch.load(checkpoint, weights_only=True)
    edit(state)
    return state


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("rng"), r"missing \['rng'\]"),
    (lambda s: s.pop("history"), r"missing \['history'\]"),
    (lambda s: s.update(epoch=-5), r"checkpoint's epoch must be an int >= 0; got -5"),
    (lambda s: s.update(history="not json"), r"checkpoint's history must be the JSON of a dict"),
    (lambda s: s.pop("format"), r"checkpoint must be format 2 .* got format None"),
    (lambda s: s["rng"].pop("numpy"), r"checkpoint's rng must hold the random streams .* missing \['numpy'\]"),
    (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), r"checkpoint's rng could not be restored"),
    (lambda s: s["student"].update({"0.weight": torch.zeros(8, 1, 5, 5)}), r"checkpoint's student does not fit"),
    (lambda s: s["optimiser"].update(param_groups=[]), r"checkpoint's optimiser does not fit"),
    (lambda s: s["augmenter"].pop("probability_logits"), r"checkpoint's augmenter does not fit"),
])
def test_a_damaged_checkpoint_is_refused_before_anything_changes(checkpoint: Path, edit: Any, match: str) -> None:
    state = _edited(checkpoint, edit)
    distiller = _distiller()
    _refused(distiller, lambda: distiller.load_state_dict(state), match)


def test_the_checkpoint_records_the_settings_and_a_format(checkpoint: Path) -> None:
    state = torch.load(checkpoint, weights_only=True)
    assert state["format"] == FORMAT_VERSION
    recorded = state["settings"]["settings"]
    assert recorded["kd"] == "kd" and recorded["seed"] == 0 and recorded["search_steps"] == 2
    assert "device" not in recorded and "progress" not in recorded  # may change on a resume
    assert state["settings"]["augmenter"]["settings"]["n_ops"] == 4
    assert state["settings"]["data"]["class"] == "TensorDataset"


def test_a_resume_on_other_data_is_refused_before_training(checkpoint: Path) -> None:
    distiller = _distiller()
    distiller.load(checkpoint)
    before = _snapshot(distiller)
    with pytest.raises(DiffAugError, match=r"checkpoint was written for training data .* resume with the data"):
        distiller.fit(_loader(seed=3), 2)
    _assert_unchanged(distiller, before)
    distiller.fit(_loader(), 2)  # the run's own data resumes
    assert distiller.epoch == 2


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    (lambda p: p.mkdir(), r"must be a file; got .*, which is a directory"),
    (lambda p: None, r"which is missing"),
    (lambda p: p.write_bytes(b"not a checkpoint"), r"could not be read"),
])
def test_unreadable_checkpoint_files_get_a_message_that_says_what_they_are(tmp_path: Path, make: Any,
                                                                           match: str) -> None:
    path = tmp_path / "checkpoint.pt"
    make(path)
    with pytest.raises(DiffAugError, match=match):
        _distiller().load(path)


class _Payload:
    def __reduce__(self):  # noqa: ANN204
        return (print, ("ran",))


def test_a_pickle_with_code_is_refused_without_torchs_advice_to_run_it(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"student": _Payload()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(DiffAugError, match=r"refused without running them") as error:
        _distiller().load(path)
    assert "weights_only" not in str(error.value) and "likely succeed" not in str(error.value)


def test_fitting_an_empty_loader_is_refused_and_writes_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(DiffAugError, match=r"train_loader must yield at least one batch an epoch; got an empty one"):
        _distiller().fit([], 2, checkpoint=tmp_path / "checkpoint.pt")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_settings_objects_build_the_same_distiller_as_keywords() -> None:
    settings = Settings(StageThree(lr=0.05), Search(epochs=(0,), steps=2), Run(progress=False))
    teacher, student = small_models(1, 10)
    by_object = Distiller.from_settings(teacher, student, PolicyAugmenter(), settings)
    assert by_object.settings == _distiller().settings
    with pytest.raises(TypeError, match="settings"):  # one way or the other: no keyword can be silently dropped
        Distiller(teacher, student, PolicyAugmenter(), settings=settings, lr=0.2)


@pytest.mark.parametrize("keywords, match", [
    ({"lr": float("nan")}, r"lr must be a finite number >= 0; got nan"),
    ({"lr": -1}, r"lr must be a finite number >= 0; got -1"),
    ({"search_lr": -0.1}, r"search_lr must be a finite number >= 0; got -0.1"),
    ({"search_steps": 0}, r"search_steps must be an int > 0; got 0"),
    ({"search_epochs": [-1]}, r"search_epochs must be an int >= 0; got -1"),
    ({"temperature": float("inf")}, r"temperature must be a finite number > 0; got inf"),
    ({"seed": 1.5}, r"seed must be an int >= 0; got 1.5"),
    ({"mean": [0.5], "std": [0.0]}, r"std > 0"),
    ({"amp": "fp8"}, r"amp must be None, 'bf16' or 'fp16'; got 'fp8'"),
])
def test_bad_settings_are_refused_by_name(keywords: dict[str, Any], match: str) -> None:
    with pytest.raises(DiffAugError, match=match):
        _distiller(**keywords)


def test_a_new_kd_loss_is_one_registry_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a name to KD_LOSSES is all it takes: the Distiller accepts it, and so does the command's --kd."""
    from diffaug.distill.__main__ import parser

    calls = []

    def mse(temperature: float) -> Any:
        def loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            calls.append(temperature)
            return ((s / temperature).softmax(1) - (t / temperature).softmax(1)).square().sum(1).mean()
        return loss

    monkeypatch.setitem(KD_LOSSES, "mse", mse)
    distiller = _distiller(kd="mse", temperature=2.0, search_epochs=[])
    x, y = next(iter(_loader()))
    assert torch.isfinite(torch.tensor(distiller.train_step(x, y)["loss"])) and calls == [2.0]
    assert parser().parse_args(["--kd", "mse"]).kd == "mse"


def test_a_changed_standard_augment_is_refused(checkpoint: Path) -> None:
    import functools

    from diffaug.distill.data import random_crop_flip

    distiller = _distiller(standard_augment=functools.partial(random_crop_flip, flip=False))
    _refused(distiller, lambda: distiller.load(checkpoint),
             r"checkpoint was written with standard_augment=None; this Distiller has standard_augment="
             r"'partial\(callable diffaug.distill.data.random_crop_flip, flip=False\)'")


def test_load_given_the_loader_refuses_other_data_before_anything_changes(checkpoint: Path) -> None:
    distiller = _distiller()
    _refused(distiller, lambda: distiller.load(checkpoint, _loader(seed=3)),
             r"the checkpoint was written for training data .* resume with the data the run started on")
    _distiller().load(checkpoint, _loader())  # the same data loads


def test_callables_are_recorded_by_name_not_by_address() -> None:
    import functools

    from diffaug.distill.settings import callable_name

    assert callable_name(kd_loss) == "callable diffaug.distill.objective.kd_loss"
    assert callable_name(functools.partial(kd_loss, temperature=2.0)) == (
        "partial(callable diffaug.distill.objective.kd_loss, temperature=2.0)")
    assert "0x" not in callable_name(torch.nn.Identity())  # an object by its class
