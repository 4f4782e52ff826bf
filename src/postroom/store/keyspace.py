"""Every Redis key name postroom uses, in one place.

Each key carries the mailbox's hash tag (``postroom:{support@example.test}:...``), so one mailbox lives in one
Redis Cluster slot and the scripts that touch several of its keys stay atomic there.  The scripts that must name
keys they only learn while running (the open script's new ticket, the owner index) build the same names from
:func:`key_base` in Lua; tests/test_store.py checks that they match these functions.
"""

from __future__ import annotations


def key_base(prefix: str, mailbox: str) -> str:
    """``postroom:{support@example.test}:``, the same base the ticket store's keys have."""
    return f"{prefix}:{{{mailbox}}}:"


def ticket_key(prefix: str, mailbox: str, number: int) -> str:
    """The ticket's hash: owner, state, priority, tags, customer, subject, times, linked ticket."""
    return f"{key_base(prefix, mailbox)}t:{number}"


def participants_key(prefix: str, mailbox: str, number: int) -> str:
    """The set of addresses taking part in a ticket (who may use its subject token)."""
    return f"{key_base(prefix, mailbox)}p:{number}"


def message_key(prefix: str, mailbox: str, message_id: str) -> str:
    """Message-ID -> ticket number, for threading by References/In-Reply-To (expires after the index days)."""
    return f"{key_base(prefix, mailbox)}m:{message_id}"


def disputed_key(prefix: str, mailbox: str, message_id: str) -> str:
    """Exists while a Message-ID is claimed by the mails of two tickets' different senders (the index keeps the
    first): a reference to it threads only the people of the ticket the index names."""
    return f"{key_base(prefix, mailbox)}d:{message_id}"


def counter_key(prefix: str, mailbox: str) -> str:
    """The mailbox's ticket counter (INCR gives the next number)."""
    return f"{key_base(prefix, mailbox)}seq"


def owned_key(prefix: str, mailbox: str, login: str) -> str:
    """The numbers of ``login``'s open tickets (owned, not closed); kept by every script that changes an owner or
    a state, read by #away's hand-over."""
    return f"{key_base(prefix, mailbox)}owned:{login}"


def owned_indexed_key(prefix: str, mailbox: str) -> str:
    """Exists once the owner index of ``mailbox`` holds the tickets opened before the index existed."""
    return f"{key_base(prefix, mailbox)}owned-indexed"


def away_key(prefix: str, mailbox: str, login: str) -> str:
    """Exists while ``login`` is absent from ``mailbox`` (set by #away, with an expiry or until #back)."""
    return f"{key_base(prefix, mailbox)}away:{login}"


def sweep_lock_key(prefix: str, mailbox: str) -> str:
    """Held by the one ``postroom sweep`` at work on ``mailbox`` (of any host), so that no two replace one mail."""
    return f"{key_base(prefix, mailbox)}sweeping"


def round_robin_key(prefix: str, mailbox: str, group: str) -> str:
    """The login that got the group's last ticket."""
    return f"{key_base(prefix, mailbox)}rr:{group}"


def open_counts_key(prefix: str, mailbox: str) -> str:
    """A hash login -> number of open tickets the rules have counted for the agent."""
    return f"{key_base(prefix, mailbox)}open"


def reply_cap_key(prefix: str, mailbox: str, correspondent: str) -> str:
    """Auto-replies sent to one correspondent from one mailbox within the current 24-hour window."""
    return f"{key_base(prefix, mailbox)}ar:{correspondent.lower()}"


def epoch_key(prefix: str, mailbox: str) -> str:
    """Exists as long as the mailbox's Redis state is continuous with the history (postroom.epoch)."""
    return f"{key_base(prefix, mailbox)}epoch"
