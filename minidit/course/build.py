"""One source for each lesson: ``solutions/NN_name.ipynb``. The lesson is generated from it.

In a solution notebook, an exercise is a code cell whose first line is
``# Exercise N.M (name)`` and whose answer sits between two marker lines::

    # Exercise 1.1 (patchify)
    def patchify(x, p):
        \"\"\"[B, C, H, W] -> [B, T, p*p*C]\"\"\"
        ### BEGIN SOLUTION
        return ...
        ### END SOLUTION

The lesson gets, in place of each marked region, ``raise NotImplementedError("Exercise 1.1 (patchify) ...")``
at the same indentation. Cells tagged ``solution`` (worked answers to questions) are left out of the
lesson. Every lesson code cell ships without outputs or execution counts and is tagged
``nbval-ignore-output``; the check cell that must follow each exercise cell is also tagged
``exercise-check``. What ``pytest --nbval lessons/`` then reports (one line per exercise, never a
learner's own saved outputs) is ``pytest_plugin.py``'s work, loaded by ``lessons/conftest.py``.

    python -m minidit.course build            # write lessons/ from solutions/
    python -m minidit.course build --check    # exit 1 if lessons/ is not what build would write
    python -m minidit.course execute [NB ...] # run solution notebooks in place, storing their outputs
    python -m minidit.course from-py SRC.py NB.ipynb   # author in "percent" text, convert to a notebook
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS, LESSONS = ROOT / "solutions", ROOT / "lessons"
BUILD_COMMAND = "python -m minidit.course build"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
EXERCISE = re.compile(r"^#\s*Exercise\s+(\d+\.\d+)\s+\(([^)]+)\)")
IGNORE_OUTPUT = "nbval-ignore-output"
#: The tag of the check cell that follows each exercise cell in a lesson (what the pytest plugin reports on).
CHECK = "exercise-check"
#: The message of a stub, and how to recognise it in a traceback (a demo cell that needs an unfinished exercise).
STUB = "Exercise {id} ({name}): replace this line with your code"
STUB_RAISED = re.compile(r"Exercise (\d+\.\d+) \(([^)]+)\): replace this line with your code")


class BuildError(Exception):
    pass


@dataclass
class Exercise:
    """An exercise of a notebook: its id ("1.1"), name ("patchify") and the index of its cell."""

    id: str
    name: str
    cell: int

    @property
    def label(self) -> str:
        return f"{self.id} ({self.name})"


def exercise_of(source: str) -> tuple[str, str] | None:
    first = source.lstrip("\n").split("\n", 1)[0]
    m = EXERCISE.match(first)
    return (m.group(1), m.group(2)) if m else None


def exercises(nb) -> list[Exercise]:
    """The exercises of a notebook, in order."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (ex := exercise_of(cell.source)):
            out.append(Exercise(ex[0], ex[1], i))
    return out


def strip_solution(source: str, where: str) -> str:
    """Replace every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region with a stub raising
    NotImplementedError that names the exercise of the cell."""
    ex = exercise_of(source)
    lines, out, inside = source.split("\n"), [], False
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise BuildError(f"{where}, line {n}: nested {BEGIN}")
            if ex is None:
                raise BuildError(f"{where}: a solution region needs the first line '# Exercise N.M (name)'")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            stub = STUB.format(id=ex[0], name=ex[1])
            out.append(f'{indent}raise NotImplementedError("{stub}")')
        elif stripped == END:
            if not inside:
                raise BuildError(f"{where}, line {n}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise BuildError(f"{where}: {BEGIN} without {END}")
    return "\n".join(out)


def lesson_from_solution(nb, name: str):
    """The lesson notebook generated from a solution notebook (a new object)."""
    import nbformat

    lesson = copy.deepcopy(nb)
    cells = []
    for i, cell in enumerate(lesson.cells):
        tags = list(cell.get("metadata", {}).get("tags", []))
        if "solution" in tags:
            continue
        if cell.cell_type == "code":
            ex = exercise_of(cell.source)
            if ex is not None and BEGIN not in cell.source:
                raise BuildError(f"{name}, cell {i}: exercise {ex[0]} has no {BEGIN} region")
            if ex is not None:
                following = lesson.cells[i + 1] if i + 1 < len(lesson.cells) else None
                if following is None or following.cell_type != "code" or exercise_of(following.source):
                    raise BuildError(f"{name}, cell {i}: exercise {ex[0]} must be followed by its check cell")
                following.setdefault("metadata", {}).setdefault("tags", []).append(CHECK)
            cell.source = strip_solution(cell.source, f"{name}, cell {i}")
            cell.outputs = []
            cell.execution_count = None
            cell.metadata = nbformat.from_dict({"tags": sorted(set(tags) | {IGNORE_OUTPUT})})
        else:
            cell.source = cell.source.replace("/blob/main/solutions/", "/blob/main/lessons/")
            cell.metadata = nbformat.from_dict({k: v for k, v in cell.metadata.items() if k == "tags"})
        if "id" in cell:
            cell["id"] = f"cell-{len(cells):03d}"
        cells.append(cell)
    lesson.cells = cells
    keep = ("kernelspec", "language_info")
    lesson.metadata = nbformat.from_dict({k: nb.metadata[k] for k in keep if k in nb.metadata})
    return lesson


def notebook_text(nb) -> str:
    import nbformat

    return nbformat.writes(nb) + "\n"


def build(check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) every lesson; returns the lessons that differ."""
    import nbformat

    sources = sorted(SOLUTIONS.glob("[0-9][0-9]_*.ipynb"))
    if not sources:
        raise BuildError(f"no solution notebooks in {SOLUTIONS}")
    differ = []
    for src in sources:
        nb = nbformat.read(src, as_version=4)
        text = notebook_text(lesson_from_solution(nb, src.name))
        dest = LESSONS / src.name
        if not dest.is_file() or dest.read_text() != text:
            differ.append(src.name)
            if not check:
                dest.parent.mkdir(exist_ok=True)
                dest.write_text(text)
    expected = {s.name for s in sources}
    extra = [p.name for p in LESSONS.glob("*.ipynb") if p.name not in expected]
    differ += [f"{name} (no solution notebook)" for name in extra]
    return differ


def execute(paths: list[Path], timeout: int = 600) -> None:
    """Run notebooks top to bottom in a fresh kernel, in place, storing their outputs."""
    import nbformat
    from nbclient import NotebookClient

    for path in paths:
        nb = nbformat.read(path, as_version=4)
        resources = {"metadata": {"path": str(path.parent)}}
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False, resources=resources)
        client.execute()
        for cell in nb.cells:
            cell.metadata.pop("execution", None)
        nbformat.write(nb, path)
        print(f"executed {path}")


def from_percent(text: str):
    """A notebook from "percent" text, an easy format to author lessons in:

    # %% [markdown]
    # # Title
    # Some *markdown*, each line behind "# ".
    # %%
    x = 1  # a code cell
    # %% tags=["solution"]
    # a cell with tags
    """
    import json

    import nbformat

    header = re.compile(r"^# %%(?P<md> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?\s*$")
    cells, current = [], None
    for line in text.split("\n"):
        m = header.match(line)
        if m:
            current = {"markdown": bool(m.group("md")), "tags": json.loads(m.group("tags") or "[]"), "lines": []}
            cells.append(current)
        elif current is not None:
            current["lines"].append(line)
    nb = nbformat.v4.new_notebook()
    for c in cells:
        lines = c["lines"]
        while lines and not lines[-1].strip():
            lines.pop()
        if c["markdown"]:
            src = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines)
            cell = nbformat.v4.new_markdown_cell(src)
        else:
            cell = nbformat.v4.new_code_cell("\n".join(lines))
        if c["tags"]:
            cell.metadata["tags"] = c["tags"]
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minidit.course", description="Build lessons/ from solutions/.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write lessons/ from solutions/")
    b.add_argument("--check", action="store_true", help="only check that lessons/ is up to date")
    e = sub.add_parser("execute", help="run solution notebooks in place (default: all)")
    e.add_argument("notebooks", nargs="*", type=Path)
    f = sub.add_parser("from-py", help="convert a percent-format .py file into a notebook (authoring aid)")
    f.add_argument("source", type=Path)
    f.add_argument("notebook", type=Path)
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            differ = build(check=args.check)
            if args.check and differ:
                print(f"lessons/ is out of date ({', '.join(differ)}): run `{BUILD_COMMAND}`", file=sys.stderr)
                return 1
            print("lessons/ is up to date" if not differ else f"wrote {', '.join('lessons/' + d for d in differ)}")
        elif args.command == "from-py":
            import nbformat

            nbformat.write(from_percent(args.source.read_text()), args.notebook)
            print(f"wrote {args.notebook}")
        else:
            execute(args.notebooks or sorted(SOLUTIONS.glob("[0-9][0-9]_*.ipynb")))
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
