"""``postroom config check``: the pre-flight an administrator runs before starting a daemon.

It loads everything the daemons load (the config, the rules file, the auto-reply templates, the DKIM keys and the
canned replies) and reports every mistake of all of them in one run, each as ``FILE:LINE: key: message``.  With
``connect`` it also reaches Redis (and says whether it persists with AOF, which postroom's ticket counters want)
and the SQL database (and says whether its schema is current).  It changes nothing: no database file, no folder
and no Redis key is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from postroom import redis_connect
from postroom.bundle import Loaded, LoadError, load_all
from postroom.config import Config, ConfigError, config_lines, load_config, read_toml, resolve_paths
from postroom.history import current_revision, head_revision
from postroom.words import plural


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check(path: Path, *, connect: bool, environ: dict[str, str] | None = None) -> Report:
    report = Report()
    name = os.fspath(path)
    try:
        load_config(name, environ)
    except ConfigError as exc:
        # The files the config names are loaded only from a valid config: look for missing ones in the raw text.
        report.errors += sorted(exc.problems + _missing_files(name), key=_line_of)
        return report
    try:
        loaded = load_all(name, environ)
    except LoadError as exc:
        report.errors += exc.problems
        return report
    _content(name, loaded, report)
    if connect:
        _connect_redis(loaded.config, report)
        _connect_database(loaded.config, report)
    return report


def _line_of(problem: str) -> int:
    parts = problem.split(":", 2)
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


def _missing_files(name: str) -> list[str]:
    """The files and folders a config names that do not exist, from its raw document (which did not validate)."""
    try:
        data, lines = read_toml(name)
    except ConfigError:
        return []
    resolve_paths(data, Path(name).resolve().parent)
    wanted: list[tuple[tuple[str, ...], Any, bool]] = [(("rules_file",), data.get("rules_file"), False)]
    for domain, entry in _tables(data, "dkim"):
        wanted.append((("dkim", domain, "key_file"), entry.get("key_file"), False))
    for key, box in _tables(data, "mailboxes"):
        wanted.append((("mailboxes", key, "canned_dir"), box.get("canned_dir"), True))
    out = []
    for where, value, folder in wanted:
        if isinstance(value, str) and value and not (Path(value).is_dir() if folder else Path(value).is_file()):
            kind = "folder" if folder else "file"
            out.append(f"{name}:{lines.line(where)}: {'.'.join(where)}: {value}: no such {kind}")
    return out


def _tables(data: dict[str, Any], section: str) -> list[tuple[str, dict[str, Any]]]:
    table = data.get(section)
    if not isinstance(table, dict):
        return []
    return [(k, v) for k, v in table.items() if isinstance(v, dict)]


def _content(name: str, loaded: Loaded, report: Report) -> None:
    """What loads but cannot work: no mailbox at all, a mailbox nobody works, reply templates that are missing."""
    config = loaded.config
    lines = config_lines(name)
    for key, box in config.mailboxes.items():
        if not box.agents:
            line = lines.line(("mailboxes", key))
            report.warnings.append(f"{name}:{line}: mailboxes.{key}.agents: empty: nobody can answer its mail")
    problem = _sqlite_folder(config.database.url)
    if problem:
        report.errors.append(f"{name}:{lines.line(('database', 'url'))}: database.url: {problem}")
    templates_dir = Path(config.autoreply.templates_dir)
    if not templates_dir.is_dir():
        line = lines.line(("autoreply", "templates_dir"))
        report.warnings.append(
            f"{name}:{line}: autoreply.templates_dir: {templates_dir}: no such folder "
            "(no auto-reply can be sent until it exists and acknowledge = true)"
        )
    templates = len(loaded.templates)
    report.notes.append(
        f"{plural(len(config.mailboxes), 'mailbox')}, {plural(len(config.agents), 'agent')}, "
        f"{plural(len(loaded.rules.rules), 'rule')}, {plural(len(config.dkim), 'DKIM key')}, "
        f"{plural(templates, 'reply template')}, "
        f"{plural(sum(len(c) for c in loaded.canned.values()), 'canned reply')}"
    )


def _sqlite_folder(url: str) -> str:
    """Why a SQLite database file cannot be created where the URL says ("" if it can)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return ""
    folder = Path(parsed.database).parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder, so {parsed.database} cannot be created"
    if not os.access(folder, os.W_OK | os.X_OK) and not Path(parsed.database).exists():
        return f"{folder} is not writable, so {parsed.database} cannot be created"
    return ""


def redis_persistence(client: redis.Redis) -> tuple[bool, str]:
    """(AOF on?, a description of how this Redis keeps its data over a restart)."""
    info = client.info("persistence")
    aof = bool(int(info.get("aof_enabled", 0)))
    try:
        save = str(client.config_get("save").get("save", ""))
    except redis.ResponseError:  # CONFIG renamed or disabled (managed Redis)
        save = "unknown"
    if aof:
        fsync = client.config_get("appendfsync").get("appendfsync", "?")
        return True, f"AOF (appendfsync {fsync})"
    if save and save != "unknown":
        return False, f"RDB snapshots only (save {save}): a crash loses the writes since the last snapshot"
    return False, "none: a restart loses every ticket counter and owner" if save == "" else "RDB settings unknown"


def _connect_redis(config: Config, report: Report) -> None:
    url = config.redis.url
    try:
        # The daemons' own way in (one Redis, Sentinel or Cluster, with the section's other keys).
        client = redis_connect.connect(config.redis.target(), config.redis.timeout_seconds)
    except (redis.RedisError, RedisClusterException) as exc:
        report.errors.append(f"redis.url {_safe(url)}: cannot reach Redis: {redis_connect.reason(exc)}")
        return
    try:
        # On a Cluster every primary keeps its own data: one node's settings stand for the deployment's
        # (deploy-ha.md asks for the same on every node).
        node = (
            client.get_redis_connection(client.get_default_node())  # type: ignore[no-untyped-call]
            if isinstance(client, RedisCluster)
            else client
        )
        version = node.info("server").get("redis_version", "?")
        aof, how = redis_persistence(node)
    except redis.RedisError as exc:
        report.errors.append(f"redis.url {_safe(url)}: cannot reach Redis: {redis_connect.reason(exc)}")
        return
    finally:
        client.close()
    report.notes.append(f"Redis {version} at {_safe(url)}: reachable; persistence: {how}")
    if not aof:
        report.warnings.append(
            f"Redis at {_safe(url)} runs without AOF: turn on appendonly yes so ticket numbers survive a crash"
        )


def _connect_database(config: Config, report: Report) -> None:
    url = config.database.url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        file = Path(parsed.database)
        if not file.exists():
            report.notes.append(f"database {url}: no file yet (postroom db upgrade creates it and its folder)")
            return
    try:
        current = current_revision(url)
    except SQLAlchemyError as exc:
        report.errors.append(f"database.url {_safe(url)}: cannot connect: {getattr(exc, 'orig', None) or exc}")
        return
    newest = head_revision()
    if current == newest:
        report.notes.append(f"database {_safe(url)}: reachable, schema at the newest revision {newest}")
    else:
        state = "has no postroom schema yet" if current is None else f"schema at revision {current}"
        report.notes.append(
            f"database {_safe(url)}: reachable, {state}; postroom db upgrade (or auto_migrate) brings it to {newest}"
        )


def _safe(url: str) -> str:
    """A URL as it may be printed: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True) if "://" in url else url
    except Exception:  # noqa: BLE001  (printing must never fail)
        return url.rsplit("@", maxsplit=1)[-1]
