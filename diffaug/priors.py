"""Prior weights of the meta-encoders: a folder of weight files and a ``manifest.json`` that vouches for them.

The manifest records, per op, the weight file and its sha256, the encoder family, the magnitude map and the fit
settings and fidelity; for the whole set, the architecture, the versions of the reference libraries and a
fingerprint of the op table. Loading checks all of it and is strict: a missing, truncated, corrupt or mismatched
file raises ``DiffAugError`` saying what is wrong and that ``diffaug fit-priors`` regenerates it.

Saving is atomic: weight files are named by their content hash and written first; the manifest is replaced last
in one ``os.replace``; only then are files no manifest refers to removed. An interrupted save leaves the previous
manifest, and every file it names, as they were.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .encoders import ARCHS, MetaEncoder, build_encoder, freeze
from .errors import DiffAugError
from .files import write_atomic
from .ops import MAGNITUDE_OPS, OPS_TABLE

__all__ = ["load_priors", "save_priors", "shipped_priors_dir", "op_table_fingerprint", "read_manifest"]

MANIFEST = "manifest.json"
FORMAT = 1
_REGENERATE = "run `diffaug fit-priors` to regenerate the priors"


def shipped_priors_dir(arch: str = "default") -> Path:
    """The folder of the priors that ship inside the package, for ``arch``."""
    if arch not in ARCHS:
        raise DiffAugError(f"arch must be one of {list(ARCHS)}; got {arch!r}")
    return Path(str(resources.files("diffaug.pretrained_priors"))) / arch


def op_table_fingerprint() -> str:
    """sha256 of everything in the op table that a fitted prior depends on: names, kinds, signs, families and the
    magnitude maps evaluated on a grid (so editing a map invalidates the priors fitted to it)."""
    grid = torch.linspace(-1, 1, 9, dtype=torch.float64)
    rows = [
        [s.name, s.kind, s.signed, s.encoder, [round(v, 6) for v in s.parameter(grid).tolist()]]
        for s in OPS_TABLE
        if s.has_magnitude
    ]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a priors folder, checked for format, op-table fingerprint and architecture."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise DiffAugError(f"priors folder {folder} must contain {MANIFEST}; it does not ({_REGENERATE})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DiffAugError(f"{manifest_path} must be valid JSON; got {error} ({_REGENERATE})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DiffAugError(f"{manifest_path} must have format {FORMAT}; got {got!r} ({_REGENERATE})")
    if manifest.get("op_table_fingerprint") != op_table_fingerprint():
        raise DiffAugError(
            f"{manifest_path} was fitted to another op table (fingerprint {manifest.get('op_table_fingerprint')!r}, "
            f"expected {op_table_fingerprint()!r}); {_REGENERATE}"
        )
    if manifest.get("arch") not in ARCHS or not isinstance(manifest.get("ops"), dict):
        raise DiffAugError(f"{manifest_path} must name an arch in {list(ARCHS)} and its ops; {_REGENERATE}")
    return manifest


def _weights_path(folder: Path, name: str, entry: object) -> Path:
    """The weight file of a manifest entry: a plain file name inside ``folder``. Nothing outside it is opened (or
    hashed into an error message), whatever the manifest says."""
    if not isinstance(entry, dict):
        raise DiffAugError(f"{folder / MANIFEST}: the entry of {name} must be an object with \"file\" and "
                           f"\"sha256\"; got {type(entry).__name__} ({_REGENERATE})")
    file = entry.get("file")
    inside = isinstance(file, str) and file not in ("", ".", "..") and Path(file).name == file \
        and "\\" not in file
    path = folder / file if inside else folder
    if not inside or path.resolve().parent != folder.resolve():  # a link out of the folder is outside too
        raise DiffAugError(f"{folder / MANIFEST}: the file of {name} must be a file name inside the priors folder "
                           f"(no directories, '..' or absolute paths); got {file!r} ({_REGENERATE})")
    return path


def load_priors(path: str | os.PathLike | None = None, arch: str = "default") -> dict[str, MetaEncoder]:
    """Load fitted, frozen encoders by op name.

    Args:
        path: a priors folder written by ``diffaug fit-priors``; None for the priors shipped with the package.
        arch: the architecture expected when ``path`` is None (a folder's manifest names its own).

    Example:
        >>> encoders = load_priors()
        >>> sorted(encoders)[:2]
        ['Brightness', 'Color']
    """
    folder = shipped_priors_dir(arch) if path is None else Path(path)
    manifest = read_manifest(folder)
    if path is None and manifest["arch"] != arch:
        raise DiffAugError(f"{folder} must hold {arch!r} priors; its manifest says {manifest['arch']!r}")
    encoders: dict[str, MetaEncoder] = {}
    for name, entry in manifest["ops"].items():
        if name not in MAGNITUDE_OPS:
            raise DiffAugError(f"{folder / MANIFEST} lists op {name!r}; expected ops from {list(MAGNITUDE_OPS)}")
        weights = _weights_path(folder, name, entry)
        if not weights.is_file():
            raise DiffAugError(f"prior for {name} must be in {weights}; the file is missing ({_REGENERATE})")
        data = weights.read_bytes()
        if _sha256(data) != entry.get("sha256"):
            raise DiffAugError(
                f"prior file {weights} must have sha256 {entry.get('sha256')}; got {_sha256(data)} "
                f"(corrupt or truncated; {_REGENERATE})"
            )
        encoder = build_encoder(name, manifest["arch"])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # torch.load only warns about some foreign pickles
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            encoder.load_state_dict(state, strict=True)
        except Exception as error:  # untrusted bytes: whatever the restricted unpickler raises, it is not a prior
            raise DiffAugError(f"prior file {weights} must hold the {name} encoder's weights; {error} "
                               f"({_REGENERATE})") from None
        bad = [key for key, value in encoder.state_dict().items()
               if value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if bad:  # a hash vouches for the bytes, not for what they hold
            raise DiffAugError(f"prior file {weights} must hold finite weights; got NaN or inf in {bad} "
                               f"({_REGENERATE})")
        encoders[name] = freeze(encoder)
    return encoders


def _tensor_bytes(encoder: MetaEncoder) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}, buffer)
    return buffer.getvalue()


def save_priors(
    folder: str | os.PathLike,
    encoders: Mapping[str, MetaEncoder],
    records: Mapping[str, Mapping[str, Any]],
    header: Mapping[str, Any],
) -> Path:
    """Write ``encoders`` (with a manifest record per op) into ``folder`` atomically.

    Ops already in the folder's manifest and not in ``encoders`` are kept, provided the manifest is of the same
    architecture and op table; otherwise the folder must be empty of priors.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = header["arch"]
    ops: dict[str, Any] = {}
    if (folder / MANIFEST).exists():
        previous = read_manifest(folder)
        if previous["arch"] != arch:
            raise DiffAugError(f"{folder} holds {previous['arch']!r} priors; refusing to mix in {arch!r} ones")
        ops.update(previous["ops"])
    for name, encoder in encoders.items():
        data = _tensor_bytes(encoder)
        digest = _sha256(data)
        file = f"{name}-{digest[:12]}.pt"
        write_atomic(folder / file, lambda temporary: Path(temporary).write_bytes(data))
        ops[name] = {"file": file, "sha256": digest, **records.get(name, {})}
    manifest = {"format": FORMAT, **header, "op_table_fingerprint": op_table_fingerprint(),
                "ops": {n: ops[n] for n in MAGNITUDE_OPS if n in ops}}
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomic(folder / MANIFEST, lambda temporary: Path(temporary).write_text(text))
    referenced = {entry["file"] for entry in ops.values()}
    for stale in folder.glob("*.pt"):
        if stale.name not in referenced:
            stale.unlink()
    return folder
