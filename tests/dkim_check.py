"""Verify a DKIM-signed message the way receivers do: with dkimpy and with OpenDKIM (the C library most
mail servers run), each against the given public key records instead of DNS.

OpenDKIM runs in its test mode (``opendkim -t FILE``: the milter's own code on a message from a file) with
``TestPublicKeys`` standing in for DNS.  It prints the Authentication-Results header it would add.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import dkim

from postroom.dkim import dns_answer

OPENDKIM = "/usr/sbin/opendkim"


def as_sent(message: bytes) -> bytes:
    """The message as Postfix sends it on: every line, the last one too, ends with CRLF."""
    message = re.sub(rb"(?<!\r)\n", b"\r\n", message)
    return message if message.endswith(b"\r\n") else message + b"\r\n"


def opendkim_result(message: bytes, records: dict[str, str]) -> str:
    """OpenDKIM's dkim= result for the message's signature: "pass", "fail", "neutral", ... or "" for none."""
    if not Path(OPENDKIM).exists() and shutil.which("opendkim") is None:
        raise AssertionError("OpenDKIM is not installed (Debian package opendkim; ./dev setup installs it)")
    with tempfile.TemporaryDirectory(prefix="postroom-opendkim-") as tmp:
        keys = Path(tmp, "keys")
        keys.write_text("".join(f"{name.rstrip('.')} {value}\n" for name, value in records.items()))
        conf = Path(tmp, "opendkim.conf")
        conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {keys}\n")
        mail = Path(tmp, "message.eml")
        mail.write_bytes(as_sent(message))
        run = subprocess.run(
            [shutil.which("opendkim") or OPENDKIM, "-x", str(conf), "-t", str(mail), "-vvv"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    out = (run.stdout + run.stderr).decode("utf-8", "replace")
    match = re.search(r"\bdkim=(\w+)", out)
    return match.group(1) if match else ""


def assert_verified(message: bytes, records: dict[str, str]) -> None:
    """Both verifiers accept the message's DKIM signature."""
    assert dkim.verify(as_sent(message), dnsfunc=dns_answer(records)), "dkimpy does not verify the signature"
    result = opendkim_result(message, records)
    assert result == "pass", f"OpenDKIM: dkim={result or '(no result)'}"
