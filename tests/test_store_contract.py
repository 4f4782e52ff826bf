"""One contract, two ticket stores: the in-memory store (unit tests, ``rules test``) must behave as the Redis one.

Every test here runs on both; a behaviour the fake got wrong fails on the fake only.  The Redis-only parts (the
Lua scripts' own key names, the owner index's cost) are at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol

import pytest
import redis

from postroom.store import keyspace, scripts
from postroom.store.memory import MemoryStore
from postroom.store.redis import RedisStore
from postroom.tickets import KEEP, Changes, NewTicket, StoreUnavailable, Ticket, TicketStore
from postroom_testbed import free_port
from tests.conftest import REDIS_MODES, empty_redis_url

BOX = "support@example.test"


class Contract(TicketStore, Protocol):
    """The TicketStore protocol plus what the admin CLI uses: both stores have it."""

    def assign(self, mailbox: str, number: int, owner: str, now: float) -> Ticket: ...

    def ticket(self, mailbox: str, number: int) -> Ticket | None: ...


@pytest.fixture(params=["memory", *REDIS_MODES])
def store(request: pytest.FixtureRequest) -> Iterator[Contract]:
    """The in-memory store, and the Redis store on one Redis, under Sentinel and on a 3-primary Cluster (where a
    script that touched a second slot would fail)."""
    if request.param == "memory":
        yield MemoryStore()
        return
    url = empty_redis_url(request, request.param)
    yield RedisStore.from_url(url, key_prefix="postroom", message_index_days=1, timeout=2.0)


def new(customer: str = "alice@customer.test", mid: str = "m1@c", owner: str = "") -> NewTicket:
    state = "open" if owner else "new"
    return NewTicket(
        customer=customer, subject="Hello", participants=(customer,), message_ids=(mid,), owner=owner, state=state
    )


def numbers(tickets: list[Ticket]) -> list[int]:
    return [t.number for t in tickets]


def test_open_numbers_tickets_per_mailbox_from_one(store: Contract) -> None:
    assert [store.open(BOX, new(mid=f"m{i}@c"), 1.0).number for i in range(3)] == [1, 2, 3]
    assert store.open("sales@example.test", new(), 1.0).number == 1
    t = store.ticket(BOX, 2)
    assert t is not None and (t.customer, t.subject, t.state, t.created) == ("alice@customer.test", "Hello", "new", 1.0)
    assert store.ticket(BOX, 99) is None


def test_lookup_by_reference_and_by_token_knows_participants(store: Contract) -> None:
    store.open(BOX, new(), 1.0)
    found = store.lookup(BOX, ["unknown@x", "m1@c"], [1], ["alice@customer.test"])
    assert found.by_reference is not None and found.by_reference.number == 1
    assert [c.sender_known for c in found.by_token] == [True]
    assert [c.sender_known for c in store.lookup(BOX, [], [1], ["mallory@evil.test"]).by_token] == [False]
    assert store.lookup(BOX, [], [], []).by_reference is None


def test_touch_adds_message_ids_and_participants(store: Contract) -> None:
    store.open(BOX, new(), 1.0)
    touched = store.touch(BOX, 1, ["m2@c"], ["bob@customer.test"], 2.0)
    assert touched.updated == 2.0
    ref = store.lookup(BOX, ["m2@c"], [], []).by_reference
    assert ref is not None and ref.number == 1
    assert [c.sender_known for c in store.lookup(BOX, [], [1], ["bob@customer.test"]).by_token] == [True]


def test_the_same_mail_again_is_the_same_ticket_for_a_participant_only(store: Contract) -> None:
    first, created = store.open_unless_seen(BOX, new(), "m1@c", 1.0)
    assert created
    again, created = store.open_unless_seen(BOX, new(), "m1@c", 2.0)
    assert (again.number, created) == (first.number, False)
    stranger, created = store.open_unless_seen(BOX, new("mallory@evil.test"), "m1@c", 3.0)
    assert created and stranger.number == 2


def test_a_reused_message_id_keeps_pointing_at_the_first_ticket(store: Contract) -> None:
    store.open_unless_seen(BOX, new(mid="m1@c"), "m1@c", 1.0)
    # Mallory reuses Alice's Message-ID: his mail opens ticket 2 and must not take the ID over.
    mallory, created = store.open_unless_seen(BOX, new("mallory@evil.test", mid="m1@c"), "m1@c", 2.0)
    assert created and mallory.number == 2
    alice_reply = store.lookup(BOX, ["m1@c"], [], ["alice@customer.test"]).by_reference
    assert alice_reply is not None and alice_reply.number == 1
    # The ID is disputed now: it threads only the first ticket's own people, not Mallory (nor his ticket).
    assert store.lookup(BOX, ["m1@c"], [], ["mallory@evil.test"]).by_reference is None
    # A follow-up that names the ID in another ticket (References to Mallory's ticket) changes nothing either.
    store.touch(BOX, 2, ["m1@c", "m9@evil"], ["mallory@evil.test"], 3.0)
    again = store.lookup(BOX, ["m1@c"], [], ["alice@customer.test"]).by_reference
    assert again is not None and again.number == 1
    # An older undisputed reference still threads a sender who only knows that one.
    older = store.lookup(BOX, ["m9@evil", "m1@c"], [], ["mallory@evil.test"]).by_reference
    assert older is not None and older.number == 2
    # A participant of the first ticket naming the ID in the second disputes and re-points nothing.
    store.open_unless_seen(BOX, new("bob@customer.test", mid="m5@c"), "m5@c", 4.0)
    store.touch(BOX, 1, ["m5@c"], ["bob@customer.test"], 5.0)
    bob = store.lookup(BOX, ["m5@c"], [], [])
    assert bob.by_reference is not None and bob.by_reference.number == 3


def test_claim_first_wins_owner_keeps_rival_loses_takeover_forces(store: Contract) -> None:
    store.open(BOX, new(), 1.0)
    won = store.claim(BOX, 1, "meier", 2.0)
    assert (won.won, won.previous_owner, won.ticket.owner, won.ticket.state) == (True, "", "meier", "open")
    assert store.claim(BOX, 1, "meier", 3.0).won
    lost = store.claim(BOX, 1, "mueller", 4.0)
    assert (lost.won, lost.ticket.owner) == (False, "meier")
    forced = store.claim(BOX, 1, "mueller", 5.0, force=True)
    assert (forced.won, forced.previous_owner, forced.ticket.owner) == (True, "meier", "mueller")


def test_update_changes_only_what_it_names(store: Contract) -> None:
    store.open(BOX, new(), 1.0)
    t = store.update(BOX, 1, Changes(priority="high", add_tags=("billing", "vip")), 2.0)
    assert (t.owner, t.state, t.priority, t.tags) == ("", "new", "high", ("billing", "vip"))
    t = store.update(BOX, 1, Changes(owner="meier", state="pending", remove_tags=("billing",)), 3.0)
    assert (t.owner, t.state, t.priority, t.tags) == ("meier", "pending", "high", ("vip",))
    assert not Changes(owner=KEEP)
    with pytest.raises(KeyError):
        store.update(BOX, 99, Changes(state="closed"), 4.0)


def test_update_unless_touched_changes_nothing_once_the_ticket_moved_on(store: Contract) -> None:
    store.open(BOX, new(), 1.0)
    store.touch(BOX, 1, [], ["alice@customer.test"], 2.0)  # a retry of the mail took the ticket meanwhile
    assert store.update_unless_touched(BOX, 1, Changes(state="closed", add_tags=("void",)), 3.0, 1.0) is None
    t = store.ticket(BOX, 1)
    assert t is not None and (t.state, t.tags, t.updated) == ("new", (), 2.0)
    t = store.update_unless_touched(BOX, 1, Changes(state="closed", add_tags=("void",)), 3.0, 2.0)
    assert t is not None and (t.state, t.tags, t.updated) == ("closed", ("void",), 3.0)
    with pytest.raises(KeyError):
        store.update_unless_touched(BOX, 99, Changes(state="closed"), 4.0, 1.0)


def test_assign_and_release(store: Contract) -> None:
    store.open(BOX, new(), 1.0)
    t = store.assign(BOX, 1, "meier", 2.0)
    assert (t.owner, t.state, t.updated) == ("meier", "open", 2.0)
    t = store.assign(BOX, 1, "", 3.0)
    assert (t.owner, t.state) == ("", "new")
    with pytest.raises(KeyError):
        store.assign(BOX, 99, "meier", 4.0)


def test_away_flags_per_mailbox(store: Contract) -> None:
    store.set_away(BOX, "meier", None, 1.0)
    assert store.away(BOX, ["meier", "mueller"]) == {"meier"}
    assert store.away("sales@example.test", ["meier"]) == set()
    store.clear_away(BOX, "meier")
    assert store.away(BOX, ["meier"]) == set()


def test_owned_follows_open_assign_claim_takeover_close_reopen_release(store: Contract) -> None:
    store.open(BOX, new(owner="meier"), 1.0)  # 1: opened by a rule's assignment
    store.open(BOX, new(mid="m2@c"), 1.0)  # 2: unassigned
    store.open(BOX, new(mid="m3@c"), 1.0)  # 3
    assert numbers(store.owned(BOX, "meier")) == [1]
    store.claim(BOX, 2, "meier", 2.0)
    store.assign(BOX, 3, "meier", 2.0)
    assert numbers(store.owned(BOX, "meier")) == [1, 2, 3]
    store.claim(BOX, 2, "mueller", 3.0)  # lost: nothing moves
    store.claim(BOX, 3, "mueller", 3.0, force=True)  # #takeover
    assert (numbers(store.owned(BOX, "meier")), numbers(store.owned(BOX, "mueller"))) == ([1, 2], [3])
    store.update(BOX, 1, Changes(state="closed"), 4.0)
    assert numbers(store.owned(BOX, "meier")) == [2]
    store.update(BOX, 1, Changes(state="open"), 5.0)  # #reopen
    store.update(BOX, 2, Changes(owner=""), 5.0)  # #release
    store.update(BOX, 3, Changes(owner="meier", state="pending"), 5.0)  # #assign, pending still counts as open
    assert (numbers(store.owned(BOX, "meier")), store.owned(BOX, "mueller")) == ([1, 3], [])
    store.assign(BOX, 3, "", 6.0)
    assert [(t.number, t.owner, t.state) for t in store.owned(BOX, "meier")] == [(1, "meier", "open")]


def test_tickets_lists_every_ticket_newest_first(store: Contract) -> None:
    for i in range(3):
        store.open(BOX, new(mid=f"m{i}@c"), 1.0)
    assert numbers(store.tickets(BOX)) == [3, 2, 1]


# -- the Redis store only --------------------------------------------------------------------------------------


def test_owned_since_is_when_the_owner_took_the_ticket(store: Contract) -> None:
    """What the rival's refusal names ("belongs to Meier since ..."): the first claim, not the ticket's creation."""
    store.open(BOX, new(), 1.0)
    assert store.claim(BOX, 1, "meier", 2.0).owned_since == 2.0
    assert store.claim(BOX, 1, "meier", 3.0).owned_since == 2.0  # answering again keeps the time
    assert store.claim(BOX, 1, "mueller", 4.0).owned_since == 2.0  # the rival is told since when
    assert store.claim(BOX, 1, "mueller", 5.0, force=True).owned_since == 5.0
    store.update(BOX, 1, Changes(owner="schulze"), 6.0)
    assert store.claim(BOX, 1, "meier", 7.0).owned_since == 6.0


def test_claim_race_has_one_winner(store: Contract) -> None:
    store.open(BOX, new(), 1.0)
    winners: list[str] = []
    barrier = threading.Barrier(8)

    def claim(login: str) -> None:
        barrier.wait()
        if store.claim(BOX, 1, login, 2.0).won:
            winners.append(login)

    threads = [threading.Thread(target=claim, args=(f"agent{i}",)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(winners) == 1


def test_unknown_tickets_are_key_errors(store: Contract) -> None:
    with pytest.raises(KeyError):
        store.update(BOX, 42, Changes(state="closed"), 1.0)
    with pytest.raises(KeyError):
        store.claim(BOX, 42, "meier", 1.0)
    with pytest.raises(KeyError):
        store.assign(BOX, 42, "meier", 1.0)


def test_a_dead_store_raises_store_unavailable(store: Contract) -> None:
    dead: Contract
    if isinstance(store, MemoryStore):
        dead = MemoryStore()
        dead.down = True
    else:
        dead = RedisStore.from_url(
            f"redis://127.0.0.1:{free_port()}/0", key_prefix="postroom", message_index_days=1, timeout=0.5
        )
    with pytest.raises(StoreUnavailable):
        dead.open(BOX, new(), 1.0)
    with pytest.raises(StoreUnavailable):
        dead.lookup(BOX, ["m1@c"], [1], ["alice@customer.test"])
    with pytest.raises(StoreUnavailable):
        dead.away(BOX, ["meier"])


def test_scripts_build_the_key_names_of_the_keyspace(redis_url: str) -> None:
    """The open script and the owner index name keys in Lua: they must be the keyspace's names."""
    store = RedisStore.from_url(redis_url, key_prefix="postroom", message_index_days=1, timeout=2.0)
    store.open(BOX, new(owner="meier"), 1.0)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    expected = {
        keyspace.counter_key("postroom", BOX),
        keyspace.ticket_key("postroom", BOX, 1),
        keyspace.participants_key("postroom", BOX, 1),
        keyspace.message_key("postroom", BOX, "m1@c"),
        keyspace.owned_key("postroom", BOX, "meier"),
        keyspace.epoch_key("postroom", BOX),
    }
    assert set(client.keys("*")) == expected
    store.open(BOX, new("mallory@evil.test"), 2.0)  # the same Message-ID from a stranger: disputed
    assert client.exists(keyspace.disputed_key("postroom", BOX, "m1@c"))


def test_owned_reads_the_agents_tickets_only(redis_url: str) -> None:
    """#away's read costs the agent's tickets, not the mailbox's: count the ticket reads Redis serves."""
    store = RedisStore.from_url(redis_url, key_prefix="postroom", message_index_days=1, timeout=2.0)
    for i in range(40):
        store.open(BOX, new(mid=f"m{i}@c", owner="meier" if i % 10 == 0 else "mueller"), 1.0)
    store.owned(BOX, "nobody")  # the one-time indexing of older tickets happens on the first read
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.config_resetstat()
    assert numbers(store.owned(BOX, "meier")) == [1, 11, 21, 31]
    assert client.info("commandstats")["cmdstat_hgetall"]["calls"] == 4


def test_tickets_from_before_the_owner_index_are_indexed_on_first_read(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, key_prefix="postroom", message_index_days=1, timeout=2.0)
    store.open(BOX, new(owner="meier"), 1.0)
    store.open(BOX, new(mid="m2@c", owner="meier"), 1.0)
    store.update(BOX, 2, Changes(state="closed"), 2.0)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.delete(keyspace.owned_key("postroom", BOX, "meier"))  # as a ticket written by an older version
    assert numbers(store.owned(BOX, "meier")) == [1]
    assert client.exists(keyspace.owned_indexed_key("postroom", BOX))


def test_the_owner_index_goes_after_a_shebang_line(redis_url: str) -> None:
    """Redis reads flags only from a first ``#!lua`` line: the index's functions must not push it down."""
    assert scripts.with_owner_index("#!lua flags=x\nreturn 1\n").startswith("#!lua flags=x\n\nlocal function")
    assert scripts.with_owner_index("\nreturn 1\n").startswith(scripts.OWNER_INDEX)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    ticket = keyspace.ticket_key("postroom", BOX, 1)
    assert scripts.ASSIGN.startswith("#!lua\n")  # every script has one (see scripts.py)
    assert client.eval(scripts.with_owner_index(scripts.ASSIGN), 1, ticket, "meier", "open", "1") is None
