"""The repository keeps its promises: the README's quick start is what CI runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README.md needs a '## Quick start' section with a bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_has_at_most_three_commands():
    commands = quick_start_commands()
    assert 1 <= len(commands) <= 3, commands
    assert "pip install -r requirements.txt" in commands[0]


def test_ci_runs_the_readme_test_command():
    test_command = quick_start_commands()[-1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci], f"{test_command!r} is not a line of .ci/run"


def test_main_job_command_runs(tmp_path):
    main_job = quick_start_commands()[1]
    assert main_job.startswith("python -m minidit."), main_job
    module = main_job.split()[2]
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
