"""The course machinery: exercise checks (``minidit.course.checks`` and one module per lesson)
and the generator that writes ``lessons/`` from ``solutions/`` (``python -m minidit.course``)."""

#: Where the course lives, for the Colab badge and the setup cell.
REPO = "minidit/minidit"
REPO_URL = f"https://github.com/{REPO}"
