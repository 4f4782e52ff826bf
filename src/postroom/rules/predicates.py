"""The conditions a rule may have: one small named predicate per condition key of the rules file.

Each class is the whole story of one key: its ``key`` in the file, a ``description`` for the admin (the header of
examples/rules.toml lists them all, and a test keeps it complete), ``parse`` turning the TOML value into the
predicate or raising ValueError with a message for the admin, ``matches`` and ``explain``.  They are frozen
dataclasses, so two rules with the same condition compare equal: that is how the loader finds rules a previous
``stop`` rule makes unreachable.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol

from postroom.autoreply import BusinessHours
from postroom.config import WEEKDAYS, HoursConfig
from postroom.rules.context import Context, boolean, shown, strings
from postroom.rules.facts import MessageFacts

MAX_REGEX_LENGTH = 1000
WEEKDAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Condition(Protocol):
    key: ClassVar[str]
    description: ClassVar[str]

    def matches(self, facts: MessageFacts, now: datetime) -> bool: ...

    def explain(self) -> str: ...


def regex(value: Any) -> re.Pattern[str]:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a regular expression in a string, got {shown(value)}")
    if len(value) > MAX_REGEX_LENGTH:
        raise ValueError(f"regular expression longer than {MAX_REGEX_LENGTH} characters")
    try:
        return re.compile(value, re.IGNORECASE)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise ValueError(f"bad regular expression {value!r}: {exc}") from None


def _contains(haystack: str, needles: tuple[str, ...]) -> bool:
    folded = haystack.casefold()
    return any(n.casefold() in folded for n in needles)


# -- the predicates --


@dataclass(frozen=True)
class Sender:
    key: ClassVar[str] = "sender"
    description: ClassVar[str] = "the From address or the envelope sender is one of these addresses"
    addresses: frozenset[str]

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> Sender:
        found = strings(value, "an address or a list of addresses")
        bad = [a for a in found if "@" not in a]
        if bad:
            raise ValueError(f"not an address: {bad[0]!r}")
        return cls(frozenset(a.lower() for a in found))

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        return any(s in self.addresses for s in facts.senders)

    def explain(self) -> str:
        return f"sender is {' or '.join(sorted(self.addresses))}"


@dataclass(frozen=True)
class SenderDomain:
    key: ClassVar[str] = "sender_domain"
    description: ClassVar[str] = "the sender's domain is one of these, or a subdomain of one"
    domains: frozenset[str]

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> SenderDomain:
        found = strings(value, "a domain or a list of domains")
        bad = [d for d in found if "@" in d or " " in d]
        if bad:
            raise ValueError(f"not a domain: {bad[0]!r}")
        return cls(frozenset(d.lower().lstrip("@.") for d in found))

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        for sender in facts.senders:
            domain = sender.rpartition("@")[2]
            if any(domain == d or domain.endswith("." + d) for d in self.domains):
                return True
        return False

    def explain(self) -> str:
        return f"sender domain is {' or '.join(sorted(self.domains))}"


@dataclass(frozen=True)
class Header:
    key: ClassVar[str] = "header"
    description: ClassVar[str] = (
        'a header, as { name = "X-Foo", contains = "..." | regex = "..." | present = true|false }'
    )
    name: str
    contains: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None
    present: bool | None = None

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> Header:
        if not isinstance(value, dict):
            raise ValueError(
                f'must be a table such as {{ name = "X-Spam-Flag", contains = "yes" }}, got {shown(value)}'
            )
        unknown = sorted(set(value) - {"name", "contains", "regex", "present"})
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} (name, contains, regex or present)")
        name = value.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[!-9;-~]+", name):
            raise ValueError(f"name must be a header name such as 'X-Spam-Flag', got {shown(name)}")
        tests = [k for k in ("contains", "regex", "present") if k in value]
        if len(tests) != 1:
            raise ValueError("needs exactly one of contains, regex or present")
        if "contains" in value:
            return cls(name, contains=strings(value["contains"]))
        if "regex" in value:
            return cls(name, pattern=regex(value["regex"]))
        return cls(name, present=boolean(value["present"]))

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        values = facts.header_values(self.name)
        if self.present is not None:
            return bool(values) == self.present
        if self.pattern is not None:
            return any(self.pattern.search(v) for v in values)
        return any(_contains(v, self.contains) for v in values)

    def explain(self) -> str:
        if self.present is not None:
            return f"header {self.name} is {'present' if self.present else 'absent'}"
        if self.pattern is not None:
            return f"header {self.name} matches /{self.pattern.pattern}/"
        return f"header {self.name} contains {' or '.join(map(repr, self.contains))}"


@dataclass(frozen=True)
class SubjectContains:
    key: ClassVar[str] = "subject_contains"
    description: ClassVar[str] = "the subject contains one of these texts (case-insensitive)"
    needles: tuple[str, ...]

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> SubjectContains:
        return cls(strings(value))

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        return _contains(facts.subject, self.needles)

    def explain(self) -> str:
        return f"subject contains {' or '.join(map(repr, self.needles))}"


@dataclass(frozen=True)
class SubjectRegex:
    key: ClassVar[str] = "subject_regex"
    description: ClassVar[str] = "the subject matches this regular expression (case-insensitive)"
    pattern: re.Pattern[str]

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> SubjectRegex:
        return cls(regex(value))

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        return self.pattern.search(facts.subject) is not None

    def explain(self) -> str:
        return f"subject matches /{self.pattern.pattern}/"


@dataclass(frozen=True)
class BodyContains:
    key: ClassVar[str] = "body_contains"
    description: ClassVar[str] = "the text of the mail contains one of these texts (case-insensitive)"
    needles: tuple[str, ...]

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> BodyContains:
        return cls(strings(value))

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        return _contains(facts.body_text, self.needles)

    def explain(self) -> str:
        return f"body contains {' or '.join(map(repr, self.needles))}"


@dataclass(frozen=True)
class BodyRegex:
    key: ClassVar[str] = "body_regex"
    description: ClassVar[str] = "the text of the mail matches this regular expression (case-insensitive)"
    pattern: re.Pattern[str]

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> BodyRegex:
        return cls(regex(value))

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        return self.pattern.search(facts.body_text) is not None

    def explain(self) -> str:
        return f"body matches /{self.pattern.pattern}/"


@dataclass(frozen=True)
class HasAttachment:
    key: ClassVar[str] = "has_attachment"
    description: ClassVar[str] = "the mail has (true) or has no (false) attachment"
    expected: bool

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> HasAttachment:
        return cls(boolean(value))

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        return bool(facts.attachments) == self.expected

    def explain(self) -> str:
        return "has an attachment" if self.expected else "has no attachment"


@dataclass(frozen=True)
class AttachmentType:
    key: ClassVar[str] = "attachment_type"
    description: ClassVar[str] = (
        'an attachment has one of these types ("application/pdf", "image/*") or endings (".pdf")'
    )
    patterns: frozenset[str]

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> AttachmentType:
        found = strings(value, 'a type such as "application/pdf" or "image/*", an ending such as ".pdf", or a list')
        bad = [p for p in found if not (p.startswith(".") or re.fullmatch(r"[\w.+*-]+/[\w.+*-]+", p))]
        if bad:
            raise ValueError(f'{bad[0]!r} is neither a type like "application/pdf" nor an ending like ".pdf"')
        return cls(frozenset(p.lower() for p in found))

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        for att in facts.attachments:
            for p in self.patterns:
                if p.startswith(".") and att.filename.lower().endswith(p):
                    return True
                if not p.startswith(".") and fnmatch.fnmatchcase(att.content_type, p):
                    return True
        return False

    def explain(self) -> str:
        return f"attachment of type {' or '.join(sorted(self.patterns))}"


@dataclass(frozen=True)
class Mailbox:
    key: ClassVar[str] = "mailbox"
    description: ClassVar[str] = 'the mail came to one of these shared mailboxes (config key "support" or address)'
    names: frozenset[str]

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> Mailbox:
        found = [n.lower() for n in strings(value, "a mailbox key or address, or a list of them")]
        if ctx.mailboxes is not None:
            known = {k.lower() for k in ctx.mailboxes} | {a.lower() for a in ctx.mailboxes.values()}
            unknown = [n for n in found if n not in known]
            if unknown:
                raise ValueError(f"unknown mailbox {unknown[0]!r} (known: {', '.join(sorted(ctx.mailboxes))})")
            # Store keys: the facts carry both, and an address written in the file must match its key's mail.
            by_address = {a.lower(): k.lower() for k, a in ctx.mailboxes.items()}
            found = [by_address.get(n, n) for n in found]
        return cls(frozenset(found))

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        return facts.mailbox.lower() in self.names or facts.mailbox_address in self.names

    def explain(self) -> str:
        return f"mailbox is {' or '.join(sorted(self.names))}"


def _minutes(text: str) -> int:
    m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a time like 08:30")
    return int(m.group(1)) * 60 + int(m.group(2))


@dataclass(frozen=True)
class TimeOfDay:
    key: ClassVar[str] = "time"
    description: ClassVar[str] = 'the local time is within "HH:MM-HH:MM" ("18:00-08:00" spans midnight)'
    start: int  # minutes after midnight, inclusive
    end: int  # exclusive

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> TimeOfDay:
        if not isinstance(value, str) or value.count("-") != 1:
            raise ValueError(f'must be a range like "18:00-08:00", got {shown(value)}')
        first, second = value.split("-")
        start, end = _minutes(first), _minutes(second)
        if start == end:
            raise ValueError("start and end are the same time: leave the condition out to match all day")
        return cls(start, end)

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        minute = now.hour * 60 + now.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def explain(self) -> str:
        return f"time {self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


@dataclass(frozen=True)
class Weekday:
    key: ClassVar[str] = "weekday"
    description: ClassVar[str] = 'the local weekday is one of these ("mon" ... "sun", or "monday" ... "sunday")'
    days: frozenset[int]  # 0 is Monday, as datetime.weekday()

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> Weekday:
        days = set()
        for name in strings(value, 'a weekday such as "sat" or a list of them'):
            lowered = name.lower()
            if lowered in WEEKDAY_NAMES:
                days.add(WEEKDAY_NAMES.index(lowered))
            elif lowered in WEEKDAYS:
                days.add(WEEKDAYS.index(lowered))
            else:
                raise ValueError(f"{name!r} is not a weekday (mon, tue, wed, thu, fri, sat, sun)")
        return cls(frozenset(days))

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        return now.weekday() in self.days

    def explain(self) -> str:
        return f"weekday is {' or '.join(WEEKDAY_NAMES[d] for d in sorted(self.days))}"


@dataclass(frozen=True)
class BusinessHoursCondition:
    key: ClassVar[str] = "business_hours"
    description: ClassVar[str] = "the mail came within (true) or outside (false) the opening hours of [hours]"
    expected: bool
    hours: BusinessHours

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> BusinessHoursCondition:
        expected = boolean(value)
        if ctx.hours is None:  # checked without a config: the hours are not known, only the value's type
            return cls(expected, BusinessHours.from_config(HoursConfig()))
        if not ctx.hours.configured:
            raise ValueError("the config has no opening hours ([hours] monday ... sunday)")
        return cls(expected, ctx.hours)

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        return self.hours.is_open(now) == self.expected

    def explain(self) -> str:
        return "within opening hours" if self.expected else "outside opening hours"


class ConditionType(Protocol):
    """A predicate class as the loader's table sees it."""

    key: str
    description: str

    def parse(self, value: Any, ctx: Context) -> Condition: ...


# The condition keys of the rules file, in the order the docs list them.
CONDITIONS: tuple[ConditionType, ...] = (
    Sender,
    SenderDomain,
    Header,
    SubjectContains,
    SubjectRegex,
    BodyContains,
    BodyRegex,
    HasAttachment,
    AttachmentType,
    Mailbox,
    TimeOfDay,
    Weekday,
    BusinessHoursCondition,
)

# The conditions that read nothing but the envelope, the headers and the time.  Any other condition may read the
# body (its text or its attachments), which the milter then collects for inbound mail (Ruleset.reads_body); a new
# condition counts as reading it until it is added here.
HEADER_ONLY: tuple[type, ...] = (
    Sender,
    SenderDomain,
    Header,
    SubjectContains,
    SubjectRegex,
    Mailbox,
    TimeOfDay,
    Weekday,
    BusinessHoursCondition,
)
