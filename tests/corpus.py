"""CPython's own email test corpus (test/test_email/data under the interpreter's standard library): real-world
mails, broken ones included, that postroom must take like any other mail."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(p for p in CORPUS.iterdir() if p.name.startswith("msg_") and p.suffix == ".txt")


def corpus_file(name: str) -> Path:
    path = CORPUS / name
    if not path.is_file():
        pytest.skip(f"{CORPUS} is not installed with this interpreter (Debian: the libpython3-testsuite package)")
    return path
