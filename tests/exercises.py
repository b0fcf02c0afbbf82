"""What the lesson tests (tests/test_lessonNN.py) share: a stub, and a check that passes or fails with its hint."""

import pytest

from minidit.course.checks import ExerciseFailed


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise N.M (name): replace this line with your code")


def assert_passes(check, fn, label, capsys):
    """``check(fn)`` prints exactly the one success line of exercise ``label`` ("1.1 (patchify)")."""
    check(fn)
    assert capsys.readouterr().out == f"✅ Exercise {label} passed\n"


def assert_fails(check, fn, label, *hints):
    """``check(fn)`` fails for exercise ``label`` with every one of ``hints`` in its message; returns it."""
    with pytest.raises(ExerciseFailed) as info:
        check(fn)
    message = str(info.value)
    assert message.startswith(f"Exercise {label}:"), message
    for hint in hints:
        assert hint in message, f"expected {hint!r} in:\n{message}"
    return message
