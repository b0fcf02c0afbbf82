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
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def install_lines(commands: list[str]) -> list[str]:
    return [c for c in commands if "pip install" in c or "-m venv" in c]


def test_quick_start_is_install_then_one_job_then_the_tests():
    commands = quick_start_commands()
    install = install_lines(commands)
    assert commands[: len(install)] == install and 1 <= len(install) <= 3, commands
    assert len(commands) == len(install) + 2, "after installing: the main job, then the test command"
    assert any("pip install -r requirements.txt" in c for c in install)


def test_quick_start_offers_cpu_only_torch_with_sizes():
    """ "No GPU needed" must not cost a 6 GB CUDA install: the CPU-only line is in the block, with both sizes."""
    cpu = [c for c in install_lines(quick_start_commands()) if "download.pytorch.org/whl/cpu" in c]
    assert len(cpu) == 1 and cpu[0].startswith("pip install torch torchvision --index-url"), cpu
    assert re.search(r"≈ ?1 GB", cpu[0]) and re.search(r"CUDA build .*≈ ?6 GB", cpu[0]), cpu[0]


def test_ci_runs_the_readme_test_command():
    test_command = quick_start_commands()[-1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci], f"{test_command!r} is not a line of .ci/run"


def test_main_job_command_runs(tmp_path):
    commands = quick_start_commands()
    main_job = commands[len(install_lines(commands))]
    assert main_job.startswith("python -m minidit."), main_job
    module = main_job.split()[2]
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
