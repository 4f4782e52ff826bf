"""The Redis store against a real, private redis-server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from redis.cluster import RedisCluster

from postroom import coop, redis_connect
from postroom.store import scripts
from postroom.store.redis import RedisStore
from postroom.tickets import NewTicket, StoreUnavailable
from postroom_testbed import LOOPBACK, RedisServer
from postroom_testbed.ha import RedisClusterSet, RedisSentinelSet

T = TypeVar("T")
BOX = "support@example.test"


@pytest.fixture
def redis_url(any_redis_url: str) -> str:
    """The store's contract holds on one Redis, under Sentinel and on a Redis Cluster (every script in one slot)."""
    return any_redis_url


def make(url: str) -> RedisStore:
    return RedisStore.from_url(url, key_prefix="postroom", message_index_days=1, timeout=2.0)


def new(customer: str = "alice@customer.test", mid: str = "m1@c") -> NewTicket:
    return NewTicket(customer=customer, subject="Hello", participants=(customer,), message_ids=(mid,))


def test_open_lookup_touch(redis_url: str) -> None:
    store = make(redis_url)
    t = store.open(BOX, new(), 100.0)
    assert t.number == 1
    found = store.lookup(BOX, ["unknown@x", "m1@c"], [1], ["alice@customer.test"])
    assert found.by_reference is not None and found.by_reference.number == 1
    assert found.by_token[0].sender_known
    stranger = store.lookup(BOX, [], [1], ["mallory@evil.test"])
    assert not stranger.by_token[0].sender_known
    touched = store.touch(BOX, 1, ["m2@c"], ["bob@customer.test"], 200.0)
    assert touched.updated == 200.0 and touched.customer == "alice@customer.test"
    assert store.lookup(BOX, ["m2@c"], [], []).by_reference is not None
    assert store.lookup(BOX, [], [1], ["bob@customer.test"]).by_token[0].sender_known


def test_the_same_mail_again_gets_its_ticket_not_a_new_one(redis_url: str) -> None:
    store = make(redis_url)
    first, created = store.open_unless_seen(BOX, new(), "m1@c", 1.0)
    assert created and first.number == 1
    again, created = store.open_unless_seen(BOX, new(), "m1@c", 2.0)
    assert not created
    assert (again.number, again.customer, again.subject, again.created) == (1, "alice@customer.test", "Hello", 1.0)
    # A follow-up's Message-ID is in the ticket too: that mail again is also the same ticket.
    store.touch(BOX, 1, ["m2@c"], [], 3.0)
    assert store.open_unless_seen(BOX, new(mid="m2@c"), "m2@c", 4.0) == (store.ticket(BOX, 1), False)
    # A stranger reusing a known Message-ID does not get into that ticket.
    stranger, created = store.open_unless_seen(BOX, new("mallory@evil.test", mid="m1@c"), "m1@c", 5.0)
    assert created and stranger.number == 2


def test_copies_of_one_mail_arriving_at_once_open_one_ticket(redis_url: str) -> None:
    results: list[tuple[int, bool]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        store = make(redis_url)
        start.wait()
        ticket, created = store.open_unless_seen(BOX, new(mid="same@c"), "same@c", 1.0)
        with lock:
            results.append((ticket.number, created))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(1, False)] * 7 + [(1, True)]
    assert make(redis_url).tickets(BOX)[0].number == 1 and len(make(redis_url).tickets(BOX)) == 1


def test_keys_carry_the_mailbox_hash_tag_and_ttl(redis_url: str) -> None:
    store = make(redis_url)
    store.open(BOX, new(), 1.0)
    client = redis_connect.client_from_url(redis_url)
    everywhere = {"target_nodes": RedisCluster.PRIMARIES} if isinstance(client, RedisCluster) else {}
    keys = sorted(str(k) for k in client.keys("*", **everywhere))
    assert keys and all(k.startswith("postroom:{support@example.test}:") for k in keys), keys
    ttl = client.ttl(store.message_key(BOX, "m1@c"))
    assert 0 < ttl <= 86400
    assert client.ttl(store.ticket_key(BOX, 1)) == -1  # tickets themselves do not expire


def test_counter_is_atomic_across_threads(redis_url: str) -> None:
    numbers: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        store = make(redis_url)
        for j in range(25):
            n = store.open(BOX, new(mid=f"{i}-{j}@c"), 1.0).number
            with lock:
                numbers.append(n)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(numbers) == list(range(1, 201))


def test_mailboxes_count_separately(redis_url: str) -> None:
    store = make(redis_url)
    assert store.open(BOX, new(), 1.0).number == 1
    assert store.open("sales@example.test", new(), 1.0).number == 1
    assert store.open(BOX, new(mid="m2@c"), 1.0).number == 2


def test_scripts_survive_a_redis_that_forgot_them_and_a_dropped_connection(redis_url: str) -> None:
    store = make(redis_url)
    assert store.open(BOX, new(), 1.0).number == 1
    admin = redis_connect.client_from_url(redis_url)
    admin.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
    assert store.open(BOX, new(mid="m2@c"), 2.0).number == 2
    assert store.touch(BOX, 2, ["m3@c"], [], 3.0).updated == 3.0
    admin.client_kill_filter(_type="normal", skipme=True)
    # The pool notices an idle connection that Redis dropped and connects again before sending.
    assert store.open(BOX, new(mid="m4@c"), 4.0).number == 3


def _on_the_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn`` as the asyncio milter engine runs it: in a greenlet on an event loop, waits handed to the loop."""
    result, _ = asyncio.run(coop.run(fn, *args))
    return result


def _directly(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


@pytest.mark.parametrize("call", [_directly, _on_the_loop], ids=["blocking", "on-the-loop"])
def test_a_timed_out_script_is_not_sent_twice(redis_url: str, call: Callable[..., Any]) -> None:
    store = RedisStore.from_url(redis_url, key_prefix="postroom", message_index_days=1, timeout=0.3)
    assert store.open(BOX, new(), 1.0).number == 1
    busy = busy_redis(redis_url, 1.0, store.counter_key(BOX))
    with pytest.raises(StoreUnavailable):
        call(store.open, BOX, new(mid="m2@c"), 2.0)
    busy.join()
    # Redis ran the timed-out open at most once, when it was free again (a retry would have counted it twice).
    # Whether it ran depends on the connection: one Redis reuses the pooled one and gets the EVALSHA queued;
    # a new connection (Sentinel's) times out in its hand-shake before the script is sent.  The connection that
    # gave up was dropped: the next call reads its own reply, not the late one.
    ran = store.lookup(BOX, ["m2@c"], [], []).by_reference is not None
    assert call(store.open, BOX, new(mid="m3@c"), 3.0).number == 2 + ran


def busy_redis(url: str, seconds: float, key: str) -> threading.Thread:
    """Keep the Redis that holds ``key`` busy for ``seconds`` from a thread; return once it is busy.

    A fixed sleep after starting the thread was not enough on a loaded machine: the thread's client (on Cluster it
    reads the slot map first) was not ready yet, and the call meant to meet a busy Redis found it idle (one CI run).
    So this waits until the thread is about to send its script and then until a PING goes unanswered.
    """
    probe = redis_connect.node_for(redis_connect.client_from_url(url, timeout=0.1), key)
    probe.ping()  # its connection is made while Redis still answers
    sending = threading.Event()
    thread = threading.Thread(target=_block_redis, args=(url, seconds, key, sending))
    thread.start()
    if not sending.wait(30):
        raise AssertionError("the thread that blocks Redis did not get a client")
    pool = probe.connection_pool
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        connection = pool.get_connection()
        try:
            connection.send_command("PING")  # type: ignore[no-untyped-call]
            connection.read_response()
        except redis.TimeoutError:
            # Dropped: its late PONG must not be read as another command's reply.
            connection.disconnect()  # type: ignore[no-untyped-call]
            return thread
        finally:
            pool.release(connection)
        time.sleep(0.005)
    thread.join()
    raise AssertionError("Redis never got busy")


def _block_redis(url: str, seconds: float, key: str, sending: threading.Event) -> None:
    """Keep the Redis that holds ``key`` busy (a Lua loop) for ``seconds``, as a slow or stuck server would be."""
    loop = """
    local t0 = redis.call('TIME')
    repeat local t = redis.call('TIME') until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1])
    return 1
    """
    client = redis_connect.client_from_url(url, timeout=10)
    sending.set()
    client.eval(loop, 1, key, int(seconds * 1_000_000))


def test_unreachable_redis_raises_store_unavailable() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0", key_prefix="p", message_index_days=1, timeout=0.5)
    for call in (
        lambda: store.lookup(BOX, ["a@b"], [1], ["x@y"]),
        lambda: store.open(BOX, new(), 1.0),
        lambda: store.touch(BOX, 1, [], [], 1.0),
    ):
        try:
            call()
        except StoreUnavailable:
            continue
        raise AssertionError("expected StoreUnavailable")


def test_assign_and_list(redis_url: str) -> None:
    store = make(redis_url)
    store.open(BOX, new(), 1.0)
    store.open(BOX, new(mid="m2@c"), 2.0)
    t = store.assign(BOX, 1, "meier", 3.0)
    assert (t.owner, t.state, t.updated) == ("meier", "open", 3.0)
    assert [x.number for x in store.tickets(BOX)] == [2, 1]
    assert store.tickets("empty@example.test") == []
    try:
        store.assign(BOX, 99, "meier", 4.0)
    except KeyError:
        pass
    else:
        raise AssertionError("assigning an unknown ticket must fail")
    assert store.ticket(BOX, 99) is None  # and must not leave a half ticket behind


def _lua_scripts() -> dict[str, str]:
    """Every Lua script of the Redis adapter (ticket store and the rules' state) by name, as it is registered (the
    owner index's functions go in after the first line); OWNER_INDEX and _INDEX are fragments that scripts
    include after their first line, not scripts."""
    return {
        name: scripts.with_owner_index(value)
        for name, value in vars(scripts).items()
        if isinstance(value, str) and "redis.call(" in value and name not in ("OWNER_INDEX", "_INDEX")
    }


def test_every_script_asks_redis_to_refuse_a_second_slot() -> None:
    found = _lua_scripts()
    assert len(found) >= 8, found.keys()
    assert [name for name, text in found.items() if not text.startswith("#!lua\n")] == []


def test_the_cluster_refuses_a_script_that_crosses_slots(cluster_set: RedisClusterSet) -> None:
    """Why the contract tests above fail for a script that strays: the flag makes Redis check every key it touches."""
    cluster_set.flush()
    client = redis_connect.client_from_url(cluster_set.url)
    assert isinstance(client, RedisCluster)
    mine = "postroom:{support@example.test}:seq"
    node = client.get_node_from_key(mine)  # type: ignore[no-untyped-call]
    # A key on the same node but in another slot: without the flag Redis would let the script write it.
    other = next(
        k for k in (f"postroom:{{box{i}@example.test}}:seq" for i in range(10_000))
        if client.get_node_from_key(k) == node and client.keyslot(k) != client.keyslot(mine)  # type: ignore[no-untyped-call]
    )  # fmt: skip
    body = "redis.call('INCR', KEYS[1]); return redis.call('INCR', ARGV[1])"
    assert client.eval(body, 1, mine, other) == 1  # the compatibility mode lets it through
    with pytest.raises(redis.exceptions.ResponseError, match="same slot"):
        client.eval("#!lua\n" + body, 1, mine, other)


@pytest.mark.parametrize("call", [_directly, _on_the_loop], ids=["blocking", "on-the-loop"])
def test_writes_wait_for_replicas_and_an_unconfirmed_write_is_unavailable(
    sentinel_set: RedisSentinelSet, call: Callable[..., Any]
) -> None:
    """[redis] confirm_replicas: the script and WAIT in one round trip; too few replicas is the failure policy, and
    the connection stays in step (the next call reads its own reply), also after Redis forgot the scripts."""
    client = redis_connect.client_from_url(sentinel_set.url)
    client.flushall()
    confirmed = RedisStore(client, "postroom", 1, confirm_replicas=len(sentinel_set.replicas))
    assert call(confirmed.open, BOX, new(), 1.0).number == 1
    client.script_flush()
    assert call(confirmed.claim, BOX, 1, "meier", 2.0).won
    more = RedisStore(client, "postroom", 1, confirm_replicas=len(sentinel_set.replicas) + 1, confirm_timeout=0.2)
    with pytest.raises(StoreUnavailable, match="replicas confirmed"):
        call(more.open, BOX, new(mid="m2@c"), 3.0)
    # The write itself ran (WAIT cannot undo it): the number is used up, never handed out again.
    assert call(confirmed.open, BOX, new(mid="m3@c"), 4.0).number == 3
    with pytest.raises(KeyError):
        call(confirmed.claim, BOX, 99, "meier", 5.0)  # a script's own answer still comes through with WAIT behind it
    assert confirmed.ticket(BOX, 1) is not None


def test_one_sweep_per_mailbox_at_a_time(redis_url: str) -> None:
    """Two sweeps at once (two hosts' timers, a timer and a daemon after a recovery) would both store a
    replacement of the same mail: the second finds the mailbox taken, another mailbox is free."""
    first, second = make(redis_url), make(redis_url)
    with first.sweeping(BOX) as held:
        assert held
        with second.sweeping(BOX) as also:
            assert not also
        with second.sweeping("sales@example.test") as other:
            assert other
    with second.sweeping(BOX) as held_now:
        assert held_now  # released at the end of the first sweep
    with first.sweeping(BOX, seconds=0.2) as held:
        assert held
        time.sleep(0.4)  # a sweep that died (or overran) frees the mailbox after the lock's time
        with second.sweeping(BOX) as taken_over:
            assert taken_over


def test_the_sweep_lock_names_a_dead_redis() -> None:
    dead = RedisStore.from_url("redis://127.0.0.1:1/0", key_prefix="postroom", message_index_days=1, timeout=0.2)
    with pytest.raises(StoreUnavailable), dead.sweeping(BOX):
        pass


def _move_slot(servers: RedisClusterSet, client: RedisCluster, key: str) -> None:
    """Move ``key``'s slot and its keys to another primary, as ``redis-cli --cluster reshard`` does."""
    slot = client.keyslot(key)  # type: ignore[no-untyped-call]
    owner = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
    source = next(n for n in servers.nodes if n.port == owner.port)
    target = next(n for n in servers.nodes if n is not source)
    src, dst = source.client(), target.client()
    src_id, dst_id = (str(c.execute_command("CLUSTER", "MYID")) for c in (src, dst))  # type: ignore[no-untyped-call]
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)  # type: ignore[no-untyped-call]
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)  # type: ignore[no-untyped-call]
    keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)  # type: ignore[no-untyped-call]
    src.execute_command("MIGRATE", LOOPBACK, target.port, "", 0, 5000, "KEYS", *keys)  # type: ignore[no-untyped-call]
    for node in servers.nodes:
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)  # type: ignore[no-untyped-call]


def test_scripts_and_look_ups_follow_a_slot_moved_to_another_node(tmp_path: Path) -> None:
    """Resharding: the node the store knows answers MOVED; the store asks the cluster for its slot map again and
    finds the mailbox's tickets on their new node, reads and scripts alike."""
    with RedisClusterSet(tmp_path / "cluster").start() as servers:
        client = redis_connect.client_from_url(servers.url)
        assert isinstance(client, RedisCluster)
        store = RedisStore(client, "postroom", 1)
        assert store.open(BOX, new(), 1.0).number == 1
        before = client.get_node_from_key(store.counter_key(BOX))  # type: ignore[no-untyped-call]
        _move_slot(servers, client, store.counter_key(BOX))

        found = store.lookup(BOX, ["m1@c"], [1], ["alice@customer.test"])
        assert found.by_reference is not None and found.by_reference.number == 1
        assert [c.ticket.number for c in found.by_token] == [1]
        assert store.open(BOX, new(mid="m2@c"), 2.0).number == 2
        assert store.claim(BOX, 2, "meier", 3.0).won
        after = client.get_node_from_key(store.counter_key(BOX))  # type: ignore[no-untyped-call]
        assert after.port != before.port


def test_a_reply_whose_token_names_its_referenced_ticket_reads_the_ticket_once(redis_server: RedisServer) -> None:
    """Most customers' replies carry the ticket's token and reference its mail: one round trip reads both (the
    reference's ticket is the token's, already read), not a second one for the reference."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    store = make(redis_server.url)
    store.open(BOX, new(), 1.0)
    store.open(BOX, new(mid="m2@c"), 2.0)
    client.config_resetstat()
    found = store.lookup(BOX, ["m1@c"], [1], ["alice@customer.test"])
    assert found.by_reference is not None and found.by_reference.number == 1
    assert [c.ticket.number for c in found.by_token] == [1] and found.by_token[0].sender_known
    assert client.info("commandstats")["cmdstat_hgetall"]["calls"] == 1
    # A reference to another ticket than the token's is read as before.
    client.config_resetstat()
    other = store.lookup(BOX, ["m2@c"], [1], ["alice@customer.test"])
    assert other.by_reference is not None and other.by_reference.number == 2
    assert client.info("commandstats")["cmdstat_hgetall"]["calls"] == 2
    client.close()
