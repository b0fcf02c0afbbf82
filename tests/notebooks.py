"""Run notebook cells in this process (no kernel): fast enough to walk every exercise of a lesson."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from minidit.course.build import exercise_of, strip_solution


def to_python(source: str) -> str:
    """IPython syntax (``!pip``, ``%magic``) -> plain Python, as the kernel would run it."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def run_cell(source: str, ns: dict) -> str:
    """Execute one cell's source in ``ns``; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(to_python(source), "<cell>", "exec"), ns)
    return out.getvalue()


@dataclass
class ExerciseResult:
    label: str  # "1.1 (patchify)"
    stub_error: BaseException | None = None  # what the stub's check raised (None: it passed!)
    solution_output: str = ""  # what the solution's check printed
    check_source: str = ""
    outputs: list[str] = field(default_factory=list)


def walk(solution: Path) -> list[ExerciseResult]:
    """Run a solution notebook top to bottom; at each exercise, first run the *stub* (what the
    lesson ships) and its check cell on a copy of the namespace, then the solution and its check."""
    import matplotlib

    matplotlib.use("Agg")
    nb = nbformat.read(solution, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    ns: dict = {"__name__": "__main__"}
    results, i = [], 0
    while i < len(code):
        src = code[i]
        ex = exercise_of(src)
        if ex is None:
            run_cell(src, ns)
            i += 1
            continue
        result = ExerciseResult(f"{ex[0]} ({ex[1]})", check_source=code[i + 1] if i + 1 < len(code) else "")
        stub_ns = dict(ns)
        run_cell(strip_solution(src, solution.name), stub_ns)
        try:
            run_cell(result.check_source, stub_ns)
        except BaseException as e:  # noqa: BLE001 - recorded and asserted on by the tests
            result.stub_error = e
        run_cell(src, ns)
        result.solution_output = run_cell(result.check_source, ns)
        results.append(result)
        i += 2
    return results
