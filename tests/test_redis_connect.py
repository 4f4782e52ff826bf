"""[redis] settings: the three forms, every mistake a config error naming the key, never a traceback."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.admin.common import redis_client, redis_store
from postroom.config import ConfigError, example_config_path, load_config, parse_config
from postroom.redis_connect import Target, parse
from postroom.tickets import NewTicket, StoreUnavailable
from postroom_testbed.ha import RedisSentinelSet


def redis_config(**redis: object) -> dict[str, object]:
    data = load_config(example_config_path(), environ={}).model_dump()
    data["redis"] = {**data["redis"], **redis}
    return data


def test_one_redis_is_taken_as_redis_py_reads_it() -> None:
    assert parse("redis://:secret@10.0.0.5:6380/2") == Target("single", url="redis://:secret@10.0.0.5:6380/2")
    assert parse("unix:///run/redis/redis.sock?db=1").mode == "single"


def test_sentinel_url_names_the_sentinels_service_and_database() -> None:
    target = parse("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26379,[::1]:26380/support/3")
    assert target == Target(
        "sentinel",
        nodes=(("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380)),
        service_name="support",
        db=3,
        password="s3cret",
    )
    assert "s3cret" not in target.describe()


def test_sentinels_as_keys_take_password_and_database_from_the_url() -> None:
    target = parse("redis://:pw@ignored/4", sentinels=["a:26379", "b:26379"], service_name="mymaster")
    assert (target.mode, target.nodes, target.service_name, target.db, target.password) == (
        "sentinel",
        (("a", 26379), ("b", 26379)),
        "mymaster",
        4,
        "pw",
    )


def test_cluster_from_url_or_key() -> None:
    assert parse("redis+cluster://n1:7000,n2:7001").nodes == (("n1", 7000), ("n2", 7001))
    assert parse("redis://n1:7000/0", cluster=True) == Target("cluster", nodes=(("n1", 7000),))


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"url": "http://x"}, "url must start with"),
        ({"url": "redis+sentinel://h:26379"}, "/SERVICE"),
        ({"url": "redis+sentinel:///svc/0"}, "no sentinel given"),
        ({"url": "redis+sentinel://h:port/svc"}, "must be host:port"),
        ({"url": "redis+sentinel://h:26379/svc/x"}, "must be a number"),
        ({"url": "redis+cluster://h:7000/3"}, "database 0 only"),
        ({"url": "rediss+cluster://h:7000"}, "TLS"),
        ({"sentinels": ["h:26379"]}, "need service_name"),
        ({"service_name": "svc"}, "only with sentinels"),
        ({"sentinels": ["h:26379"], "service_name": "s", "cluster": True}, "exclude each other"),
        ({"url": "redis://h:7000/2", "cluster": True}, "database 0 only"),
        ({"url": "redis+sentinel://h:1/a/0", "service_name": "b"}, "differs"),
        ({"url": "redis+sentinel://h:1/a/0", "sentinels": ["h:2"]}, "leave sentinels"),
        ({"sentinel_password": "pw"}, "only with sentinels"),
        ({"url": "redis+cluster://h:7000", "sentinel_password": "pw"}, "only with sentinels"),
        ({"url": "redis+sentinel://h:1/a/0", "sentinel_username": "u"}, "needs sentinel_password"),
    ],
)
def test_mistakes_are_config_errors_that_say_what_to_fix(changes: dict[str, object], complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(redis_config(**changes), "postroom.toml", environ={})
    # Problems read "FILE[:LINE]: KEY: message" (config check's format); the key is the section or its url.
    named = [p for p in caught.value.problems if re.search(r"(^|: )redis(\.url)?: ", p)]
    assert any(complaint in p for p in named), caught.value.problems


@given(st.text(max_size=80), st.lists(st.text(max_size=20), max_size=3), st.text(max_size=10), st.booleans())
def test_any_setting_is_a_target_or_a_value_error(url: str, sentinels: list[str], service: str, cluster: bool) -> None:
    try:
        target = parse(url, sentinels=sentinels, service_name=service, cluster=cluster)
    except ValueError as exc:
        assert str(exc)  # a message for the admin, not an empty error
    else:
        assert target.mode in ("single", "sentinel", "cluster")


def test_the_environment_override_takes_a_sentinel_url() -> None:
    url = "redis+sentinel://127.0.0.1:26379/postroom/0"
    config = parse_config(redis_config(), environ={"POSTROOM_REDIS_URL": url})
    assert config.redis.target().mode == "sentinel"


def test_an_unreachable_cluster_at_start_is_one_clear_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """redis-py builds a Cluster client only from a reachable node's slot map (one Redis and Sentinel start anyway)."""
    config = parse_config(redis_config(url="redis+cluster://:pw@127.0.0.1:1"), environ={})
    with pytest.raises(SystemExit) as exited:
        redis_client(config)
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Redis Cluster (seed nodes 127.0.0.1:1) is not reachable:") and "pw" not in err


def test_the_sentinels_password_is_a_key_or_an_environment_override_and_not_the_data_nodes() -> None:
    url = "redis+sentinel://:data-pw@127.0.0.1:26379/postroom/0"
    from_file = parse_config(redis_config(url=url, sentinel_password="s3nt", sentinel_username="pr"), environ={})
    target = from_file.redis.target()
    assert (target.password, target.sentinel_username, target.sentinel_password) == ("data-pw", "pr", "s3nt")
    from_env = parse_config(redis_config(url=url), environ={"POSTROOM_REDIS_SENTINEL_PASSWORD": "s3nt"})
    assert from_env.redis.target().sentinel_password == "s3nt"
    assert "s3nt" not in from_env.redis.target().describe()


@pytest.fixture(scope="module")
def guarded_sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelSet]:
    """Sentinels with a requirepass of their own in front of a primary without one."""
    with RedisSentinelSet(tmp_path_factory.mktemp("guarded"), replicas=0, sentinel_password="s3nt-pw").start() as s:
        yield s


def test_sentinels_that_ask_for_a_password_get_it_and_the_primary_does_not(
    guarded_sentinels: RedisSentinelSet,
) -> None:
    # The primary has no password: were the sentinels' sent to it as well, Redis would refuse the AUTH.
    config = parse_config(redis_config(url=guarded_sentinels.url, sentinel_password="s3nt-pw"), environ={})
    store = redis_store(config)  # as the daemons make it
    ticket = store.open("support@example.test", NewTicket("alice@customer.test", "Hi", ("alice@customer.test",), ()), 1)
    assert ticket.number == 1


@pytest.mark.parametrize("password", ["", "wrong"])
def test_a_missing_or_wrong_sentinel_password_is_one_line_that_says_which_key(
    guarded_sentinels: RedisSentinelSet, password: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = parse_config(redis_config(url=guarded_sentinels.url, sentinel_password=password), environ={})
    store = redis_store(config)
    admins = [sentinel.client() for sentinel in guarded_sentinels.sentinels]
    before = [int(a.info("stats")["total_connections_received"]) for a in admins]
    with pytest.raises(StoreUnavailable) as caught:
        store.open("support@example.test", NewTicket("alice@customer.test", "Hi", ("alice@customer.test",), ()), 1)
    # Each sentinel asked once (2: room for a sentinel's own reconnect): redis-py's default retries, three more
    # connections each after a growing pause, held the mail for about 12 s.
    asked = [int(a.info("stats")["total_connections_received"]) - b for a, b in zip(admins, before, strict=True)]
    assert all(1 <= n <= 2 for n in asked), asked
    said = str(caught.value)
    # redis-py's own message carries the repr of every sentinel's client, several hundred characters each.
    assert "set [redis] sentinel_password" in said and "<redis." not in said and len(said) < 300, said
    assert "from 3" in said  # each of the three sentinels refused
