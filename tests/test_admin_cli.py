"""The admin's commands against a real Redis and a real SQL database (SQLite and PostgreSQL): postroom tickets
list/show/assign/close, postfix-snippet and dovecot-snippet, and the deployment guides that quote the snippets.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result
from sqlalchemy.orm import Session

from postroom.admin import snippets
from postroom.admin.cli import main
from postroom.admin.common import daemon_runtime
from postroom.config import Config, example_config_path, load_config, parse_config, to_toml, with_changes
from postroom.history import make_engine, migrate, write
from postroom.store.assignment import RedisAssignmentState
from postroom.store.redis import RedisStore
from postroom.tickets import NewTicket, Record
from postroom_testbed import free_port

# The CLI records the person who ran it (under sudo, who ran sudo), not a fixed "admin".
WHO = os.environ.get("SUDO_USER") or getpass.getuser()

SUPPORT = "support@example.test"
SALES = "sales@example.test"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def team_config(redis_url: str, db_url: str) -> Config:
    data = load_config(example_config_path(), environ={}).model_dump()
    data["mailboxes"]["sales"] = {"address": SALES, "tag": "Sales", "agents": ["schulze"]}
    return with_changes(parse_config(data, environ={}), {"redis": {"url": redis_url}, "database": {"url": db_url}})


class Admin:
    """A config file on disk pointing at the test's Redis and database, and the ``postroom`` command."""

    def __init__(self, tmp_path: Path, redis_url: str, db_url: str) -> None:
        self.config = team_config(redis_url, db_url)
        self.path = tmp_path / "postroom.toml"
        self.path.write_text(to_toml(self.config))
        self.env = {"POSTROOM_REDIS_URL": redis_url, "POSTROOM_DATABASE_URL": db_url}
        self.store = RedisStore.from_url(redis_url, key_prefix="postroom", message_index_days=1, timeout=2)
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        migrate(db_url)
        self.engine = make_engine(db_url)

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(main, [*args, "--config", str(self.path)], env=self.env)

    def json(self, *args: str) -> Any:
        res = self.run(*args, "--json")
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    def mail(self, mailbox: str, customer: str, subject: str, qid: str, *, owner: str = "", state: str = "new") -> int:
        """A ticket as the pipeline leaves it: Redis state plus its first message and event in SQL."""
        now = time.time()
        t = self.store.open(mailbox, NewTicket(customer, subject, (customer,), (f"{qid}@c.test",), owner, state), now)
        self.record(
            Record(
                mailbox=mailbox,
                number=t.number,
                event="opened",
                at=now,
                customer=customer,
                ticket_subject=subject,
                owner=owner,
                state=state,
                message_id=f"{qid}@c.test",
                queue_id=qid,
                from_addr=customer,
                subject=subject,
                actor=customer,
                detail="new",
            )
        )
        return t.number

    def record(self, *records: Record) -> None:
        with Session(self.engine) as s, s.begin():
            write(s, list(records))

    def close(self) -> None:
        self.redis.close()
        self.engine.dispose()


@pytest.fixture
def admin(tmp_path: Path, redis_url: str, db_url: str) -> Any:
    a = Admin(tmp_path, redis_url, db_url)
    yield a
    a.close()


def test_list_shows_the_tickets_and_filters_by_owner_state_and_mailbox(admin: Admin) -> None:
    one = admin.mail(SUPPORT, "alice@customer.test", "Printer on fire", "Q1")
    two = admin.mail(SUPPORT, "bob@customer.test", "Invoice wrong", "Q2", owner="meier", state="open")
    three = admin.mail(SUPPORT, "carol@customer.test", "Thanks", "Q3", owner="mueller", state="closed")
    quote = admin.mail(SALES, "dave@customer.test", "Quote please", "Q4")

    every = admin.json("tickets", "list")
    assert {(t["ticket"], t["owner"], t["state"]) for t in every} == {
        (f"Support #{one}", "", "new"),
        (f"Support #{two}", "meier", "open"),
        (f"Support #{three}", "mueller", "closed"),
        (f"Sales #{quote}", "", "new"),
    }
    assert [t["number"] for t in admin.json("tickets", "list", "--owner", "meier")] == [two]
    assert [t["ticket"] for t in admin.json("tickets", "list", "--owner", "unassigned", "--mailbox", "support")] == [
        f"Support #{one}"
    ]
    assert [t["subject"] for t in admin.json("tickets", "list", "--state", "closed")] == ["Thanks"]
    assert [t["customer"] for t in admin.json("tickets", "list", "--mailbox", SALES)] == ["dave@customer.test"]

    table = admin.run("tickets", "list")
    assert table.exit_code == 0, table.output
    assert "Support #2" in table.output and "Invoice wrong" in table.output and "meier" in table.output
    assert "unassigned" in table.output and "4 tickets" in table.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tickets", "list", "--owner", "nobody"), "unknown agent 'nobody'"),
        (("tickets", "list", "--mailbox", "billing"), "unknown mailbox 'billing'"),
        (("tickets", "list", "--state", "lost"), "Invalid value for '--state'"),
        (("tickets", "show", "99", "--mailbox", "support"), "no ticket Support #99"),
        (("tickets", "show", "1"), "several mailboxes (support, sales): name one with --mailbox"),
        (("tickets", "assign", "99", "meier", "--mailbox", "support"), "no ticket Support #99"),
        (("tickets", "assign", "1", "nobody", "--mailbox", "support"), "unknown agent 'nobody'"),
        (("tickets", "assign", "1", "meier", "--mailbox", "sales"), "meier is not an agent of sales@example.test"),
        (("tickets", "close", "99", "--mailbox", "support"), "no ticket Support #99"),
    ],
)
def test_unknown_tickets_agents_and_mailboxes_exit_2_and_change_nothing(
    admin: Admin, args: tuple[str, ...], message: str
) -> None:
    admin.mail(SUPPORT, "alice@customer.test", "Printer on fire", "Q1")
    admin.mail(SALES, "dave@customer.test", "Quote please", "Q4")
    before = {k: admin.redis.hgetall(k) for k in admin.redis.keys("postroom:*:t:*")}
    res = admin.run(*args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert {k: admin.redis.hgetall(k) for k in admin.redis.keys("postroom:*:t:*")} == before


def test_show_tells_the_history_from_sql(admin: Admin) -> None:
    n = admin.mail(SUPPORT, "alice@customer.test", "Printer on fire", "Q1")
    admin.store.touch(SUPPORT, n, ["Q2@c.test"], ["alice@customer.test"], time.time())
    admin.record(
        Record(
            mailbox=SUPPORT,
            number=n,
            event="followup",
            at=time.time(),
            message_id="Q2@c.test",
            queue_id="Q2",
            from_addr="alice@customer.test",
            subject="Re: Printer on fire",
            actor="alice@customer.test",
            detail="references",
        )
    )
    shown = admin.json("tickets", "show", str(n), "--mailbox", "support")
    assert (shown["ticket"], shown["customer"], shown["state"]) == (f"Support #{n}", "alice@customer.test", "new")
    assert [(m["direction"], m["subject"], m["queue_id"]) for m in shown["messages"]] == [
        ("inbound", "Printer on fire", "Q1"),
        ("inbound", "Re: Printer on fire", "Q2"),
    ]
    assert [e["kind"] for e in shown["events"]] == ["opened", "followup"]
    assert shown["messages"][0]["at"].endswith("Z")

    table = admin.run("tickets", "show", str(n), "--mailbox", SUPPORT)
    assert table.exit_code == 0, table.output
    for text in ("Support #1", "Printer on fire", "Re: Printer on fire", "followup", "references", "Q2"):
        assert text in table.output


def test_assign_changes_the_owner_in_redis_and_records_the_admin(admin: Admin) -> None:
    n = admin.mail(SUPPORT, "alice@customer.test", "Printer on fire", "Q1")
    res = admin.run("tickets", "assign", str(n), "Mueller", "--mailbox", "support")
    assert res.exit_code == 0, res.output
    assert f"Support #{n} assigned to mueller (was unassigned), open" in res.output
    # The mail path reads Redis: Mueller's folder gets the customer's next mail, his reply is the owner's.
    assert admin.redis.hget(f"postroom:{{{SUPPORT}}}:t:{n}", "owner") == "mueller"
    assert admin.redis.hget(f"postroom:{{{SUPPORT}}}:t:{n}", "state") == "open"
    shown = admin.json("tickets", "show", str(n), "--mailbox", "support")
    assert shown["owner"] == "mueller"
    assert (shown["events"][-1]["kind"], shown["events"][-1]["actor"]) == ("assign", WHO)
    assert shown["events"][-1]["detail"] == "mueller (was unassigned)"
    assert [t["number"] for t in admin.json("tickets", "list", "--owner", "mueller")] == [n]


def test_close_closes_in_redis_keeps_the_owner_and_records_the_admin(admin: Admin) -> None:
    n = admin.mail(SUPPORT, "bob@customer.test", "Invoice wrong", "Q2", owner="meier", state="open")
    res = admin.run("tickets", "close", str(n), "--mailbox", "support")
    assert res.exit_code == 0, res.output
    assert f"Support #{n} closed (owner meier)" in res.output
    assert admin.redis.hget(f"postroom:{{{SUPPORT}}}:t:{n}", "state") == "closed"
    shown = admin.json("tickets", "show", str(n), "--mailbox", "support")
    assert (shown["state"], shown["owner"]) == ("closed", "meier")
    assert [(e["kind"], e["actor"], e["detail"]) for e in shown["events"]][-1] == ("close", WHO, "was open")
    assert [t["number"] for t in admin.json("tickets", "list", "--state", "closed")] == [n]


def test_show_falls_back_to_the_history_when_redis_lost_the_ticket(admin: Admin) -> None:
    n = admin.mail(SUPPORT, "alice@customer.test", "Printer on fire", "Q1")
    admin.redis.delete(f"postroom:{{{SUPPORT}}}:t:{n}")
    shown = admin.json("tickets", "show", str(n), "--mailbox", "support")
    assert shown["subject"] == "Printer on fire" and [e["kind"] for e in shown["events"]] == ["opened"]


def test_redis_down_is_a_service_error_not_a_usage_error(tmp_path: Path, db_url: str) -> None:
    dead = "redis://127.0.0.1:1/0"
    config = team_config(dead, db_url)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    res = CliRunner().invoke(
        main,
        ["tickets", "list", "--config", str(path)],
        env={"POSTROOM_REDIS_URL": dead, "POSTROOM_DATABASE_URL": db_url},
    )
    assert res.exit_code == 1
    assert "Redis at redis://127.0.0.1:1/0 is not reachable" in res.output


def snippet_config(tmp_path: Path, **changes: dict[str, object]) -> Path:
    config = with_changes(load_config(example_config_path(), environ={}), changes)
    path = tmp_path / "snippet.toml"
    path.write_text(to_toml(config))
    return path


def test_postfix_snippet_is_made_from_the_config(tmp_path: Path) -> None:
    path = snippet_config(
        tmp_path,
        milter={"socket": "inet:8891@10.0.0.5"},
        smtpd={"listen_port": 10035, "reinject_host": "127.0.0.2", "reinject_port": 10036},
    )
    res = CliRunner().invoke(main, ["postfix-snippet", "--config", str(path)], env={"POSTROOM_MILTER_SOCKET": None})
    assert res.exit_code == 0, res.output
    out = res.output
    assert "smtpd_milters = inet:10.0.0.5:8891\n" in out  # libmilter's PORT@HOST in Postfix's HOST:PORT
    assert "milter_default_action = accept\n" in out and "  -o milter_default_action=tempfail\n" in out
    assert "  -o content_filter=postroom:[127.0.0.1]:10035\n" in out
    assert "  -o smtpd_sasl_authenticated_header=yes\n" in out
    assert "\n127.0.0.2:10036 inet n" in out
    assert "  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters\n" in out
    only = CliRunner().invoke(main, ["postfix-snippet", "--config", str(path), "--mode", "after-queue"])
    assert "smtpd_milters" not in only.output and "content_filter=postroom" in only.output


def test_dovecot_snippet_files_detail_addresses_into_folders(tmp_path: Path) -> None:
    plain = CliRunner().invoke(main, ["dovecot-snippet"])
    assert plain.exit_code == 0, plain.output
    for line in ("recipient_delimiter = +", "lmtp_save_to_detail_mailbox = yes", "lda_mailbox_autocreate = yes"):
        assert f"\n{line}\n" in plain.output
    path = snippet_config(tmp_path)
    listed = CliRunner().invoke(main, ["dovecot-snippet", "--config", str(path)], env={"POSTROOM_MILTER_SOCKET": None})
    assert "# support@example.test: folders Meier, Mueller, Schulze" in listed.output


@pytest.mark.parametrize(("doc", "mode"), [("deploy-milter.md", "milter"), ("deploy-after-queue.md", "after-queue")])
def test_deployment_guides_quote_what_postfix_snippet_prints(doc: str, mode: str) -> None:
    config = load_config(example_config_path(), environ={})
    printed = snippets.postfix_snippet(config, mode)
    text = (DOCS / doc).read_text()
    assert printed in text, f"docs/{doc} is out of step with `postroom postfix-snippet --mode {mode}`"
    assert snippets.dovecot_snippet(None) in text, f"docs/{doc} is out of step with `postroom dovecot-snippet`"


def test_a_daemon_makes_one_redis_connection_pool(tmp_path: Path, redis_url: str, sqlite_url: str) -> None:
    """The ticket store and the rules' state share one client: one pool, one set of connections per process."""
    path = tmp_path / "postroom.toml"
    path.write_text(to_toml(team_config(redis_url, sqlite_url)))
    with daemon_runtime(path, "test", environ={}) as runtime:
        store, assign = runtime.parts.store, runtime.parts.assign
        assert isinstance(store, RedisStore) and isinstance(assign, RedisAssignmentState)
        assert store.client is assign.client  # one client: one pool (one per node on a Cluster)
        assert assign.pick_least_open(SUPPORT, ["meier"]) == "meier"  # both work over it
        assert (
            store.open(SUPPORT, NewTicket("alice@customer.test", "Hi", ("alice@customer.test",), ()), 1.0).number == 1
        )


def test_admin_rebuild_restores_redis_from_the_history(admin: Admin) -> None:
    """Redis lost everything: the admin's rebuild brings back tickets, owners, threading and the numbering."""
    one = admin.mail(SUPPORT, "alice@customer.test", "Printer on fire", "Q1", owner="meier", state="open")
    two = admin.mail(SUPPORT, "bob@customer.test", "Invoice wrong", "Q2")
    quote = admin.mail(SALES, "dave@customer.test", "Quote please", "Q3")
    admin.redis.flushall()

    res = admin.run("admin", "rebuild")
    assert res.exit_code == 0, res.output
    assert f"{SUPPORT}: 2 tickets, 2 Message-IDs and 0 away flags restored; next number after #{two}" in res.output
    assert f"{SALES}: 1 tickets, 1 Message-IDs and 0 away flags restored; next number after #{quote}" in res.output
    found = admin.store.lookup(SUPPORT, ["Q1@c.test"], [], [])
    assert found.by_reference is not None and found.by_reference.number == one
    assert found.by_reference.owner == "meier" and found.by_reference.subject == "Printer on fire"
    assert admin.store.lookup(SUPPORT, [], [two], ["bob@customer.test"]).by_token[0].sender_known
    assert admin.store.open(SUPPORT, NewTicket("eve@c", "New", ("eve@c",), ()), time.time()).number == two + 1
    again = admin.run("admin", "rebuild")  # safe twice: nothing missing, nothing written
    assert f"{SUPPORT}: 0 tickets, 0 Message-IDs and 0 away flags restored" in again.output


def test_admin_rebuild_names_a_dead_redis(admin: Admin, tmp_path: Path) -> None:
    path = tmp_path / "dead.toml"
    path.write_text(to_toml(with_changes(admin.config, {"redis": {"url": f"redis://127.0.0.1:{free_port()}/0"}})))
    res = CliRunner().invoke(main, ["admin", "rebuild", "--config", str(path)], env={})
    assert res.exit_code == 1 and "Redis at redis://127.0.0.1:" in res.output
