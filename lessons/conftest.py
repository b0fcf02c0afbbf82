"""Makes `pytest --nbval lessons/...` speak to a student: one line per exercise, cells that need an
unfinished exercise skipped (not failed), your own saved outputs never compared, and a progress line.
The plugin is `minidit/course/pytest_plugin.py`, installed with minidit: for a lesson saved elsewhere,
run `pytest --nbval -p minidit.course.pytest_plugin path/to/01_patchify.ipynb`."""

import pytest

try:
    from minidit.course import pytest_plugin
except ImportError as err:  # minidit or nbval not installed
    pytest_plugin, missing = None, err.name


def pytest_configure(config):
    if pytest_plugin is None:
        raise pytest.UsageError(f"the lessons need {missing}: run `pip install -r requirements.txt -e .`")
    if not config.pluginmanager.is_registered(pytest_plugin):
        config.pluginmanager.register(pytest_plugin, "minidit.course.pytest_plugin")
