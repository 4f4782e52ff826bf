"""Shared fixtures: private services started per test session, never the machine's own leftovers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from postroom import redis_connect
from postroom.config import Config, example_config_path, load_config, parse_config
from postroom_testbed import ADAPTERS, Deployment, RedisServer, deploy
from postroom_testbed.ha import PostgresServer, RedisClusterSet, RedisSentinelSet

# The local PostgreSQL server (Debian's postgresql package, started by .ci/run); each test run makes its own
# database there and drops it afterwards, so nothing depends on what the server held before.
PG_ADMIN_URL = os.environ.get("POSTROOM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A private Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture(scope="session")
def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelSet]:
    """A primary, a replica and three sentinels, shared by the tests that leave the primary running."""
    with RedisSentinelSet(tmp_path_factory.mktemp("sentinel")).start() as servers:
        yield servers


@pytest.fixture(scope="session")
def cluster_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterSet]:
    """Three primaries in cluster mode (redis-cli --cluster create)."""
    with RedisClusterSet(tmp_path_factory.mktemp("cluster")).start() as servers:
        yield servers


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL (initdb + pg_ctl in a temp dir) that tests may stop and restart."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.remove()


REDIS_MODES = ("single", "sentinel", "cluster")


def empty_redis_url(request: pytest.FixtureRequest, mode: str) -> str:
    """The URL of the session's Redis of ``mode`` (single, sentinel or cluster), emptied first."""
    url: str
    if mode == "single":
        url = request.getfixturevalue("redis_server").url
    elif mode == "sentinel":
        url = request.getfixturevalue("sentinel_set").url
    else:
        cluster: RedisClusterSet = request.getfixturevalue("cluster_set")
        cluster.flush()
        return cluster.url
    client = redis_connect.client_from_url(url)
    client.flushall()
    client.close()
    return url


@pytest.fixture(params=REDIS_MODES)
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """The same tests against one Redis, a Sentinel-watched primary and a 3-primary Cluster, emptied before each."""
    return empty_redis_url(request, request.param)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"postroom_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as exc:
        pytest.fail(
            f"PostgreSQL at {PG_ADMIN_URL} is needed for the history tests ({exc}); "
            "install and start it: apt-get install postgresql (bash .ci/run does this)"
        )
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'history.sqlite3'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both back ends the history supports, SQLite (embedded default) and PostgreSQL (production)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.sqlite3'}"
    base: str = request.getfixturevalue("pg_url")
    # One schema per test keeps the PostgreSQL runs independent inside the session's database.
    schema = f"t_{uuid.uuid4().hex[:10]}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return f"{base}?options=-csearch_path%3D{schema}"


# -- end to end: a private Postfix + Dovecot + Redis with the real postroom daemon in front of Dovecot --

CUSTOMERS = ("alice@customer.test", "bob@customer.test", "mallory@customer.test")


def e2e_base_config() -> Config:
    """The shipped example config plus a second mailbox, for the two-mailbox tests."""
    data = load_config(example_config_path(), environ={}).model_dump()
    # Sales lets agents answer each other's tickets, to test the "warn" policy beside support's "reject".
    data["mailboxes"]["sales"] = {
        "address": "sales@example.test",
        "tag": "Sales",
        "agents": ["schulze", "mueller"],
        "on_rival_reply": "warn",
    }
    return parse_config(data, environ={})


# Every behaviour test runs through both adapters: the milter and the after-queue content filter (postroom smtpd)
# share one pipeline, so they must show the user the same results, except where a test says why not.
@pytest.fixture(scope="session", params=ADAPTERS)
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """One deployment per adapter shared by the tests that leave it as they found it."""
    with deploy(e2e_base_config(), CUSTOMERS, adapter=request.param) as d:
        yield d


@pytest.fixture(params=ADAPTERS)
def own_deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """A deployment of its own, for tests that stop or break a part of it."""
    with deploy(e2e_base_config(), CUSTOMERS, adapter=request.param) as d:
        yield d
