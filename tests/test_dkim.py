"""postroom's own DKIM signer (OpenSSL RSA, streaming relaxed body hash) against dkimpy and OpenDKIM.

Every signature made here is checked by both verifiers; generated bodies cover the canonicalisation's corners
(whitespace runs, trailing whitespace and blank lines, CRLF and bare LF, bare CR, empty bodies, 8-bit bytes) and
are fed in chunks split anywhere, as the milter receives them.
"""

from __future__ import annotations

import base64
import hashlib
import pickle
import random
import subprocess
from unittest import mock

import dkim
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.dkim import BodyHash, DkimError, SigningKey, body_hash, dns_answer, generate, public_txt, sign
from tests.dkim_check import as_sent, assert_verified, opendkim_result

PEM = generate(2048)
KEY = SigningKey("example.test", "postroom", PEM)
RECORDS = {"postroom._domainkey.example.test.": public_txt(PEM)}
NOW = 1_700_000_000

HEADERS = [
    ("From", '"Meier via Support" <support@example.test>'),
    ("To", "Customer <c@customer.test>"),
    ("Subject", "Re: [Support #17]  Router\r\n\tbroken "),
    ("Date", "Sun, 29 Nov 2026 18:00:00 +0000"),
    ("Message-ID", "<r1@example.test>"),
    ("X-Mailer", "not signed"),
]

# Bodies made of the characters canonicalisation treats specially, plus 8-bit and ordinary text.
body_bytes = st.lists(
    st.sampled_from([b"a", b"Z", b" ", b"  ", b"\t", b"\r\n", b"\n", b"\r", b"\xff", b"\xc3\xa4", b"\x00", b"."]),
    max_size=60,
).map(b"".join)


def dkimpy_body_hash(body: bytes) -> bytes:
    """dkimpy's reading of the same body as Postfix sends it: its parser's line ends, its relaxed canonicalisation."""
    _, parsed = dkim.rfc822_parse(as_sent(b"X: y\r\n\r\n" + body))
    return base64.b64encode(hashlib.sha256(Relaxed.canonicalize_body(parsed)).digest())


def message(value: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = f"DKIM-Signature: {value}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + body


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]


@settings(max_examples=400, deadline=None)
@given(body_bytes, st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_the_body_hash_is_dkimpys_for_any_body_split_anywhere(body: bytes, cuts: list[int]) -> None:
    assert body_hash(split(body, cuts)) == dkimpy_body_hash(body)


@settings(max_examples=60, deadline=None)
@given(body_bytes, st.text(st.sampled_from("ab \t\u00e4"), max_size=20))
def test_the_signature_is_the_one_dkimpy_makes_and_verifies(body: bytes, subject: str) -> None:
    headers = [*HEADERS, ("Subject", subject)]
    ours = sign(KEY, headers, body, now=NOW)
    assert_dkimpy_verifies(message(ours, headers, body))
    with mock.patch("time.time", return_value=NOW):
        raw = as_sent(message("x", headers, body).partition(b"\r\n")[2])  # without our signature
        theirs = dkim.sign(raw, b"postroom", b"example.test", PEM, canonicalize=(b"relaxed", b"relaxed"))
    # Same key, same time, same headers: RSASSA-PKCS1-v1_5 is deterministic, so the whole value is equal.
    assert "".join(ours.split()) == "".join(theirs.decode().partition(":")[2].split())


def assert_dkimpy_verifies(raw: bytes) -> None:
    assert dkim.verify(as_sent(raw), dnsfunc=dns_answer(RECORDS))


def corner_bodies() -> list[bytes]:
    """Bodies for both verifiers.  No bare CR (RFC 5322 forbids it; mail clients do not send it): OpenDKIM
    drops a bare CR before text and the spaces before one, where RFC 6376 (and dkimpy, and postroom) keeps both,
    so the two verifiers cannot both accept such a body whoever signs it.  dkimpy checks bare CRs above."""
    rng = random.Random(20)
    pieces = [b"word", b" ", b"   ", b"\t", b"\r\n", b"\n", b"\r\n\r\n", b"\xe4\xf6", b"\xff", b"-- ", b"."]
    generated = [b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 80))) for _ in range(24)]
    return [
        b"",
        b"\r\n",
        b"\r\n\r\n\r\n",
        b"no final line end",
        b"trailing blank lines\r\n\r\n\r\n\r\n",
        b"trailing   whitespace \t \r\nand  runs\t\tof  it\r\n",
        b"bare\nline\nfeeds\n\n",
        b"8-bit: \xc3\xa4\xc3\xb6 \xff\xfe\r\n",
        b"x" * 5000 + b"\r\n",  # one long line, as an HTML part often is
        (b"A line of a big reply  with\ttabs and  runs. \r\n" * 40_000),  # ~2 MB
        *generated,
    ]


def test_opendkim_and_dkimpy_verify_every_signature() -> None:
    for body in corner_bodies():
        for chunk in (len(body) or 1, 7, 65536):
            chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)]
            raw = message(sign(KEY, HEADERS, chunks), HEADERS, body)
            assert_verified(raw, RECORDS)


def test_opendkim_notices_a_changed_body() -> None:
    """The OpenDKIM check can fail: one changed byte after signing is a failed signature."""
    body = b"Hello,\r\nthe router works again.\r\n"
    raw = message(sign(KEY, HEADERS, body), HEADERS, body)
    assert opendkim_result(raw, RECORDS) == "pass"
    assert opendkim_result(raw.replace(b"works", b"Works"), RECORDS) == "fail"


def test_from_is_oversigned_and_unlisted_headers_are_not_signed() -> None:
    tags = dict(part.strip().split("=", 1) for part in sign(KEY, HEADERS, b"x").split(";"))
    assert tags["h"].split(" : ") == ["from", "to", "subject", "date", "message-id", "from"]
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == ("rsa-sha256", "relaxed/relaxed", "example.test", "postroom")


def test_a_mail_without_from_cannot_be_signed() -> None:
    with pytest.raises(DkimError, match="no From"):
        sign(KEY, [("To", "c@customer.test")], b"x")


def test_a_key_pickles_as_its_pem_and_signs_the_same() -> None:
    again = pickle.loads(pickle.dumps(KEY))
    assert sign(again, HEADERS, b"x", now=NOW) == sign(KEY, HEADERS, b"x", now=NOW)


def test_the_hash_of_many_empty_lines_keeps_no_copy_of_them() -> None:
    hasher = BodyHash()
    for _ in range(1000):
        hasher.update(b"\r\n" * 1000)
    hasher.update(b"end")
    assert base64.b64encode(hasher.digest()) == dkimpy_body_hash(b"\r\n" * 1_000_000 + b"end")


def openssl(*args: str) -> bytes:
    return subprocess.run(["openssl", *args], capture_output=True, check=True).stdout


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        (b"not a key at all", "not a PEM private key"),
        (openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"), "not an RSA key"),
        (openssl("genrsa", "-traditional", "512"), "512 bits"),
    ],
)
def test_a_bad_key_is_refused_with_the_reason(pem: bytes, reason: str) -> None:
    with pytest.raises(DkimError, match=reason):
        SigningKey("example.test", "s", pem)
