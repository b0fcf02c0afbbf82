"""What ``pytest --nbval lessons/NN_name.ipynb`` shows a student (loaded by ``lessons/conftest.py``, or
by ``pytest -p minidit.course.pytest_plugin`` for a lesson saved elsewhere).

nbval runs every code cell of a notebook, in order, in one kernel, as one pytest item. For a lesson notebook
(``is_lesson``) this plugin changes three things:

- **Saved outputs never fail.** No output is compared, for every cell, the learner's own included: only an
  error raised now fails a cell. (Solution notebooks elsewhere keep nbval's strict comparison.)
- **Names a learner can find.** The check cell of an exercise is reported as ``Exercise 1.1 (patchify)``,
  any other cell as ``cell 12: <its first line>`` (cells counted from 1, markdown included).
- **One line per exercise.** A check that fails is reported in one line (its hint, none of the checker's
  frames); a cell that fails because it uses an exercise that does not pass yet (the stub's
  NotImplementedError, or a name that the exercise or a cell skipped for it defines) is *skipped* for
  that reason; and a closing section lists every exercise, passed or not, with the lesson's progress::

      ❌ Exercise 1.1 (patchify): tokens differ from the reference: ... channels LAST, ...
      ✅ Exercise 1.2 (patchify_einops) passed
      ⬜ Exercise 1.3 (unpatchify): not done yet: replace the `raise NotImplementedError(...)` line with ...
         skipped until it passes: cell 23 (print("round trip exact:", torc…)
      lesson 01: 1 of 5 exercises done; next: Exercise 1.1 (patchify)

  These failures still count ("4 failed") and fail the run; they are left out of pytest's FAILURES and
  short summary sections, which keep every other failure.

An exercise is a code cell whose first line is ``# Exercise N.M (name)``; its check cell is the code cell
tagged ``exercise-check`` that follows it (``python -m minidit.course build`` tags it), or else the next code
cell. Any other failure (a learner's own cell, a syntax error) keeps its traceback, without colour codes.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from nbval.plugin import IPyNbCell, IPyNbFile, NbCellError

from .build import CHECK, STUB_RAISED, exercise_of
from .checks import NOT_DONE

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LESSONS_DIR = "lessons"
_NOTEBOOKS = pytest.StashKey[list]()  # the lesson notebooks collected in this session
_HIDDEN = pytest.StashKey[set]()  # node ids reported by the lesson section instead of pytest's own
_THREADS = pytest.StashKey["str | None"]()  # the busy-machine line for the header, or None


def is_lesson(path: Path) -> bool:
    """The plugin acts on lesson notebooks only: in a folder named ``lessons``, or (a lesson saved
    elsewhere) with the check cells' tag, which solution notebooks do not have."""
    if path.suffix != ".ipynb":
        return False
    if path.parent.name == LESSONS_DIR:
        return True
    try:
        return f'"{CHECK}"' in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def plain(text: str) -> str:
    """Text without terminal colour codes."""
    return ANSI.sub("", text)


def one_line(text: str) -> str:
    return " ".join(plain(text).split())


def _parse(source: str) -> ast.AST | None:
    lines = [("pass" if line.lstrip().startswith(("!", "%")) else line) for line in source.split("\n")]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def names_defined(source: str) -> set[str]:
    """The names a cell binds in the notebook's namespace (functions, classes, imports, assignments; not
    the local names inside its functions); of a cell with a syntax error, the functions and classes it
    starts to define."""
    tree = _parse(source)
    if tree is None:
        return set(re.findall(r"^(?:def|class)\s+(\w+)", source, re.MULTILINE))
    out, todo = set(), [tree]
    while todo:
        for node in ast.iter_child_nodes(todo.pop()):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.add(node.name)  # its body is a scope of its own
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                out.add(node.id)
            elif isinstance(node, ast.alias):
                out.add((node.asname or node.name).split(".")[0])
            elif not isinstance(node, ast.Lambda | ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
                todo.append(node)
    return out


def names_used(source: str) -> set[str]:
    tree = _parse(source)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} if tree else set()


def first_line(source: str, width: int = 40, naming: set[str] | frozenset = frozenset()) -> str:
    """The cell's first line (that uses one of ``naming``, if one does), to find the cell by."""
    lines = [s.strip() for s in source.split("\n") if s.strip()]
    uses = [s for s in lines if naming & set(re.findall(r"\w+", s))]
    line = (uses or lines or ["(empty)"])[0]
    return line if len(line) <= width else line[: width - 1] + "…"


@dataclass
class Exercise:
    id: str  # "1.1"
    name: str  # "patchify"
    cell: int  # index of the exercise cell in the notebook
    check: int | None = None  # index of its check cell
    names: set[str] = field(default_factory=set)  # what the exercise cell defines
    status: str = "not run"  # "passed", "not done", "wrong" or "not run"
    message: str = ""
    code_error: str = ""  # the exercise cell's own failure, if any
    tainted: set[str] = field(default_factory=set)  # names defined by cells skipped for this exercise
    skipped: list[str] = field(default_factory=list)  # the cells skipped for this exercise ("cell 13 (...)")

    @property
    def label(self) -> str:
        return f"Exercise {self.id} ({self.name})"


def _exercises(nb) -> list[Exercise]:
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (ex := exercise_of(cell.source)):
            out.append(Exercise(ex[0], ex[1], i, names=names_defined(cell.source)))
    for k, ex in enumerate(out):
        end = out[k + 1].cell if k + 1 < len(out) else len(nb.cells)
        code = [j for j in range(ex.cell + 1, end) if nb.cells[j].cell_type == "code"]
        tagged = [j for j in code if CHECK in nb.cells[j].get("metadata", {}).get("tags", [])]
        ex.check = (tagged or code or [None])[0]
    return out


class LessonNotebook(IPyNbFile):
    """nbval's notebook, with items named for a learner and the exercises' outcomes recorded."""

    def collect(self):
        items = list(super().collect())  # nbval reads self.nb and makes one item per code cell
        self.exercises = _exercises(self.nb)
        self.ran = False
        by_check = {ex.check: ex for ex in self.exercises}
        by_cell = {ex.cell: ex for ex in self.exercises}
        index = {id(c): i for i, c in enumerate(self.nb.cells)}
        self.config.stash.setdefault(_NOTEBOOKS, []).append(self)
        seen = set()
        for item in items:
            i = index[id(item.cell)]
            check_of = by_check.get(i)
            name = check_of.label if check_of else f"cell {i + 1}: {first_line(item.cell.source)}"
            if name in seen:
                name = f"{name} (cell {i + 1})"
            seen.add(name)
            yield LessonCell.from_parent(
                self, name=name, cell_num=item.cell_num, cell=item.cell, options=item.options,
                index=i, check_of=check_of, exercise=by_cell.get(i),
            )  # fmt: skip

    def blocking_exercise(self, index: int, source: str, error_text: str) -> Exercise | None:
        """The exercise a failing cell needs: the stub it raised, or an exercise that does not pass
        (or a cell skipped for it) that defines a name the cell uses."""
        if m := STUB_RAISED.search(error_text):
            for ex in self.exercises:
                if ex.id == m.group(1):
                    return ex
        used = names_used(source)
        candidates = [
            ex
            for ex in self.exercises
            if ex.cell < index and ex.status in ("not done", "wrong") and used & (ex.names | ex.tainted)
        ]
        # the one the error names: an undefined name, or a function in the traceback; else the first
        named = set(re.findall(r"NameError: name '(\w+)' is not defined", error_text))
        named |= set(re.findall(r"\bin (\w+)\(", error_text))
        return next((ex for ex in candidates if named & (ex.names | ex.tainted)), candidates[0] if candidates else None)


class LessonCell(IPyNbCell):
    def __init__(self, name, parent, cell_num, cell, options, index, check_of=None, exercise=None):
        cell = nbformat.NotebookNode(cell)
        cell["outputs"] = []  # a learner's saved outputs (even with no execution count) are never compared
        options["check"] = False
        super().__init__(name, parent, cell_num, cell, options)
        self.index, self.check_of, self.exercise = index, check_of, exercise

    def reportinfo(self):
        # Not the node id's tail: pytest would print its dots as "::" in verbose lines.
        return self.path, None, f"{self.path.name}, {self.name}"

    def _error(self) -> dict:
        return next((o for o in reversed(self.test_outputs or []) if o.get("output_type") == "error"), {})

    def runtest(self):
        notebook: LessonNotebook = self.parent
        notebook.ran = True
        try:
            super().runtest()
        except NbCellError:
            error = self._error()
            ename, evalue = error.get("ename", ""), plain(error.get("evalue", ""))
            text = plain("\n".join(error.get("traceback", [])) + "\n" + evalue)
            if self.check_of is not None and error:
                self._check_failed(ename, evalue)
            elif error and (ex := notebook.blocking_exercise(self.index, self.cell.source, text)):
                line = first_line(self.cell.source, 32, ex.names | ex.tainted)
                ex.tainted |= names_defined(self.cell.source)
                ex.skipped.append(f"cell {self.index + 1} ({line})")
                if self.exercise is not None:
                    self.exercise.code_error = f"needs {ex.label}, which does not pass yet."
                self.config.stash[_HIDDEN].add(self.nodeid)
                reason = "" if ex.status == "not done" else ", which does not pass its check yet"
                pytest.skip(f"needs {ex.label}{reason}")
            elif self.exercise is not None and error:
                evalue = re.sub(r"\(\d+\.py, (line \d+)\)", r"(\1)", one_line(evalue))  # the kernel's file name
                self.exercise.code_error = f"cell {self.index + 1} (your code) raised {ename}: {evalue}"
            raise
        if self.check_of is not None:
            self.check_of.status = "passed"

    def _check_failed(self, ename: str, evalue: str) -> None:
        ex = self.check_of
        if ename in ("ExerciseFailed", "AssertionError"):
            message = one_line(evalue).removeprefix(f"{ex.label}:").removeprefix(f"Exercise {ex.id}:").strip()
        else:  # not the check's verdict: the check could not run (e.g. the exercise's name is undefined)
            message = f"{ename}: {one_line(evalue)}"
        ex.message = ex.code_error or message
        ex.status = "not done" if NOT_DONE in ex.message or "needs Exercise" in ex.message else "wrong"
        self.config.stash[_HIDDEN].add(self.nodeid)

    def repr_failure(self, excinfo):
        exc = excinfo.value
        if not isinstance(exc, NbCellError):
            return plain(str(super().repr_failure(excinfo)))
        if self.check_of is not None and self.check_of.message:
            return f"{self.check_of.label}: {self.check_of.message}"
        error = self._error()
        if error.get("traceback"):  # what failed first (pytest's short summary shows it), then the traceback
            lines = plain("\n".join(error["traceback"])).split("\n")
            head = f"{error.get('ename')}: {one_line(error.get('evalue', ''))}"
            return "\n".join([head, ""] + lines[1 if set(lines[0]) == {"-"} else 0 :])
        return plain(f"{exc}\n{exc.inner_traceback or ''}").strip()


def limit_kernel_threads() -> str | None:
    """On a busy machine, run the notebooks' kernels with one thread (they inherit ``OMP_NUM_THREADS``).

    torch's default is a thread per core; when other work already fills the cores, those threads wait for each
    other at every small op, and a lesson that takes 40 s on one thread took 5-8 minutes on a busy 2-core
    machine. ``OMP_NUM_THREADS``, when set, is the user's choice. Returns a line for pytest's header, or None."""
    import os

    from ..runtime import cpu_threads

    threads, busy = cpu_threads(num_workers=0, local_processes=1)
    if busy is None:
        return None
    os.environ["OMP_NUM_THREADS"] = "1"
    return busy.replace("training with", "notebook kernels get").split(", so")[0] + " (OMP_NUM_THREADS=N chooses)"


def pytest_configure(config):
    config.stash[_THREADS] = limit_kernel_threads()


def pytest_report_header(config):
    return config.stash.get(_THREADS, None)


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path, parent):
    """Swap nbval's collector for lesson notebooks."""
    collectors = yield
    if not is_lesson(file_path):
        return collectors
    parent.config.stash.setdefault(_HIDDEN, set())
    return [LessonNotebook.from_parent(parent, path=file_path) if type(c) is IPyNbFile else c for c in collectors or []]


def _progress(nb: LessonNotebook) -> list[tuple[str, dict]]:
    """The lines of a lesson's closing section, with their terminal markup."""
    lines, told = [], False
    for ex in nb.exercises:
        if ex.status == "passed":
            lines.append((f"✅ {ex.label} passed", {"green": True}))
            continue
        message = ex.message or ex.status
        if message.startswith(NOT_DONE):  # how to start is said once, at the first exercise not done
            message = "not done yet" + ("" if told else message[len(NOT_DONE) :])
            told = True
        mark = "❌" if ex.status == "wrong" else "⬜"
        lines.append((f"{mark} {ex.label}: {message}", {"red": ex.status == "wrong"}))
        if ex.skipped:
            lines.append((f"   skipped until it passes: {', '.join(ex.skipped)}", {}))
    done = sum(ex.status == "passed" for ex in nb.exercises)
    number = nb.path.name.split("_", 1)[0]
    todo = next((ex for ex in nb.exercises if ex.status != "passed"), None)
    line = f"lesson {number}: {done} of {len(nb.exercises)} exercises done"
    if todo is not None:
        line += f"; next: {todo.label}"
    else:
        later = sorted(p for p in nb.path.parent.glob("[0-9][0-9]_*.ipynb") if p.name > nb.path.name)
        line += f"; next: lesson {later[0].stem}" if later else "; that was the last lesson"
    lines.append((line, {"bold": True}))
    return lines


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Exercise failures and the cells skipped for them are reported in one section per lesson, last,
    instead of in pytest's FAILURES and short summary (where they still count: "5 failed")."""
    hidden = config.stash.get(_HIDDEN, set())
    stats = terminalreporter.stats
    saved = {key: stats[key] for key in ("failed", "skipped") if key in stats}
    for key, reports in saved.items():
        stats[key] = [r for r in reports if getattr(r, "nodeid", None) not in hidden]
    try:
        return (yield)
    finally:
        stats.update(saved)
        for nb in config.stash.get(_NOTEBOOKS, []):
            if nb.ran and nb.exercises:
                terminalreporter.write_sep("=", f"lesson {nb.path.stem}")
                for text, markup in _progress(nb):
                    terminalreporter.write_line(text, **markup)
