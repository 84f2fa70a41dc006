"""The bad-input matrix: one table per public entry point, each row a call that must be refused, with the exception
type and the text its message must hold (what was expected and what was given), in the manner of torchvision's
``check_transform`` checkers. A row is a case a user met or could meet; add the next one here.

Each table is checked by one test: the call raises exactly that type (never a bare IndexError, RuntimeError,
ZeroDivisionError or a traceback from a command) and its message matches.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from diffaug import DiffAugError, PolicyAugmenter, ReferencePolicy, apply_op, load_priors
from diffaug.cli import main
from diffaug.distill import Segmentation, dkd_loss, kd_loss, tst_loss
from diffaug.distill.objective import dist_loss, logit_kd, soft_kl
from diffaug.fit import FitSettings, fit_priors, shipped_images_dir
from diffaug.ops import op_names
from diffaug.priors import MANIFEST, read_manifest, save_priors, shipped_priors_dir


def check_raises(call: Callable[[], object], error: type[BaseException], match: str) -> None:
    """``call()`` raises ``error`` itself (not a subclass standing in for it) with a message matching ``match``."""
    with pytest.raises(error, match=match) as caught:
        call()
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {caught.value}"


def _images(*shape: int, value: float | None = None, at: float | None = None) -> torch.Tensor:
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    if at is not None:
        x.view(-1)[0] = at
    return x if value is None else torch.full(shape, value)


# --------------------------------------------------------------------------------------------------------------
# apply_op and the op table.

M2 = torch.full((2,), 0.5)
OPS_ROWS = [
    pytest.param(lambda: apply_op("Shear", _images(2, 3, 8, 8), M2), r"unknown op name\(s\) \['Shear'\]; expected names from \[",
                 id="unknown-op"),
    pytest.param(lambda: apply_op("Rotate", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), M2),
                 r"float tensor in \[0, 1\].* got uint8 of shape \(2, 3, 8, 8\) \(convert with x.float\(\) / 255\)", id="uint8"),
    pytest.param(lambda: apply_op("Rotate", _images(8, 8), M2), r"got float32 of shape \(8, 8\)$", id="2d"),
    pytest.param(lambda: apply_op("Rotate", _images(1, 2, 3, 8, 8), M2), r"got float32 of shape \(1, 2, 3, 8, 8\)$", id="5d"),
    pytest.param(lambda: apply_op("Rotate", _images(2, 4, 8, 8), M2), r"got float32 of shape \(2, 4, 8, 8\) with 4 channels$",
                 id="4-channels"),
    pytest.param(lambda: apply_op("Rotate", _images(8, 8, 3), M2[:1]),
                 r"with 8 channels \(channels-last\? use x.permute\(2, 0, 1\)\)", id="hwc-3d"),
    pytest.param(lambda: apply_op("Rotate", _images(2, 8, 8, 3), M2),
                 r"with 8 channels \(channels-last\? use x.permute\(0, 3, 1, 2\)\)", id="bhwc-4d"),
    pytest.param(lambda: apply_op("Rotate", torch.zeros(0, 3, 8, 8), torch.zeros(0)), r"got an empty tensor of shape \(0, 3, 8, 8\)",
                 id="empty"),
    pytest.param(lambda: apply_op("Rotate", _images(2, 3, 8, 8, at=float("nan")), M2), r"containing NaN or inf", id="nan-pixel"),
    pytest.param(lambda: apply_op("Rotate", _images(2, 3, 8, 8, at=float("inf")), M2), r"containing NaN or inf", id="inf-pixel"),
    pytest.param(lambda: apply_op("Invert", _images(2, 3, 8, 8, at=1.00001), M2), r"got values in \[0\.\d+, 1\.00001\]$",
                 id="pixel-just-above-1"),
    pytest.param(lambda: apply_op("Invert", _images(2, 3, 8, 8, at=-1e-5), M2), r"got values in \[-1e-05, 0\.9\d+\]$",
                 id="pixel-just-below-0"),
    pytest.param(lambda: apply_op("Invert", _images(2, 3, 8, 8) * 255, M2), r"got values in \[\d+\.?\d*, \d+\.?\d*\]$",
                 id="pixels-0-255"),
    pytest.param(lambda: apply_op("Rotate", [[0.5]], M2), r"float tensor .* got list$", id="list-images"),
    pytest.param(lambda: apply_op("Rotate", _images(2, 3, 8, 8), torch.zeros(3)),
                 r"magnitude for Rotate must be a float tensor of shape \(2,\) .* got float32 of shape \(3,\)", id="magnitude-shape"),
    pytest.param(lambda: apply_op("Rotate", _images(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)), r"got int64 of shape \(2,\)",
                 id="magnitude-int"),
    pytest.param(lambda: apply_op("Rotate", _images(2, 3, 8, 8), 0.5), r"magnitude for Rotate .* got float$", id="magnitude-float"),
    pytest.param(lambda: apply_op("Rotate", _images(2, 3, 8, 8), torch.tensor([0.5, 1.5])), r"in \[-1, 1\]; got values in \[0\.5, 1\.5\]",
                 id="magnitude-above-1"),
    pytest.param(lambda: apply_op("Rotate", _images(2, 3, 8, 8), torch.tensor([0.5, 1.0000001])),
                 r"got values in \[0\.5, 1\.0000001\]", id="magnitude-just-above-1"),
    pytest.param(lambda: apply_op("Posterize", _images(2, 3, 8, 8), torch.tensor([-0.5, 0.5])),
                 r"magnitude for Posterize .* in \[0, 1\]; got values in \[-0\.5, 0\.5\]", id="unsigned-op-negative"),
    pytest.param(lambda: apply_op("Rotate", _images(2, 3, 8, 8), torch.tensor([0.5, float("nan")])), r"got values in \[nan, nan\]",
                 id="magnitude-nan"),
    pytest.param(lambda: op_names([]), r"ops must name at least one op", id="op-names-empty"),
    pytest.param(lambda: op_names("Rotate"), r"ops must be a sequence of op names .* got 'Rotate'", id="op-names-str"),
    pytest.param(lambda: op_names(["Rotate", "Rotate"]), r"op names must be unique; got \['Rotate'\]", id="op-names-duplicate"),
]


@pytest.mark.parametrize("call, match", OPS_ROWS)
def test_apply_op_refuses(call: Callable[[], object], match: str) -> None:
    check_raises(call, DiffAugError, match)


# --------------------------------------------------------------------------------------------------------------
# Targets, through an augmenter with geometry="composed".

def _moved(**targets: object) -> Callable[[], object]:
    def call() -> object:
        policy = ReferencePolicy(geometry="composed", ignore_index=targets.pop("ignore_index", 255))  # type: ignore[arg-type]
        return policy(_images(2, 1, 8, 8), **targets)
    return call


BOX = torch.tensor([[1.0, 1.0, 5.0, 5.0]])
NO_BOX = torch.zeros(0, 4)
TARGET_ROWS = [
    pytest.param(_moved(masks=torch.zeros(2, 8, 8, dtype=torch.int8)),
                 r"ignore_index must be representable in the masks' dtype int8 \(in \[-128, 127\]\) .* got 255", id="int8-ignore-255"),
    pytest.param(_moved(masks=torch.zeros(2, 8, 8, dtype=torch.uint8), ignore_index=-1),
                 r"dtype uint8 \(in \[0, 255\]\) .* got -1", id="uint8-ignore-minus-1"),
    pytest.param(_moved(masks=torch.full((2, 8, 8), 2**60)), r"within 2\*\*53 of ignore_index \(255\) .* got labels in \[",
                 id="labels-beyond-2-53"),
    pytest.param(_moved(masks=torch.zeros(2, 8, 8)), r"label masks must be integers", id="float-label-masks"),
    pytest.param(_moved(masks=torch.zeros(2, 8, 8, dtype=torch.bool)), r"label masks must be integers", id="bool-masks"),
    pytest.param(_moved(masks=torch.zeros(3, 8, 8, dtype=torch.long)), r"masks must be \(2, 8, 8\) .* got int64 of shape \(3, 8, 8\)",
                 id="masks-batch"),
    pytest.param(_moved(masks=torch.zeros(2, 1, 8, 8, dtype=torch.long)), r"a 4-d mask is K float masks", id="4d-int-masks"),
    pytest.param(_moved(boxes=[torch.tensor([[5.0, 1.0, 1.0, 5.0]]), NO_BOX]),
                 r"boxes must be xyxy with x1 <= x2 and y1 <= y2; got \[5\.0, 1\.0, 1\.0, 5\.0\] for image 0", id="box-x2-below-x1"),
    pytest.param(_moved(boxes=[NO_BOX, torch.tensor([[1.0, 5.0, 5.0, 1.0]])]), r"x1 <= x2 and y1 <= y2; .* for image 1",
                 id="box-y2-below-y1"),
    pytest.param(_moved(boxes=[torch.tensor([[1.0, 1.0, float("inf"), 5.0]]), NO_BOX]),
                 r"boxes must have finite coordinates; got NaN or inf for image 0: \[1\.0, 1\.0, inf, 5\.0\]", id="box-inf"),
    pytest.param(_moved(boxes=[torch.tensor([[float("nan"), 1.0, 2.0, 5.0]]), NO_BOX]), r"boxes must have finite coordinates",
                 id="box-nan"),
    pytest.param(_moved(keypoints=[torch.tensor([[float("nan"), 1.0]]), torch.zeros(0, 2)]), r"keypoints must have finite coordinates",
                 id="keypoint-nan"),
    pytest.param(_moved(boxes=[BOX]), r"boxes must be a list of 2 float tensors .* got a sequence of 1", id="boxes-count"),
    pytest.param(_moved(boxes=torch.zeros(2, 1, 4)), r"got float32 of shape \(2, 1, 4\)", id="boxes-tensor"),
    pytest.param(_moved(boxes=[torch.zeros(1, 3), NO_BOX]), r"xyxy boxes \(N_i, 4\) .* got float32 of shape \(1, 3\) for image 0",
                 id="box-width-3"),
    pytest.param(_moved(keypoints=[torch.zeros(1, 2, dtype=torch.long)] * 2), r"xy keypoints \(N_i, 2\) .* got int64", id="int-keypoints"),
    pytest.param(lambda: ReferencePolicy()(_images(2, 1, 8, 8), masks=torch.zeros(2, 8, 8, dtype=torch.long)),
                 r'build the augmenter with geometry="composed"', id="residual-geometry"),
    pytest.param(lambda: ReferencePolicy(geometry="composed")(_images(1, 8, 8), masks=torch.zeros(1, 8, 8, dtype=torch.long)),
                 r"targets need a batch of images \(B, C, H, W\)", id="unbatched"),
]


@pytest.mark.parametrize("call, match", TARGET_ROWS)
def test_targets_refused(call: Callable[[], object], match: str) -> None:
    check_raises(call, DiffAugError, match)


# --------------------------------------------------------------------------------------------------------------
# Losses.

S, T = torch.randn(2, 10), torch.randn(2, 10)
Y = torch.tensor([1, 2])
LOSS_ROWS = [
    pytest.param(lambda: tst_loss(T, S, torch.tensor([1, 10])),
                 r"targets must be class indices in \[0, 9\] for logits of 10 classes; got values in \[1, 10\]", id="tst-label-10"),
    pytest.param(lambda: tst_loss(T, S, torch.tensor([-1, 3])), r"in \[0, 9\] .* got values in \[-1, 3\]", id="tst-label-minus-1"),
    pytest.param(lambda: kd_loss(S, T, torch.tensor([-100, 3])),
                 r"got values in \[-100, 3\] \(these losses have no ignore_index: drop unlabelled samples first\)", id="kd-minus-100"),
    pytest.param(lambda: kd_loss(S, T, torch.tensor([0, 99])), r"in \[0, 9\] .* got values in \[0, 99\]", id="kd-label-99"),
    pytest.param(lambda: dkd_loss(S, T, torch.tensor([0, 10])), r"in \[0, 9\] .* got values in \[0, 10\]", id="dkd-label-10"),
    pytest.param(lambda: kd_loss(S, T, torch.tensor([0.0, 1.0])), r"targets must be integer class indices of shape \(2,\); got float32",
                 id="float-targets"),
    pytest.param(lambda: tst_loss(T, S, torch.tensor([0, 1, 2])), r"shape \(2,\); got int64 of shape \(3,\)", id="targets-length"),
    pytest.param(lambda: tst_loss(T, S, [0, 1]), r"targets must be integer class indices .* got list", id="targets-list"),
    pytest.param(lambda: tst_loss(T[:, :3], S[:, :4], Y[:2] % 3),
                 r"teacher_logits and student_logits must be float logits of the same shape; got teacher_logits float32 of "
                 r"shape \(2, 3\) and student_logits float32 of shape \(2, 4\)", id="tst-shapes-named-right"),
    pytest.param(lambda: kd_loss(S[:, :4], T[:, :3], Y % 3),
                 r"student_logits and teacher_logits .* got student_logits float32 of shape \(2, 4\) and teacher_logits "
                 r"float32 of shape \(2, 3\)", id="kd-shapes-named-right"),
    pytest.param(lambda: kd_loss(S, T.tolist(), Y), r"teacher_logits list", id="teacher-list"),
    pytest.param(lambda: tst_loss(T[:, :1], S[:, :1], torch.zeros(2, dtype=torch.long)), r"at least 2 classes", id="one-class"),
    pytest.param(lambda: kd_loss(S.view(2, 2, 5), T.view(2, 2, 5), Y), r"student_logits must be float logits of shape \(B, num_classes\)",
                 id="3d-logits"),
    pytest.param(lambda: kd_loss(S.long(), T, Y), r"got int64 of shape \(2, 10\)", id="int-logits"),
    pytest.param(lambda: kd_loss(S, T, Y, temperature=0), r"temperature must be a positive finite number; got 0", id="temperature-0"),
    pytest.param(lambda: soft_kl(S, T, float("inf")), r"positive finite number; got inf", id="temperature-inf"),
    pytest.param(lambda: dist_loss(S, T, temperature=float("nan")), r"positive finite number; got nan", id="temperature-nan"),
    pytest.param(lambda: dkd_loss(S, T, Y, temperature=True), r"positive finite number; got True", id="temperature-bool"),
    pytest.param(lambda: dist_loss(S, T[:1]), r"same shape", id="dist-shapes"),
    pytest.param(lambda: logit_kd("kl"), r"kd must be one of \['kd', 'dkd', 'dist'\] or a callable .* got 'kl'", id="unknown-kd"),
]


@pytest.mark.parametrize("call, match", LOSS_ROWS)
def test_losses_refuse(call: Callable[[], object], match: str) -> None:
    check_raises(call, DiffAugError, match)


# --------------------------------------------------------------------------------------------------------------
# Segmentation's terms and metric.

LOGITS = torch.zeros(1, 3, 2, 2)
SEGMENTATION_ROWS = [
    pytest.param(lambda: Segmentation().statistics(LOGITS, torch.tensor([[[0, 7], [255, 1]]])),
                 r"segmentation masks must be class indices in \[0, 2\] or the ignore_index 255 for logits of 3 classes; got values in "
                 r"\[0, 7\]", id="label-above-classes"),
    pytest.param(lambda: Segmentation().statistics(LOGITS, torch.tensor([[[0, -1], [255, 1]]])), r"got values in \[-1, 1\]",
                 id="label-minus-1"),
    pytest.param(lambda: Segmentation(ignore_index=-1).statistics(LOGITS, torch.tensor([[[0, 255], [-1, 1]]])),
                 r"or the ignore_index -1 .* got values in \[0, 255\]", id="255-not-the-ignore-index"),
    pytest.param(lambda: Segmentation().search_terms(LOGITS, LOGITS, torch.tensor([[[0, 3], [1, 1]]])), r"got values in \[0, 3\]",
                 id="search-terms"),
    pytest.param(lambda: Segmentation().distill_loss(LOGITS, LOGITS, torch.tensor([[[0, 3], [1, 1]]]), logit_kd("kd"), 1.0, 1.0),
                 r"got values in \[0, 3\]", id="distill-loss"),
    pytest.param(lambda: Segmentation().statistics(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long)),
                 r"segmentation models must return logits \(B, C, H, W\) at the masks' size \(1, 2, 2\); got \(1, 3, 4, 4\)", id="logits-size"),
    pytest.param(lambda: Segmentation().metric(torch.ones(5, dtype=torch.float64)),
                 r"flattened C x C confusion matrix .* got shape \(5,\)", id="metric-not-square"),
]


@pytest.mark.parametrize("call, match", SEGMENTATION_ROWS)
def test_segmentation_refuses(call: Callable[[], object], match: str) -> None:
    check_raises(call, DiffAugError, match)


# --------------------------------------------------------------------------------------------------------------
# Priors: a copy of the shipped folder with one thing broken per row.

def _entry(name: str, value: object) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        manifest["ops"]["Rotate"][name] = value
    return edit


def _set(*keys: str, value: object) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        target = manifest
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


PRIORS_ROWS = [
    pytest.param(_entry("file", "../outside.pt"), r"the file of Rotate must be a file name inside the priors folder .* got '../outside.pt'",
                 id="file-dotdot"),
    pytest.param(_entry("file", "/etc/hostname"), r"inside the priors folder .* got '/etc/hostname'", id="file-absolute"),
    pytest.param(_entry("file", "sub/Rotate.pt"), r"inside the priors folder .* got 'sub/Rotate.pt'", id="file-in-subfolder"),
    pytest.param(_entry("file", ".."), r"inside the priors folder .* got '..'", id="file-is-dotdot"),
    pytest.param(_entry("file", ""), r"inside the priors folder .* got ''", id="file-empty"),
    pytest.param(_entry("file", 7), r"inside the priors folder .* got 7", id="file-a-number"),
    pytest.param(_set("ops", "Rotate", value=["Rotate.pt"]), r"the entry of Rotate must be an object with \"file\" and \"sha256\"; got list",
                 id="entry-a-list"),
    pytest.param(_set("ops", "Rotate", value="Rotate.pt"), r"the entry of Rotate must be an object .* got str", id="entry-a-string"),
    pytest.param(_entry("sha256", "0" * 64), r"must have sha256 0{64}; got [0-9a-f]{64} \(corrupt or truncated", id="wrong-hash"),
    pytest.param(_set("ops", "Equalize", value={}), r"lists op 'Equalize'; expected ops from \[", id="manifest-op-without-magnitude"),
    pytest.param(_set("format", value=2), r"must have format 1; got 2", id="format"),
    pytest.param(_set("op_table_fingerprint", value="0" * 64), r"fitted to another op table", id="fingerprint"),
    pytest.param(_set("arch", value="tiny"), r"must name an arch in \['default', 'paper'\]", id="arch"),
    pytest.param(_set("ops", value=[]), r"must name an arch .* and its ops", id="ops-a-list"),
]


@pytest.fixture(scope="module")
def shipped_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("priors") / "default"
    shutil.copytree(shipped_priors_dir(), folder)
    return folder


@pytest.mark.parametrize("edit, match", PRIORS_ROWS)
def test_priors_manifests_refused(edit: Callable[[dict], None], match: str, shipped_copy: Path, tmp_path: Path) -> None:
    folder = tmp_path / "priors"
    shutil.copytree(shipped_copy, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    check_raises(lambda: load_priors(folder), DiffAugError, match)


def _nan_weights(folder: Path) -> None:
    encoders = load_priors(folder)
    next(v for v in encoders["Color"].state_dict().values() if v.is_floating_point()).fill_(float("inf"))
    manifest = read_manifest(folder)
    header = {k: v for k, v in manifest.items() if k not in ("format", "op_table_fingerprint", "ops")}
    save_priors(folder, {"Color": encoders["Color"]}, {"Color": {}}, header)


PRIORS_FOLDER_ROWS = [
    pytest.param(_nan_weights, r"must hold finite weights; got NaN or inf in \[", id="inf-weights-valid-hash"),
    pytest.param(lambda folder: (folder / MANIFEST).write_text("[1, 2]"), r"must have format 1; got 'list'", id="manifest-a-list"),
    pytest.param(lambda folder: (folder / MANIFEST).write_text("{"), r"must be valid JSON", id="manifest-not-json"),
    pytest.param(lambda folder: (folder / MANIFEST).unlink(), r"must contain manifest.json; it does not", id="no-manifest"),
]


@pytest.mark.parametrize("damage, match", PRIORS_FOLDER_ROWS)
def test_priors_folders_refused(damage: Callable[[Path], object], match: str, shipped_copy: Path, tmp_path: Path) -> None:
    folder = tmp_path / "priors"
    shutil.copytree(shipped_copy, folder)
    damage(folder)
    check_raises(lambda: load_priors(folder), DiffAugError, match)


def test_priors_arch_refused() -> None:
    check_raises(lambda: load_priors(arch="tiny"), DiffAugError, r"arch must be one of \['default', 'paper'\]; got 'tiny'")


# --------------------------------------------------------------------------------------------------------------
# The fitting entry (FitSettings, fit_priors): refused on construction or before any fitting.

FIT_ROWS = [
    pytest.param(lambda: FitSettings(steps=0), r"steps must be an int >= 1; got 0", id="steps-0"),
    pytest.param(lambda: FitSettings(steps=-1), r"steps must be an int >= 1; got -1", id="steps-negative"),
    pytest.param(lambda: FitSettings(steps=True), r"steps must be an int >= 1; got True", id="steps-bool"),
    pytest.param(lambda: FitSettings(batch_size=0), r"batch_size must be an int >= 1; got 0", id="batch-0"),
    pytest.param(lambda: FitSettings(image_size=0), r"image_size must be an int >= 3; got 0", id="image-size-0"),
    pytest.param(lambda: FitSettings(image_size=2), r"image_size must be an int >= 3; got 2", id="image-size-2"),
    pytest.param(lambda: FitSettings(image_size=32.0), r"image_size must be an int >= 3; got 32.0", id="image-size-float"),
    pytest.param(lambda: FitSettings(refine_iterations=-1), r"refine_iterations must be an int >= 0; got -1", id="refine-negative"),
    pytest.param(lambda: FitSettings(refine_batch_size=0), r"refine_batch_size must be an int >= 1; got 0", id="refine-batch-0"),
    pytest.param(lambda: FitSettings(lr=0), r"lr must be a positive finite number; got 0", id="lr-0"),
    pytest.param(lambda: FitSettings(lr=float("nan")), r"lr must be a positive finite number; got nan", id="lr-nan"),
    pytest.param(lambda: FitSettings(lr=float("inf")), r"lr must be a positive finite number; got inf", id="lr-inf"),
    pytest.param(lambda: FitSettings(seed=1.5), r"seed must be an int; got 1.5", id="seed-float"),
    pytest.param(lambda: FitSettings(device="bogus"), r"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1'; got 'bogus'",
                 id="device-bogus"),
    pytest.param(lambda: FitSettings(device="cuda:99"), r"device must be one this machine has; got 'cuda:99'", id="device-missing"),
    pytest.param(lambda: fit_priors([], stream=None), r"ops to fit must name at least one op", id="no-ops"),
    pytest.param(lambda: fit_priors(["Equalize"], stream=None), r"ops to fit must be magnitude ops .* got \['Equalize'\]",
                 id="op-without-magnitude"),
    pytest.param(lambda: fit_priors(["Rotate"], out=shipped_priors_dir(), stream=None), r"out must not be the priors shipped",
                 id="out-shipped"),
    pytest.param(lambda: fit_priors(["Rotate"], arch="paper", out=shipped_priors_dir("default"), overwrite_shipped=True, stream=None),
                 r"holds 'default' priors; refusing to mix in 'paper' ones", id="out-other-arch"),
    pytest.param(lambda: fit_priors(["Rotate"], images=Path(__file__), stream=None), r"images must be a folder of images; got .*, which is not a folder",
                 id="images-a-file"),
]


@pytest.mark.parametrize("call, match", FIT_ROWS)
def test_fitting_refuses(call: Callable[[], object], match: str) -> None:
    check_raises(call, DiffAugError, match)


# --------------------------------------------------------------------------------------------------------------
# The `diffaug` command: a bad flag is argparse's error (exit 2), a failure at run time one line (exit 1).
# Placeholders: FILE an existing file, DIR an existing folder, EMPTY a folder without images, CORRUPT a folder
# with a photo and a file that is not an image, OUT a path to write.

CLI_ROWS = [
    pytest.param(["demo", "--count", "0"], 2, r"argument --count: must be an int >= 1; got '0'", id="demo-count-0"),
    pytest.param(["demo", "--count", "-3"], 2, r"argument --count: must be an int >= 1; got '-3'", id="demo-count-negative"),
    pytest.param(["demo", "--count", "many"], 2, r"argument --count: must be an int >= 1; got 'many'", id="demo-count-word"),
    pytest.param(["demo", "--size", "0"], 2, r"argument --size: must be an int >= 1; got '0'", id="demo-size-0"),
    pytest.param(["demo", "--rows", "0"], 2, r"argument --rows: must be an int >= 1; got '0'", id="demo-rows-0"),
    pytest.param(["demo", "--magnitude", "0"], 2, r"argument --magnitude: must be a number strictly between 0 and 1; got '0'",
                 id="demo-magnitude-0"),
    pytest.param(["demo", "--magnitude", "nan"], 2, r"strictly between 0 and 1; got 'nan'", id="demo-magnitude-nan"),
    pytest.param(["demo", "--seed", "x"], 2, r"argument --seed: invalid int value: 'x'", id="demo-seed-word"),
    pytest.param(["demo", "--images", "CORRUPT", "--out", "OUT"], 1, r"images must be readable image files; .*broken.png is not",
                 id="demo-corrupt-image"),
    pytest.param(["demo", "--images", "EMPTY", "--out", "OUT"], 1, r"must contain images \(.png", id="demo-no-images"),
    pytest.param(["demo", "--out", "FILE"], 1, r"out must end in an image extension such as .png or .jpg; got", id="demo-out-no-extension"),
    pytest.param(["demo", "--out", "DIR.png"], 1, r"out must be an image file to write; got .*, which is a folder", id="demo-out-a-folder"),
    pytest.param(["fit-priors", "--image-size", "0"], 2, r"argument --image-size: must be an int >= 3; got '0'", id="fit-image-size-0"),
    pytest.param(["fit-priors", "--batch-size", "0"], 2, r"argument --batch-size: must be an int >= 1; got '0'", id="fit-batch-0"),
    pytest.param(["fit-priors", "--steps", "0"], 2, r"argument --steps: must be an int >= 1; got '0'", id="fit-steps-0"),
    pytest.param(["fit-priors", "--steps", "-1"], 2, r"argument --steps: must be an int >= 1; got '-1'", id="fit-steps-negative"),
    pytest.param(["fit-priors", "--refine-iterations", "-1"], 2, r"argument --refine-iterations: must be an int >= 0; got '-1'",
                 id="fit-refine-negative"),
    pytest.param(["fit-priors", "--ops", "Equalize"], 2, r"invalid choice: 'Equalize'", id="fit-op-without-magnitude"),
    pytest.param(["fit-priors", "--arch", "tiny"], 2, r"invalid choice: 'tiny'", id="fit-arch"),
    pytest.param(["fit-priors", "--device", "bogus"], 1, r"device must be a torch device .* got 'bogus'", id="fit-device-bogus"),
    pytest.param(["fit-priors", "--device", "cuda:99"], 1, r"device must be one this machine has; got 'cuda:99'", id="fit-device-missing"),
    pytest.param(["fit-priors", "--out", "FILE"], 1, r"out must be a priors folder .* which is a file", id="fit-out-a-file"),
    pytest.param(["fit-priors", "--images", "CORRUPT", "--out", "OUT"], 1, r"images must be readable image files", id="fit-corrupt-image"),
    pytest.param(["fit-priors", "--images", "FILE", "--out", "OUT"], 1, r"images must be a folder of images", id="fit-images-a-file"),
    pytest.param(["bogus"], 2, r"invalid choice: 'bogus'", id="unknown-command"),
    pytest.param([], 2, r"the following arguments are required: command", id="no-command"),
]


@pytest.mark.parametrize("argv, status, match", CLI_ROWS)
def test_command_refuses(argv: list[str], status: int, match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not an image, not a folder")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(shipped_images_dir() / "camera.png", corrupt / "camera.png")
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    places = {"FILE": tmp_path / "file", "DIR.png": tmp_path / "dir.png", "EMPTY": tmp_path / "empty", "CORRUPT": corrupt,
              "OUT": tmp_path / "out.png" if argv[:1] == ["demo"] else tmp_path / "priors"}
    argv = [str(places.get(a, a)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"diffaug {argv[0]}: error: " if status == 1 else "diffaug")  # argparse: "diffaug CMD: error:"
    if status == 1:
        assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, last), last
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "priors").exists()


# --- PolicyAugmenter / ReferencePolicy: constructor, sample, generator ---
# Refused at construction, or by sample() / forward before anything is drawn or rendered.

NAN, INF = float("nan"), float("inf")
POLICY_ROWS = [
    pytest.param(lambda: ReferencePolicy(temperature=INF), DiffAugError, r"temperature must be a positive finite number; got inf",
                 id="policy-temperature-inf"),
    pytest.param(lambda: ReferencePolicy(temperature=NAN), DiffAugError, r"temperature must be a positive finite number; got nan",
                 id="policy-temperature-nan"),
    pytest.param(lambda: ReferencePolicy(temperature=0), DiffAugError, r"positive finite number; got 0$", id="policy-temperature-0"),
    pytest.param(lambda: ReferencePolicy(temperature=True), DiffAugError, r"positive finite number; got True", id="policy-temperature-bool"),
    pytest.param(lambda: ReferencePolicy(mean=[NAN] * 3, std=[0.2] * 3), DiffAugError,
                 r"mean and std must be 1 or 3 finite numbers each, std > 0; got mean=\[nan, nan, nan\]", id="policy-mean-nan"),
    pytest.param(lambda: ReferencePolicy(mean=[0.5] * 3, std=[INF] * 3), DiffAugError, r"finite numbers .* std=\[inf, inf, inf\]",
                 id="policy-std-inf"),
    pytest.param(lambda: ReferencePolicy(mean=[0.5], std=[-0.2]), DiffAugError, r"std > 0; got mean=\[0.5\], std=\[-0.2\]",
                 id="policy-std-negative"),
    pytest.param(lambda: ReferencePolicy(mean=[0.5] * 3, std=[0.2] * 3)(_images(2, 1, 8, 8)), DiffAugError,
                 r"images must have as many channels as mean/std have values \(3\); got 1-channel images", id="policy-mean-3-on-1-channel"),
    pytest.param(lambda: PolicyAugmenter(priors=None, mean=[0.5] * 3, std=[0.2] * 3)(_images(1, 8, 8)), DiffAugError,
                 r"as many channels as mean/std have values \(3\); got 1-channel images", id="policy-mean-3-on-1-channel-unbatched"),
    pytest.param(lambda: ReferencePolicy(seed=1.5), DiffAugError, r"seed must be an int or None; got 1.5", id="policy-seed-float"),
    pytest.param(lambda: ReferencePolicy(seed=True), DiffAugError, r"seed must be an int or None; got True", id="policy-seed-bool"),
    pytest.param(lambda: ReferencePolicy(seed="0"), DiffAugError, r"seed must be an int or None; got '0'", id="policy-seed-str"),
    pytest.param(lambda: ReferencePolicy(n_ops=0), DiffAugError, r"n_ops must be an int in \[1, 14\] .* got 0", id="policy-n-ops-0"),
    pytest.param(lambda: ReferencePolicy(probability=1.0), DiffAugError, r"probability of \w+ must be a number strictly between 0 and 1; got 1.0",
                 id="policy-probability-1"),
    pytest.param(lambda: ReferencePolicy(geometry="affine"), DiffAugError, r"geometry must be one of \['residual', 'composed'\]; got 'affine'",
                 id="policy-geometry-unknown"),
    pytest.param(lambda: ReferencePolicy(ignore_index=255.0), DiffAugError, r"ignore_index must be an int .* got 255.0",
                 id="policy-ignore-index-float"),
    pytest.param(lambda: PolicyAugmenter(priors=None, forward="exact"), DiffAugError,
                 r"forward must be one of \['encoder', 'reference'\]; got 'exact'", id="policy-forward-unknown"),
    pytest.param(lambda: ReferencePolicy(compile="fast"), DiffAugError, r"compile must be True, False or a torch.compile mode .* got 'fast'",
                 id="policy-compile-unknown"),
    pytest.param(lambda: ReferencePolicy().sample(True), DiffAugError, r"batch_size must be a positive int; got True", id="policy-sample-bool"),
    pytest.param(lambda: ReferencePolicy().sample(0), DiffAugError, r"batch_size must be a positive int; got 0", id="policy-sample-0"),
    pytest.param(lambda: ReferencePolicy().sample(-1), DiffAugError, r"batch_size must be a positive int; got -1", id="policy-sample-negative"),
    pytest.param(lambda: ReferencePolicy().sample(2.0), DiffAugError, r"batch_size must be a positive int; got 2.0", id="policy-sample-float"),
    pytest.param(lambda: ReferencePolicy().sample(2, 5), DiffAugError, r"generator must be a torch.Generator or None; got int",
                 id="policy-sample-generator-int"),
    pytest.param(lambda: ReferencePolicy()(_images(2, 3, 8, 8), generator=5), DiffAugError,
                 r"generator must be a torch.Generator or None; got int", id="policy-forward-generator-int"),
    pytest.param(lambda: ReferencePolicy(compile=True)(_images(2, 3, 8, 8), generator=0), DiffAugError,
                 r"generator must be a torch.Generator or None; got int", id="policy-compiled-forward-generator-int"),
    pytest.param(lambda: ReferencePolicy()(_images(2, 3, 8, 8), torch.Generator()), DiffAugError,
                 r"sample must be a PolicySample from sample\(\) \(pass a generator as generator=\); got Generator",
                 id="policy-generator-as-sample"),
    pytest.param(lambda: ReferencePolicy()(_images(2, 3, 8, 8), ReferencePolicy().sample(3)), DiffAugError,
                 r"sample must come from this augmenter's sample\(2\) .* got a sample of 3 images", id="policy-sample-batch-size"),
    pytest.param(lambda: ReferencePolicy()(_images(2, 3, 8, 8), ReferencePolicy(["Rotate"]).sample(2)), DiffAugError,
                 r"got a sample of 2 images over ops \['Rotate'\]", id="policy-sample-other-ops"),
    pytest.param(lambda: ReferencePolicy()(_images(2, 3, 8, 8), ReferencePolicy().sample(2), generator=torch.Generator()),
                 DiffAugError, r"pass sample= .* or generator= .* not both", id="policy-sample-and-generator"),
]


@pytest.mark.parametrize("call, error, match", POLICY_ROWS)
def test_policies_refuse(call: Callable[[], object], error: type[BaseException], match: str) -> None:
    check_raises(call, error, match)


def test_the_matrix_has_a_row_per_case() -> None:
    """The counts the closing note of issue 30 reports; a row removed by mistake shows here."""
    tables = [OPS_ROWS, TARGET_ROWS, LOSS_ROWS, SEGMENTATION_ROWS, PRIORS_ROWS, PRIORS_FOLDER_ROWS, FIT_ROWS, CLI_ROWS]
    tables += [POLICY_ROWS, POLICY_BOUNDARY_ROWS]
    ids = [row.id for table in tables for row in table]
    assert len(ids) == len(set(ids)) and len(ids) >= 130


# --------------------------------------------------------------------------------------------------------------
# The policies' input boundary (uint8 / half precision), ReferencePolicy's output_dtype and from_dict.

def _policy_dict(**changes: object) -> dict:
    data = ReferencePolicy(["Rotate", "Invert"], n_ops=1).to_dict()
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


POLICY_BOUNDARY_ROWS = [
    pytest.param(lambda: ReferencePolicy()(torch.zeros(2, 3, 8, 8, dtype=torch.int16)),
                 r"images must be float \(in \[0, 1\], or normalised with mean/std\) or uint8 \(in \[0, 255\]\) tensors; "
                 r"got int16 of shape \(2, 3, 8, 8\)", id="int16-images"),
    pytest.param(lambda: PolicyAugmenter(priors=None)(torch.zeros(3, 8, 8, dtype=torch.int64)),
                 r"or uint8 .*; got int64 of shape \(3, 8, 8\)", id="int64-images-augmenter"),
    pytest.param(lambda: ReferencePolicy()(torch.zeros(2, 3, 8, 8, dtype=torch.bool)), r"or uint8 .*; got bool", id="bool-images"),
    pytest.param(lambda: ReferencePolicy()(torch.zeros(2, 4, 8, 8, dtype=torch.uint8)),
                 r"uint8 images must have shape \(B, C, H, W\) or \(C, H, W\), C in \{1, 3\}, not empty; got uint8 of shape \(2, 4, 8, 8\)", id="uint8-4-channels"),
    pytest.param(lambda: ReferencePolicy()(torch.zeros(0, 3, 8, 8, dtype=torch.uint8)), r"not empty; got uint8 of shape \(0, 3, 8, 8\)",
                 id="uint8-empty"),
    pytest.param(lambda: ReferencePolicy()(torch.zeros(8, 8, dtype=torch.uint8)), r"uint8 images must have shape .*; got uint8 of shape \(8, 8\)",
                 id="uint8-2d"),
    pytest.param(lambda: ReferencePolicy(mean=[0.5] * 3, std=[0.25] * 3)(torch.full((1, 3, 8, 8), 2.2, dtype=torch.bfloat16)),
                 r"images normalised with mean/std must be .* got values in", id="bf16-out-of-normalised-range"),
    pytest.param(lambda: ReferencePolicy(output_dtype=torch.float16), r"output_dtype must be None .* or torch.uint8; got torch.float16",
                 id="output-dtype-float16"),
    pytest.param(lambda: ReferencePolicy(output_dtype=torch.uint8, mean=[0.5] * 3, std=[0.25] * 3),
                 r"output_dtype=torch.uint8 .* cannot be combined with mean/std; got mean=\[0.5, 0.5, 0.5\]", id="uint8-out-normalised"),
    pytest.param(lambda: ReferencePolicy.from_dict(_policy_dict(probability_logits=[float("nan"), 0.0])),
                 r"probability_logits must be a flat list of 2 finite numbers, one per op of \['Rotate', 'Invert'\]; got nan for Rotate",
                 id="from-dict-nan-logit"),
    pytest.param(lambda: ReferencePolicy.from_dict(_policy_dict(probability_logits=[0.0, float("inf")])),
                 r"probability_logits must be .* finite .*; got inf for Invert", id="from-dict-inf-logit"),
    pytest.param(lambda: ReferencePolicy.from_dict(_policy_dict(magnitude_logits=[float("-inf")])),
                 r"magnitude_logits must be a flat list of 1 finite numbers, one per op of \['Rotate'\]; got -inf for Rotate",
                 id="from-dict-minus-inf-magnitude"),
    pytest.param(lambda: ReferencePolicy.from_dict(_policy_dict(probability_logits=[[0.0], [0.0]])),
                 r"must be a flat list of 2 finite numbers.*; got a nested list of shape \(2, 1\)", id="from-dict-nested"),
    pytest.param(lambda: ReferencePolicy.from_dict(_policy_dict(probability_logits=[0.0])),
                 r"must be a flat list of 2 finite numbers.*; got a list of shape \(1,\)", id="from-dict-short"),
    pytest.param(lambda: ReferencePolicy.from_dict(_policy_dict(probability_logits=["a", "b"])),
                 r"must be a flat list of 2 finite numbers.*; got \['a', 'b'\]", id="from-dict-strings"),
    pytest.param(lambda: ReferencePolicy.from_dict(_policy_dict(probability_logits=None)),
                 r"policy dict must hold the keys .*; missing \['probability_logits'\]", id="from-dict-missing-logits"),
    pytest.param(lambda: ReferencePolicy.from_dict(_policy_dict(magnitude_logits=None, n_ops=None)),
                 r"missing \['n_ops', 'magnitude_logits'\]", id="from-dict-missing-two"),
]


@pytest.mark.parametrize("call,match", POLICY_BOUNDARY_ROWS)
def test_policy_boundary_refuses(call: Callable[[], object], match: str) -> None:
    check_raises(call, DiffAugError, match)
