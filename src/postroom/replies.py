"""Every SMTP reply postroom gives, named once, with the code in the name (checked by tests/test_replies.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    status: str  # RFC 3463 enhanced status code
    text: str

    def lines(self) -> list[str]:
        return self.text.splitlines() or [""]

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.status, text)

    def format(self, **values: str) -> Reply:
        """Fill the placeholders; the result is one ASCII line, whatever the values held."""
        text = self.text.format(**{k: " ".join(v.split()) for k, v in values.items()})
        return self.with_text(text.encode("ascii", "replace").decode("ascii"))

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


S451_TEMPORARY_FAILURE = Reply(451, "4.3.0", "postroom: temporary failure, please try again later")
S451_STORE_UNAVAILABLE = Reply(451, "4.3.0", "postroom: ticket store unavailable, please try again later")
S550_BAD_MESSAGE = Reply(550, "5.6.0", "postroom: message cannot be processed")
S550_TICKET_OWNED = Reply(
    550,
    "5.7.1",
    "postroom: {mark} belongs to {owner} since {since}. Your reply was not sent. "
    "To take the ticket over, send it again with the first line #takeover",
)
S550_BAD_COMMAND = Reply(
    550, "5.5.2", "postroom: cannot carry out {line!r}: {reason}. Nothing was changed and nothing was sent"
)
S550_NO_TICKET = Reply(
    550,
    "5.5.2",
    "postroom: {line!r} needs a ticket: answer a mail of the ticket or put [{tag} #NUMBER] in the subject. "
    "Nothing was changed",
)

# The after-queue filter's answers to Postfix's content_filter delivery (docs/deploy-after-queue.md).  Postfix
# writes them into its log line for the original queue id, which so names the queue id of the mail handed back.
S250_HANDED_BACK = Reply(250, "2.0.0", "postroom: handed back to Postfix as {queue_id}")
S250_DISCARDED = Reply(250, "2.7.0", "postroom: discarded")
# The development server (postroom demo) has no Postfix to hand mail to: it files it into its Maildir folders.
S250_FILED = Reply(250, "2.0.0", "postroom dev server: filed as {queue_id}")
S451_REINJECTION_FAILED = Reply(
    451, "4.3.0", "postroom: Postfix did not take the mail back ({reason}); it stays queued and is tried again"
)
