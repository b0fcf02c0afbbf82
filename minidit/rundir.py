"""Run directories of ``python -m minidit.train``: one writer at a time, and what a resume may trust.

A run directory holds ``config.json``, ``log.jsonl``, ``summary.json``, ``samples/`` and
``checkpoints/last.pt``. Everything here turns a damaged or busy directory into one
``UserError`` line (or a warning, where the damage can be repaired without losing anything),
before any training.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .fileio import read_json

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

#: The lock file: held (``flock``) by the one process that writes the run directory; it holds that pid.
LOCK_NAME = ".lock"


class RunWarning(UserWarning):
    """Damage in a run directory that the trainer repaired (a torn log line, an unreadable summary)."""


def _cannot_use(path: Path, e: OSError) -> UserError:
    why = e.strerror or str(e)
    if isinstance(e, FileExistsError | NotADirectoryError):
        why = "a file is in the way: it is not a directory"
    return UserError(f"cannot write the run directory {path} ({why}); pass --run-dir with a writable directory")


def make_writable_dir(path: Path) -> None:
    """Create ``path`` (and its parents) and check that files can be created in it, or one ``UserError`` line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise _cannot_use(path, e) from None


def lock(run_dir: Path) -> int:
    """Create ``run_dir`` and take the exclusive lock of ``run_dir/.lock``; returns its file descriptor.

    The lock (``fcntl.flock``) lasts until the descriptor is closed or the process ends, however it
    ends: the OS releases it, so a SIGKILLed run never leaves a stale lock. The holder writes its pid
    into the file, and a second process is refused naming it."""
    make_writable_dir(run_dir)
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _cannot_use(run_dir, e) from None
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "not written yet"
        os.close(fd)
        raise UserError(
            f"{run_dir} is in use by another training process (pid {holder}); wait for it to end, "
            "or pass --run-dir NEW_DIR"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # releases the flock


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of ``log.jsonl``. A torn last line (a crash or a full disk in the middle of an append) is
    dropped with a ``RunWarning``; a damaged line before the last is a ``UserError``."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and isinstance(row.get("step"), int)
        except ValueError:
            ok = False
        if ok:
            rows.append(row)
        elif i == len(lines) - 1:
            why = "left by an interrupted write"
            warnings.warn(f"{path}: dropped its torn last line ({line[:40]!r}), {why}", RunWarning, stacklevel=2)
        else:
            raise UserError(f"{path}: line {i + 1} is not a log row; repair or delete the file to resume")
    return rows


def read_summary(path: Path) -> dict[str, Any]:
    """``summary.json`` as a dict; {} if it is missing, or unreadable (then with a ``RunWarning``: it is rewritten)."""
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except UserError:
        warnings.warn(f"{path}: unreadable; it is written again", RunWarning, stacklevel=2)
        return {}


def check_resumable(ckpt: dict[str, Any], path: Path, version: int) -> None:
    """A ``UserError`` line unless ``ckpt`` (read from ``path``) holds all a resumed run needs, in the right types."""

    def refuse(why: str):
        raise UserError(
            f"{path}: cannot resume from it ({why}); move it aside to start again, or pass --run-dir NEW_DIR"
        )

    if ckpt.get("version") != version or not isinstance(ckpt.get("model"), dict):
        refuse("not a minidit training checkpoint")
    for part in ("ema", "opt", "rng"):
        if not isinstance(ckpt.get(part), dict):
            refuse(f"no {part} state")
    step = ckpt.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        refuse(f"bad step {step!r}")
    rng = ckpt["rng"].get("cpu")
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
        refuse("no CPU random state")
    if not isinstance(ckpt["rng"].get("cuda", []), list):
        refuse("bad CUDA random state")
    opt = ckpt["opt"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        refuse("damaged optimizer state")
    if not isinstance(ckpt.get("scaler", {}), dict):
        refuse("damaged gradient-scaler state")


def load_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any], path: Path) -> None:
    """``opt.load_state_dict(state)``, refusing (one line) a state that does not fit ``opt``'s parameters:
    ``load_state_dict`` checks only the number of parameters, a wrong shape would fail at the first step."""
    try:
        opt.load_state_dict(state)
        params = [p for group in opt.param_groups for p in group["params"]]
        for p in params:
            for name, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise ValueError(f"{name} of shape {list(value.shape)} for a parameter of shape {list(p.shape)}")
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        why = " ".join(str(e).split())[:200]
        raise UserError(
            f"{path}: cannot resume from it (its optimizer state does not fit the model: {why}); "
            "move it aside to start again, or pass --run-dir NEW_DIR"
        ) from None


def nonfinite_parts(parts: dict[str, list[torch.Tensor]]) -> list[str]:
    """The names of ``parts`` whose floating-point tensors hold a NaN or an inf (one host sync)."""
    names, flags = [], []
    for name, tensors in parts.items():
        tensors = [t for t in tensors if t.is_floating_point()]
        if tensors:
            names.append(name)
            flags.append(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
    if not flags:
        return []
    ok = torch.stack(flags).tolist()
    return [name for name, good in zip(names, ok) if not good]
