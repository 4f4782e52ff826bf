"""The rules' Redis state against a real, private redis-server: turns, loads, absence, the auto-reply cap."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import redis
from redis.cluster import RedisCluster

from postroom import redis_connect
from postroom.store.assignment import CAP_WINDOW_SECONDS, RedisAssignmentState
from postroom.store.keyspace import away_key, open_counts_key, reply_cap_key
from postroom.store.redis import RedisStore
from postroom.tickets import StoreUnavailable

BOX = "support@example.test"
TEAM = ["meier", "mueller", "schulze"]


def make(url: str) -> RedisAssignmentState:
    return RedisAssignmentState.from_url(url, key_prefix="postroom", timeout=2.0)


def client(url: str) -> redis.Redis | RedisCluster:
    return redis_connect.client_from_url(url)


@pytest.fixture
def redis_url(any_redis_url: str) -> str:
    """The same state on one Redis, under Sentinel and on a Redis Cluster (every script in one slot)."""
    return any_redis_url


def test_round_robin_is_fair_over_1000_tickets_and_counts_them(redis_url: str) -> None:
    state = make(redis_url)
    owners = Counter(state.pick_round_robin(BOX, "support", TEAM) for _ in range(1000))
    assert owners == {"meier": 334, "mueller": 333, "schulze": 333}
    assert state.open_counts(BOX, TEAM) == dict(owners)


def test_round_robin_and_least_open_skip_agents_marked_away(redis_url: str) -> None:
    state = make(redis_url)
    r = client(redis_url)
    r.set(away_key("postroom", BOX, "mueller"), "", ex=3600)  # what #away does
    turns = [state.pick_round_robin(BOX, "support", TEAM) for _ in range(4)]
    assert turns == ["meier", "schulze", "meier", "schulze"]
    assert state.away(BOX, TEAM) == {"mueller"}
    # mueller has no open tickets at all, yet is away: the least loaded present agent is picked.
    assert state.pick_least_open(BOX, TEAM) == "meier"
    r.delete(away_key("postroom", BOX, "mueller"))
    assert state.pick_least_open(BOX, TEAM) == "mueller"
    for login in TEAM:
        r.set(away_key("postroom", BOX, login), "")
    assert state.pick_round_robin(BOX, "support", TEAM) == ""
    assert state.pick_least_open(BOX, TEAM) == ""


def test_least_open_follows_assignments_and_releases(redis_url: str) -> None:
    state = make(redis_url)
    state.count_assigned(BOX, "meier")
    state.count_assigned(BOX, "meier")
    state.count_assigned(BOX, "mueller")
    assert state.pick_least_open(BOX, TEAM) == "schulze"
    assert state.pick_least_open(BOX, TEAM) == "mueller"  # 1 vs meier's 2 and schulze's 1: first listed wins
    state.count_released(BOX, "meier")
    state.count_released(BOX, "meier")
    state.count_released(BOX, "meier")  # more releases than tickets must not make a negative load
    assert state.open_counts(BOX, TEAM) == {"meier": 0, "mueller": 2, "schulze": 1}
    assert state.pick_least_open(BOX, TEAM) == "meier"


def test_parallel_picks_never_share_a_turn(redis_url: str) -> None:
    state = make(redis_url)
    picks: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [make(redis_url).pick_round_robin(BOX, "support", TEAM) for _ in range(50)]
        with lock:
            picks.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(picks) == {"meier": 100, "mueller": 100, "schulze": 100}
    assert state.open_counts(BOX, TEAM) == {"meier": 100, "mueller": 100, "schulze": 100}


def test_auto_reply_cap_allows_five_a_day_per_correspondent(redis_url: str) -> None:
    state = make(redis_url)
    answers = [state.allow(BOX, "Alice@Customer.test", 5) for _ in range(7)]
    assert answers == [True] * 5 + [False] * 2
    assert state.allow(BOX, "bob@customer.test", 5)  # another correspondent has a cap of their own
    assert state.allow("sales@example.test", "alice@customer.test", 5)  # and so has another mailbox
    ttl = client(redis_url).ttl(reply_cap_key("postroom", BOX, "alice@customer.test"))
    assert 0 < ttl <= CAP_WINDOW_SECONDS
    assert not state.allow(BOX, "carol@customer.test", 0)  # a cap of 0 sends nothing


def test_cap_is_atomic_under_concurrency(redis_url: str) -> None:
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [make(redis_url).allow(BOX, "loop@customer.test", 5) for _ in range(10)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 5


def test_every_key_carries_the_mailbox_hash_tag(redis_url: str) -> None:
    state = make(redis_url)
    state.pick_round_robin(BOX, "support", TEAM)
    state.allow(BOX, "alice@customer.test", 5)
    r = client(redis_url)
    everywhere = {"target_nodes": RedisCluster.PRIMARIES} if isinstance(r, RedisCluster) else {}
    keys = sorted(str(k) for k in r.keys("*", **everywhere))
    assert keys == sorted(
        [
            open_counts_key("postroom", BOX),
            reply_cap_key("postroom", BOX, "alice@customer.test"),
            "postroom:{support@example.test}:rr:support",
        ]
    )
    assert all(k.startswith("postroom:{support@example.test}:") for k in keys)


def test_the_away_key_is_the_one_the_ticket_store_sets() -> None:
    store = RedisStore(redis.Redis(), "postroom")
    if not hasattr(store, "away_key"):
        pytest.skip("the ticket store has no away_key (issue 4 not merged)")
    assert store.away_key(BOX, "meier") == away_key("postroom", BOX, "meier")


def test_a_dead_redis_is_store_unavailable() -> None:
    state = RedisAssignmentState.from_url("redis://127.0.0.1:1/0", key_prefix="postroom", timeout=0.5)
    with pytest.raises(StoreUnavailable):
        state.pick_round_robin(BOX, "support", TEAM)
    with pytest.raises(StoreUnavailable):
        state.allow(BOX, "alice@customer.test", 5)
