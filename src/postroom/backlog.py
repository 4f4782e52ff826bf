"""Mail delivered degraded gets its ticket once Redis is back.

While Redis is down a customer's mail is delivered unmodified (the failure policy).  What its ticket needs (the
mailbox, Message-ID, senders, subject) goes to a spool of its own on local disk; a background thread tries every
few seconds to open the tickets, in arrival order, and records each in the history as ``opened`` with the detail
``delivered degraded``.  From then on the customer's next mail threads into that ticket, and an agent's reply to
the mail finds it (rewritten, signed, with the token), as if Redis had never been away.  The mail already in the
mailbox keeps its old subject and headers (no token).

Replaying is safe: a mail's ticket is opened with its Message-ID (or, for a mail without one, an ID derived from
its headers: postroom.mime.derived_id), so the same mail again (a replay after a crash) gets the ticket it opened,
not a second one.

No ghost tickets.  A store call the client gave up on (a timeout) may still have run in Redis and opened the
mail's ticket.  Delivered degraded, the mail takes that ticket here.  Refused with a 451 (``on_error =
"tempfail"``), the mail is not in the mailbox, and its sender may or may not send it again: the ticket is closed,
tagged ``void`` and recorded as ``void`` in the history, unless the retry came first (it touched the ticket); a
retry that comes later finds the ticket under the same key and makes it its own again (postroom.inbound).  A failed
call that never reached Redis leaves nothing to settle.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict

from postroom.history import HistoryWriter
from postroom.spool import Spool
from postroom.tickets import Changes, NewTicket, Pending, Record, StoreUnavailable, Ticket, TicketStore

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
        # Called (on this thread) after a pass that ticketed something: the daemon sweeps the mailboxes then, so
        # the degraded mails there are replaced by their ticketed versions (admin.common._SweepAfterRecovery).
        self.on_recovered: Callable[[], None] = lambda: None

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
            before = self.ticketed
            while not self._stop.is_set() and self.drain_once():
                pass
            if self.ticketed > before and not self._stop.is_set():
                self.on_recovered()

    def drain_once(self) -> bool:
        """Ticket one batch; False when there is nothing to do or the store is still away."""
        batch = self.spool.read(50)
        if batch is None:
            return False
        records: list[Record] = []
        try:
            for item in batch.items:
                pending = Pending.from_dict(item)
                record = self._ticket(pending) if pending.kind == "degraded" else self._settle(pending)
                if record is not None:
                    records.append(record)
        except StoreUnavailable:
            # Still down: the ones done so far are recorded; their retry later finds their ticket by its key.
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
            message_ids=(p.key,) if p.key else (),
        )
        ticket, created = self._store.open_unless_seen(p.mailbox, new, p.key, p.at)
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

    def _settle(self, p: Pending) -> Record | None:
        """A mail refused for now: the ticket its failed call opened, if nothing used it since, is made void."""
        found = self._opened_for(p)
        if found is None or found.updated > p.at or "void" in found.tags:
            # Never opened, or its retry came first (touched it), or settled before (a replay after a crash).
            return None
        void = Changes(state="closed", add_tags=("void",))
        # In one step with the check that nothing touched it since: a retry arriving meanwhile keeps its ticket.
        ticket = self._store.update_unless_touched(p.mailbox, found.number, void, p.at, found.updated)
        if ticket is None:
            return None
        log.warning(
            "%s #%d void: opened for a mail refused for now (queue id %s, a store call postroom gave up on); "
            "if it is sent again, the ticket is its own again",
            p.mailbox,
            ticket.number,
            p.queue_id or "-",
        )
        return Record.of(
            ticket,
            "void",
            p.at,
            direction="",
            queue_id="",
            message_id="",
            actor="postroom",
            subject=p.subject,
            detail="opened for a mail refused for now (451) by a store call postroom gave up on",
        )

    def _opened_for(self, p: Pending) -> Ticket | None:
        """The ticket opened under the mail's key, if any (a lookup that also honours a disputed ID)."""
        if not p.key:
            return None
        return self._store.lookup(p.mailbox, [p.key], [], list(p.senders)).by_reference
