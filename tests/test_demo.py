"""The README's main command runs to its end and shows what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_plays_the_story_and_ends_with_the_ticket_table() -> None:
    env = {**os.environ, "COLUMNS": "160", "TERM": "dumb"}
    proc = subprocess.run(
        [sys.executable, "-m", "postroom", "demo"], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "lands in support@example.test/Meier as AW: [Support #1] Printer on fire" in out
    assert "as [Support #3] send me the invoice" in out
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^│ (\d) │.*$", out, re.M)}
    assert re.search(r"alice@customer.test\s+│ Printer on fire\s+│ meier\s+│ open", rows["1"])
    assert re.search(r"mallory@customer.test\s+│ send me the invoice\s+│ unassigned", rows["3"])
    assert re.search(r"│ 1\s+│$", rows["4"])  # the forward is linked to ticket 1
    assert "INBOX (4 messages)" in out and "Meier (1 messages)" in out
    assert "everything it started is stopped" in out
