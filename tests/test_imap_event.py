"""What a move into a folder means (pure), and `postroom dovecot-snippet`'s output, without Dovecot.

The same rules run end to end through a real Dovecot in test_imap_event_e2e.py; here the in-memory store and
recorded effects show each branch, including the race of two agents claiming one ticket.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from postroom.admin import dovecot
from postroom.admin.cli import main
from postroom.admin.dovecot import DEFAULT_DIR, DEFAULT_LOCATION, Layout, acl_text, dovecot_config
from postroom.config import Config, example_config_path, load_config, parse_config, to_toml
from postroom.imap_event import (
    Effects,
    Event,
    Followup,
    Intent,
    MoveStore,
    decide,
    handle,
    intent,
    read_headers,
    target,
    ticket_number,
)
from postroom.store.memory import MemoryStore
from postroom.store.redis import RedisStore
from postroom.tickets import Claim, NewTicket, Record, Ticket

SUPPORT = "support@example.test"
NOW = 1_800_000_000.0


def team(**box: object) -> Config:
    data = load_config(example_config_path(), environ={}).model_dump()
    data["mailboxes"]["support"].update(box)
    return parse_config(data, "<test>", environ={})


class Recorded:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self.followups: list[Followup] = []
        self.effects = Effects(self.records.extend, self.followups.append)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> MoveStore:
    """Each rule against the in-memory store and the real Redis adapter: the two keep one contract."""
    if request.param == "memory":
        return MemoryStore()
    url: str = request.getfixturevalue("redis_url")
    return RedisStore.from_url(url, key_prefix="imapevent", message_index_days=1, timeout=2)


def opened(store: MoveStore, owner: str = "", state: str = "new") -> Ticket:
    new = NewTicket("alice@customer.test", "Help", ("alice@customer.test",), ("m1@customer.test",), owner, state)
    return store.open(SUPPORT, new, NOW - 60)


def moved(ticket: Ticket, folder: str, user: str) -> Event:
    headers = [("Message-ID", "<m1@customer.test>"), ("X-Postroom-Ticket", f"{ticket.number} (Support)")]
    return Event(folder, user, headers)


def test_folders_as_agents_see_them_map_to_the_mailbox_user_s_folders() -> None:
    config = team()
    assert target(config, "Support") is not None and target(config, "Support").folder == "INBOX"  # type: ignore[union-attr]
    assert target(config, "Support/Meier").folder == "Meier"  # type: ignore[union-attr]
    assert target(config, "Supportive/Meier") is None and target(config, "INBOX") is None
    hit = target(config, "Support/Meier")
    assert hit is not None
    assert intent(config, hit) == Intent("assign", "meier")
    assert intent(config, target(config, "Support/Done")) == Intent("close")  # type: ignore[arg-type]
    assert intent(config, target(config, "Support")) == Intent("release")  # type: ignore[arg-type]
    assert intent(config, target(config, "Support/Archive")) == Intent("none")  # type: ignore[arg-type]
    # An agent who does not work this mailbox has no folder in it that means anything.
    narrowed = team(agents=["meier"])
    assert intent(narrowed, target(narrowed, "Support/Mueller")) == Intent("none")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("owner", "state", "wanted", "actor", "event", "rival"),
    [
        ("", "new", Intent("assign", "meier"), "meier", "assign", ""),
        ("meier", "open", Intent("assign", "meier"), "meier", "", ""),  # already his: nothing to do
        ("meier", "open", Intent("assign", "mueller"), "meier", "assign", ""),  # the owner hands it on
        ("meier", "open", Intent("assign", "mueller"), "mueller", "assign", "meier"),
        ("meier", "open", Intent("close"), "meier", "close", ""),
        ("meier", "open", Intent("close"), "mueller", "close", "meier"),
        ("meier", "closed", Intent("close"), "mueller", "", ""),
        ("", "open", Intent("release"), "meier", "", ""),
        ("meier", "open", Intent("release"), "mueller", "release", "meier"),
        ("", "closed", Intent("release"), "meier", "release", ""),  # back in the INBOX: open again
    ],
)
def test_decide(*, owner: str, state: str, wanted: Intent, actor: str, event: str, rival: str) -> None:
    ticket = Ticket(SUPPORT, 1, owner=owner, state=state)
    decision = decide(ticket, wanted, actor)
    assert (decision.event, decision.rival) == (event, rival)
    assert bool(decision.changes) == bool(event)


def test_move_into_an_agent_folder_assigns_with_the_mover_as_actor(store: MoveStore) -> None:
    config, out = team(), Recorded()
    ticket = opened(store)
    handle(config, store, out.effects, moved(ticket, "Support/Meier", "mueller"), NOW)
    assert store.ticket(SUPPORT, ticket.number).owner == "meier"  # type: ignore[union-attr]
    assert [(r.event, r.actor, r.owner) for r in out.records] == [("assign", "mueller", "meier")]
    assert out.followups == []


def test_reject_changes_nothing_and_moves_the_mail_back_to_the_owner(store: MoveStore) -> None:
    config, out = team(on_rival_reply="reject"), Recorded()
    ticket = opened(store, owner="meier", state="open")
    handle(config, store, out.effects, moved(ticket, "Support/Mueller", "mueller"), NOW)
    assert store.ticket(SUPPORT, ticket.number).owner == "meier"  # type: ignore[union-attr]
    assert [(r.event, r.actor) for r in out.records] == [("move_rejected", "mueller")]
    (f,) = out.followups
    assert (f.dropped_in, f.move_to, f.note_folder, f.message_id) == (
        "Mueller",
        "Meier",
        "Mueller",
        "<m1@customer.test>",
    )
    assert "belongs to Meier" in f.note_subject and "#takeover" in f.note_body


def test_warn_applies_the_move_and_notes_it_in_the_owner_s_folder(store: MoveStore) -> None:
    config, out = team(on_rival_reply="warn"), Recorded()
    ticket = opened(store, owner="meier", state="open")
    handle(config, store, out.effects, moved(ticket, "Support/Done", "mueller"), NOW)
    assert store.ticket(SUPPORT, ticket.number).state == "closed"  # type: ignore[union-attr]
    assert [r.event for r in out.records] == ["close", "rival_move_warn"]
    (f,) = out.followups
    assert (f.move_to, f.note_folder) == ("", "Meier")


class ClaimedMeanwhile(MemoryStore):
    """A store where another agent claims the ticket just before our claim runs (the race of two drags)."""

    def claim(self, mailbox: str, number: int, login: str, now: float, *, force: bool = False) -> Claim:
        if not force and self.ticket_map[(mailbox, number)].owner == "":
            super().claim(mailbox, number, "meier", now)
        return super().claim(mailbox, number, login, now, force=force)


def test_two_agents_claiming_at_once_one_wins_and_the_other_is_the_rival() -> None:
    config, store, out = team(on_rival_reply="reject"), ClaimedMeanwhile(), Recorded()
    ticket = opened(store)
    handle(config, store, out.effects, moved(ticket, "Support/Mueller", "mueller"), NOW)
    assert store.ticket(SUPPORT, ticket.number).owner == "meier"  # type: ignore[union-attr]
    assert [r.event for r in out.records] == ["move_rejected"]
    assert out.followups[0].move_to == "Meier"


def test_a_mail_without_a_ticket_gets_one_then_the_move(store: MoveStore) -> None:
    # Acknowledgements on: a mail found late gets its ticket, never a late acknowledgement (nor an error).
    data = team().model_dump()
    data["autoreply"]["acknowledge"] = True
    config, out = parse_config(data, "<test>", environ={}), Recorded()
    headers = [("From", "Alice <alice@customer.test>"), ("Subject", "Down"), ("Message-ID", "<d1@customer.test>")]
    handle(config, store, out.effects, Event("Support/Meier", "meier", headers), NOW)
    assert [(r.event, r.owner) for r in out.records] == [("opened", ""), ("assign", "meier")]
    assert store.ticket(SUPPORT, 1).owner == "meier"  # type: ignore[union-attr]
    # A reply to it threads into the new ticket.
    assert store.lookup(SUPPORT, ["d1@customer.test"], [], []).by_reference == store.ticket(SUPPORT, 1)


def test_a_folder_outside_the_shared_mailboxes_changes_nothing(store: MoveStore) -> None:
    config, out = team(), Recorded()
    ticket = opened(store)
    for folder in ("INBOX", "Support/Archive", "Sales/Meier"):
        handle(config, store, out.effects, moved(ticket, folder, "meier"), NOW)
    assert out.records == [] and store.ticket(SUPPORT, ticket.number).owner == ""  # type: ignore[union-attr]


def test_read_headers_reads_the_header_and_drains_the_body() -> None:
    body = b"x" * 3_000_000
    stream = io.BytesIO(b"Subject: a\r\n b\r\nX-Postroom-Ticket: 7 (Support)\r\n\r\n" + body)
    headers = read_headers(stream)
    assert stream.read() == b""
    assert ticket_number(headers, team().mailboxes["support"]) == 7
    assert [n for n, _ in headers] == ["Subject", "X-Postroom-Ticket"]


def test_ticket_number_takes_this_mailbox_s_value_only() -> None:
    box = team().mailboxes["support"]
    headers = [("X-Postroom-Ticket", "3 (Sales)"), ("X-Postroom-Ticket", "9 (Support)")]
    assert ticket_number(headers, box) == 9
    assert ticket_number([("X-Postroom-Ticket", "9 (Support) trailing")], box) is None


@given(st.binary(max_size=3000))
def test_any_bytes_on_stdin_give_headers_or_none_never_an_exception(data: bytes) -> None:
    headers = read_headers(io.BytesIO(data))
    ticket_number(headers, team().mailboxes["support"])


# -- the snippet ----------------------------------------------------------------------------------------------


def layout(tmp_path: Path) -> Layout:
    return Layout(
        tmp_path, "maildir:/var/vmail/{address}/Maildir", tmp_path / "postroom.toml", "/opt/postroom/bin/python"
    )


def test_snippet_has_a_namespace_acls_and_hooks_per_mailbox(tmp_path: Path) -> None:
    config = team(agents=["meier", "mueller"])
    text = dovecot_config(config, layout(tmp_path))
    assert "  prefix = Support/\n" in text
    assert "  location = maildir:/var/vmail/support@example.test/Maildir:INDEXPVT=" in text
    for folder in ("Done", "Meier", "Mueller"):
        assert f"  mailbox {folder} {{\n    auto = subscribe\n  }}" in text
    assert "mailbox Schulze" not in text
    assert "imapsieve_mailbox1_name = Support\n" in text and "imapsieve_mailbox2_name = Support/*\n" in text
    assert "lmtp_save_to_detail_mailbox = yes" in text and "master = yes" in text
    acl = acl_text(config)
    assert "Support/* user=meier lrwstipek\n" in acl and "user=schulze" not in acl
    assert "* user=postroom lrwstipekx\n" in acl
    everyone = acl_text(team(agents=[]))
    assert all(f"Support user={a} " in everyone for a in ("meier", "mueller", "schulze"))


def test_snippet_command_errors_are_the_admins_not_tracebacks(tmp_path: Path) -> None:
    path = tmp_path / "postroom.toml"
    path.write_text(to_toml(team()))
    bad = CliRunner().invoke(main, ["dovecot-snippet", "--config", str(path), "--mail-location", "maildir:{home}"])
    assert bad.exit_code == 2 and "unknown placeholder {home}" in bad.output
    assert CliRunner().invoke(main, ["dovecot-snippet", "--write"]).exit_code == 2
    good = CliRunner().invoke(main, ["dovecot-snippet", "--config", str(path), "--dir", str(tmp_path)])
    assert good.exit_code == 0 and f"acl = vfile:{tmp_path}/acl" in good.output


def test_snippet_reads_the_default_config_when_there_is_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = tmp_path / "postroom.toml"
    monkeypatch.setattr(dovecot, "DEFAULT_CONFIG", default)
    plain = CliRunner().invoke(main, ["dovecot-snippet"])
    assert plain.exit_code == 0 and "namespace" not in plain.output  # no config anywhere: the LMTP lines
    default.write_text(to_toml(team()))
    found = CliRunner().invoke(main, ["dovecot-snippet"])
    assert found.exit_code == 0 and "namespace postroom_support {" in found.output, found.output


def test_the_deployment_guide_quotes_what_dovecot_snippet_prints() -> None:
    config = load_config(example_config_path(), environ={})
    layout = Layout(DEFAULT_DIR, DEFAULT_LOCATION, Path("/etc/postroom/postroom.toml"), "/opt/postroom/bin/python")
    guide = (Path(__file__).resolve().parents[1] / "docs" / "deploy-milter.md").read_text()
    assert dovecot_config(config, layout) in guide, "docs/deploy-milter.md is out of step with dovecot-snippet"
    assert acl_text(config) in guide, "docs/deploy-milter.md is out of step with the ACL file dovecot-snippet writes"


def test_snippet_refuses_folders_that_would_mean_two_things(tmp_path: Path) -> None:
    data = team().model_dump()
    data["mailboxes"]["sales"] = {**data["mailboxes"]["support"], "address": "sales@example.test", "tag": "support"}
    data["agents"]["schulze"]["folder"] = "Done"
    path = tmp_path / "postroom.toml"
    path.write_text(to_toml(parse_config(data, "<test>", environ={})))
    res = CliRunner().invoke(main, ["dovecot-snippet", "--config", str(path)])
    assert res.exit_code == 2, res.output
    assert "mailboxes.sales and mailboxes.support would both be the folder support" in res.output
    assert "agent schulze's folder Done is also done_folder" in res.output


def test_a_mailbox_without_agents_is_every_agents() -> None:
    data = load_config(example_config_path(), environ={}).model_dump()
    del data["mailboxes"]["support"]["agents"]
    config = parse_config(data, "<test>", environ={})
    # One list for the reply path, the rules and the IMAP side alike.
    assert config.mailboxes["support"].agents == ["meier", "mueller", "schulze"]
    assert parse_config(config.model_dump(), "<again>", environ={}) == config


@given(st.text(max_size=80))
def test_any_folder_name_maps_to_one_mailbox_folder_or_none(folder: str) -> None:
    config = team()
    hit = target(config, folder)
    if hit is None:
        assert folder != "Support" and not folder.startswith("Support/")
    else:
        assert folder in ("Support", f"Support/{hit.folder}")
        intent(config, hit)  # every folder has a meaning or none, never an error


def test_imap_subscribe_without_dovecot_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    data = team().model_dump()
    data["imap"] = {**data["imap"], "port": 1, "master_password_file": str(secret)}
    path = tmp_path / "postroom.toml"
    path.write_text(to_toml(parse_config(data, "<test>", environ={})))
    res = CliRunner().invoke(main, ["imap-subscribe", "--config", str(path)])
    assert res.exit_code == 2 and "IMAP as the master user at 127.0.0.1:1 failed" in res.output
