"""The one configuration schema, its TOML loader and the environment overrides.

Every key has a type, a default and a comment in ``examples/postroom.toml`` (package data); unknown keys and bad values
are errors that name the file and the key.  A loaded :class:`Config` is immutable: a reload builds a new one, so a
connection keeps the config it started with.
"""

from __future__ import annotations

import datetime
import os
import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from postroom import redis_connect
from postroom.redis_connect import Target
from postroom.tomllines import KeyLines, key_lines

# Deployment and tests point the same file at other services without editing it.
ENV_OVERRIDES: Mapping[str, tuple[str, str]] = {
    "POSTROOM_REDIS_URL": ("redis", "url"),
    "POSTROOM_REDIS_SENTINEL_PASSWORD": ("redis", "sentinel_password"),
    "POSTROOM_DATABASE_URL": ("database", "url"),
    "POSTROOM_MILTER_SOCKET": ("milter", "socket"),
}

_LOCAL_PART = r"[A-Za-z0-9!#$%&'*/=?^_`{|}~.-]+"
_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
ADDRESS_RE = re.compile(rf"^{_LOCAL_PART}@{_DOMAIN}$")
# Folder names end up in an envelope address (support+Meier@) and in IMAP: keep them to a safe alphabet.
FOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOGIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


class ConfigError(ValueError):
    """A configuration problem; each of ``problems`` is one line ``FILE:LINE: key: message``."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


def check_redis_url(value: str) -> str:
    """A URL redis-py can connect with; the ValueError says what is wrong (at load, not at the first mail)."""
    from redis.connection import parse_url  # noqa: PLC0415  (redis-py's own parser, so the two always agree)

    if re.match(r"^rediss?\+\w+://", value):
        return value  # RedisConfig.target() reads (or refuses) these forms, together with the section's other keys
    if not re.match(r"^(redis|rediss|unix)://", value):
        raise ValueError(
            f"{value!r} is not a Redis URL: url must start with redis://, rediss://, unix://, redis+sentinel:// or"
            " redis+cluster://"
        )
    try:
        parse_url(value)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    return value


def check_database_url(value: str) -> str:
    """A SQLAlchemy URL whose dialect and driver are installed; the ValueError names the package to install."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415  (SQLAlchemy only where a database URL is read)
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError  # noqa: PLC0415

    try:
        dialect = make_url(value).get_dialect()
    except (ArgumentError, ValueError):
        raise ValueError(f"{value!r} is not a database URL: sqlite:////PATH or postgresql+psycopg://...") from None
    except NoSuchModuleError:
        raise ValueError(f"{value!r}: SQLAlchemy knows no such database (sqlite or postgresql+psycopg)") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise ValueError(
            f"{value!r}: its driver is not installed ({exc.name or exc}); postroom supports sqlite:/// "
            "and postgresql+psycopg:// (psycopg, which ./dev install puts into the venv)"
        ) from None
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MilterConfig(_Section):
    socket: str = "unix:/run/postroom/milter.sock"
    socket_umask: Annotated[int, Field(ge=0, le=0o777)] = 0o007
    timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 600
    on_error: Literal["degraded", "tempfail"] = "degraded"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    workers: Annotated[int, Field(ge=0, le=64)] = 0
    # Who speaks the milter protocol: libmilter through pymilter (a thread per connection) or postroom.milter.aio
    # (one asyncio thread for all connections; ends of message there too while they are quick, else on eom_threads
    # threads).
    engine: Literal["libmilter", "asyncio"] = "libmilter"
    eom_threads: Annotated[int, Field(ge=1, le=256)] = 16

    @field_validator("socket")
    @classmethod
    def _socket_form(cls, value: str) -> str:
        if not re.match(r"^(unix|local):/.+|^inet6?:\d{1,5}(@.+)?$", value):
            raise ValueError("must be unix:/absolute/path or inet:PORT@HOST")
        return value


class SmtpdConfig(_Section):
    """The after-queue content filter (``postroom smtpd``); the failure policy is [milter] on_error for both."""

    listen_host: str = "127.0.0.1"
    listen_port: Annotated[int, Field(ge=1, le=65535)] = 10025
    reinject_host: str = "127.0.0.1"
    reinject_port: Annotated[int, Field(ge=1, le=65535)] = 10026
    max_message_size: Annotated[int, Field(ge=0)] = 52_428_800
    timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 300


class RedisConfig(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    sentinels: list[str] = Field(default_factory=list)
    service_name: str = ""
    sentinel_username: str = ""
    sentinel_password: str = ""  # the sentinels' own requirepass, when they have one (the url's is the data nodes')
    cluster: bool = False
    confirm_replicas: Annotated[int, Field(ge=0, le=5)] = 0
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,32}$")] = "postroom"
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 2.0
    message_index_days: Annotated[int, Field(ge=1, le=3650)] = 400

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_redis_url(value)

    @model_validator(mode="after")
    def _target(self) -> RedisConfig:
        self.target()  # a ValueError here names the section: "redis: ..."
        return self

    def target(self) -> Target:
        """Single Redis, Sentinel or Cluster, as the url and the other keys say (see postroom.redis_connect)."""
        return redis_connect.parse(
            self.url,
            sentinels=self.sentinels,
            service_name=self.service_name,
            cluster=self.cluster,
            sentinel_username=self.sentinel_username,
            sentinel_password=self.sentinel_password,
        )


class DatabaseConfig(_Section):
    url: str = "sqlite:////var/lib/postroom/history.sqlite3"
    auto_migrate: bool = True
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 200
    spool_dir: str = ""
    spool_max_mb: Annotated[int, Field(ge=1, le=1_000_000)] = 1024

    def spool_path(self) -> Path:
        """The history spool's folder: as set, else beside a SQLite file, else /var/lib/postroom/spool."""
        if self.spool_dir:
            return Path(self.spool_dir)
        if self.url.startswith("sqlite:///") and not self.url.startswith("sqlite:///:memory:"):
            return Path(self.url.removeprefix("sqlite:///")).parent / "spool"
        return Path("/var/lib/postroom/spool")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_database_url(value)


# Business time as "90m" or "4h" (hours and minutes of opening hours); "" means no target.
_BUSINESS_RE = re.compile(r"^(\d{1,5})([mh])$")


def business_minutes(value: str) -> int:
    """Minutes of a duration like "90m" or "4h"; 0 for ""; ValueError for anything else."""
    if not value:
        return 0
    m = _BUSINESS_RE.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a duration like 30m or 4h")
    return int(m.group(1)) * (60 if m.group(2) == "h" else 1)


def _duration(value: str) -> str:
    business_minutes(value)
    return value.strip()


class SlaPolicy(_Section):
    """Targets of one priority in one mailbox, in business time (the [hours] opening hours)."""

    first_response: str = ""
    next_response: str = ""
    resolution: str = ""

    _check = field_validator("first_response", "next_response", "resolution")(_duration)


class SlaConfig(_Section):
    """``postroom remind`` and ``postroom digest``: when to remind, escalate and report."""

    remind_before: str = "1h"
    unassigned_after: str = "2h"
    lead_digest: Literal["daily", "weekly"] = "daily"

    _check = field_validator("remind_before", "unassigned_after")(_duration)


class MetricsConfig(_Section):
    """Where the daemons serve Prometheus's /metrics; "" serves none."""

    milter_listen: str = ""
    smtpd_listen: str = ""

    @field_validator("milter_listen", "smtpd_listen")
    @classmethod
    def _loopback(cls, value: str) -> str:
        if not value:
            return value
        m = re.match(r"^(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\]):(\d{1,5})$", value)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ValueError(f"{value!r} must be a loopback HOST:PORT such as 127.0.0.1:9151 or [::1]:9151")
        return value


class AgentConfig(_Section):
    address: str
    display_name: str = ""
    folder: str = ""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not ADDRESS_RE.match(value):
            raise ValueError(f"not a mail address: {value!r}")
        return value.lower()

    @field_validator("folder")
    @classmethod
    def _folder(cls, value: str) -> str:
        if value and not FOLDER_RE.match(value):
            raise ValueError(f"folder {value!r} must match {FOLDER_RE.pattern}")
        return value


class MailboxConfig(_Section):
    address: str
    tag: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,31}$")]
    agents: list[str] = Field(default_factory=list)
    inbox_folder: str = ""
    forward_prefixes_link: bool = True
    on_rival_reply: Literal["reject", "warn", "allow"] = "reject"
    from_format: Annotated[str, Field(min_length=1, max_length=100)] = "{agent} via {mailbox}"
    reply_to: str = ""
    copy_replies: bool = True
    canned_dir: str = ""
    away_handover: Literal["inbox", "round-robin", "least-open"] = "inbox"
    leads: list[str] = Field(default_factory=list)
    sla: dict[Literal["low", "normal", "high", "urgent"], SlaPolicy] = Field(default_factory=dict)
    done_folder: Annotated[str, Field(pattern=FOLDER_RE.pattern)] = "Done"

    @field_validator("from_format")
    @classmethod
    def _from_format(cls, value: str) -> str:
        try:
            value.format(agent="A", mailbox="M")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{agent}} and {{mailbox}} may be used: {exc}") from None
        return value

    @field_validator("reply_to")
    @classmethod
    def _reply_to(cls, value: str) -> str:
        if value and not ADDRESS_RE.match(value):
            raise ValueError(f"not a mail address: {value!r}")
        return value.lower()

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not ADDRESS_RE.match(value):
            raise ValueError(f"not a mail address: {value!r}")
        if "+" in value.split("@", 1)[0]:
            raise ValueError("a shared address cannot contain the detail delimiter '+'")
        return value.lower()

    @field_validator("inbox_folder")
    @classmethod
    def _folder(cls, value: str) -> str:
        if value and not FOLDER_RE.match(value):
            raise ValueError(f"folder {value!r} must match {FOLDER_RE.pattern}")
        return value


_SELECTOR = r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*$"


class DkimKey(_Section):
    selector: Annotated[str, Field(pattern=_SELECTOR, max_length=63)]
    key_file: str

    @staticmethod
    def problems(domain: str, selector: str) -> list[str]:
        """What is wrong with a domain and selector an admin typed (``dkim genkey``), in the config's own terms."""
        out = []
        if not re.match(rf"^{_DOMAIN}$", domain):
            out.append(f"{domain!r} is not a domain name")
        if not re.match(_SELECTOR, selector) or len(selector) > 63:
            out.append(f"{selector!r} is not a selector (letters, digits, '-', '_', dot-separated labels)")
        return out


WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# "08:00-12:00, 13:00-17:00"; "" is closed all day.  24:00 may end a range.
_RANGE_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]|24):([0-5]\d)$")


def parse_opening(value: str) -> list[tuple[int, int]]:
    """Opening ranges of one weekday as (start, end) minutes after midnight; ValueError names the bad part."""
    ranges: list[tuple[int, int]] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        m = _RANGE_RE.match(part)
        start = int(m.group(1)) * 60 + int(m.group(2)) if m else 0
        end = int(m.group(3)) * 60 + int(m.group(4)) if m else 0
        if not m or end > 24 * 60 or end <= start:
            raise ValueError(f"{part!r} is not a range like 08:00-17:00")
        ranges.append((start, end))
    return sorted(ranges)


class HoursConfig(_Section):
    timezone: str = "UTC"
    monday: str = ""
    tuesday: str = ""
    wednesday: str = ""
    thursday: str = ""
    friday: str = ""
    saturday: str = ""
    sunday: str = ""
    holidays: list[str] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as Europe/Berlin)") from None
        return value

    @field_validator(*WEEKDAYS)
    @classmethod
    def _ranges(cls, value: str) -> str:
        parse_opening(value)
        return value

    @field_validator("holidays")
    @classmethod
    def _dates(cls, value: list[str]) -> list[str]:
        for day in value:
            try:
                datetime.date.fromisoformat(day)
            except ValueError:
                raise ValueError(f"{day!r} is not a date like 2025-12-25") from None
        return value

    def configured(self) -> bool:
        """No opening hours at all means always open: no business-hours reply, ever."""
        return any(getattr(self, day) for day in WEEKDAYS)


class AutoReplyConfig(_Section):
    acknowledge: bool = False
    templates_dir: str = "/etc/postroom/templates"
    default_language: Annotated[str, Field(pattern=r"^[a-z]{2,3}$")] = "en"
    daily_cap: Annotated[int, Field(ge=0, le=1000)] = 5


class MailerConfig(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 25
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    queue_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    attempts: Annotated[int, Field(ge=1, le=20)] = 3


class ImapConfig(_Section):
    """postroom's own IMAP access (a Dovecot master user) and the imapsieve hook (``postroom imap-event``)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 143
    master_user: Annotated[str, Field(pattern=LOGIN_RE.pattern)] = "postroom"
    master_password_file: str = "/etc/postroom/imap-master.secret"
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0


class Config(_Section):
    milter: MilterConfig = MilterConfig()
    smtpd: SmtpdConfig = SmtpdConfig()
    redis: RedisConfig = RedisConfig()
    database: DatabaseConfig = DatabaseConfig()
    recipient_delimiter: Annotated[str, Field(min_length=1, max_length=1)] = "+"
    agents: dict[str, AgentConfig] = Field(default_factory=dict)
    mailboxes: dict[str, MailboxConfig] = Field(default_factory=dict)
    dkim: dict[str, DkimKey] = Field(default_factory=dict)
    rules_file: str = ""
    hours: HoursConfig = HoursConfig()
    autoreply: AutoReplyConfig = AutoReplyConfig()
    mailer: MailerConfig = MailerConfig()
    sla: SlaConfig = SlaConfig()
    metrics: MetricsConfig = MetricsConfig()
    imap: ImapConfig = ImapConfig()

    @field_validator("dkim")
    @classmethod
    def _dkim_domains(cls, value: dict[str, DkimKey]) -> dict[str, DkimKey]:
        for domain in value:
            if not re.match(rf"^{_DOMAIN}$", domain):
                raise ValueError(f"dkim: {domain!r} is not a domain name")
        return {d.lower(): k for d, k in value.items()}

    @field_validator("agents")
    @classmethod
    def _agent_logins(cls, value: dict[str, AgentConfig]) -> dict[str, AgentConfig]:
        for login in value:
            if not LOGIN_RE.match(login):
                raise ValueError(f"agent login {login!r} must match {LOGIN_RE.pattern}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _every_agent_by_default(cls, data: Any) -> Any:
        # A mailbox without agents is worked (and, through Dovecot's ACLs, seen) by every agent: filled in here,
        # once, so the reply path, the rules and the IMAP side all read the same list.
        if not isinstance(data, dict) or not isinstance(data.get("mailboxes"), dict):
            return data
        logins = list(data["agents"]) if isinstance(data.get("agents"), dict) else []
        boxes = {
            key: {**box, "agents": logins} if isinstance(box, dict) and not box.get("agents") else box
            for key, box in data["mailboxes"].items()
        }
        return {**data, "mailboxes": boxes}

    # -- derived look-ups; computed on demand because a Config is small and frozen --

    def mailbox_for(self, address: str) -> tuple[str, MailboxConfig, str] | None:
        """Map an envelope recipient (``support@``, ``Support+Meier@``) to (key, mailbox, detail)."""
        local, _, domain = address.strip("<>").rpartition("@")
        base, _, detail = local.partition(self.recipient_delimiter)
        wanted = f"{base}@{domain}".lower()
        for key, box in self.mailboxes.items():
            if box.address == wanted:
                return key, box, detail
        return None

    def agent_for_login(self, login: str) -> str | None:
        """The configured agent of an SMTP login; Dovecot may hand us "meier" or "Meier@example.test"."""
        if login in self.agents:
            return login
        lowered = login.lower()
        for name, agent in self.agents.items():
            if lowered in (name.lower(), agent.address):
                return name
        return None

    def agent_folder(self, login: str) -> str:
        agent = self.agents[login]
        return agent.folder or login.capitalize()

    def agent_name(self, login: str) -> str:
        agent = self.agents[login]
        return agent.display_name or login.capitalize()


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


Loc = tuple[int | str, ...]


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[Loc, str]:
    """Apply the POSTROOM_* overrides; returns which keys came from which variable (for the error messages)."""
    applied: dict[Loc, str] = {}
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in environ:
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                continue  # the schema reports the bad section itself
            data[section][key] = environ[var]
            applied[(section, key)] = var
    return applied


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _cross_problems(data: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    """Mistakes between tables (unknown agents, one address twice), found on the raw document so they show up
    together with every other mistake instead of after the rest is fixed."""
    out: list[tuple[Loc, str]] = []
    agents = _table(data, "agents")
    owner: dict[str, str] = {}
    for login, agent in agents.items():
        address = agent.get("address") if isinstance(agent, dict) else None
        if isinstance(address, str):
            if address.lower() in owner:
                out.append((("agents", login, "address"), f"{address} is also {owner[address.lower()]}.address"))
            owner.setdefault(address.lower(), f"agents.{login}")
    for key, box in _table(data, "mailboxes").items():
        if not isinstance(box, dict):
            continue
        address = box.get("address")
        if isinstance(address, str):
            if address.lower() in owner:
                out.append((("mailboxes", key, "address"), f"{address} is also {owner[address.lower()]}.address"))
            owner.setdefault(address.lower(), f"mailboxes.{key}")
        for field_name in ("agents", "leads"):
            logins = box.get(field_name)
            for n, login in enumerate(logins if isinstance(logins, list) else []):
                if isinstance(login, str) and login not in agents:
                    out.append((("mailboxes", key, field_name, n), f"unknown agent {login!r} (no [agents.{login}])"))
    return out


def parse_config(
    data: dict[str, Any],
    path: str = "<config>",
    environ: Mapping[str, str] | None = None,
    lines: KeyLines | None = None,
    *,
    need_mailbox: bool = False,
) -> Config:
    """Validate an already-parsed TOML document; ``environ`` overrides apply first.  ``lines`` (from the TOML
    text) lets every problem name its line; all problems of the document are reported together.  A config file
    must name a mailbox (``need_mailbox``); documents built in code for tests need not."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    from_env = _apply_env(data, os.environ if environ is None else environ)
    found: list[tuple[Loc, str]] = []
    config = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            found.append((err["loc"], "unknown key" if err["type"] == "extra_forbidden" else err["msg"]))
    found += _cross_problems(data)
    if need_mailbox and not _table(data, "mailboxes"):
        found.append((("mailboxes",), "no [mailboxes.NAME] table: postroom would handle no mail"))
    if not found:
        assert config is not None
        return config
    problems = []
    for loc, msg in found:
        var = from_env.get(loc[:2])
        where = f"{path}: {_location(loc)} (from {var})" if var else f"{path}:{_line(lines, loc)}{_location(loc)}"
        problems.append(f"{where}: {msg.removeprefix('Value error, ')}")
    raise ConfigError(path, problems)


def _line(lines: KeyLines | None, loc: Loc) -> str:
    return f"{lines.line(loc)}: " if lines is not None else " "


def read_toml(name: str) -> tuple[dict[str, Any], KeyLines]:
    """A TOML file's document and the lines of its keys; :class:`ConfigError` if it cannot be read or parsed."""
    try:
        with open(name, "rb") as fh:
            raw = fh.read()
        text = raw.decode("utf-8")
        return tomllib.loads(text), key_lines(text)
    except OSError as exc:
        raise ConfigError(name, [f"{name}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(name, [f"{name}:{line}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+)", str(exc))
        raise ConfigError(name, [f"{name}:{m.group(1) if m else 1}: not valid TOML: {exc}"]) from None


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate a TOML config file; raises :class:`ConfigError` naming file, line and key."""
    name = os.fspath(path)
    data, lines = read_toml(name)
    resolve_paths(data, Path(name).resolve().parent)
    return parse_config(data, name, environ, lines, need_mailbox=True)


def resolve_paths(data: dict[str, Any], here: Path) -> None:
    """Make the file names of a raw config document absolute: relative ones are relative to the config file, so
    the shipped example works from any directory (``Path / an absolute path`` is that path)."""
    for section, key in (("dkim", "key_file"), ("mailboxes", "canned_dir")):
        for entry in _table(data, section).values():
            if isinstance(entry, dict) and isinstance(entry.get(key), str) and entry[key]:
                entry[key] = str(here / entry[key])
    if isinstance(data.get("rules_file"), str) and data["rules_file"]:
        data["rules_file"] = str(here / data["rules_file"])
    autoreply = data.get("autoreply")
    if isinstance(autoreply, dict) and isinstance(autoreply.get("templates_dir"), str):
        autoreply["templates_dir"] = str(here / autoreply["templates_dir"])


def config_lines(path: str | os.PathLike[str]) -> KeyLines:
    """The key lines of a config file that has loaded before (for problems found after loading it)."""
    try:
        return read_toml(os.fspath(path))[1]
    except ConfigError:
        return KeyLines({})


def example_config_path() -> Path:
    """The shipped example (package data, beside its rules, templates, canned replies and example DKIM key), used
    by the tests and the demo so it never goes stale, and found the same way in a checkout and in an install."""
    return Path(__file__).resolve().parent / "examples" / "postroom.toml"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    # Domain names as keys ([dkim."example.test"]) must be quoted, or TOML reads them as nested tables.
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else _toml_value(key)


def _toml_table(lines: list[str], name: str, data: Mapping[str, object]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    if name:
        lines.append(f"\n[{name}]")
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items()]
    for key, value in data.items():
        if isinstance(value, Mapping):
            _toml_table(lines, f"{name}.{_toml_key(key)}" if name else _toml_key(key), value)


def to_toml(config: Config) -> str:
    """The config as a TOML document that loads back to an equal Config (tests, the demo, ``config show``)."""
    lines: list[str] = []
    _toml_table(lines, "", config.model_dump())
    return "\n".join(lines) + "\n"


def with_changes(config: Config, changes: Mapping[str, Mapping[str, object]]) -> Config:
    """A copy with some keys of some sections replaced, validated again; e.g. {"milter": {"socket_umask": 0}}."""
    data = config.model_dump()
    for section, values in changes.items():
        data[section] = {**data[section], **values}
    return parse_config(data, "<changes>", environ={})
