"""A large mail costs the milter at most its own size once (issue 15, item 8): measured with tracemalloc while the
real adapter and pipeline (in-memory store) take a 30 MB mail through pymilter's TestCtx.

Before the body was spooled and signed as a stream, an agent's 30 MB reply cost Python several times its size
(the chunks, their join, a MIME parse, the canonical copy for DKIM); a customer's 30 MB mail with a rule that
reads bodies, about four times.
"""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Callable, Iterator

import Milter
import pytest
from Milter import testctx

from postroom.bundle import load_all
from postroom.config import example_config_path
from postroom.milter.adapter import Runtime, make_factory
from postroom.parts import Parts
from postroom.rules import MemoryAssignmentState, parse_rules
from postroom.store.memory import MemoryStore
from tests.test_milter_callbacks import OFFERED_STEPS, PostfixCtx

SIZE = 30_000_000
LINE = b"A line of a large mail, as a long log file or a pasted table makes it.  \r\n"
BODY_RULES = parse_rules('[[rule]]\nname = "refunds"\nbody_contains = "refund"\ntag = "billing"\n', "rules.toml")


@pytest.fixture
def connect(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], MeasuredCtx]]:
    loaded = load_all(example_config_path(), environ={})
    parts = Parts(loaded.config, MemoryStore(), keys=loaded.keys, rules=BODY_RULES, assign=MemoryAssignmentState())
    runtime = Runtime(parts)
    monkeypatch.setattr(testctx.TestCtx, "default_opts", [Milter.CURR_ACTS, OFFERED_STEPS, 0, 0])
    factory, _holder = make_factory(runtime)
    monkeypatch.setattr(Milter, "factory", factory)
    opened: list[MeasuredCtx] = []

    def open_connection() -> MeasuredCtx:
        ctx = MeasuredCtx()
        assert ctx._connect(host="mail.test", helo="mail.test", ip="192.0.2.25") == Milter.CONTINUE
        opened.append(ctx)
        return ctx

    yield open_connection
    for ctx in opened:
        if ctx.getpriv() is not None:
            ctx._close()


def large(sender: str, rcpt: str) -> bytes:
    head = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: Logs\r\nMessage-ID: <big@x.test>\r\n\r\n"
    return head.encode() + LINE * (SIZE // len(LINE))


class MeasuredCtx(PostfixCtx):
    """Python memory of the milter's part alone: from the first body chunk to the end of end-of-message (TestCtx
    holds, parses and copies the whole mail itself around that: Postfix's side, not the milter's)."""

    baseline = 0
    peak = 0

    def _feed_body(self, bfp: io.BytesIO) -> int:
        self.baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        return super()._feed_body(bfp)

    def _eom(self) -> int:
        rc = int(super()._eom())
        self.peak = tracemalloc.get_traced_memory()[1]  # before TestCtx keeps a copy of the whole mail
        return rc


def peak_mib(ctx: MeasuredCtx, send: Callable[[], int]) -> tuple[int, float]:
    tracemalloc.start()
    try:
        rc = send()
    finally:
        tracemalloc.stop()
    return rc, (ctx.peak - ctx.baseline) / 1024 / 1024


def test_an_agents_30_mb_reply_costs_less_than_its_size(connect: Callable[[], MeasuredCtx]) -> None:
    ctx = connect()
    raw = large("Support <support@example.test>", "carol@customer.test")
    rc, peak = peak_mib(ctx, lambda: ctx.send(raw, "<meier@example.test>", "<carol@customer.test>", login="meier"))
    assert rc == Milter.ACCEPT
    assert any(c[:2] == ("insheader", "DKIM-Signature") for c in ctx.calls), ctx.calls  # signed, whole body
    assert peak < 8, f"the reply took {peak:.0f} MiB of Python memory"


def test_a_customers_30_mb_mail_read_by_a_rule_costs_less_than_its_size(connect: Callable[[], MeasuredCtx]) -> None:
    ctx = connect()
    raw = large("Carol <carol@customer.test>", "support@example.test")
    rc, peak = peak_mib(ctx, lambda: ctx.send(raw, "<carol@customer.test>", "<support@example.test>"))
    assert rc == Milter.ACCEPT
    assert ctx.body_answers and set(ctx.body_answers) == {Milter.CONTINUE}  # the rule made it read the body
    assert peak < SIZE / 1024 / 1024, f"the mail took {peak:.0f} MiB of Python memory"
