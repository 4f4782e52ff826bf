"""Our own notices (reminders, escalations, follow-ups) passing the milter on their way into a team folder or to a
lead's own address.

``postroom remind`` sends them through the local Postfix to ``support+Meier@`` (or ``schulze@``), so they pass the
inbound path like any customer mail. The pipeline must not ticket them, nor strip their X-Postroom-* headers. The
header alone proves nothing (anyone can write it); what proves it is the notice's Message-ID, which ``postroom
remind`` indexes in Redis under the ticket before it sends. A random Message-ID that only went to the team's own
folders and leads cannot be guessed by a stranger, and a mail without the header costs no Redis round trip.
"""

from __future__ import annotations

from postroom.config import MailboxConfig
from postroom.mime import Message, message_id
from postroom.tickets import TicketStore

NOTICE_HEADER = "X-Postroom-Notice"


def ours(message: Message, store: TicketStore, boxes: list[MailboxConfig]) -> str | None:
    """ "Support #17 reminder" when the mail is a notice ``postroom remind`` sent about that ticket, else None."""
    header = message.header(NOTICE_HEADER)
    if not header:
        return None  # most mail: nothing to look up
    own_id = message_id(message.header("Message-ID"))
    if not own_id:
        return None
    parts = header.split()
    if len(parts) < 2 or not parts[1].lstrip("#").isdigit():
        return None
    number = int(parts[1].lstrip("#"))
    for box in boxes:
        found = store.lookup(box.address, [own_id], [], []).by_reference
        if found is not None and found.number == number:
            return f"{box.tag} #{number} {parts[0]}"
    return None
