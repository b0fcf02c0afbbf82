"""The course machinery: lessons are generated from solutions, ship clean, and their checks are real."""

import json
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


def run_nbval(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", str(path), "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=path.parent, timeout=600,
    )  # fmt: skip


def test_lesson_01_fails_on_exercise_1_1_then_passes_when_solved(tmp_path):
    """The learner's path: the fresh lesson fails naming Exercise 1.1; with the solutions typed in and
    the notebook saved with the learner's own outputs (including a stale error), it passes."""
    lesson = tmp_path / "01_patchify.ipynb"
    shutil.copy(ROOT / "lessons" / "01_patchify.ipynb", lesson)
    out = run_nbval(lesson)
    assert out.returncode != 0
    assert "Exercise 1.1 (patchify)" in out.stdout

    solved = nbformat.read(ROOT / "solutions" / "01_patchify.ipynb", as_version=4)
    nb = nbformat.read(lesson, as_version=4)
    answers = {ex[0]: c.source for c in solved.cells if c.cell_type == "code" and (ex := build.exercise_of(c.source))}
    for n, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        ex = build.exercise_of(cell.source)
        if ex:
            cell.source = answers[ex[0]]
        cell.execution_count = n + 1  # saved as the learner ran it, with outputs of their own
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"my own output {n}\n")]
        if n == 1:
            cell.outputs.append(nbformat.v4.new_output("error", ename="NameError", evalue="earlier", traceback=[]))
    nbformat.write(nb, lesson)
    out = run_nbval(lesson)
    assert out.returncode == 0, out.stdout[-3000:]


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
