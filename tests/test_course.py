"""The course machinery: lessons are generated from solutions, ship clean, and their checks are real."""

import json
import linecache
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from notebooks import walk

from minidit.course import build

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


def test_lessons_are_what_the_generator_makes():
    differ = build.build(check=True)
    assert not differ, f"lessons/ is out of date ({', '.join(differ)}): run `{build.BUILD_COMMAND}`"


@pytest.mark.parametrize("path", sorted((ROOT / "lessons").glob("*.ipynb")), ids=lambda p: p.name)
def test_lessons_ship_clean(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            assert build.IGNORE_OUTPUT in cell.metadata.get("tags", [])
            assert "### BEGIN SOLUTION" not in cell.source
    assert build.exercises(nb), "a lesson without exercises"
    checks = [i for i, c in enumerate(nb.cells) if build.CHECK in c.metadata.get("tags", [])]
    assert checks == [ex.cell + 1 for ex in build.exercises(nb)], "every exercise cell, then its tagged check cell"


def test_an_exercise_without_its_check_cell_is_refused():
    nb = build.from_percent(
        "# %%\n# Exercise 9.1 (x)\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n# %% [markdown]\n# text\n"
    )
    with pytest.raises(build.BuildError, match="must be followed by its check cell"):
        build.lesson_from_solution(nb, "t")


def test_strip_solution_keeps_indentation_and_names_the_exercise():
    src = "# Exercise 9.1 (double)\ndef f(x):\n    y = 1\n"
    src += "    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n"
    out = build.strip_solution(src, "t")
    assert out == (
        "# Exercise 9.1 (double)\ndef f(x):\n    y = 1\n"
        '    raise NotImplementedError("Exercise 9.1 (double): replace this line with your code")\n'
    )
    with pytest.raises(build.BuildError, match="without"):
        build.strip_solution("# Exercise 9.1 (x)\n### BEGIN SOLUTION\n", "t")
    with pytest.raises(build.BuildError, match="first line"):
        build.strip_solution("x = 1\n### BEGIN SOLUTION\n### END SOLUTION\n", "t")


def test_percent_format_round_trip():
    nb = build.from_percent('# %% [markdown]\n# # Title\n# text\n# %%\nx = 1\n# %% tags=["solution"]\ny = 2\n')
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code"]
    assert nb.cells[0].source == "# Title\ntext" and nb.cells[2].metadata["tags"] == ["solution"]


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.name)
def test_every_stub_fails_and_every_solution_passes(solution, monkeypatch):
    monkeypatch.chdir(solution.parent)
    results = walk(solution)
    assert results, "no exercises found"
    for r in results:
        assert isinstance(r.stub_error, AssertionError), f"Exercise {r.label}: the stub passed its check"
        assert f"Exercise {r.label.split()[0]}" in str(r.stub_error), str(r.stub_error)
        assert r.solution_output.strip().splitlines() == [f"✅ Exercise {r.label} passed"], r.solution_output


# --------------------------------------------------------------------------
# What `pytest --nbval lessons/NN.ipynb` shows a student (minidit/course/pytest_plugin.py, lessons/conftest.py)
# --------------------------------------------------------------------------

LESSON_01 = ROOT / "lessons" / "01_patchify.ipynb"
WRONG_PATCHIFY = """# Exercise 1.1 (patchify)
def patchify(x, p):
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # channels first: a plausible slip
    return x.reshape(B, (H // p) * (W // p), C * p * p)
"""
CRASHING_UNPATCHIFY = """# Exercise 1.3 (unpatchify)
def unpatchify(x, p, c):
    B, T, _ = x.shape
    return x.reshape(B, c, T, p)
"""
BROKEN_EMBED = """# Exercise 1.4 (patch_embed_as_linear)
def patch_embed_as_linear(conv):
    return nn.Linear(conv.in_channels * conv.kernel_size[0] ** 2, conv.out_channels
"""


def run_nbval(target: str, cwd: Path) -> str:
    """The student's command, `pytest --nbval <target>` run in ``cwd``; returns what it printed, with
    the exit status on the last line."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", target, "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=cwd, timeout=600,
    )  # fmt: skip
    return out.stdout + out.stderr + f"\nexit status {out.returncode}"


def lesson_copy(tmp: Path, edit) -> Path:
    """A folder ``lessons/`` holding the shipped conftest.py and lesson 01 changed by ``edit(notebook)``."""
    folder = tmp / "lessons"
    folder.mkdir()
    shutil.copy(ROOT / "lessons" / "conftest.py", folder)
    nb = nbformat.read(LESSON_01, as_version=4)
    edit(nb)
    nbformat.write(nb, folder / LESSON_01.name)
    return folder / LESSON_01.name


def answers() -> dict[str, str]:
    solved = nbformat.read(ROOT / "solutions" / LESSON_01.name, as_version=4)
    return {ex[0]: c.source for c in solved.cells if c.cell_type == "code" and (ex := build.exercise_of(c.source))}


def paste(nb, ids, sources=None) -> None:
    """Type the solutions (or ``sources``) of exercises ``ids`` into the notebook."""
    sources = sources or answers()
    for cell in nb.cells:
        ex = build.exercise_of(cell.source) if cell.cell_type == "code" else None
        if ex and ex[0] in ids:
            cell.source = sources[ex[0]]


def exercise_lines(out: str, label: str) -> list[str]:
    """The lines of the lesson section about exercise ``label`` ("1.1 (patchify)")."""
    return [line for line in out.splitlines() if line[:1] in "✅❌⬜" and f" Exercise {label}" in line[:60]]


def assert_plain(out: str) -> None:
    """No colour codes, none of nbval's "Cell N" names, none of the checker's frames."""
    assert "\x1b[" not in out
    assert "::Cell " not in out and "minidit/course" not in out and "checks.py" not in out


@pytest.fixture(scope="module")
def untouched() -> str:
    """The shipped lesson 01, run as a student would from the repository root."""
    return run_nbval("lessons/01_patchify.ipynb", ROOT)


def test_untouched_lesson_says_one_line_per_exercise_and_the_progress(untouched):
    exercises = build.exercises(nbformat.read(LESSON_01, as_version=4))
    assert untouched.endswith("exit status 1"), untouched[-3000:]
    for ex in exercises:
        lines = exercise_lines(untouched, ex.label)
        assert len(lines) == 1 and lines[0].startswith(f"⬜ Exercise {ex.label}: not done yet"), untouched
    first = exercises[0].label
    assert f"⬜ Exercise {first}: not done yet: replace the `raise NotImplementedError(...)`" in untouched
    assert f"lesson 01: 0 of {len(exercises)} exercises done; next: Exercise {first}" in untouched
    # the unfinished exercises are the only failures: the cells that call them are skipped, naming them
    assert re.search(rf"\b{len(exercises)} failed, \d+ passed, [1-9]\d* skipped in", untouched), untouched
    assert "   skipped until it passes: cell " in untouched
    assert "Traceback" not in untouched and "FAILURES" not in untouched and "NotImplementedError:" not in untouched
    assert_plain(untouched)


@pytest.fixture(scope="module")
def saved_from_a_kernel(tmp_path_factory) -> tuple[Path, str]:
    """Lesson 01 as a learner saves it: run in a real kernel with the first exercises solved, the last one
    still a stub (its check cell and the cells using it saved with errors) and a cell of their own printing
    the time and a plot; then the last exercise solved and the notebook saved without running it
    again (stale errors), one cell's execution count lost as some front ends do."""
    from nbclient import NotebookClient

    ids = [ex.id for ex in build.exercises(nbformat.read(LESSON_01, as_version=4))]

    def edit(nb):
        paste(nb, ids[:-1])
        check = next(i for i, c in enumerate(nb.cells) if build.CHECK in c.metadata.get("tags", []))
        own = "import time\nprint('my timing:', time.time())\nplt.plot(torch.rand(5))\nplt.show()"
        nb.cells.insert(check + 1, nbformat.v4.new_code_cell(own))

    path = lesson_copy(tmp_path_factory.mktemp("saved"), edit)
    nb = nbformat.read(path, as_version=4)
    resources = {"metadata": {"path": str(path.parent)}}
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True, resources=resources).execute()
    paste(nb, ids[-1:])
    ran = [c for c in nb.cells if c.cell_type == "code" and c.outputs and c.execution_count]
    ran[-1].execution_count = None
    nbformat.write(nb, path)
    return path, run_nbval(path.name, path.parent)


def test_saved_outputs_never_fail_a_learner(saved_from_a_kernel):
    path, out = saved_from_a_kernel
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    own = [c for c in code if "my timing" in c.source][0]
    assert any(o.output_type == "error" for c in code for o in c.outputs), "no stale error was saved"
    assert own.outputs and not own.metadata.get("tags"), "the learner's cell was not saved as JupyterLab does"
    exercises = build.exercises(nb)
    assert out.endswith("exit status 0"), out[-3000:]
    for ex in exercises:
        assert exercise_lines(out, ex.label) == [f"✅ Exercise {ex.label} passed"], out
    assert f"lesson 01: {len(exercises)} of {len(exercises)} exercises done; " in out
    assert "next: Exercise" not in out
    assert_plain(out)


@pytest.fixture(scope="module")
def wrong_answer(tmp_path_factory) -> str:
    """Exercise 1.1 wrong (channels first), 1.2 solved, 1.3 crashing, 1.4 a syntax error, 1.5 not done, and
    a cell of the learner's own that fails for a reason of its own; run from the folder above lessons/."""

    def edit(nb):
        mine = {"1.1": WRONG_PATCHIFY, "1.3": CRASHING_UNPATCHIFY, "1.4": BROKEN_EMBED}
        paste(nb, ["1.1", "1.2", "1.3", "1.4"], {**answers(), **mine})
        nb.cells.insert(3, nbformat.v4.new_code_cell("ratio = 1 / 0  # my own cell"))

    path = lesson_copy(tmp_path_factory.mktemp("wrong"), edit)
    return run_nbval(f"lessons/{path.name}", path.parent.parent)


def test_a_wrong_answer_fails_with_its_hint_in_one_line(wrong_answer):
    from minidit.course import lesson01

    ns = {}
    exec(WRONG_PATCHIFY, ns)
    with pytest.raises(AssertionError) as err:
        lesson01.check_patchify(ns["patchify"])
    hint = " ".join(str(err.value).split()).removeprefix("Exercise 1.1 (patchify):").strip()
    assert exercise_lines(wrong_answer, "1.1 (patchify)") == [f"❌ Exercise 1.1 (patchify): {hint}"]
    assert exercise_lines(wrong_answer, "1.2 (patchify_einops)") == ["✅ Exercise 1.2 (patchify_einops) passed"]
    n = len(build.exercises(nbformat.read(LESSON_01, as_version=4)))
    assert f"lesson 01: 1 of {n} exercises done; next: Exercise 1.1 (patchify)" in wrong_answer
    # the learner's own failing cell: a failure, named by its first line, with its traceback, without colours
    assert "01_patchify.ipynb, cell 4: ratio = 1 / 0  # my own cell" in wrong_answer
    assert "ZeroDivisionError" in wrong_answer, wrong_answer
    # a crash names the learner's line; a syntax error in an exercise cell is that exercise's failure
    line = exercise_lines(wrong_answer, "1.3 (unpatchify)")
    crash = r"your function raised RuntimeError: shape .* is invalid .* \(in unpatchify, line 4 of its cell: "
    assert len(line) == 1 and re.search(crash + re.escape("`return x.reshape(B, c, T, p)`)"), line[0]), line
    line = exercise_lines(wrong_answer, "1.4 (patch_embed_as_linear)")
    assert len(line) == 1 and re.match(r"❌ Exercise 1.4 \(\w+\): cell \d+ \(your code\) raised SyntaxError", line[0])
    assert re.search(r"\(line 3\)$", line[0]), line  # the line in the cell, not the kernel's file name
    # a cell using 1.1 (wrong) and 1.3 (crashing) that crashes in 1.3's function is skipped for 1.3
    assert re.search(
        r"❌ Exercise 1.3 [^\n]*\n   skipped until it passes: cell \d+ \(print\(\"round trip", wrong_answer
    )
    assert "\nSyntaxError: " in wrong_answer.split("short test summary")[0]  # its traceback, in FAILURES
    # failures: n - 1 exercises (1.2 passed), the exercise cell of 1.4, and the learner's cell
    assert re.search(rf"\b{n + 1} failed, \d+ passed", wrong_answer), wrong_answer
    assert wrong_answer.endswith("exit status 1")
    assert_plain(wrong_answer)


def test_plugin_reads_names_and_places(tmp_path):
    from minidit.course import pytest_plugin as plugin

    assert plugin.is_lesson(Path("x/lessons/01_a.ipynb")) and plugin.is_lesson(Path("x/lessons/conftest.py")) is False
    assert plugin.is_lesson(tmp_path / "saved_elsewhere.ipynb") is False  # not there
    for path in SOLUTIONS:  # solution notebooks keep nbval's comparison of outputs
        assert not plugin.is_lesson(path)
        lesson = tmp_path / path.name
        shutil.copy(ROOT / "lessons" / path.name, lesson)
        assert plugin.is_lesson(lesson)  # a lesson saved outside lessons/, e.g. downloaded from Colab
    src = "!pip install x\nimport numpy as np\ndef f(a):\n    b = 1\n    return g(a)\ntokens, (u, v) = f(1), (2, 3)\n"
    src += "for i in range(2):\n    w = [j for j in range(i)]\n"
    assert plugin.names_defined(src) == {"np", "f", "tokens", "u", "v", "i", "w"}  # not f's b, not j
    assert {"g", "f", "a"} <= plugin.names_used(src)
    assert plugin.names_defined("def f(x):\n    return (x\nclass K:\n") == {"f", "K"}  # a syntax error
    stub = build.strip_solution("# Exercise 7.2 (x_y)\n### BEGIN SOLUTION\n### END SOLUTION\n", "t")
    assert build.STUB_RAISED.search(stub).groups() == ("7.2", "x_y")
    assert plugin.plain("\x1b[31mNameError\x1b[39m: x") == "NameError: x"


def test_a_check_names_the_exercise_a_stub_belongs_to_and_the_learners_line():
    from minidit.course import checks

    def uses_earlier(x):
        raise NotImplementedError(build.STUB.format(id="1.1", name="patchify"))

    with pytest.raises(checks.ExerciseFailed, match=r"1.3 \(u\): needs Exercise 1.1 \(patchify\) first"):
        checks.call("1.3 (u)", uses_earlier, 1)
    cell, ns = "/tmp/ipykernel_1/123.py", {}  # a cell's "file" in a kernel: its lines are in linecache
    source = "def f(x):\n    y = x + 1\n    return y.reshape(5)\n"
    linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
    exec(compile(source, cell, "exec"), ns)
    message = r"raised AttributeError: .* \(in f, line 3 of its cell: `return y.reshape\(5\)`\)$"
    with pytest.raises(checks.ExerciseFailed, match=message):
        checks.call("1.1 (f)", ns["f"], 1)
    linecache.cache.pop(cell)


def test_build_check_prints_the_fixing_command(tmp_path, monkeypatch):
    for name in ("solutions", "lessons"):
        shutil.copytree(ROOT / name, tmp_path / name)
    monkeypatch.setattr(build, "SOLUTIONS", tmp_path / "solutions")
    monkeypatch.setattr(build, "LESSONS", tmp_path / "lessons")
    victim = sorted((tmp_path / "lessons").glob("*.ipynb"))[0]
    data = json.loads(victim.read_text())
    data["cells"][0]["source"] = "edited by hand"
    victim.write_text(json.dumps(data))
    assert build.main(["build", "--check"]) == 1
    assert build.main(["build"]) == 0 and build.build(check=True) == []


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.name)
def test_colab_setup_clones_the_repository(solution):
    """On Colab a lesson needs the repository's data/ (the shipped toy classifier, toy DiT and toy VAE), which a
    plain `pip install git+...` leaves out: the setup cell clones the repository and installs it in place."""
    nb = nbformat.read(solution, as_version=4)
    setup = next(c.source for c in nb.cells if c.cell_type == "code")
    assert '"google.colab" in sys.modules' in setup
    assert "git clone" in setup and "pip -q install -e /content/minidit" in setup
    assert 'sys.path.insert(0, "/content/minidit")' in setup


def test_kernels_get_one_thread_on_a_busy_machine_unless_the_user_chose(monkeypatch):
    """nbval's kernels inherit OMP_NUM_THREADS: on a busy machine (load >= cores) the plugin sets it to 1 (a
    lesson took 8.5 minutes with 2 threads on a busy 2-core machine); idle, or when the user set it, it stays."""
    import os

    from minidit import runtime
    from minidit.course.pytest_plugin import limit_kernel_threads

    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert limit_kernel_threads() is None and "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 3.0))
    line = limit_kernel_threads()
    assert os.environ["OMP_NUM_THREADS"] == "1" and "busy" in line and "1 thread" in line
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert limit_kernel_threads() is None and os.environ["OMP_NUM_THREADS"] == "2"
