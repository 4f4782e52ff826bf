"""Automatic replies: the acknowledgement of a new ticket, and the business-hours reply outside opening hours.

RFC 3834 throughout: :func:`should_auto_reply` never answers automatic mail (``Auto-Submitted`` other than ``no``),
bulk and list mail, bounces (empty return path), robots (mailer-daemon, noreply, postmaster ...), or our own mail;
every reply carries ``Auto-Submitted: auto-replied``, ``In-Reply-To``/``References`` and the ticket token, leaves
from the shared address with an empty envelope sender (so a failed reply bounces nowhere) and is DKIM-signed for
the shared domain.  A per-correspondent cap (``[autoreply] daily_cap``, counted in Redis) ends any loop the
headers do not.

Templates are files ``<templates_dir>/<name>.<language>.txt`` (a first line ``Subject: ...``, an empty line, the
text), overridden per mailbox by ``<templates_dir>/<mailbox key>/<name>.<language>.txt``; ``$ticket``, ``$token``,
``$tag``, ``$subject``, ``$mailbox``, ``$customer`` and ``$next_opening`` are replaced.  They are read when the
config is (re)loaded, so the mail path does no file I/O.

The one call for the inbound pipeline is :func:`plan_auto_reply`; it returns the mail for
:class:`postroom.mailer.Mailer` (or why there is none) and does no I/O but the cap's one Redis transaction.
"""

from __future__ import annotations

import quopri
import re
import string
import uuid
import zoneinfo
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Protocol

from postroom import subject as subj
from postroom.config import WEEKDAYS, Config, HoursConfig, MailboxConfig, parse_opening
from postroom.dkim import Keyring, sign
from postroom.mailer import OutgoingMail
from postroom.mime import addresses, encode_header_value, fold, message_id, readable, shorten

ACK = "ack"
CLOSED = "closed"
NO_REPLY = "none"  # a rule's auto_reply = "none": this mail gets no automatic reply
PLACEHOLDERS = frozenset({"ticket", "token", "tag", "subject", "mailbox", "customer", "next_opening"})
_TEMPLATE_NAME_RE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9_-]{0,63})\.(?P<lang>[a-z]{2,3})\.txt$")
# Local parts of senders that are programs, not people (RFC 3834 section 2 and common practice), as a class: the
# robot word anywhere between the separators of a local part ("gmail-noreply", "noreply-12345", "info.no_reply",
# "DoNotReply", "bounces+verp=..."), the list-manager prefixes and suffixes, never inside a person's name
# ("juno.reply" is a person).  A "+detail" or "=VERP" tail changes nothing.
_SEP = r"[-_.+=]"
_ROBOT_WORDS = (
    r"no[-_.]?reply|no[-_.]?replies|do[-_.]?not[-_.]?reply|dont[-_.]?reply|mailer[-_.]?daemon|postmaster"
    r"|bounces?|listserv|majordomo|mailman"
)
_ROBOT_RE = re.compile(
    rf"(?:^|{_SEP})(?:{_ROBOT_WORDS})\d*(?:{_SEP}|$)|^owner-|-(?:request|owner)(?:\+|$)",
    re.IGNORECASE,
)


# ---------------------------------------------------------------------------------------------------------------
# opening hours


@dataclass(frozen=True)
class BusinessHours:
    """The ``[hours]`` section, ready to answer "open now?" and "open again when?"."""

    zone: zoneinfo.ZoneInfo
    week: tuple[tuple[tuple[int, int], ...], ...]  # per weekday (Monday first): (start, end) minutes after midnight
    holidays: frozenset[date]

    @classmethod
    def from_config(cls, hours: HoursConfig) -> BusinessHours:
        return cls(
            zoneinfo.ZoneInfo(hours.timezone),
            tuple(tuple(parse_opening(getattr(hours, day))) for day in WEEKDAYS),
            frozenset(date.fromisoformat(d) for d in hours.holidays),
        )

    @property
    def configured(self) -> bool:
        return any(self.week)

    def local(self, now: datetime) -> datetime:
        """``now`` in the configured zone; a naive datetime counts as UTC."""
        if now.tzinfo is None:
            now = now.replace(tzinfo=zoneinfo.ZoneInfo("UTC"))
        return now.astimezone(self.zone)

    def is_open(self, now: datetime) -> bool:
        if not self.configured:
            return True  # no opening hours configured: never "closed"
        local = self.local(now)
        if local.date() in self.holidays:
            return False
        minute = local.hour * 60 + local.minute
        return any(start <= minute < end for start, end in self.week[local.weekday()])

    def next_opening(self, now: datetime) -> datetime | None:
        """The next start of an opening range after ``now`` (skipping holidays), None when there is none."""
        if not self.configured:
            return None
        local = self.local(now)
        for offset in range(0, 400):  # a year of holidays cannot hide every opening day
            day = local.date() + timedelta(days=offset)
            if day in self.holidays:
                continue
            for start, _end in self.week[day.weekday()]:
                opening = datetime.combine(day, time(start // 60, start % 60), tzinfo=self.zone)
                if opening > local:
                    return opening
        return None


_DAY_NAMES = {
    "en": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "de": ("Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"),
    "nl": ("maandag", "dinsdag", "woensdag", "donderdag", "vrijdag", "zaterdag", "zondag"),
}
_MONTH_NAMES = {
    "en": (
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ),
    "de": (
        "Januar",
        "Februar",
        "März",
        "April",
        "Mai",
        "Juni",
        "Juli",
        "August",
        "September",
        "Oktober",
        "November",
        "Dezember",
    ),
    "nl": (
        "januari",
        "februari",
        "maart",
        "april",
        "mei",
        "juni",
        "juli",
        "augustus",
        "september",
        "oktober",
        "november",
        "december",
    ),
}
_WHEN_FORMATS = {
    "en": "{weekday}, {day} {month} at {time} ({zone})",
    "de": "{weekday}, {day}. {month} um {time} Uhr ({zone})",
    "nl": "{weekday} {day} {month} om {time} ({zone})",
}


def format_opening(when: datetime | None, language: str) -> str:
    """The next opening time as a customer reads it in their language (English for languages we lack)."""
    if when is None:
        return ""
    lang = language if language in _WHEN_FORMATS else "en"
    return _WHEN_FORMATS[lang].format(
        weekday=_DAY_NAMES[lang][when.weekday()],
        day=when.day,
        month=_MONTH_NAMES[lang][when.month - 1],
        time=when.strftime("%H:%M"),
        zone=str(when.tzinfo),
    )


# ---------------------------------------------------------------------------------------------------------------
# templates


class TemplateError(ValueError):
    """Problems with the templates, each naming the file and the line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Template:
    subject: string.Template
    body: string.Template
    path: str


class Templates:
    """Every template, read once per (re)load: (mailbox key or "" for all, name, language) -> Template."""

    def __init__(self, entries: Mapping[tuple[str, str, str], Template]) -> None:
        self._entries = dict(entries)

    def names(self) -> set[str]:
        return {name for _box, name, _lang in self._entries}

    def languages(self, mailbox: str, name: str) -> list[str]:
        return sorted({lang for box, n, lang in self._entries if n == name and box in ("", mailbox)})

    def get(self, mailbox: str, name: str, language: str) -> Template | None:
        return self._entries.get((mailbox, name, language)) or self._entries.get(("", name, language))

    def __len__(self) -> int:
        return len(self._entries)


NO_TEMPLATES = Templates({})


def _parse_template(path: Path, problems: list[str]) -> Template | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        problems.append(f"{path}:1: cannot read: {exc.strerror}")
        return None
    except UnicodeDecodeError as exc:
        at = path.read_bytes()[: exc.start].count(b"\n") + 1
        problems.append(f"{path}:{at}: not UTF-8 text")
        return None
    lines = text.replace("\r\n", "\n").split("\n")
    first = lines[0]
    if not first.lower().startswith("subject:"):
        problems.append(f"{path}:1: the first line must be 'Subject: ...', then an empty line, then the text")
        return None
    if len(lines) < 2 or lines[1].strip():
        problems.append(f"{path}:2: the line after the Subject line must be empty")
        return None
    bad = False
    for number, line in enumerate(lines, 1):
        tpl = string.Template(line)
        if not tpl.is_valid():
            problems.append(f"{path}:{number}: a '$' that is no placeholder (write $$ for a dollar sign)")
            bad = True
            continue
        unknown = sorted(set(tpl.get_identifiers()) - PLACEHOLDERS)
        if unknown:
            known = ", ".join("$" + p for p in sorted(PLACEHOLDERS))
            problems.append(f"{path}:{number}: unknown placeholder ${unknown[0]} (known: {known})")
            bad = True
    if bad:
        return None
    body = "\n".join(lines[2:]).rstrip("\n") + "\n"
    return Template(string.Template(first[len("subject:") :].strip()), string.Template(body), str(path))


def load_templates(config: Config) -> Templates:
    """Read ``[autoreply] templates_dir``; raises TemplateError naming file and line of every problem.

    A missing directory is an error only when replies are switched on (``acknowledge``); rules that name a
    template are checked against what is found here by the rules loader.
    """
    directory = Path(config.autoreply.templates_dir)
    problems: list[str] = []
    if not directory.is_dir():
        if config.autoreply.acknowledge:
            raise TemplateError([f"{directory}:1: [autoreply] templates_dir is not a directory"])
        return NO_TEMPLATES
    entries: dict[tuple[str, str, str], Template] = {}
    candidates = [("", p) for p in sorted(directory.glob("*.txt"))]
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        if sub.name not in config.mailboxes:
            known = ", ".join(sorted(config.mailboxes)) or "none"
            problems.append(f"{sub}:1: no mailbox {sub.name!r} in the config (mailbox keys: {known})")
            continue
        candidates += [(sub.name, p) for p in sorted(sub.glob("*.txt"))]
    for box, path in candidates:
        m = _TEMPLATE_NAME_RE.match(path.name)
        if not m:
            problems.append(f"{path}:1: a template file is named <name>.<language>.txt, e.g. ack.de.txt")
            continue
        template = _parse_template(path, problems)
        if template is not None:
            entries[(box, m.group("name"), m.group("lang"))] = template
    templates = Templates(entries)
    default = config.autoreply.default_language
    required = [ACK] + ([CLOSED] if BusinessHours.from_config(config.hours).configured else [])
    if config.autoreply.acknowledge:
        for name in required:
            if templates.get("", name, default) is None:
                problems.append(f"{directory / f'{name}.{default}.txt'}:1: missing: acknowledge = true needs it")
    if problems:
        raise TemplateError(problems)
    return templates


# ---------------------------------------------------------------------------------------------------------------
# which language, whether to answer, which template


def preferred_languages(headers: Sequence[tuple[str, str]]) -> list[str]:
    """Primary language subtags the customer's mail asks for, best first: Content-Language, then Accept-Language
    by quality."""
    found: list[str] = []
    for name, value in headers:
        if name.lower() == "content-language":
            found += [part.strip().split("-")[0].lower() for part in readable(value).split(",")]
    weighted: list[tuple[float, int, str]] = []
    for name, value in headers:
        if name.lower() != "accept-language":
            continue
        for i, part in enumerate(readable(value).split(",")):
            lang, _, params = part.strip().partition(";")
            quality = 1.0
            m = re.search(r"q\s*=\s*([0-9.]+)", params)
            if m:
                try:
                    quality = float(m.group(1))
                except ValueError:
                    quality = 0.0
            weighted.append((-quality, i, lang.strip().split("-")[0].lower()))
    found += [lang for _q, _i, lang in sorted(weighted)]
    return [lang for lang in dict.fromkeys(found) if re.fullmatch(r"[a-z]{2,3}", lang)]


def choose_language(headers: Sequence[tuple[str, str]], available: Collection[str], default: str) -> str:
    """The customer's language if we have a template in it, else the configured default, else English."""
    for lang in [*preferred_languages(headers), default, "en"]:
        if lang in available:
            return lang
    return sorted(available)[0] if available else default


@dataclass(frozen=True)
class ReplyCheck:
    """Whether RFC 3834 lets us answer this mail, and the reason an admin reads in the log."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def _robot(address: str) -> bool:
    return bool(_ROBOT_RE.search(address.rpartition("@")[0]))


def should_auto_reply(headers: Sequence[tuple[str, str]], envelope_sender: str, config: Config) -> ReplyCheck:
    """RFC 3834 section 2: answer people, never programs, lists, bounces or ourselves."""
    sender = envelope_sender.strip().strip("<>").lower()
    if not sender:
        return ReplyCheck(False, "empty return path (a bounce or another automatic mail)")
    for name, raw in headers:
        lname = name.lower()
        value = readable(raw).strip().lower()
        if lname == "auto-submitted" and value.split(";")[0].strip() != "no":
            return ReplyCheck(False, f"Auto-Submitted: {value}")
        if lname == "precedence" and value in ("bulk", "list", "junk", "auto_reply"):
            return ReplyCheck(False, f"Precedence: {value}")
        if lname in ("list-id", "list-unsubscribe", "list-post"):
            return ReplyCheck(False, f"list mail ({name})")
        if lname == "x-auto-response-suppress" and re.search(r"\b(all|autoreply|oof)\b", value):
            return ReplyCheck(False, f"X-Auto-Response-Suppress: {value}")
        if lname == "content-type" and value.startswith("multipart/report"):
            return ReplyCheck(False, "a delivery or read report (multipart/report)")
        if lname.startswith("x-postroom-"):
            return ReplyCheck(False, f"our own mail ({name})")
    from_addrs = [a for k, v in headers if k.lower() == "from" for a in addresses(v)]
    ours = {agent.address for agent in config.agents.values()}
    for address in dict.fromkeys([sender, *from_addrs]):
        if _robot(address):
            return ReplyCheck(False, f"{address} is a program, not a person")
        if config.mailbox_for(address) is not None or address in ours:
            return ReplyCheck(False, f"our own address {address}")
    return ReplyCheck(True, "a person's mail")


def template_for(config: Config, hours: BusinessHours, rule_template: str, new_ticket: bool, now: datetime) -> str:
    """The template to answer with, "" for none: only new tickets are answered (an answer to every follow-up
    would be chatter and a loop risk); a rule's choice first; outside opening hours the acknowledgement becomes
    the business-hours reply."""
    if not new_ticket or rule_template == NO_REPLY:
        return ""
    name = rule_template or (ACK if config.autoreply.acknowledge else "")
    if name == ACK and not hours.is_open(now):
        return CLOSED
    return name


class ReplyCap(Protocol):
    """The per-correspondent cap: ``allow`` counts one reply and says whether it is within ``limit``."""

    def allow(self, mailbox: str, correspondent: str, limit: int) -> bool: ...


# ---------------------------------------------------------------------------------------------------------------
# the reply


def make_message_id(address: str) -> str:
    return f"<postroom.{uuid.uuid4().hex}@{address.rpartition('@')[2] or 'localhost'}>"


def _fold_signature(value: str) -> str:
    # Relaxed canonicalisation treats "; " and ";\r\n " alike, so folding there keeps the signature valid and the
    # line short enough for any SMTP hop.
    return value.replace("; ", ";\r\n\t")


def _template_values(
    config: Config,
    box: MailboxConfig,
    *,
    ticket: int,
    original: Sequence[tuple[str, str]],
    to: str,
    now: datetime,
    language: str,
) -> dict[str, str]:
    """The ``$names`` an auto-reply template may use."""
    hours = BusinessHours.from_config(config.hours)
    # The customer's subject without their token and "AW:"/"Re:" prefixes: the template adds its own "Re:".
    original_subject = subj.parse(
        subj.strip_token(readable(next((v for k, v in original if k.lower() == "subject"), "")), box.tag)
    ).rest
    return {
        "ticket": str(ticket),
        "token": subj.token(box.tag, ticket),
        "tag": box.tag,
        # A stranger's subject can be 100 KB: the reply quotes enough of it to be recognised.
        "subject": shorten(subj.one_line(original_subject)),
        "mailbox": box.address,
        "customer": to,
        "next_opening": format_opening(hours.next_opening(now), language),
    }


def _threading_headers(original: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """In-Reply-To and References of an answer to the mail whose headers are ``original`` (RFC 5322 3.6.4)."""
    original_id = message_id(next((v for k, v in original if k.lower() == "message-id"), None))
    references = subj.message_ids(
        next((v for k, v in original if k.lower() == "references"), None),
        next((v for k, v in original if k.lower() == "in-reply-to"), None) if not original_id else None,
        f"<{original_id}>" if original_id else None,
    )
    headers: list[tuple[str, str]] = []
    if original_id:
        headers.append(("In-Reply-To", f"<{original_id}>"))
    if references:
        headers.append(("References", " ".join(f"<{r}>" for r in references)))
    return headers


def build_auto_reply(
    config: Config,
    templates: Templates,
    keys: Keyring,
    *,
    mailbox: str,
    ticket: int,
    template: str,
    original: Sequence[tuple[str, str]],
    to: str,
    now: datetime,
    message_id_value: str,
) -> bytes:
    """A complete RFC 5322 message from the shared address of ``mailbox`` (its config key) to ``to``, answering
    the mail whose headers are ``original``; DKIM-signed when the config has a key for the shared domain.

    Raises LookupError when the mailbox has no template of that name.
    """
    box = config.mailboxes[mailbox]
    available = templates.languages(mailbox, template)
    if not available:
        raise LookupError(f"no auto-reply template {template!r} for mailbox {mailbox}")
    language = choose_language(original, available, config.autoreply.default_language)
    tpl = templates.get(mailbox, template, language)
    assert tpl is not None  # the language was chosen among the available ones
    values = _template_values(config, box, ticket=ticket, original=original, to=to, now=now, language=language)
    subject_text = subj.with_token(tpl.subject.safe_substitute(values), box.tag, ticket)
    body_text = tpl.body.safe_substitute(values)
    headers: list[tuple[str, str]] = [
        ("From", formataddr((box.tag, box.address))),
        ("To", to),
        ("Subject", fold("Subject", encode_header_value(subject_text))),
        ("Date", format_datetime(now if now.tzinfo else now.replace(tzinfo=zoneinfo.ZoneInfo("UTC")))),
        ("Message-ID", message_id_value),
        *_threading_headers(original),
    ]
    if box.reply_to:
        headers.append(("Reply-To", box.reply_to))
    headers += [
        ("Auto-Submitted", "auto-replied"),
        # Exchange and Outlook honour this and send no out-of-office answer back to our answer.
        ("X-Auto-Response-Suppress", "All"),
        ("Content-Language", language),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Transfer-Encoding", "quoted-printable"),
        ("X-Postroom-Ticket", f"{ticket} ({box.tag})"),
    ]
    normal = body_text.replace("\r\n", "\n").replace("\r", "\n")
    body = quopri.encodestring(normal.encode("utf-8")).replace(b"\n", b"\r\n")
    key = keys.for_address(box.address)
    if key is not None:
        headers.insert(0, ("DKIM-Signature", _fold_signature(sign(key, headers, body))))
    head = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
    return head + b"\r\n" + body


@dataclass(frozen=True)
class AutoReplyPlan:
    """What :func:`plan_auto_reply` decided: a mail for the mailer, or None and why not."""

    mail: OutgoingMail | None
    reason: str
    message_id: str = ""  # index this to the ticket, so the customer's answer to the reply threads


def plan_auto_reply(
    config: Config,
    templates: Templates,
    keys: Keyring,
    cap: ReplyCap,
    *,
    mailbox: str,
    ticket: int,
    new_ticket: bool,
    rule_template: str,
    headers: Sequence[tuple[str, str]],
    envelope_sender: str,
    queue_id: str,
    now: datetime,
) -> AutoReplyPlan:
    """Everything between a ticket and its automatic reply: template choice, RFC 3834, the cap, the message.

    ``rule_template`` is :attr:`postroom.rules.Decision.auto_reply_template`; ``headers`` and
    ``envelope_sender`` are the customer's mail as it arrived (before our edits).  Raises StoreUnavailable when
    Redis (the cap) is down, like every other Redis step of the pipeline.
    """
    hours = BusinessHours.from_config(config.hours)
    name = template_for(config, hours, rule_template, new_ticket, now)
    if not name:
        return AutoReplyPlan(None, "no auto-reply for this mail")
    if not templates.languages(mailbox, name):
        return AutoReplyPlan(None, f"no template {name!r} for mailbox {mailbox}")
    check = should_auto_reply(headers, envelope_sender, config)
    if not check:
        return AutoReplyPlan(None, f"not answered: {check.reason}")
    to = envelope_sender.strip().strip("<>").lower()
    box = config.mailboxes[mailbox]
    if not cap.allow(box.address, to, config.autoreply.daily_cap):
        return AutoReplyPlan(None, f"not answered: {to} reached the cap of {config.autoreply.daily_cap} a day")
    mid = make_message_id(box.address)
    data = build_auto_reply(
        config,
        templates,
        keys,
        mailbox=mailbox,
        ticket=ticket,
        template=name,
        original=headers,
        to=to,
        now=now,
        message_id_value=mid,
    )
    what = f"auto-reply {name!r} for {box.tag} #{ticket}"
    return AutoReplyPlan(OutgoingMail("", (to,), data, queue_id, what), f"{what} to {to}", mid.strip("<>"))
