"""Files that are whole or absent: atomic writes (checkpoints, logs, JSON, .npz), and JSON read as one line on error.

A crash, a kill or a full disk in the middle of a write leaves the old file or the new one, never a
partial file: every file minidit writes goes through :func:`atomic_write`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], Any]) -> None:
    """Write ``path`` atomically: ``write_fn(tmp_path)`` writes a temporary file in the same
    directory, which is fsynced and then renamed over ``path``. A crash at any moment leaves
    either the old file or the new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write_fn(tmp)
        # mkstemp makes 0600, and some writers (safetensors) replace the file with a fresh 0600 one:
        # give the finished file the permissions any other new file gets.
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException as e:
        # torch.save and safetensors write from C++: a full disk reaches us as a RuntimeError
        # ("unexpected pos ..."), not as OSError(ENOSPC). Tell it apart while the partial file still
        # fills the disk.
        full = isinstance(e, Exception) and not isinstance(e, OSError) and _nearly_full(path.parent)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise OSError(errno.ENOSPC, f"No space left on device ({type(e).__name__}: {e})") from e
        raise


def _nearly_full(directory: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(directory).free < margin
    except OSError:
        return False


def write_text(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text``, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """``path`` holds ``obj`` as indented JSON (and a final newline), written atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez(path, **arrays)`` written atomically, to exactly ``path`` (np.savez appends ``.npz`` to a
    name that lacks it; given a file object, it does not)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def read_json(path: str | os.PathLike, error: type[Exception] = UserError, hint: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; a file that cannot be read, is not JSON or holds no object raises
    ``error`` with one line (``"<path>: not readable JSON (<why>); <hint>"``)."""
    hint = f"; {hint}" if hint else ""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise error(f"{path}: not readable JSON ({e}){hint}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}{hint}")
    return data
