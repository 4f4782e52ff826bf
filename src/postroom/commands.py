"""Command lines at the top of an agent's mail body (``#takeover``, ...), and removing them before sending.

Only the outbound path calls this, and only for an authenticated agent: a customer's ``#close`` is text.
The body is MIME: the commands are read from the first text/plain part (or text/html when there is none) and
removed from every text part that starts with them, so the customer sees neither the plain nor the HTML
version of them.
"""

from __future__ import annotations

import calendar
import email
import email.policy
import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from pathlib import Path

from postroom.config import Config
from postroom.tickets import PRIORITIES, TAG_RE

COMMAND_RE = re.compile(r"^#([a-z][a-z-]{1,20})(?:[ \t]+(.*))?$", re.IGNORECASE)
_HTML_BREAK = re.compile(r"<br\s*/?>|</p\s*>|</div\s*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^>]*>")
_MAX_COMMANDS = 20
# Commands are read from this much of the body: the top of the first text part, after any MIME preamble.
HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Command:
    name: str  # lower case, without "#"
    args: tuple[str, ...]
    line: str  # as the agent wrote it, for error replies


def parse_lines(text: str) -> tuple[list[Command], int]:
    """Leading command lines of ``text`` (blank lines between them allowed) and how many lines they span."""
    commands: list[Command] = []
    consumed = 0
    lines = text.splitlines()
    for i, raw in enumerate(lines[: _MAX_COMMANDS * 2]):
        line = raw.strip()
        if not line:
            continue
        m = COMMAND_RE.match(line)
        if not m:
            break
        commands.append(Command(m.group(1).lower(), tuple((m.group(2) or "").split()), line))
        consumed = i + 1
        if len(commands) >= _MAX_COMMANDS:
            break
    return commands, consumed


def _text_parts(msg: Message) -> list[Message]:
    return [p for p in msg.walk() if not p.is_multipart() and p.get_content_maintype() == "text"]


def _decoded(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        text = payload.decode(charset, "replace")
    except LookupError:
        text = payload.decode("utf-8", "replace")
    # The generator writes every line end as CRLF again; inside Python a line ends in "\n".
    return text.replace("\r\n", "\n")


def _html_text(html: str) -> str:
    return _HTML_TAG.sub("", _HTML_BREAK.sub("\n", html)).replace("&nbsp;", " ")


def read(headers: list[tuple[str, str]], body: bytes) -> list[Command]:
    """The commands at the top of the first text part.  ``body`` may be only the body's first HEAD_BYTES: the
    commands stand at its top, and a MIME parse of a 25 MB reply would cost several times its size."""
    msg = _parse(headers, body[:HEAD_BYTES])
    parts = _text_parts(msg)
    plain = [p for p in parts if p.get_content_subtype() == "plain"]
    if plain:
        return parse_lines(_decoded(plain[0]))[0]
    html = [p for p in parts if p.get_content_subtype() == "html"]
    if html:
        return parse_lines(_html_text(_decoded(html[0])))[0]
    return []


def _parse(headers: list[tuple[str, str]], body: bytes) -> Message:
    mime = [(k, v) for k, v in headers if k.lower().startswith("content-") or k.lower() == "mime-version"]
    head = "".join(f"{k}: {v}\r\n" for k, v in mime).encode("utf-8", "surrogateescape")
    return email.message_from_bytes(head + b"\r\n" + body, policy=email.policy.compat32)


def _strip_plain(text: str, replacements: list[str]) -> str:
    commands, consumed = parse_lines(text)
    if len(commands) < len(replacements):
        return text
    lines = text.splitlines(keepends=True)
    rest = lines[consumed:]
    inserted = "".join(r if r.endswith("\n") else r + "\n" for r in replacements if r)
    if inserted:
        # The agent's blank line between the snippet and their own words stays where they wrote it.
        return inserted + "".join(rest)
    while rest and not rest[0].strip():
        rest = rest[1:]
    return "".join(rest)


def _strip_html(markup: str, replacements: list[str]) -> str:
    # Replace the command lines wherever they stand in the markup, keeping all other markup.
    out = markup
    for replacement in replacements:
        m = re.search(r"#[a-z][a-z-]{1,20}(?:[ \t]+[^<\r\n]*)?", out, re.IGNORECASE)
        if not m:
            break
        end = m.end()
        br = re.match(r"\s*<br\s*/?>", out[end:], re.IGNORECASE)
        if br:
            end += br.end()
        new = html.escape(replacement).replace("\n", "<br>\n") if replacement else ""
        out = out[: m.start()] + new + out[end:]
    return out


def strip(headers: list[tuple[str, str]], body: bytes, replacements: list[str]) -> tuple[bytes, dict[str, str]]:
    """Replace the leading command lines of every text part (one replacement per command: "" removes it, a
    canned reply's text stands in its place); returns the new body and the top-level MIME headers whose value
    changed (a single-part mail may change its Content-Transfer-Encoding)."""
    msg = _parse(headers, body)
    for part in _text_parts(msg):
        text = _decoded(part)
        if part.get_content_subtype() == "html":
            new = _strip_html(text, replacements)
        else:
            new = _strip_plain(text, replacements)
        if new == text:
            continue
        charset = part.get_content_charset() or "utf-8"
        cte = (part.get("Content-Transfer-Encoding") or "").lower()
        del part["Content-Transfer-Encoding"]
        try:
            new.encode("ascii")
            ascii_only = True
        except UnicodeEncodeError:
            ascii_only = False
        if ascii_only and cte in ("", "7bit", "8bit"):
            part.set_payload(new, "us-ascii" if charset.lower() in ("us-ascii", "ascii") else None)
            part["Content-Transfer-Encoding"] = cte or "7bit"
        else:
            part.set_payload(new, "utf-8")  # base64 or QP by the utf-8 charset's rules
            part.set_param("charset", "utf-8")
    flat = msg.as_bytes(policy=email.policy.compat32.clone(linesep="\r\n"))
    head, _, new_body = flat.partition(b"\r\n\r\n")
    changed: dict[str, str] = {}
    before = {k.lower(): v for k, v in headers}
    for line in re.split(rb"\r\n(?![ \t])", head):
        name, _, value = line.decode("utf-8", "surrogateescape").partition(":")
        value = " ".join(value.split())
        if name.lower().startswith("content-") and " ".join(before.get(name.lower(), "").split()) != value:
            changed[name] = value
    return new_body, changed


# -- what the commands mean ------------------------------------------------------------------------------------

_STATES = {"close": "closed", "reopen": "open", "pending": "pending"}
TICKET_COMMANDS = frozenset(
    {"take", "takeover", "assign", "release", "close", "reopen", "pending", "priority", "tag", "untag", "canned"}
    | {"remind"}
)
KNOWN = TICKET_COMMANDS | {"note", "away", "back"}
_DATE_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2}))?$")


class CommandError(ValueError):
    """A command line postroom cannot carry out; the whole mail is refused so nothing is half applied."""

    def __init__(self, line: str, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"{line}: {reason}")


@dataclass
class Plan:
    """Everything the commands of one mail ask for, checked before anything is changed."""

    owner: str | None = None  # new owner ("" = released), None = unchanged
    state: str | None = None
    priority: str | None = None
    add_tags: list[str] = field(default_factory=list)
    remove_tags: list[str] = field(default_factory=list)
    take: bool = False
    takeover: bool = False
    note: bool = False
    away: bool = False
    away_until: float | None = None
    back: bool = False
    remind: bool = False  # #remind or #pending until: a follow-up date, read back from the history
    replacements: list[str] = field(default_factory=list)  # per command line: "" removes it, canned text replaces
    events: list[tuple[str, str]] = field(default_factory=list)  # (event, detail) for the history
    ticket_lines: list[str] = field(default_factory=list)  # the lines of commands that change a ticket

    @property
    def touches_ticket(self) -> bool:
        return any(
            (
                self.owner is not None,
                self.state is not None,
                self.priority is not None,
                self.add_tags,
                self.remove_tags,
                self.take,
                self.takeover,
                self.remind,
            )
        )


def _until(cmd: Command) -> float:
    args = list(cmd.args)
    if args and args[0].lower() == "until":
        args = args[1:]
    m = _DATE_RE.match(" ".join(args))
    if not m:
        raise CommandError(cmd.line, "write #away or #away until YYYY-MM-DD [HH:MM] (UTC)")
    y, mo, d, hh, mm = (int(x) if x else 0 for x in m.groups())
    try:
        return float(calendar.timegm(datetime(y, mo, d, hh, mm).timetuple()))
    except ValueError as exc:
        raise CommandError(cmd.line, f"not a date: {exc}") from None


_IN_RE = re.compile(r"^(\d{1,3})([hdw])$", re.IGNORECASE)
_UNIT = {"h": 3600, "d": 86400, "w": 7 * 86400}


def followup_at(name: str, detail: str, at: float) -> float | None:
    """When a ``#remind`` or ``#pending until`` given at ``at`` falls due (UTC seconds), or None if it names none.

    ``#remind 3d`` (h, d or w after the mail), ``#remind 2026-12-01 [09:00]`` and ``#pending until 2026-12-01``;
    dates are UTC like ``#away until``.
    """
    args = detail.split()
    if name == "pending":
        if not args or args[0].lower() != "until":
            return None
        args = args[1:]
    elif name != "remind":
        return None
    m = _IN_RE.match(" ".join(args))
    if m:
        return at + int(m.group(1)) * _UNIT[m.group(2).lower()]
    return _until(Command(name, tuple(args), detail))


def _followup_or_error(cmd: Command) -> None:
    usage = "write #remind 3d (h, d, w) or #remind YYYY-MM-DD [HH:MM], or #pending until YYYY-MM-DD [HH:MM] (UTC)"
    try:
        if followup_at(cmd.name, " ".join(cmd.args), 0.0) is None:
            raise CommandError(cmd.line, usage)
    except CommandError as exc:
        raise CommandError(cmd.line, exc.reason if exc.reason.startswith("not a date") else usage) from None


@dataclass(frozen=True)
class _Mailbox:
    """What the commands are checked against: the mailbox's agents and canned replies."""

    agents: list[str]
    canned: dict[str, str]
    placeholders: dict[str, str]


def plan(
    cmds: list[Command],
    *,
    agents: list[str],
    canned: dict[str, str],
    placeholders: dict[str, str],
) -> Plan:
    """Check every command against the mailbox (its agents, its canned replies) and say what they do.

    Raises CommandError for the first line that cannot be carried out; the caller then changes nothing.
    """
    p = Plan()
    box = _Mailbox(agents, canned, placeholders)
    for cmd in cmds:
        meaning = _MEANINGS.get(cmd.name)
        if meaning is None:
            known = " ".join(f"#{k}" for k in sorted(KNOWN))
            raise CommandError(cmd.line, f"unknown command; known: {known}")
        p.replacements.append(meaning(p, cmd, box))
        p.events.append((cmd.name, " ".join(cmd.args)))
        if cmd.name in TICKET_COMMANDS:
            p.ticket_lines.append(cmd.line)
    if p.away and p.back:
        raise CommandError("#away/#back", "one mail cannot say both")
    return p


# One function per command: it checks the command's arguments, writes what it means into the plan and returns
# the text that replaces the command line in the customer's copy ("" removes the line).


def _take(p: Plan, cmd: Command, box: _Mailbox) -> str:
    p.take = True
    return ""


def _takeover(p: Plan, cmd: Command, box: _Mailbox) -> str:
    p.takeover = True
    return ""


def _assign(p: Plan, cmd: Command, box: _Mailbox) -> str:
    if len(cmd.args) != 1:
        raise CommandError(cmd.line, "write #assign LOGIN")
    who = cmd.args[0].lower()
    if who not in box.agents:
        raise CommandError(cmd.line, f"unknown agent {who!r}; agents of this mailbox: {', '.join(box.agents)}")
    p.owner = who
    return ""


def _release(p: Plan, cmd: Command, box: _Mailbox) -> str:
    p.owner = ""
    return ""


def _set_state(p: Plan, cmd: Command, box: _Mailbox) -> str:
    p.state = _STATES[cmd.name]
    return ""


def _pending(p: Plan, cmd: Command, box: _Mailbox) -> str:
    p.state = _STATES[cmd.name]
    if cmd.args:  # "#pending until DATE": a follow-up when the customer stays silent
        _followup_or_error(cmd)
        p.remind = True
    return ""


def _remind(p: Plan, cmd: Command, box: _Mailbox) -> str:
    _followup_or_error(cmd)
    p.remind = True
    return ""


def _priority(p: Plan, cmd: Command, box: _Mailbox) -> str:
    if len(cmd.args) != 1 or cmd.args[0].lower() not in PRIORITIES:
        raise CommandError(cmd.line, f"write #priority {'|'.join(PRIORITIES)}")
    p.priority = cmd.args[0].lower()
    return ""


def _tags(p: Plan, cmd: Command, box: _Mailbox) -> str:
    if not cmd.args:
        raise CommandError(cmd.line, f"write #{cmd.name} TAG [TAG ...]")
    for tag in cmd.args:
        if not TAG_RE.match(tag):
            raise CommandError(cmd.line, f"tag {tag!r} must match {TAG_RE.pattern}")
    (p.add_tags if cmd.name == "tag" else p.remove_tags).extend(t.lower() for t in cmd.args)
    return ""


def _note(p: Plan, cmd: Command, box: _Mailbox) -> str:
    p.note = True
    return ""


def _away(p: Plan, cmd: Command, box: _Mailbox) -> str:
    p.away = True
    p.away_until = _until(cmd) if cmd.args else None
    return ""


def _back(p: Plan, cmd: Command, box: _Mailbox) -> str:
    p.back = True
    return ""


def _canned(p: Plan, cmd: Command, box: _Mailbox) -> str:
    if len(cmd.args) != 1:
        raise CommandError(cmd.line, "write #canned NAME")
    text = box.canned.get(cmd.args[0].lower())
    if text is None:
        known = ", ".join(sorted(box.canned)) or "none configured"
        raise CommandError(cmd.line, f"no canned reply {cmd.args[0]!r} (known: {known})")
    return _fill(text, box.placeholders)


_MEANINGS: dict[str, Callable[[Plan, Command, _Mailbox], str]] = {
    "take": _take,
    "takeover": _takeover,
    "assign": _assign,
    "release": _release,
    "close": _set_state,
    "reopen": _set_state,
    "pending": _pending,
    "remind": _remind,
    "priority": _priority,
    "tag": _tags,
    "untag": _tags,
    "note": _note,
    "away": _away,
    "back": _back,
    "canned": _canned,
}


def _fill(text: str, values: dict[str, str]) -> str:
    # Only our own placeholders are replaced; other braces in a snippet stay as they are.
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text if text.endswith("\n") else text + "\n"


def load_canned(config: Config) -> dict[str, dict[str, str]]:
    """Every mailbox's canned replies, read once at start-up: {mailbox address: {name: text}}.

    A snippet is ``<canned_dir>/<name>.txt`` (UTF-8); ``{customer_name}`` and ``{ticket}`` are filled in.
    """
    out: dict[str, dict[str, str]] = {}
    problems: list[tuple[tuple[str, ...], str]] = []
    for key, box in config.mailboxes.items():
        if not box.canned_dir:
            continue
        where = ("mailboxes", key, "canned_dir")
        folder = Path(box.canned_dir)
        if not folder.is_dir():
            problems.append((where, f"{folder}: not a directory"))
            continue
        snippets: dict[str, str] = {}
        for path in sorted(folder.glob("*.txt")):
            try:
                snippets[path.stem.lower()] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append((where, f"{path}: {exc}"))
        out[box.address] = snippets
    if problems:
        raise CannedError("; ".join(f"{'.'.join(k)}: {m}" for k, m in problems), problems)
    return out


class CannedError(ValueError):
    """Every unreadable canned-reply folder or file, as (config key, message)."""

    def __init__(self, message: str, problems: list[tuple[tuple[str, ...], str]]) -> None:
        self.problems = problems
        super().__init__(message)
