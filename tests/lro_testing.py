"""What tests/test_bad_input.py and tests/test_properties.py share: the settings and the verdict."""

from __future__ import annotations

import pytest
from hypothesis import event, settings


def examples(n):
    """Hypothesis settings for ``n`` examples: derandomized (the same examples on every run: CI is deterministic),
    no deadline, nothing written to the tree."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None)


def check_outcome(call, problems):
    """``call()`` when ``problems`` (names of the invalid arguments) is empty; else assert that it raises a
    ValueError / TypeError naming one of them (any other exception propagates: the test fails)."""
    event("valid input" if not problems else "invalid input")  # shown by --hypothesis-show-statistics
    if not problems:
        return call()
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert any(name in str(info.value) for name in problems), f"{info.value!r} names none of {problems}"
    return None
