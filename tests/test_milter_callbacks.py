"""The pymilter adapter under pymilter's TestCtx: callbacks in libmilter's order, verdicts turned into milter calls.

The store is the in-memory fake and the pipeline is the real one; what is checked is the adapter's side: which
smfi_* calls a verdict becomes, in which order and with which header indexes, which macro it reads when, and that
nothing of one message survives into the next on the same connection.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import Milter
import pytest
from Milter import testctx

from postroom import log as plog
from postroom import replies, runtime
from postroom.config import Config, example_config_path, load_config, with_changes
from postroom.milter.adapter import Runtime, make_factory
from postroom.milter.worker import Handled, WorkerError
from postroom.parts import Parts
from postroom.pipeline import Message, Outcome
from postroom.rules import NO_RULES, MemoryAssignmentState, Ruleset, parse_rules
from postroom.store.memory import MemoryStore
from postroom.verdict import (
    Action,
    AddRecipient,
    ChangeSender,
    RemoveHeader,
    RemoveRecipient,
    SetHeader,
    Verdict,
)

SUPPORT = "support@example.test"
ALICE = "alice@customer.test"
BOB = "bob@customer.test"
QID = "4QcTx01"

# TestCtx offers every protocol step, including the "no reply" ones.  A @Milter.noreply callback then returns
# NOREPLY, which libmilter swallows but TestCtx takes for a rejection: it closes the connection right after
# connect().  Offer what an MTA without no-reply support offers, so those callbacks answer CONTINUE.
NO_REPLY_STEPS = (
    Milter.P_NR_CONN
    | Milter.P_NR_HELO
    | Milter.P_NR_MAIL
    | Milter.P_NR_RCPT
    | Milter.P_NR_DATA
    | Milter.P_NR_UNKN
    | Milter.P_NR_EOH
    | Milter.P_NR_BODY
    | Milter.P_NR_HDR
)
OFFERED_STEPS = 0x1FFFFF & ~NO_REPLY_STEPS

# The milter protocol stages in the order of an SMTP transaction (the M_* numbers are not in that order).
STAGES = (
    Milter.M_CONNECT,
    Milter.M_HELO,
    Milter.M_ENVFROM,
    Milter.M_ENVRCPT,
    Milter.M_DATA,
    Milter.M_EOH,
    Milter.M_EOM,
)

Call = tuple[object, ...]


class PostfixCtx(testctx.TestCtx):  # type: ignore[misc]
    """TestCtx that hands out macros when Postfix sends them and records every smfi_* call in order.

    TestCtx's own bookkeeping cannot show header indexes (its chgheader deletes every copy of a name), and it
    answers getsymval() with every macro at every stage.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stage_macros: dict[int, dict[str, str]] = {}
        self.calls: list[Call] = []
        self.body_answers: list[int] = []

    def _feed_body(self, bfp: io.BytesIO) -> int:
        # TestCtx takes any answer but CONTINUE for the end of the mail; Postfix takes SKIP (negotiated) as "send
        # no more body" and goes on to end of message, as libmilter's smfi_body documents.
        self.body_answers = []
        while chunk := bfp.read(8192):
            rc = int(self._priv.body(chunk))
            self.body_answers.append(rc)
            if rc == Milter.SKIP and self._protocol & Milter.P_SKIP:
                break
            if rc != Milter.CONTINUE:
                return rc
        return int(Milter.CONTINUE)

    def getsymval(self, name: str) -> str | None:
        stage = self._stage
        # TestCtx names no stage for header and body callbacks; they come after DATA.
        last = STAGES.index(stage) if stage in STAGES else STAGES.index(Milter.M_DATA)
        # libmilter treats "i" and "{i}" as one macro; Postfix sends the queue id as "i".
        names = {name}
        if re.fullmatch(r"\{.\}", name):
            names.add(name[1])
        for s in STAGES[: last + 1]:
            macros = self.stage_macros.get(s, {})
            for n in names:
                if n in macros:
                    return macros[n]
        return None

    def addheader(self, field: str, value: str, idx: int) -> None:
        super().addheader(field, value, idx)
        self.calls.append(("addheader", field, value) if idx == -1 else ("insheader", field, value, idx))

    def chgheader(self, field: str, idx: int, value: str) -> None:
        super().chgheader(field, idx, value)
        self.calls.append(("chgheader", field, idx, value))

    def addrcpt(self, rcpt: str, params: Any) -> None:
        super().addrcpt(rcpt, params)
        self.calls.append(("addrcpt", rcpt))

    def delrcpt(self, rcpt: str) -> None:
        super().delrcpt(rcpt)
        self.calls.append(("delrcpt", rcpt))

    def chgfrom(self, sender: str, params: Any = None) -> None:
        super().chgfrom(sender, params)
        self.calls.append(("chgfrom", sender))

    def send(self, raw: bytes, mail_from: str, *rcpts: str, qid: str | None = QID, login: str | None = None) -> int:
        """One mail on this connection, with the macros of each stage as Postfix sends them.

        {auth_authen} comes with MAIL FROM and only after SMTP AUTH; the queue id is given at end of message
        only (Postfix has none at MAIL FROM and at the first RCPT).  Returns the end-of-message answer.
        """
        self.calls.clear()
        self._reply = None
        mail = {"{mail_addr}": mail_from}
        if login is not None:
            mail |= {"{auth_type}": "PLAIN", "{auth_authen}": login}
        # A new MAIL FROM discards every macro of the previous message.
        self.stage_macros = {Milter.M_CONNECT: self.stage_macros.get(Milter.M_CONNECT, {}), Milter.M_ENVFROM: mail}
        if qid is not None:
            self.stage_macros[Milter.M_EOM] = {"i": qid}
        return int(self._feedFile(io.BytesIO(raw), mail_from, *rcpts))

    @property
    def reply(self) -> tuple[str, ...] | None:
        return tuple(self._reply) if self._reply else None


class RefusingCtx(PostfixCtx):
    """An MTA that refuses one kind of edit; pymilter raises milter.error when libmilter reports a failure."""

    refuse = "chgheader"

    def chgheader(self, field: str, idx: int, value: str) -> None:
        if self.refuse == "chgheader":
            raise Milter.error("cannot change header")
        super().chgheader(field, idx, value)

    def addrcpt(self, rcpt: str, params: Any) -> None:
        if self.refuse == "addrcpt":
            raise Milter.error("cannot add recipient")
        super().addrcpt(rcpt, params)


class RefusingRecipientCtx(RefusingCtx):
    refuse = "addrcpt"


Connect = Callable[..., PostfixCtx]


@pytest.fixture
def config() -> Config:
    return load_config(example_config_path(), environ={})


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def connect(monkeypatch: pytest.MonkeyPatch, config: Config, store: MemoryStore) -> Iterator[Connect]:
    """Open milter connections as libmilter does: negotiate (which makes the milter object), connect, helo."""
    # negotiate() writes the agreed steps into the list it is given, which is TestCtx's class attribute:
    # give each test its own list.
    monkeypatch.setattr(testctx.TestCtx, "default_opts", [Milter.CURR_ACTS, OFFERED_STEPS, 0, 0])
    opened: list[PostfixCtx] = []

    def open_connection(
        ctx_class: type[PostfixCtx] = PostfixCtx, with_config: Config | None = None, rules: Ruleset = NO_RULES
    ) -> PostfixCtx:
        runtime_ = Runtime(Parts(with_config or config, store, rules=rules, assign=MemoryAssignmentState()))
        factory, _holder = make_factory(runtime_)
        monkeypatch.setattr(Milter, "factory", factory)
        ctx = ctx_class()
        ctx.stage_macros[Milter.M_CONNECT] = {"j": "mx.example.test", "{daemon_name}": "mx.example.test"}
        assert ctx._connect(host="mail.customer.test", helo="mail.customer.test", ip="192.0.2.25") == Milter.CONTINUE
        assert ctx.getpriv() is not None, "TestCtx closed the connection"
        opened.append(ctx)
        return ctx

    yield open_connection
    for ctx in opened:
        if ctx.getpriv() is not None:
            ctx._close()


def mail(
    subject: str = "Printer on fire",
    *,
    sender: str = ALICE,
    msgid: str = "<m1@customer.test>",
    extra: Sequence[tuple[str, str]] = (),
    body: str = "Hello team,\nplease help.\n",
) -> bytes:
    lines = [f"From: Customer <{sender}>", f"To: {SUPPORT}", f"Subject: {subject}", f"Message-ID: {msgid}"]
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\n".join(lines) + "\n\n" + body).encode()


@contextlib.contextmanager
def admin_log() -> Iterator[io.StringIO]:
    """The daemon's log as an admin reads it: postroom.log.setup's handler and format, on a buffer."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        plog.setup("info")
    try:
        yield buf
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def recipients_after(rcpts: Sequence[str], calls: Sequence[Call]) -> set[str]:
    result = set(rcpts)
    for call in calls:
        if call[0] == "delrcpt":
            result.discard(str(call[1]))
        elif call[0] == "addrcpt":
            result.add(str(call[1]))
    return result


# -- verdicts become milter calls -------------------------------------------------------------------------------


def test_new_mail_gets_its_edits_in_the_verdicts_order(connect: Connect) -> None:
    ctx = connect()
    assert ctx.send(mail(), ALICE, SUPPORT) == Milter.ACCEPT
    assert ctx.calls[:-1] == [
        ("chgheader", "Subject", 1, "[Support #1] Printer on fire"),
        ("addheader", "X-Postroom-Ticket", "1 (Support)"),
        ("addheader", "X-Postroom-Owner", "unassigned (Support #1)"),
        ("addheader", "X-Postroom-State", "new (Support #1)"),
        ("addheader", "X-Postroom-Priority", "normal (Support #1)"),
    ]
    # The example config's support mailbox has SLA targets: the first response's due time, from the clock.
    name, header, value = ctx.calls[-1]
    assert (name, header) == ("addheader", "X-Postroom-Due")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(Support #1\)", str(value))


def test_a_second_subject_line_is_kept_and_only_the_first_gets_the_token(connect: Connect) -> None:
    ctx = connect()
    raw = mail(extra=[("Subject", "second copy"), ("SUBJECT", "third copy")])
    assert ctx.send(raw, ALICE, SUPPORT) == Milter.ACCEPT
    # Mails with two Subject lines exist in the wild: the customer's second line is not ours to delete.
    subject_calls = [c for c in ctx.calls if c[0] == "chgheader" and str(c[1]).lower() == "subject"]
    assert subject_calls == [("chgheader", "Subject", 1, "[Support #1] Printer on fire")]


def test_a_long_subject_is_handed_to_libmilter_folded(connect: Connect) -> None:
    ctx = connect()
    words = " ".join(f"Wort{i}-\u00e4\u00f6\u00fc" for i in range(120))
    assert ctx.send(mail(subject=words), ALICE, SUPPORT) == Milter.ACCEPT
    (value,) = [c[3] for c in ctx.calls if c[0] == "chgheader" and c[1] == "Subject"]
    lines = str(value).split("\n")
    # libmilter's multi-line value: LF and white space, no CR; every line short, every line but the first folded.
    assert len(lines) > 10 and "\r" not in str(value)
    assert all(len(line) <= 78 for line in lines) and all(line.startswith(" ") for line in lines[1:])


def test_remove_header_deletes_every_copy_of_a_forged_header_before_postroom_adds_its_own(connect: Connect) -> None:
    ctx = connect()
    forged = [("X-Postroom-Owner", "meier (Support #9)"), ("x-postroom-OWNER", "mueller"), ("X-Postroom-Status", "ok")]
    assert ctx.send(mail(extra=forged), ALICE, SUPPORT) == Milter.ACCEPT
    assert ctx.calls[:3] == [
        ("chgheader", "X-Postroom-Owner", 2, ""),
        ("chgheader", "X-Postroom-Owner", 1, ""),
        ("chgheader", "X-Postroom-Status", 1, ""),
    ]
    owners = [c for c in ctx.calls if str(c[1]).lower() == "x-postroom-owner"]
    assert owners[-1] == ("addheader", "X-Postroom-Owner", "unassigned (Support #1)")
    assert not any(c[0] == "addheader" and c[1] == "X-Postroom-Status" for c in ctx.calls)


def test_follow_up_to_an_owned_ticket_moves_the_recipient_to_the_owners_folder(
    connect: Connect, store: MemoryStore
) -> None:
    assert connect().send(mail("Invoice wrong", msgid="<inv-1@customer.test>"), ALICE, SUPPORT) == Milter.ACCEPT
    store.assign(SUPPORT, 1, "meier", 0.5)
    ctx = connect()
    reply = mail("AW: Invoice wrong", msgid="<inv-2@customer.test>", extra=[("In-Reply-To", "<inv-1@customer.test>")])
    assert ctx.send(reply, ALICE, SUPPORT) == Milter.ACCEPT
    assert ("chgheader", "Subject", 1, "AW: [Support #1] Invoice wrong") in ctx.calls
    assert ("addheader", "X-Postroom-Owner", "meier (Support #1)") in ctx.calls
    rcpt_calls = [c for c in ctx.calls if c[0] in ("addrcpt", "delrcpt")]
    assert sorted(rcpt_calls) == [("addrcpt", "<support+Meier@example.test>"), ("delrcpt", f"<{SUPPORT}>")]


@pytest.mark.parametrize(
    ("verdict", "calls", "rc"),
    [
        (Verdict.accept(SetHeader("X-Absent", "v")), [("addheader", "X-Absent", "v")], Milter.ACCEPT),
        (Verdict.accept(RemoveHeader("X-Absent")), [], Milter.ACCEPT),
        (
            Verdict.accept(AddRecipient("support+Meier@example.test"), RemoveRecipient(f"<{SUPPORT}>")),
            [("addrcpt", "<support+Meier@example.test>"), ("delrcpt", f"<{SUPPORT}>")],
            Milter.ACCEPT,
        ),
        (Verdict.accept(ChangeSender("support@example.test")), [("chgfrom", "<support@example.test>")], Milter.ACCEPT),
        (Verdict.reject(replies.S550_BAD_MESSAGE), [], Milter.REJECT),
        (Verdict.tempfail(replies.S451_TEMPORARY_FAILURE), [], Milter.TEMPFAIL),
        (Verdict(Action.DISCARD), [], Milter.DISCARD),
    ],
    ids=["set-absent-adds", "remove-absent", "recipients", "sender", "reject", "tempfail", "discard"],
)
def test_each_kind_of_verdict_becomes_its_milter_calls(
    connect: Connect, monkeypatch: pytest.MonkeyPatch, verdict: Verdict, calls: list[Call], rc: int
) -> None:
    monkeypatch.setattr(runtime, "process", lambda *args, **kwargs: Outcome(verdict))
    ctx = connect()
    assert ctx.send(mail(), ALICE, SUPPORT) == rc
    assert ctx.calls == calls
    if verdict.reply is not None:
        reply = verdict.reply
        assert ctx.reply == (str(reply.code), reply.status, *reply.lines())
    else:
        assert ctx.reply is None


# -- what the callbacks collect ---------------------------------------------------------------------------------


BODY_RULES = parse_rules('[[rule]]\nname = "refunds"\nbody_contains = "refund"\ntag = "billing"\n', "rules.toml")
LONG_BODY = "".join(f"line {i:05d} of a long mail\n" for i in range(1000))  # several body() chunks


def test_pipeline_gets_the_envelope_headers_whole_body_and_the_queue_id_of_end_of_message(
    connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Message] = []

    def spy(message: Message, *args: object, **kwargs: object) -> Outcome:
        seen.append(message)
        return Outcome(Verdict.accept())

    monkeypatch.setattr(runtime, "process", spy)
    body = LONG_BODY
    ctx = connect(rules=BODY_RULES)  # a rule reads the body, so customer mail needs it
    ctx.send(mail(body=body), ALICE, SUPPORT, "sales@example.test", qid="4QbOdY")
    assert len(ctx.body_answers) > 1 and set(ctx.body_answers) == {Milter.CONTINUE}
    (message,) = seen
    env = message.envelope
    assert (env.mail_from, env.rcpts, env.queue_id, env.auth_login) == (
        f"<{ALICE}>",
        [f"<{SUPPORT}>", "<sales@example.test>"],
        "4QbOdY",
        "",
    )
    assert [name for name, _ in message.headers] == ["From", "To", "Subject", "Message-ID"]
    assert message.body() == body.encode()


def test_auth_login_is_read_with_mail_from_and_an_agents_body_is_always_read(
    connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Message] = []

    def spy(message: Message, *args: object, **kwargs: object) -> Outcome:
        seen.append(message)
        return Outcome(Verdict.accept())

    monkeypatch.setattr(runtime, "process", spy)
    ctx = connect()  # no rules: an agent's commands and the DKIM signature still need the body
    ctx.send(mail(sender="meier@example.test", body=LONG_BODY), "meier@example.test", ALICE, login="meier")
    assert seen[0].envelope.auth_login == "meier"
    assert seen[0].body() == LONG_BODY.encode()
    assert len(ctx.body_answers) > 1 and set(ctx.body_answers) == {Milter.CONTINUE}


def test_customer_mail_skips_a_body_that_no_rule_reads(connect: Connect, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Message] = []

    def spy(message: Message, *args: object, **kwargs: object) -> Outcome:
        seen.append(message)
        return Outcome(Verdict.accept())

    monkeypatch.setattr(runtime, "process", spy)
    ctx = connect()
    assert ctx.send(mail(body=LONG_BODY), ALICE, SUPPORT) == Milter.ACCEPT
    # The first chunk answers SKIP: Postfix sends no more of the body and goes on to end of message.
    assert ctx.body_answers == [Milter.SKIP]
    assert [name for name, _ in seen[0].headers] == ["From", "To", "Subject", "Message-ID"]
    with pytest.raises(RuntimeError, match="skipped"):
        seen[0].body()


def test_a_skipped_body_still_makes_a_ticket(connect: Connect, store: MemoryStore) -> None:
    ctx = connect()
    assert ctx.send(mail(body=LONG_BODY), ALICE, SUPPORT) == Milter.ACCEPT
    assert ctx.body_answers == [Milter.SKIP]
    assert ("chgheader", "Subject", 1, "[Support #1] Printer on fire") in ctx.calls
    # With a rule that reads the body, the body is read and the rule applies.
    ctx = connect(rules=BODY_RULES)
    refund = mail("Money back", body="I want a refund\n", msgid="<r@customer.test>")
    assert ctx.send(refund, ALICE, SUPPORT) == Milter.ACCEPT
    assert ctx.body_answers == [Milter.CONTINUE]
    assert store.ticket_map[(SUPPORT, 2)].tags == ("billing",)


def test_an_mta_that_cannot_skip_gets_continue_and_the_body_is_dropped(
    connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(testctx.TestCtx, "default_opts", [Milter.CURR_ACTS, OFFERED_STEPS & ~Milter.P_SKIP, 0, 0])
    ctx = connect()
    assert ctx.send(mail(body=LONG_BODY), ALICE, SUPPORT) == Milter.ACCEPT
    assert len(ctx.body_answers) > 1 and set(ctx.body_answers) == {Milter.CONTINUE}
    assert ctx.getpriv().spool.size == 0


def test_queue_id_read_at_end_of_message_is_in_the_one_log_line_of_the_mail(connect: Connect) -> None:
    ctx = connect()
    with admin_log() as log:
        ctx.send(mail(), ALICE, SUPPORT, qid="4QlOg5")
    lines = [line for line in log.getvalue().splitlines() if " 4QlOg5: " in line]
    assert len(lines) == 1, lines
    assert re.search(
        r" INFO 4QlOg5: mailbox support@example\.test ticket #1 opened \(new\) owner=unassigned$", lines[0]
    )


def test_without_a_queue_id_the_log_line_carries_the_connection_id(connect: Connect) -> None:
    ctx = connect()
    with admin_log() as log:
        ctx.send(mail(), ALICE, SUPPORT, qid=None)
    assert re.search(r" INFO conn\d+: mailbox support@example\.test ticket #1 opened", log.getvalue(), re.M)


def test_mail_without_a_ticket_is_logged_with_the_verdict(connect: Connect) -> None:
    ctx = connect()
    with admin_log() as log:
        ctx.send(mail(sender=BOB), BOB, "info@example.test", qid="4QnOtK")
    lines = [line for line in log.getvalue().splitlines() if " 4QnOtK: " in line]
    assert [line.split(" 4QnOtK: ", 1)[1] for line in lines] == ["accept: no shared mailbox among the recipients"]


def test_second_message_on_a_connection_does_not_see_the_first_ones_headers_or_recipients(
    connect: Connect, store: MemoryStore
) -> None:
    ctx = connect()
    first = mail(extra=[("X-Postroom-Owner", "meier"), ("Subject", "second copy")])
    assert ctx.send(first, ALICE, SUPPORT) == Milter.ACCEPT
    assert ("chgheader", "X-Postroom-Owner", 1, "") in ctx.calls

    # Not for a shared mailbox and nothing forged: no edit at all, no ticket.
    other = mail("Lunch?", sender=BOB, msgid="<lunch@customer.test>")
    assert ctx.send(other, BOB, "info@example.test", qid="4QcTx02") == Milter.ACCEPT
    assert ctx.calls == []
    assert len(store.ticket_map) == 1

    third = mail("Broken login", sender=BOB, msgid="<login@customer.test>")
    assert ctx.send(third, BOB, SUPPORT, qid="4QcTx03") == Milter.ACCEPT
    assert ctx.calls[0] == ("chgheader", "Subject", 1, "[Support #2] Broken login")
    assert not any(c[0] == "chgheader" and c[1] != "Subject" for c in ctx.calls)
    assert store.ticket_map[(SUPPORT, 2)].customer == BOB
    assert store.participants[(SUPPORT, 2)] == {BOB}


# -- failures while applying a verdict --------------------------------------------------------------------------


def test_refused_edit_still_accepts_the_mail_marked_degraded(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = connect(RefusingCtx)
    assert ctx.send(mail(), ALICE, SUPPORT) == Milter.ACCEPT
    # The Subject change was the first edit and failed; nothing after it was applied.
    assert ctx.calls == [("addheader", "X-Postroom-Status", "degraded")]
    failed = [r for r in caplog.records if r.getMessage().startswith("could not apply the verdict")]
    assert len(failed) == 1 and failed[0].exc_info is not None


def test_refused_edit_with_policy_tempfail_asks_postfix_to_retry(connect: Connect, config: Config) -> None:
    ctx = connect(RefusingCtx, with_changes(config, {"milter": {"on_error": "tempfail"}}))
    assert ctx.send(mail(), ALICE, SUPPORT) == Milter.TEMPFAIL
    assert ctx.reply == ("451", "4.3.0", "postroom: temporary failure, please try again later")
    assert ctx.calls == []


@dataclass(frozen=True)
class DeadWorkers:
    """The pipeline as the adapter sees it when no worker process answers."""

    config: Config
    rules: Ruleset = NO_RULES

    def handle(self, message: Message, now: float) -> Handled:
        raise WorkerError("worker 0 (pid 4242): no answer in 60 s")

    def accepted(self, handled: Handled) -> None:
        raise AssertionError("nothing was handled")


@pytest.mark.parametrize(("on_error", "answer"), [("degraded", Milter.ACCEPT), ("tempfail", Milter.TEMPFAIL)])
def test_no_answer_from_the_workers_applies_the_failure_policy(
    connect: Connect, config: Config, caplog: pytest.LogCaptureFixture, on_error: str, answer: int
) -> None:
    policy = with_changes(config, {"milter": {"on_error": on_error}})
    ctx = connect(with_config=policy)
    Milter.factory.holder.set(DeadWorkers(policy))  # what a SIGHUP would swap in; the next mail takes it
    assert ctx.send(mail(), ALICE, SUPPORT) == answer
    if on_error == "degraded":
        assert ctx.calls == [("addheader", "X-Postroom-Status", "degraded")]
    else:
        assert ctx.reply == ("451", "4.3.0", "postroom: temporary failure, please try again later")
        assert ctx.calls == []
    failed = [r for r in caplog.records if r.getMessage() == f"the pipeline did not answer; policy {on_error}"]
    assert len(failed) == 1 and "no answer in 60 s" in str(failed[0].exc_info)


def test_refused_recipient_change_leaves_the_mail_a_recipient(connect: Connect, store: MemoryStore) -> None:
    connect().send(mail("Invoice wrong", msgid="<inv-1@customer.test>"), ALICE, SUPPORT)
    store.assign(SUPPORT, 1, "meier", 0.5)
    ctx = connect(RefusingRecipientCtx)
    reply = mail("AW: Invoice wrong", msgid="<inv-2@customer.test>", extra=[("In-Reply-To", "<inv-1@customer.test>")])
    assert ctx.send(reply, ALICE, SUPPORT) == Milter.ACCEPT
    assert ("addheader", "X-Postroom-Status", "degraded") in ctx.calls
    assert recipients_after([f"<{SUPPORT}>"], ctx.calls), f"no recipient left after {ctx.calls}"
