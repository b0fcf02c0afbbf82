"""What every exercise check shares: seeded inputs, comparisons that explain themselves, one success line.

A check calls the learner's function on seeded inputs, compares with the reference in
``minidit``, and either prints exactly one line::

    ✅ Exercise 1.2 (unpatchify) passed

or raises ``AssertionError`` with a specific hint. Lesson modules (``minidit.course.lesson01`` ...)
build their checks from these pieces; their tests prove each check rejects plausible mistakes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .build import STUB_RAISED

#: What the check of a stub says (the pytest plugin reports such an exercise as "not done yet").
NOT_DONE = "not implemented yet"


class ExerciseFailed(AssertionError):
    """A check that did not pass; the message says what was expected and, where it can, why."""


def passed(exercise: str) -> None:
    """Print the one fixed success line of ``exercise`` ("1.2 (unpatchify)")."""
    print(f"✅ Exercise {exercise} passed")


def fail(exercise: str, message: str) -> None:
    raise ExerciseFailed(f"Exercise {exercise}: {message}")


def call(exercise: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Call the learner's function; a stub's NotImplementedError and any crash become a clear failure."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        other = STUB_RAISED.search(str(e))
        if other and other.group(1) != exercise.split()[0]:  # the stub of an earlier exercise it builds on
            fail(exercise, f"needs Exercise {other.group(1)} ({other.group(2)}) first: it is {NOT_DONE}.")
        fail(exercise, f"{NOT_DONE}: replace the `raise NotImplementedError(...)` line with your code.")
    except ExerciseFailed:
        raise
    except Exception as e:  # a learner's bug: show it, in one line, with the exercise's name and the line
        fail(exercise, f"your function raised {type(e).__name__}: {e}{_where(e)}")


def _where(error: BaseException) -> str:
    """Where the learner's code failed, as " (in patchify, line 7 of its cell: `x = x.reshape(...)`)": the
    deepest frame outside installed packages and this package (IPython keeps a cell's lines in linecache)."""
    import linecache
    import sys
    import sysconfig
    import traceback

    libraries = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")} | {sys.prefix, sys.base_prefix}
    package = str(Path(__file__).resolve().parents[1])
    own = [
        f for f in traceback.extract_tb(error.__traceback__)[1:]  # [0] is the call above
        if not f.filename.startswith((*libraries, package)) and not f.filename.startswith("<frozen")
    ]  # fmt: skip
    if not own:
        return ""
    frame = own[-1]
    line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    return f" (in {frame.name}, line {frame.lineno} of its cell" + (f": `{line}`)" if line else ")")


def expect_tensor(exercise: str, got: Any, name: str = "the result") -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        fail(exercise, f"{name} should be a torch.Tensor, got {type(got).__name__}.")
    return got


def expect_shape(exercise: str, got: torch.Tensor, shape: tuple[int, ...], hints: dict | None = None) -> None:
    """Shapes must match exactly; ``hints`` maps a wrong shape to an explanation of the likely mistake."""
    if tuple(got.shape) != tuple(shape):
        hint = (hints or {}).get(tuple(got.shape), "")
        fail(exercise, f"got shape {tuple(got.shape)}, expected {tuple(shape)}." + (f" {hint}" if hint else ""))


def expect_close(
    exercise: str,
    got: torch.Tensor,
    expected: torch.Tensor,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    diagnose: Callable[[torch.Tensor], str | None] | None = None,
    what: str = "values",
) -> None:
    """Values must match the reference. On a mismatch, ``diagnose(got)`` may name the likely mistake
    (e.g. by testing the learner's output against known wrong variants)."""
    expect_shape(exercise, got, tuple(expected.shape))
    got64, exp64 = got.detach().double(), expected.detach().double()
    if torch.allclose(got64, exp64, atol=atol, rtol=rtol):
        return
    err = (got64 - exp64).abs().max().item()
    rel = err / max(exp64.abs().max().item(), 1e-12)
    hint = diagnose(got) if diagnose is not None else None
    message = (
        f"{what} differ from the reference: max abs error {err:.3g} (relative {rel:.2g}); the check allows "
        f"|error| <= atol + rtol·|expected| with atol={atol:g}, rtol={rtol:g}."
    )
    fail(exercise, message + (f" {hint}" if hint else ""))


def matches(got: torch.Tensor, candidate: torch.Tensor, atol: float = 1e-5) -> bool:
    """Does ``got`` equal a known wrong variant? Used by checks to name a mistake."""
    return tuple(got.shape) == tuple(candidate.shape) and torch.allclose(
        got.detach().double(), candidate.detach().double(), atol=atol, rtol=1e-5
    )


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expect_dtype(exercise: str, got: torch.Tensor, dtype: torch.dtype, hint: str = "") -> None:
    """The dtype the rest of the lesson relies on (a float32 result where float64 was asked breaks later cells)."""
    if got.dtype != dtype:
        fail(exercise, f"got dtype {got.dtype}, expected {dtype}." + (f" {hint}" if hint else ""))


class ChunkCalls(torch.overrides.TorchFunctionMode):
    """Records ``(chunks, dim)`` of every ``Tensor.chunk`` / ``torch.chunk`` call made inside the ``with`` block,
    so that a check can name "chunk without dim" (which splits the batch axis) even when it only crashes later."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.chunk, torch.chunk):
            chunks = args[1] if len(args) > 1 else kwargs.get("chunks")
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            self.calls.append((chunks, dim))
        return func(*args, **kwargs)


def call_watching_chunks(exercise: str, fn: Callable[..., Any], *args, chunks: int, hint: str) -> Any:
    """``call``, and if the learner's code crashes after splitting a [B, k·D] tensor into ``chunks`` along the
    batch axis (``.chunk(chunks)`` without ``dim``), add ``hint`` to the failure."""
    recorder = ChunkCalls()
    try:
        with recorder:
            return call(exercise, fn, *args)
    except ExerciseFailed as err:
        if "not implemented yet" not in str(err) and any(n == chunks and d in (0, -2) for n, d in recorder.calls):
            raise ExerciseFailed(f"{err} {hint}") from None
        raise
