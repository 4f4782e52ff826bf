"""What ``postroom remind`` sends when (pure planning), its notices passing the pipeline, #remind and #pending until,
and the digest's PNG chart and MIME structure."""

from __future__ import annotations

import datetime as dt
import struct
import zlib
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from postroom import chart, commands, digest, remind
from postroom.admin.cli import main
from postroom.admin.common import redis_store
from postroom.commands import CommandError, followup_at
from postroom.config import to_toml
from postroom.history import make_engine
from postroom.parts import Parts
from postroom.pipeline import Message, process
from postroom.store.memory import MemoryStore
from postroom.tickets import NewTicket
from postroom.timeline import Event, Timeline, load
from postroom.verdict import AddHeader, Envelope, RemoveHeader
from postroom_testbed import free_port

from .slafix import BOX, sla_config, write_history

NO_ENV = {"POSTROOM_REDIS_URL": None, "POSTROOM_DATABASE_URL": None, "POSTROOM_MILTER_SOCKET": None}

UTC = dt.UTC


def t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def timeline(*events: tuple[str, str, str], owner: str = "meier", state: str = "open") -> Timeline:
    tl = Timeline(BOX, 7, "alice@customer.test", "Help", owner, state, "normal", t(events[0][1]))
    tl.events = [Event(kind, "", detail, t(when)) for kind, when, detail in events]
    return tl


def kinds(config_notices: list[remind.Notice]) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(n.kind, n.target, n.rcpts) for n in config_notices]


def test_reminder_before_the_due_time_escalation_after_and_each_only_once() -> None:
    config = sla_config(sla={"remind_before": "30m"})
    tl = timeline(("opened", "2026-11-23T10:00", ""))  # first response due 12:00
    assert remind.plan(config, [tl], t("2026-11-23T11:29")) == []
    due = remind.plan(config, [tl], t("2026-11-23T11:30"))
    assert kinds(due) == [("reminder", "first_response", ("support+Meier@example.test",))]
    tl.events.append(Event("notice", "postroom", due[0].detail, t("2026-11-23T11:30")))
    assert remind.plan(config, [tl], t("2026-11-23T11:45")) == []
    late = remind.plan(config, [tl], t("2026-11-23T12:00"))
    assert kinds(late) == [("escalation", "first_response", ("schulze@example.test",))]
    tl.events.append(Event("notice", "postroom", late[0].detail, t("2026-11-23T12:00")))
    assert remind.plan(config, [tl], t("2026-11-23T12:30")) == []
    tl.events.append(Event("reply", "meier", "", t("2026-11-23T12:40")))  # answered: nothing more is due
    assert remind.plan(config, [tl], t("2026-11-23T16:00")) == []


def test_unassigned_tickets_go_to_the_team_inbox_and_closed_ones_are_left_alone() -> None:
    config = sla_config(sla={"unassigned_after": "2h"})
    tl = timeline(("opened", "2026-11-23T10:00", ""), owner="")
    found = remind.plan(config, [tl], t("2026-11-23T12:00"))
    assert ("unassigned", "unassigned", ("support@example.test",)) in kinds(found)
    tl.state = "closed"
    assert remind.plan(config, [tl], t("2026-11-24T12:00")) == []


def test_follow_up_after_a_silent_customer_cancelled_by_an_answer() -> None:
    config = sla_config()
    tl = timeline(
        ("opened", "2026-11-23T10:00", ""),
        ("reply", "2026-11-23T10:30", ""),
        ("remind", "2026-11-23T10:30", "3d"),
    )
    assert remind.followup_due(tl) == t("2026-11-26T10:30")
    fired = [n for n in remind.plan(config, [tl], t("2026-11-26T10:30")) if n.kind == "followup"]
    assert kinds(fired) == [("followup", "followup", ("support+Meier@example.test",))]
    tl.events.append(Event("followup", "alice@customer.test", "", t("2026-11-24T09:00")))
    assert remind.followup_due(tl) is None


def test_pending_until_is_a_follow_up_and_plain_pending_is_not() -> None:
    assert followup_at("pending", "until 2026-12-01", 0) == t("2026-12-01T00:00").timestamp()
    assert followup_at("pending", "", 0) is None
    assert followup_at("remind", "2026-12-01 09:30", 0) == t("2026-12-01T09:30").timestamp()
    assert followup_at("remind", "4h", 100.0) == 100.0 + 4 * 3600
    assert followup_at("remind", "2w", 0) == 14 * 86400


@pytest.mark.parametrize("line", ["#remind", "#remind soon", "#remind 2026-13-01", "#pending until tomorrow"])
def test_bad_follow_up_dates_refuse_the_mail_with_a_hint(line: str) -> None:
    cmds, _ = commands.parse_lines(line)
    with pytest.raises(CommandError) as err:
        commands.plan(cmds, agents=["meier"], canned={}, placeholders={})
    assert "#remind" in err.value.reason or "not a date" in err.value.reason


def test_remind_is_a_ticket_command() -> None:
    cmds, _ = commands.parse_lines("#remind 3d\n")
    p = commands.plan(cmds, agents=["meier"], canned={}, placeholders={})
    assert p.touches_ticket and p.events == [("remind", "3d")]


@given(st.text(max_size=40))
def test_followup_at_answers_any_text_with_a_time_none_or_a_command_error(detail: str) -> None:
    for name in ("remind", "pending"):
        try:
            result = followup_at(name, detail, 0.0)
        except CommandError as exc:
            assert exc.reason  # the agent is told what is wrong
            continue
        assert result is None or isinstance(result, float)


def _notice_mail(store: MemoryStore, message_id: str, number: int) -> Message:
    headers = [
        ("From", "Support reminders <support@example.test>"),
        ("To", "support+Meier@example.test"),
        ("Subject", f"[Support #{number}] Reminder"),
        ("Message-ID", f"<{message_id}>"),
        ("Auto-Submitted", "auto-generated"),
        ("X-Postroom-Notice", f"reminder {number} (Support #{number})"),
    ]
    return Message(Envelope(mail_from="<>", rcpts=["<support+Meier@example.test>"], queue_id="Q1"), headers)


def test_our_notice_passes_the_pipeline_untouched_a_forged_one_is_ticketed() -> None:
    config = sla_config()
    store = MemoryStore()
    ticket = store.open(BOX, NewTicket("alice@customer.test", "Help", ("alice@customer.test",), ()), 0.0)
    store.touch(BOX, ticket.number, ["postroom.notice.abc@example.test"], [], 0.0)
    ours = process(_notice_mail(store, "postroom.notice.abc@example.test", ticket.number), Parts(config, store), 1.0)
    assert ours.verdict.edits == () and ours.records == []
    forged = process(_notice_mail(store, "guess@evil.test", ticket.number), Parts(config, store), 1.0)
    assert [r.event for r in forged.records] == ["opened"]  # a stranger's copy is customer mail like any other
    assert RemoveHeader("X-Postroom-Notice") in forged.verdict.edits


def test_new_ticket_mail_carries_its_due_time() -> None:
    config = sla_config()
    store = MemoryStore()
    mail = Message(
        Envelope(mail_from="<alice@customer.test>", rcpts=["<support@example.test>"], queue_id="Q2"),
        [("From", "alice@customer.test"), ("Subject", "Help"), ("Message-ID", "<m@c>")],
    )
    out = process(mail, Parts(config, store), t("2026-11-27T16:30").timestamp())
    due = [e.value for e in out.verdict.edits if isinstance(e, AddHeader) and e.name == "X-Postroom-Due"]
    assert due == ["2026-11-30T10:30:00Z (Support #1)"]  # 2h of opening time: 30 min on Friday, 90 on Monday


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append((kind, body))
        pos += 12 + length
    return out


def test_chart_is_a_valid_png_with_bars_and_a_line() -> None:
    png = chart.bars_and_line([1, 4, 2, 0, 3, 5, 2], [30.0, None, 90.0, 60.0, None, 10.0, 20.0])
    chunks = _chunks(png)
    assert [k for k, _ in chunks] == [b"IHDR", b"PLTE", b"IDAT", b"IEND"]
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (width, height, depth, colour) == (420, 160, 8, 3)
    raw = zlib.decompress(chunks[2][1])
    assert len(raw) == height * (width + 1)
    assert {chart.BAR, chart.LINE} <= set(raw)


def test_lead_digest_is_plain_and_html_with_the_chart_inline() -> None:
    config = sla_config()
    tl = timeline(("opened", "2026-11-23T10:00", ""), ("reply", "2026-11-23T11:00", ""))
    (mail,) = digest.lead_digest(config, config.mailboxes["support"], [tl], t("2026-11-24T00:00"), 1)
    msg = digest.message(mail, t("2026-11-24T00:00"))
    assert msg.get_content_type() == "multipart/alternative"
    plain, related = msg.iter_parts()
    assert plain.get_content_type() == "text/plain" and related.get_content_type() == "multipart/related"
    html, image = related.iter_parts()
    cid = str(image["Content-ID"]).strip("<>")
    assert f'src="cid:{cid}"' in html.get_content()
    assert msg["Auto-Submitted"] == "auto-generated" and msg["To"] == "schulze@example.test"
    assert "First response, median (business min)  60.0" in plain.get_content()


def test_a_notice_postfix_does_not_take_is_not_recorded_and_tried_again(
    tmp_path: Path, sqlite_url: str, redis_url: str
) -> None:
    config = sla_config(database={"url": sqlite_url}, redis={"url": redis_url}, mailer={"port": free_port()})
    path = tmp_path / "postroom.toml"
    path.write_text(to_toml(config))
    write_history(sqlite_url)
    args = ["remind", "--config", str(path), "--now", "2026-11-24T16:30:00Z"]
    dry = CliRunner().invoke(main, [*args, "--dry-run"], env=NO_ENV)
    assert dry.exit_code == 0 and "Support #2: escalation next_response 2026-11-24T16:00:00Z" in dry.output
    failed = CliRunner().invoke(main, args, env=NO_ENV)
    assert failed.exit_code == 1, failed.output  # nobody listens on the mailer port
    assert "0 notices sent" in failed.output
    engine = make_engine(sqlite_url)
    assert all(e.kind != "notice" for tl in load(engine) for e in tl.events)
    again = CliRunner().invoke(main, [*args, "--dry-run"], env=NO_ENV)  # still due: the next run tries again
    notices = [line for line in dry.output.splitlines() if line.startswith("Support #")]
    assert notices and [line for line in again.output.splitlines() if line.startswith("Support #")] == notices
    engine.dispose()


def test_two_runs_at_once_send_a_notice_once(redis_url: str) -> None:
    """Two hosts running the timer in the same minute: the Redis claim lets one of them send."""
    config = sla_config(redis={"url": redis_url})
    store = redis_store(config)
    ticket = store.open(BOX, NewTicket("alice@customer.test", "Help", ("alice@customer.test",), ()), 0.0)
    tl = timeline(("opened", "2026-11-23T10:00", ""))
    tl.number = ticket.number
    now = t("2026-11-23T12:30")
    sent: list[tuple[str, ...]] = []
    claims = remind.RedisClaims(redis.Redis.from_url(redis_url), config.redis.key_prefix)
    for _ in range(2):  # both runs read the history before either recorded anything
        notices = remind.plan(config, [tl], now)
        records, failed = remind.send_all(
            config, notices, store, lambda _f, rcpts, _d: sent.append(rcpts), now, claims=claims
        )
    assert sent == [("schulze@example.test",)]

    def refuse(_f: str, _r: tuple[str, ...], _d: bytes) -> None:
        raise OSError("connection refused")

    later = t("2026-11-23T13:30")
    tl.events.append(Event("followup", "", "", t("2026-11-23T12:35")))
    tl.events.insert(1, Event("reply", "meier", "", t("2026-11-23T11:00")))
    notices = remind.plan(config, [tl], later)
    assert remind.send_all(config, notices, store, refuse, later, claims=claims) == ([], len(notices))
    records, failed = remind.send_all(config, notices, store, lambda *_: None, later, claims=claims)
    assert (len(records), failed) == (len(notices), 0)  # a failed send gave its claim back


def test_breached_tickets_are_counted_for_the_metrics(redis_url: str) -> None:
    config = sla_config(redis={"url": redis_url})
    late = timeline(("opened", "2026-11-23T10:00", ""))  # first response due 12:00
    answered = timeline(("opened", "2026-11-23T10:00", ""), ("reply", "2026-11-23T10:30", ""))
    waiting = timeline(("opened", "2026-11-23T10:00", ""), state="pending")
    counts = remind.breached(config, [late, answered, waiting], t("2026-11-23T12:00"))
    assert counts == {"support@example.test": 1}
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    remind.publish_breached(client, "postroom", counts)
    assert client.get(remind.breached_key("postroom", BOX)) == "1"
    assert 0 < client.ttl(remind.breached_key("postroom", BOX)) <= remind.BREACHED_SECONDS
