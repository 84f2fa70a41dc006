"""Writing files so that an interruption never leaves a half-written one: the one helper every writer uses."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)``, flush the result to disk, then move it onto ``path`` in one ``os.replace``.

    Until the replace, ``path`` keeps its previous content; on any error or interrupt the temporary file is
    removed. The temporary file lives beside ``path`` (same file system) as ``.<name>.<random>.tmp``. The file
    gets the mode a plain ``open(path, "w")`` would give it (the old file's, or 0666 less the umask), not the
    0600 of the temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, _plain_mode(path))
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _plain_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)  # the only portable way to read the umask is to set it; restored at once
        os.umask(umask)
        return 0o666 & ~umask
