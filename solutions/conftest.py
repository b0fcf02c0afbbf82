"""`pytest --nbval solutions/`: on a busy machine the notebooks' kernels run with one thread, as the lessons'
(see `minidit.course.pytest_plugin.limit_kernel_threads`). Solutions keep nbval's strict output comparison."""

from minidit.course.pytest_plugin import limit_kernel_threads

_LINE = None


def pytest_configure(config):
    global _LINE
    _LINE = limit_kernel_threads()


def pytest_report_header(config):
    return _LINE
