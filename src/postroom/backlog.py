"""Mail delivered degraded gets its ticket once Redis is back.

While Redis is down a customer's mail is delivered unmodified (the failure policy).  What its ticket needs (the
mailbox, Message-ID, senders, subject) goes to a spool of its own on local disk; a background thread tries every
few seconds to open the tickets, in arrival order, and records each in the history as ``opened`` with the detail
``delivered degraded``.  From then on the customer's next mail threads into that ticket, and an agent's reply to
the mail finds it (rewritten, signed, with the token), as if Redis had never been away.  The mail already in the
mailbox keeps its old subject and headers (no token).

Replaying is safe: a mail's ticket is opened with its Message-ID, so the same mail again (a replay after a crash)
gets the ticket it opened, not a second one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict

from postroom.history import HistoryWriter
from postroom.spool import Spool
from postroom.tickets import NewTicket, Pending, Record, StoreUnavailable, TicketStore

log = logging.getLogger("postroom")


class Backlog:
    """The spool of degraded mails and the thread that tickets them once the store answers."""

    def __init__(self, spool: Spool, store: TicketStore, history: HistoryWriter | None, interval: float = 2.0) -> None:
        self.spool = spool
        self._store = store
        self._history = history
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="postroom-backlog", daemon=True)
        self.ticketed = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, items: list[Pending]) -> None:
        if items and not self.spool.append([asdict(p) for p in items]):
            log.error("backlog spool full: %d degraded mail(s) will not be ticketed later", len(items))

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.spool.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.spool.adopt()
            self.spool.sync()
            while not self._stop.is_set() and self.drain_once():
                pass

    def drain_once(self) -> bool:
        """Ticket one batch; False when there is nothing to do or the store is still away."""
        batch = self.spool.read(50)
        if batch is None:
            return False
        records: list[Record] = []
        try:
            for item in batch.items:
                records.append(self._ticket(Pending.from_dict(item)))
        except StoreUnavailable:
            # Still down: the ones done so far are recorded; their retry later finds their ticket by Message-ID.
            if self._history is not None and records:
                self._history.submit(records)
            return False
        if self._history is not None:
            self._history.submit(records)
        self.spool.commit(batch)
        self.ticketed += len(records)
        return True

    def _ticket(self, p: Pending) -> Record:
        new = NewTicket(
            customer=p.customer,
            subject=p.subject[:300],
            participants=p.senders,
            message_ids=(p.message_id,) if p.message_id else (),
        )
        ticket, created = self._store.open_unless_seen(p.mailbox, new, p.message_id, p.at)
        log.info(
            "%s #%d %s for the mail delivered degraded (queue id %s)",
            p.mailbox,
            ticket.number,
            "opened" if created else "already opened",
            p.queue_id or "-",
        )
        # Not created: the open call that timed out while the mail was delivered (a ghost until now) or this
        # backlog's own replay after a crash; either way the ticket is this mail's, and the history gets it.
        return Record.of(
            ticket,
            "opened",
            p.at,
            direction="inbound",
            queue_id=p.queue_id,
            message_id=p.message_id,
            actor=p.customer,
            subject=p.subject,
            detail="delivered degraded, ticketed after recovery" if created else "delivered degraded, its ticket kept",
        )
