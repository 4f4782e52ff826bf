"""From postroom's ``[redis]`` settings to a redis-py client: one Redis, a primary watched by Sentinel, or a Cluster.

Three forms, each through redis-py's own support for it (no home-made failover or slot routing):

- ``redis://host:port/db`` (also ``rediss://``, ``unix://``): one Redis server.
- ``redis+sentinel://[user:password@]host:port,host:port/SERVICE/db``, or ``url`` plus ``sentinels = ["host:port",
  ...]`` and ``service_name``: redis-py's :class:`redis.sentinel.Sentinel` asks the sentinels for the primary of
  SERVICE; after a failover the next connection goes to the new primary (no restart).  The URL's user and password
  are the data nodes'; sentinels that ask for a password of their own (``requirepass`` in sentinel.conf) get
  ``sentinel_password`` (and ``sentinel_username`` for an ACL user).
- ``redis+cluster://[user:password@]host:port[,host:port]``, or ``url`` plus ``cluster = true``: redis-py's
  :class:`redis.cluster.RedisCluster`; the hosts are seed nodes, the slot map comes from the cluster.  Cluster has
  database 0 only.

:func:`parse` checks a form and says what is wrong with it (the config schema calls it, so a mistake is a config
error naming the key); :func:`connect` builds the client.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:  # the config schema parses URLs with this module; only connect() needs redis-py
    import redis
    from redis.cluster import RedisCluster

__all__ = ["Target", "client_from_url", "connect", "node_for", "parse", "reason"]

Mode = Literal["single", "sentinel", "cluster"]

_SENTINEL_SCHEME = "redis+sentinel"
_CLUSTER_SCHEME = "redis+cluster"
_SINGLE_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class Target:
    """Where postroom's Redis is: parsed, checked, not yet connected."""

    mode: Mode
    url: str = ""  # single: the URL as given, for redis-py
    nodes: tuple[tuple[str, int], ...] = ()  # the sentinels, or the cluster's seed nodes
    service_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None  # the sentinels' own credentials, when they ask for them
    sentinel_password: str | None = None

    def describe(self) -> str:
        """For log lines: where, never the password."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes)
        if self.mode == "sentinel":
            return f"Redis primary of {self.service_name!r} (sentinels {hosts}), db {self.db}"
        if self.mode == "cluster":
            return f"Redis Cluster (seed nodes {hosts})"
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            return f"Redis at unix:{parts.path}"
        port = f":{parts.port}" if parts.port else ""
        return f"Redis at {parts.scheme}://{parts.hostname}{port}{parts.path}"


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {text!r} must be host:port")
    return host.strip("[]"), int(port)


def _hosts(netloc: str, what: str) -> tuple[tuple[str | None, str | None], tuple[tuple[str, int], ...]]:
    """user:password@ and the comma-separated hosts of a multi-host URL."""
    creds, _, hosts = netloc.rpartition("@")
    user, password = None, None
    if creds:
        name, sep, secret = creds.partition(":")
        user = unquote(name) or None
        password = unquote(secret) if sep else None
    nodes = tuple(_host_port(h, what) for h in hosts.split(",") if h.strip())
    if not nodes:
        raise ValueError(f"no {what} given (host:port,host:port)")
    return (user, password), nodes


def _db(text: str) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"database {text!r} must be a number")
    return int(text)


def _parse_sentinel_url(url: str) -> Target:
    parts = urlsplit(url)
    (user, password), nodes = _hosts(parts.netloc, "sentinel")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"{url.rsplit('@', maxsplit=1)[-1]!r}: the path must be /SERVICE or /SERVICE/DB")
    return Target("sentinel", nodes=nodes, service_name=path[0], db=_db(path[1] if len(path) > 1 else ""),
                  username=user, password=password)  # fmt: skip


def _parse_cluster_url(url: str) -> Target:
    parts = urlsplit(url)
    (user, password), nodes = _hosts(parts.netloc, "cluster node")
    if _db(parts.path.strip("/")) != 0:
        raise ValueError("Redis Cluster has database 0 only")
    return Target("cluster", nodes=nodes, username=user, password=password)


@dataclass(frozen=True)
class _Url:
    """What a redis:// (rediss://, unix://) URL says, for the forms that take their sentinels or nodes elsewhere."""

    username: str | None
    password: str | None
    db: int
    host: str
    port: int

    @staticmethod
    def of(url: str) -> _Url:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return _Url(None, None, 0, "", 0)
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{url.rsplit('@', maxsplit=1)[-1]!r}: bad port") from None
        user = unquote(parts.username or "") or None
        password = unquote(parts.password or "") or None
        return _Url(user, password, _db(parts.path.strip("/")), parts.hostname or "", port)


def _scheme(url: str) -> str:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in ("rediss+sentinel", "rediss+cluster"):
        raise ValueError(
            "TLS to Sentinel or Cluster nodes is not supported yet; use redis+sentinel:// or redis+cluster://"
        )
    if scheme not in (*_SINGLE_SCHEMES, _SENTINEL_SCHEME, _CLUSTER_SCHEME):
        raise ValueError(
            f"url must start with redis://, rediss://, unix://, {_SENTINEL_SCHEME}:// or {_CLUSTER_SCHEME}://"
        )
    return scheme


def _multi_host(url: str, scheme: str, sentinels: Sequence[str], service_name: str, cluster: bool) -> Target:
    """A redis+sentinel:// or redis+cluster:// url, which must not be given its hosts twice."""
    if scheme == _SENTINEL_SCHEME:
        if sentinels or cluster:
            raise ValueError("a redis+sentinel:// url names the sentinels itself: leave sentinels and cluster unset")
        target = _parse_sentinel_url(url)
        if service_name and service_name != target.service_name:
            raise ValueError(f"service_name {service_name!r} differs from the url's {target.service_name!r}")
        return target
    if sentinels:
        raise ValueError("Cluster and Sentinel exclude each other: Redis Cluster fails over by itself")
    return _parse_cluster_url(url)


def _with_keys(url: str, scheme: str, sentinels: Sequence[str], service_name: str, cluster: bool) -> Target:
    """A one-server url, turned into Sentinel or Cluster by the other [redis] keys, or taken as it is."""
    given = _Url.of(url)
    if sentinels and cluster:
        raise ValueError("Cluster and Sentinel exclude each other: Redis Cluster fails over by itself")
    if sentinels:
        if not service_name:
            raise ValueError("sentinels need service_name, the name the sentinels monitor the primary under")
        nodes = tuple(_host_port(s, "sentinel") for s in sentinels)
        return Target(
            "sentinel", nodes=nodes, service_name=service_name, db=given.db, username=given.username,
            password=given.password,
        )  # fmt: skip
    if service_name:
        raise ValueError("service_name is used only with sentinels")
    if not cluster:
        return Target("single", url=url)
    if scheme != "redis":
        raise ValueError("cluster = true needs a redis://host:port url (a seed node)")
    if given.db != 0:
        raise ValueError("Redis Cluster has database 0 only")
    seed = (given.host or "127.0.0.1", given.port)
    return Target("cluster", nodes=(seed,), username=given.username, password=given.password)


def parse(
    url: str,
    *,
    sentinels: Sequence[str] = (),
    service_name: str = "",
    cluster: bool = False,
    sentinel_username: str = "",
    sentinel_password: str = "",
) -> Target:
    """Check one ``[redis]`` setting; ValueError says what is wrong in words an admin can act on."""
    scheme = _scheme(url)
    if scheme in (_SENTINEL_SCHEME, _CLUSTER_SCHEME):
        target = _multi_host(url, scheme, sentinels, service_name, cluster)
    else:
        target = _with_keys(url, scheme, sentinels, service_name, cluster)
    if not (sentinel_username or sentinel_password):
        return target
    if target.mode != "sentinel":
        raise ValueError("sentinel_password and sentinel_username are used only with sentinels")
    if sentinel_username and not sentinel_password:
        raise ValueError("sentinel_username needs sentinel_password")
    return replace(target, sentinel_username=sentinel_username or None, sentinel_password=sentinel_password)


def connect(
    target: Target, timeout: float, on_connect: Callable[[Any], None] | None = None
) -> redis.Redis | RedisCluster:
    """A client with one connection pool (per node for Cluster), replies decoded as str.

    ``on_connect`` (one Redis, Sentinel) replaces redis-py's handshake on every new connection: the ticket store's
    restart watch (postroom.epoch).  Cluster runs its own handshake there and every node has its own run_id, so it
    is not given one: on Cluster an emptied node is noticed by the open script (NOEPOCH) instead.
    """
    import redis  # noqa: PLC0415 - see the TYPE_CHECKING import above
    from redis.backoff import NoBackoff  # noqa: PLC0415
    from redis.cluster import ClusterNode, RedisCluster  # noqa: PLC0415
    from redis.retry import Retry  # noqa: PLC0415
    from redis.sentinel import Sentinel  # noqa: PLC0415

    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "decode_responses": True}
    if on_connect is not None and target.mode != "cluster":
        common["redis_connect_func"] = on_connect
    if target.mode == "single":
        return redis.Redis.from_url(target.url, **common)
    common.update(username=target.username, password=target.password)
    if target.mode == "sentinel":
        # Each sentinel once per look-up, without redis-py's default retries: their backoff (seconds, growing)
        # held a mail that long when the sentinels refused the password.  The next mail asks them again.
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if target.sentinel_password:
            sentinel_kwargs.update(username=target.sentinel_username, password=target.sentinel_password)
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        return cast(redis.Redis, sentinel.master_for(target.service_name, db=target.db, **common))  # type: ignore[no-untyped-call]
    nodes = [ClusterNode(h, p) for h, p in target.nodes]  # type: ignore[no-untyped-call]
    return RedisCluster(startup_nodes=nodes, **common)


def client_from_url(url: str, timeout: float = 2.0) -> redis.Redis | RedisCluster:
    """Any of the three URL forms (tests, benchmarks, admin tools given a URL)."""
    return connect(parse(url), timeout)


def node_for(client: redis.Redis | RedisCluster, key: str) -> redis.Redis:
    """The plain client of the server that holds ``key``: the client itself, or on Cluster the slot's node (for
    pipelines and scripts of one mailbox, whose keys share one slot)."""
    from redis.cluster import RedisCluster  # noqa: PLC0415

    if not isinstance(client, RedisCluster):
        return client
    return client.get_redis_connection(client.get_node_from_key(key))  # type: ignore[no-untyped-call]


# redis-py's MasterNotFoundError lists each sentinel's client (its whole repr) beside the error it gave.
_SENTINEL_ERROR = re.compile(r"> - (?:\w+:)?(\w+)")


def reason(exc: BaseException) -> str:
    """A Redis error in one short line for the log and ``config check``.

    When no sentinel named a primary, redis-py's message carries the repr of every sentinel's client; this keeps
    the errors the sentinels gave and says what to do about a password they refused.
    """
    from redis.sentinel import MasterNotFoundError  # noqa: PLC0415 - see the TYPE_CHECKING import above

    text = str(exc)
    head, sep, _ = text.partition(" : <redis.")
    if not isinstance(exc, MasterNotFoundError) or not sep:
        return text
    errors = _SENTINEL_ERROR.findall(text)
    counts = ", ".join(f"{name} from {errors.count(name)}" for name in dict.fromkeys(errors))
    hint = ""
    if any("Authentication" in name for name in errors):
        hint = "; the sentinels ask for a password: set [redis] sentinel_password (or correct it)"
    return f"{head} (sentinels answered: {counts}){hint}"
