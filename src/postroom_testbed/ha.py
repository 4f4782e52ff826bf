"""Replicated Redis and a private PostgreSQL on loopback, for the scale-out tests and bench/ha.py.

- :class:`RedisSentinelSet`: a primary, replicas and three sentinels (``redis-server --sentinel``) watching them.
- :class:`RedisClusterSet`: three primaries in cluster mode, joined with ``redis-cli --cluster create``.
- :class:`PostgresServer`: ``initdb`` + ``pg_ctl`` of Debian's PostgreSQL in a temp dir on a free port, run as the
  ``postgres`` user, so a test can stop, restart or kill it without touching the machine's own cluster.
- :class:`MxHosts`: two (or more) MX hosts, a private Postfix and ``postroom milter`` each, in front of one Dovecot,
  sharing one of the Redis sets above and one SQL database.

Every server runs in the foreground as a child of this process (its own session), so a SIGKILL hits the
redis-server itself, which is what a failover test needs.  Recipes: /work/shared/HARNESS.md.
"""

from __future__ import annotations

import copy
import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import redis

from postroom import redis_connect
from postroom.config import Config, to_toml, with_changes
from postroom_testbed.daemons import MilterDaemon
from postroom_testbed.deploy import Deployment
from postroom_testbed.dovecot import Login, MailUser
from postroom_testbed.postfix import Postfix
from postroom_testbed.processes import LOOPBACK, StackError, _binary, _mkdir, _wait_listening, free_port, log_tail
from postroom_testbed.redis_server import RedisServer
from postroom_testbed.stack import Stack

__all__ = ["HostDeployment", "MxHosts", "PostgresServer", "RedisClusterSet", "RedisNode", "RedisSentinelSet"]

SERVICE_NAME = "postroom"
_STOP_TIMEOUT = 10.0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free too, below the kernel's ephemeral range.

    free_port() hands out ephemeral ports (32768 and up), whose bus port would be above 65535.
    """
    for _ in range(200):
        port = random.randint(12000, 22000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise StackError("no free port pair P, P + 10000 on 127.0.0.1")


class RedisNode(RedisServer):
    """One redis-server process (plain, replica, cluster node or sentinel) with its own config file; started, stopped
    and port-clash-retried as :class:`postroom_testbed.RedisServer` is."""

    def __init__(
        self, workdir: Path, name: str, settings: Sequence[str], *, sentinel: bool = False, cluster: bool = False
    ) -> None:
        super().__init__(workdir / name)
        self.name = name
        self.cluster = cluster
        if cluster:
            self.port = cluster_port()
        self.settings = list(settings)
        self.sentinel = sentinel
        self.config_path = self.dir / "redis.conf"
        self.password: str | None = None  # its requirepass, for client()

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def _new_ports(self) -> None:
        self.port = cluster_port() if self.cluster else free_port()

    def _start_once(self) -> None:
        _mkdir(self.dir)
        lines = [
            f"port {self.port}",
            f"bind {LOOPBACK}",
            f"dir {self.dir}",
            f"logfile {self.log_path}",
            "daemonize no",
            "protected-mode no",
        ]
        if not self.sentinel:
            lines += ['save ""', "appendonly no"]
        # Sentinels rewrite their file (known replicas, epochs): written once, kept over a restart.
        if not (self.sentinel and self.config_path.exists()):
            self.config_path.write_text("\n".join(lines + self.settings) + "\n")
        cmd = [_binary("redis-server"), str(self.config_path)] + (["--sentinel"] if self.sentinel else [])
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_listening([self.port], self._proc, f"redis {self.name}", self.log_path)

    def kill(self) -> None:
        """SIGKILL, as a crashed host would end it: no goodbye to replicas or sentinels."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(_STOP_TIMEOUT)

    def client(self) -> redis.Redis:
        return redis.Redis(LOOPBACK, self.port, password=self.password, decode_responses=True, socket_timeout=5)


class _Servers:
    nodes: list[RedisNode]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisSentinelSet(_Servers):
    """A primary, ``replicas`` replicas and three sentinels (quorum 2) for the service ``postroom``.

    Failure detection is fast for tests (``down-after-milliseconds 3000``); a production set keeps Redis's
    defaults or what docs/deploy-ha.md says.  Not faster: a sentinel pings once a second and starts its wait for
    a new primary's first answer when it switches to it, so at 1000 a busy machine made the sentinels declare the
    freshly promoted primary down as well and fail over a second time (seen in a CI run under load).
    """

    def __init__(self, workdir: Path, replicas: int = 1, sentinel_password: str | None = None) -> None:
        """``sentinel_password``: the sentinels' own requirepass (the data nodes stay without one)."""
        self.workdir = _mkdir(workdir)
        self.sentinel_password = sentinel_password
        # A replica's first sync starts at once instead of after Redis 7's 5 s diskless-sync delay.
        fast_sync = ["repl-diskless-sync-delay 0"]
        self.primary = RedisNode(workdir, "primary", fast_sync)
        self.replicas = [RedisNode(workdir, f"replica{i}", fast_sync) for i in range(replicas)]
        self.sentinels: list[RedisNode] = []
        self.nodes = [self.primary, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE_NAME}/0"

    def start(self) -> RedisSentinelSet:
        try:
            self.primary.start()
            for replica in self.replicas:
                replica.settings.append(f"replicaof {LOOPBACK} {self.primary.port}")
                replica.start()
            self._wait_replicas_online()
            monitor = [
                f"sentinel monitor {SERVICE_NAME} {LOOPBACK} {self.primary.port} 2",
                f"sentinel down-after-milliseconds {SERVICE_NAME} 3000",
                f"sentinel failover-timeout {SERVICE_NAME} 5000",
                "sentinel resolve-hostnames no",
            ]
            if self.sentinel_password:
                # Every sentinel of a set has the same one: they also log in to each other with it.
                monitor.append(f"requirepass {self.sentinel_password}")
            self.sentinels = [RedisNode(self.workdir, f"sentinel{i}", monitor, sentinel=True) for i in range(3)]
            self.nodes += self.sentinels
            for sentinel in self.sentinels:
                sentinel.password = self.sentinel_password
                sentinel.start()
            self._wait_sentinels_agree()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_replicas_online(self, timeout: float = 20.0) -> None:
        """Every replica finished its first full sync (state "online", not "wait_bgsave")."""
        deadline = time.monotonic() + timeout
        client = self.primary.client()
        while True:
            info = client.info("replication")
            states = [info.get(f"slave{i}", {}).get("state") for i in range(len(self.replicas))]
            if states == ["online"] * len(self.replicas):
                break
            if time.monotonic() > deadline:
                raise StackError(f"replicas not in sync ({states}):\n{log_tail(self.primary.log_path)}")
            time.sleep(0.05)
        client.close()

    def _wait_sentinels_agree(self, timeout: float = 20.0) -> None:
        """Every sentinel knows the other two and the replicas, so a failover can be voted on at once."""
        deadline = time.monotonic() + timeout
        while True:
            ready = 0
            for sentinel in self.sentinels:
                state = cast(dict[str, Any], sentinel.client().sentinel_master(SERVICE_NAME))
                if int(state["num-other-sentinels"]) == 2 and int(state["num-slaves"]) == len(self.replicas):
                    ready += 1
            if ready == len(self.sentinels):
                return
            if time.monotonic() > deadline:
                raise StackError(f"sentinels did not see each other:\n{log_tail(self.sentinels[0].log_path)}")
            time.sleep(0.1)

    def master_address(self) -> tuple[str, int]:
        """The primary as the sentinels see it now."""
        return _named_primary(self.sentinels[0])

    def node_at(self, address: tuple[str, int]) -> RedisNode:
        for node in (self.primary, *self.replicas):
            if node.address == address:
                return node
        raise StackError(f"no node of this set at {address}")

    def wait_failover(self, old: tuple[str, int], timeout: float = 30.0) -> tuple[str, int]:
        """Wait until every sentinel names a primary other than ``old``, finished failing over and sees it up,
        and it answers as a primary with every other surviving replica in sync again (the sentinels re-point them
        after the promotion)."""
        deadline = time.monotonic() + timeout
        survivors = len(self.replicas) - 1
        while time.monotonic() < deadline:
            named = {_named_primary(s) for s in self.sentinels}
            if len(named) == 1 and all(_settled(s) for s in self.sentinels):
                new = named.pop()
                info = self.node_at(new).client().info("replication") if new != old else {}
                online = [info.get(f"slave{i}", {}).get("state") for i in range(survivors)]
                if info.get("role") == "master" and online == ["online"] * survivors:
                    return new
            time.sleep(0.1)
        raise StackError(f"no failover from {old} within {timeout:.0f}s:\n{log_tail(self.sentinels[0].log_path)}")


def _settled(sentinel: RedisNode) -> bool:
    """The sentinel's primary is neither being failed over nor (subjectively) down."""
    flags = str(cast(dict[str, Any], sentinel.client().sentinel_master(SERVICE_NAME))["flags"])
    return flags.split(",") == ["master"]


def _named_primary(sentinel: RedisNode) -> tuple[str, int]:
    host, port = cast(tuple[str, int], sentinel.client().sentinel_get_master_addr_by_name(SERVICE_NAME))
    return str(host), int(port)


def _cluster_state(node: RedisNode) -> str:
    info = node.client().execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
    # redis-py parses CLUSTER INFO into a dict on a plain client; the raw text has "cluster_state:ok" lines.
    if isinstance(info, dict):
        return str(info.get("cluster_state", ""))
    return dict(line.split(":", 1) for line in str(info).split() if ":" in line).get("cluster_state", "")


class RedisClusterSet(_Servers):
    """Three primaries in cluster mode (no replicas) covering all 16384 slots."""

    def __init__(self, workdir: Path, primaries: int = 3) -> None:
        self.workdir = _mkdir(workdir)
        self.nodes = [
            RedisNode(workdir, f"node{i}", ["cluster-enabled yes", "cluster-node-timeout 2000"], cluster=True)
            for i in range(primaries)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://{LOOPBACK}:{self.nodes[0].port}/0"

    def start(self) -> RedisClusterSet:
        try:
            for node in self.nodes:
                node.settings.append(f"cluster-config-file {node.dir / 'nodes.conf'}")
                node.start()
            cmd = [_binary("redis-cli"), "--cluster", "create"]
            cmd += [f"{LOOPBACK}:{n.port}" for n in self.nodes]
            cmd += ["--cluster-replicas", "0", "--cluster-yes"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
            if done.returncode != 0 or "All 16384 slots covered" not in done.stdout:
                raise StackError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
            self._wait_cluster_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_cluster_ok(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(_cluster_state(n) == "ok" for n in self.nodes):
            if time.monotonic() > deadline:
                raise StackError(f"cluster not ok:\n{log_tail(self.nodes[0].log_path)}")
            time.sleep(0.1)

    def flush(self) -> None:
        for node in self.nodes:
            node.client().flushall()


def _pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise StackError("PostgreSQL's initdb not found under /usr/lib/postgresql (apt-get install postgresql)")
    return Path(found[-1]).parent


class PostgresServer:
    """A private PostgreSQL cluster in a temp dir of its own on a free loopback port; trust auth, user postgres."""

    def __init__(self) -> None:
        # Its own temp dir, not the caller's: the server runs as postgres, which cannot enter pytest's 0700 dirs.
        self.root = Path(tempfile.mkdtemp(prefix="postroom-pg-"))
        self.dir = _mkdir(self.root / "data", 0o700)
        self.log_path = self.root / "postgres.log"
        self.socket_dir = _mkdir(self.root / "sock")
        self.port = free_port()
        self._bin = _pg_bindir()
        self._user = "postgres"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"postroom_{uuid.uuid4().hex[:10]}"
        self._run("createdb", "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        # initdb and the server refuse to run as root; the Debian package made the postgres user.
        cmd = [str(self._bin / args[0]), *args[1:]]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, user=self._user, cwd="/"
        )
        if done.returncode != 0:
            raise StackError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}\n{log_tail(self.log_path)}")
        return done

    def start(self) -> PostgresServer:
        uid = pwd.getpwnam(self._user).pw_uid
        self.log_path.touch()
        for path in (self.root, self.dir, self.socket_dir, self.log_path):
            os.chown(path, uid, -1)
        if not (self.dir / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.restart()
        return self

    def restart(self) -> None:
        """Start the server (again): a test's primary restart."""
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses={LOOPBACK} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.dir), "-l", str(self.log_path), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast`` (or ``immediate``, a crash); nothing when it is not running."""
        if (self.dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.dir), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop the server at once and delete its files."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class HostDeployment(Deployment):
    """One MX host of :class:`MxHosts`: its own Postfix and milter; Dovecot, Redis and SQL shared with the others."""

    def redis_client(self) -> redis.Redis:
        # The shared Redis (Sentinel or Cluster), not the stack's private one; a Cluster client answers the same
        # single-key commands the tests use.
        return cast(redis.Redis, redis_connect.client_from_url(self.config.redis.url))


class MxHosts:
    """Several MX hosts in front of one mailbox server: a private Postfix and ``postroom milter`` each, all
    delivering into one Dovecot over LMTP and sharing one Redis (``redis_url``) and one SQL database.

    ``hosts[i]`` is a :class:`postroom_testbed.Deployment` whose stack sends through host i's Postfix and reads
    the shared Dovecot, so the single-host e2e helpers work per host.
    """

    def __init__(
        self,
        base: Config,
        *,
        redis_url: str,
        database_url: str,
        hosts: int = 2,
        customers: Sequence[str] = (),
        workers: int = 0,
        milter_default_action: str = "accept",
    ) -> None:
        self.base = base
        self.redis_url = redis_url
        self.database_url = database_url
        self.count = hosts
        self.customers = list(customers)
        self.workers = workers
        self.milter_default_action = milter_default_action
        self.hosts: list[HostDeployment] = []
        self._extra_postfix: list[Postfix] = []
        self._stack: Stack | None = None

    def start(self) -> MxHosts:
        addresses = [box.address for box in self.base.mailboxes.values()]
        addresses += [agent.address for agent in self.base.agents.values()]
        users = [MailUser(a) for a in dict.fromkeys([*addresses, *self.customers])]
        logins = [Login(name) for name in self.base.agents]
        stack = Stack(users=users, logins=logins, milter="auto", milter_default_action=self.milter_default_action)
        self._stack = stack.start()
        try:
            for i in range(self.count):
                self.hosts.append(self._start_host(stack, i))
        except BaseException:
            self.stop()
            raise
        return self

    def _start_host(self, stack: Stack, i: int) -> HostDeployment:
        if i == 0:
            postfix, socket_path = stack.postfix, stack.milter_socket_path
        else:
            socket_path = stack.root / f"mx{i}.sock"
            postfix = Postfix(
                stack.root / f"mx{i}",
                lmtp_port=stack.dovecot.lmtp_port,
                auth_port=stack.dovecot.auth_port,
                domains=stack.domains,
                mailboxes=[u.address for u in stack.users],
                milter=f"unix:{socket_path}",
                milter_default_action=self.milter_default_action,
            )
            self._extra_postfix.append(postfix)
            postfix.start()
        view = copy.copy(stack)
        view._postfix = postfix  # this host's Postfix; Dovecot (and the unused private Redis) are shared
        config = with_changes(
            self.base,
            {
                "milter": {"socket": f"unix:{socket_path}", "socket_umask": 0, "workers": self.workers},
                "redis": {"url": self.redis_url},
                "database": {"url": self.database_url},
                "mailer": {"host": LOOPBACK, "port": postfix.smtp_port},
            },
        )
        daemon = MilterDaemon(stack.root / f"postroom{i}", to_toml(config), socket_path)
        daemon.start()
        return HostDeployment(view, daemon, config)

    def stop(self) -> None:
        for host in self.hosts:
            host.daemon.stop()
        for postfix in self._extra_postfix:
            postfix.stop()
        if self._stack is not None:
            self._stack.stop()

    def __enter__(self) -> MxHosts:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
