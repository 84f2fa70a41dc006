"""Shipped priors: fidelity to the reference ops, strict and safe loading, atomic saving, wheel packaging."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from diffaug import DiffAugError, PolicyAugmenter, load_priors
from diffaug.fit import evaluate_encoder, load_images
from diffaug.ops import MAGNITUDE_OPS, get_op
from diffaug.priors import MANIFEST, read_manifest, save_priors, shipped_priors_dir

# The issue's targets (dB) at the fitting size; the priors are measured on photos held out of the fit.
TARGET_PSNR = {
    "Brightness": 45, "Color": 45, "Contrast": 45, "Sharpness": 45, "Posterize": 42, "Solarize": 30,
    "ShearX": 50, "ShearY": 50, "TranslateX": 50, "TranslateY": 50, "Rotate": 50,
}
TARGET_PSNR_3X_AFFINE = 45
# Gradient w.r.t. m: cosine with the reference's finite difference, at least 0.95 of the reference's own.
GRAD_FRACTION = 0.95


@pytest.fixture(scope="module")
def held_out() -> list[torch.Tensor]:
    return load_images()[1]


@pytest.mark.parametrize("name", MAGNITUDE_OPS)
def test_shipped_default_priors_meet_fidelity_targets(name: str, held_out: list[torch.Tensor]) -> None:
    encoder = load_priors()[name]
    metrics = evaluate_encoder(encoder, held_out, 32, count=96, seed=99)
    assert metrics["psnr"] >= TARGET_PSNR[name], metrics
    assert metrics["psnr"] > metrics["identity_psnr"] + 10, metrics
    if not torch.isnan(torch.tensor(metrics["grad_ceiling"])):
        assert metrics["grad_cosine"] >= GRAD_FRACTION * metrics["grad_ceiling"], metrics
    if get_op(name).kind == "affine":
        at_3x = evaluate_encoder(encoder, held_out, 96, count=16, seed=99)
        assert at_3x["psnr"] >= TARGET_PSNR_3X_AFFINE, at_3x


def test_manifest_records_what_the_issue_asks() -> None:
    for arch in ("default", "paper"):
        manifest = read_manifest(shipped_priors_dir(arch))
        assert manifest["arch"] == arch and manifest["image_size"] == 32
        assert set(manifest["versions"]) >= {"torch", "kornia", "pillow"}
        assert set(manifest["fit"]) >= {"steps", "batch_size", "seed", "images"}
        assert list(manifest["ops"]) == list(MAGNITUDE_OPS)
        for name, entry in manifest["ops"].items():
            assert len(entry["sha256"]) == 64 and entry["magnitude_map"] == get_op(name).parameter_range
            assert set(entry["fidelity"]["32px"]) == {"psnr", "identity_psnr", "grad_cosine", "grad_ceiling"}
            assert "96px" in entry["fidelity"]


def test_paper_priors_load_and_are_worse_on_colour() -> None:
    paper, default = load_priors(arch="paper"), load_priors()
    held = load_images()[1]
    for name in ("Color", "Solarize"):
        assert evaluate_encoder(paper[name], held, 32, count=32)["psnr"] < evaluate_encoder(
            default[name], held, 32, count=32)["psnr"] - 10
    assert PolicyAugmenter(arch="paper").encoders["Rotate"].arch == "paper"


@pytest.fixture
def priors_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "priors"
    shutil.copytree(shipped_priors_dir(), folder)
    return folder


def _weight_file(folder: Path, name: str = "Rotate") -> Path:
    return folder / json.loads((folder / MANIFEST).read_text())["ops"][name]["file"]


def test_a_copied_folder_loads(priors_copy: Path) -> None:
    assert sorted(load_priors(priors_copy)) == sorted(MAGNITUDE_OPS)
    assert PolicyAugmenter(priors=priors_copy).encoders["Rotate"] is not None


def test_corrupt_weight_file_is_refused(priors_copy: Path) -> None:
    path = _weight_file(priors_copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DiffAugError, match=r"must have sha256 .* \(corrupt or truncated; run `diffaug fit-priors`"):
        load_priors(priors_copy)


def test_truncated_weight_file_is_refused(priors_copy: Path) -> None:
    path = _weight_file(priors_copy)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DiffAugError, match=r"corrupt or truncated"):
        load_priors(priors_copy)


def test_missing_weight_file_is_refused(priors_copy: Path) -> None:
    _weight_file(priors_copy, "Color").unlink()
    with pytest.raises(DiffAugError, match=r"prior for Color must be in .*the file is missing \(run `diffaug fit-priors`"):
        load_priors(priors_copy)


def test_missing_or_broken_manifest_is_refused(priors_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(DiffAugError, match=r"must contain manifest.json"):
        load_priors(tmp_path)
    (priors_copy / MANIFEST).write_text("{not json")
    with pytest.raises(DiffAugError, match=r"must be valid JSON"):
        load_priors(priors_copy)


def test_manifest_of_another_op_table_is_refused(priors_copy: Path) -> None:
    manifest = json.loads((priors_copy / MANIFEST).read_text())
    manifest["op_table_fingerprint"] = "0" * 64
    (priors_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DiffAugError, match=r"fitted to another op table"):
        load_priors(priors_copy)


def test_weights_of_another_op_are_refused_strictly(priors_copy: Path) -> None:
    """A file with the right hash but the wrong tensors (a Color prior where Rotate belongs) fails strict loading."""
    manifest = json.loads((priors_copy / MANIFEST).read_text())
    manifest["ops"]["Rotate"] = manifest["ops"]["Color"]
    (priors_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DiffAugError, match=r"must hold the Rotate encoder's weights"):
        load_priors(priors_copy)


def test_arbitrary_pickle_is_not_executed(priors_copy: Path, tmp_path: Path) -> None:
    """A weight file carrying a pickled callable is refused by the weights-only loader, even with a matching hash."""
    import hashlib
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = _weight_file(priors_copy)
    payload = pickle.dumps(Exploit())
    path.write_bytes(payload)
    manifest = json.loads((priors_copy / MANIFEST).read_text())
    manifest["ops"]["Rotate"]["sha256"] = hashlib.sha256(payload).hexdigest()
    (priors_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DiffAugError, match=r"must hold the Rotate encoder's weights"):
        load_priors(priors_copy)
    assert not marker.exists()


def test_augmenter_with_partial_priors_names_what_is_missing(tmp_path: Path) -> None:
    encoders = load_priors()
    save_priors(tmp_path, {"Rotate": encoders["Rotate"]}, {}, {"arch": "default"})
    assert list(load_priors(tmp_path)) == ["Rotate"]
    PolicyAugmenter(ops=["Rotate", "Invert"], priors=tmp_path)
    with pytest.raises(DiffAugError, match=r"missing \['Brightness'"):
        PolicyAugmenter(priors=tmp_path)


def test_interrupted_save_leaves_the_previous_priors(priors_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash while writing the manifest: the old manifest and every file it names still load."""
    encoders = load_priors()
    before = (priors_copy / MANIFEST).read_text()
    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith(MANIFEST):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with torch.no_grad():
        encoders["Rotate"].coefficients.linear.bias.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_priors(priors_copy, {"Rotate": encoders["Rotate"]}, {}, {"arch": "default"})
    monkeypatch.undo()
    assert (priors_copy / MANIFEST).read_text() == before
    assert not list(priors_copy.glob(".*.tmp"))
    load_priors(priors_copy)


def test_mixing_architectures_in_one_folder_is_refused(priors_copy: Path) -> None:
    paper = load_priors(arch="paper")
    with pytest.raises(DiffAugError, match=r"refusing to mix in 'paper'"):
        save_priors(priors_copy, {"Rotate": paper["Rotate"]}, {}, {"arch": "paper"})


@pytest.mark.slow
def test_priors_load_from_a_built_wheel(tmp_path: Path) -> None:
    """Build the wheel, unpack it alone on sys.path, and load the priors from another directory."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("diffaug-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "diffaug" / "pretrained_priors" / "default" / MANIFEST).is_file()
    code = (
        "import diffaug, torch; from diffaug import PolicyAugmenter;"
        f"assert diffaug.__file__.startswith({str(site)!r}), diffaug.__file__;"
        "a = PolicyAugmenter(seed=0); print(a(torch.rand(2, 3, 16, 16)).shape, len(diffaug.load_priors(arch='paper')))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 3, 16, 16]) 11" in result.stdout


def test_a_manifest_cannot_point_outside_its_folder(priors_copy: Path, tmp_path: Path) -> None:
    """A valid weight file with its right hash, but outside the folder (by '..', an absolute path or a link), is
    not loaded, and the error prints no hash of it."""
    outside = tmp_path / "outside.pt"
    shutil.copy(_weight_file(priors_copy), outside)
    manifest = json.loads((priors_copy / MANIFEST).read_text())
    (priors_copy / "link.pt").symlink_to(outside)
    for file in ("../outside.pt", str(outside), "link.pt"):
        manifest["ops"]["Rotate"]["file"] = file
        (priors_copy / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(DiffAugError, match=r"the file of Rotate must be a file name inside the priors folder") as caught:
            load_priors(priors_copy)
        assert manifest["ops"]["Rotate"]["sha256"] not in str(caught.value)


def test_non_finite_weights_with_a_valid_hash_are_refused(priors_copy: Path) -> None:
    """The hash vouches for the bytes; NaN weights would give NaN images, so the values are checked too."""
    from diffaug.priors import save_priors

    encoders = load_priors(priors_copy)
    state = encoders["Rotate"].state_dict()
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    manifest = read_manifest(priors_copy)
    header = {k: v for k, v in manifest.items() if k not in ("format", "op_table_fingerprint", "ops")}
    record = {k: v for k, v in manifest["ops"]["Rotate"].items() if k not in ("file", "sha256")}
    save_priors(priors_copy, {"Rotate": encoders["Rotate"]}, {"Rotate": record}, header)
    with pytest.raises(DiffAugError, match=r"must hold finite weights; got NaN or inf in \["):
        load_priors(priors_copy)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_of_a_plain_write(tmp_path: Path, umask: int) -> None:
    """write_atomic's temporary file is 0600 (mkstemp); the file it leaves must have what open() would give it:
    0666 less the umask for a new file, the old file's mode for a replaced one."""
    from diffaug.files import write_atomic

    previous = os.umask(umask)
    try:
        new = write_atomic(tmp_path / "new.txt", lambda t: Path(t).write_text("x"))
        assert new.stat().st_mode & 0o777 == 0o666 & ~umask
        old = tmp_path / "old.txt"
        old.write_text("old")
        old.chmod(0o640)
        write_atomic(old, lambda t: Path(t).write_text("new"))
        assert old.stat().st_mode & 0o777 == 0o640 and old.read_text() == "new"
    finally:
        os.umask(previous)
