"""Subject tokens, prefixes and Message-ID lists: the parsers that read what strangers write."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom import subject


@pytest.mark.parametrize(
    ("raw", "prefixes", "forward", "reply"),
    [
        ("Re: Hello", ("re",), False, True),
        ("AW: Hello", ("aw",), False, True),
        ("SV: Hello", ("sv",), False, True),
        ("Antw: Hello", ("antw",), False, True),
        ("RE[2]: Hello", ("re",), False, True),
        ("Fwd: Hello", ("fwd",), True, False),
        ("FW: Hello", ("fw",), True, False),
        ("WG: Hello", ("wg",), True, False),
        ("Doorst: Hello", ("doorst",), True, False),
        ("Re: Fwd: Hello", ("re", "fwd"), False, True),
        ("WG: AW: Hello", ("wg", "aw"), True, False),
        ("Hello: world", (), False, False),
        ("Reminder: pay", (), False, False),
        ("\u56de\u590d\uff1aHello", ("\u56de\u590d",), False, True),  # Chinese client, full-width colon
        ("\u8f6c\u53d1: Hello", ("\u8f6c\u53d1",), True, False),
    ],
)
def test_prefixes(raw: str, prefixes: tuple[str, ...], forward: bool, reply: bool) -> None:
    info = subject.parse(raw)
    assert info.prefixes == prefixes
    assert info.is_forward is forward
    assert info.is_reply is reply


def test_tokens_found_anywhere_and_per_tag() -> None:
    info = subject.parse("AW: [Support #17] Rechnung [Sales #4]")
    assert subject.numbers_for(info, "Support") == [17]
    assert subject.numbers_for(info, "support") == [17]
    assert subject.numbers_for(info, "Sales") == [4]
    assert subject.numbers_for(info, "Billing") == []


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("Hello", "[Support #17] Hello"),
        ("", "[Support #17]"),
        ("Re: Hello", "Re: [Support #17] Hello"),
        ("AW: [Support #17] Hello", "AW: [Support #17] Hello"),
        ("[Support #99] stolen", "[Support #17] stolen"),
        ("Fwd: [Support #3] Hello", "[Support #17] Fwd: Hello"),
        ("[Sales #4] Hello", "[Support #17] [Sales #4] Hello"),
        ("Line\r\nBcc: evil@x", "[Support #17] Line Bcc: evil@x"),
    ],
)
def test_with_token(before: str, after: str) -> None:
    assert subject.with_token(before, "Support", 17) == after


def test_message_ids_in_order_deduplicated() -> None:
    refs = "<a@x> <b@x>\r\n <c@x>"
    assert subject.message_ids(refs, "<c@x>", None) == ["a@x", "b@x", "c@x"]
    assert subject.message_ids("no ids here") == []
    assert subject.message_ids("".join(f"<{i}@x>" for i in range(80)))[0] == "30@x"


def test_decode_rfc2047_and_flatten() -> None:
    assert subject.decode("=?utf-8?q?Gr=C3=BC=C3=9Fe?=") == "Grüße"
    assert subject.decode("=?bogus?q?x?=") == "=?bogus?q?x?="
    assert subject.decode("a\r\n\tb") == "a b"


@settings(max_examples=400)
@given(st.text(max_size=300))
def test_parsers_accept_any_text(raw: str) -> None:
    info = subject.parse(raw)
    assert all(n >= 0 for _, n in info.tokens)
    subject.message_ids(raw)
    subject.decode(raw)


@settings(max_examples=400)
@given(st.text(max_size=200), st.integers(min_value=1, max_value=10**9))
def test_with_token_always_one_line_and_exactly_one_token(raw: str, number: int) -> None:
    out = subject.with_token(raw, "Support", number)
    assert "\r" not in out and "\n" not in out
    assert subject.numbers_for(subject.parse(out), "Support") == [number]
    # Idempotent: a reply that already carries the token keeps its subject.
    assert subject.with_token(out, "Support", number) == out


@given(st.lists(st.from_regex(r"[A-Za-z0-9.$_-]{1,20}@[a-z]{1,10}\.test", fullmatch=True), max_size=10))
def test_message_ids_roundtrip(ids: list[str]) -> None:
    header = " ".join(f"<{i}>" for i in ids)
    assert subject.message_ids(header) == list(dict.fromkeys(ids))
