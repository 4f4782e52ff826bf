"""The one failure policy: what a mail gets when postroom cannot decide it."""

from __future__ import annotations

import pytest

from postroom.config import example_config_path, load_config, with_changes
from postroom.policy import Failure, on_failure


@pytest.mark.parametrize(
    ("on_error", "authenticated", "expected"),
    [
        ("degraded", False, Failure.DEGRADED),  # a customer's mail is delivered, marked
        ("tempfail", False, Failure.TEMPFAIL),  # ...or kept queued when the admin says so
        ("degraded", True, Failure.TEMPFAIL),  # an agent's reply never leaves unrewritten
        ("tempfail", True, Failure.TEMPFAIL),
    ],
)
def test_policy(on_error: str, authenticated: bool, expected: Failure) -> None:
    config = with_changes(load_config(example_config_path(), environ={}), {"milter": {"on_error": on_error}})
    assert on_failure(config, authenticated=authenticated) is expected
