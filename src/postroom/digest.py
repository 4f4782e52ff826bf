"""``postroom digest``: each agent's open tickets, each lead's figures, by mail.

Every digest is multipart/alternative: a plain-text part that reads well in any client, and an HTML part with
tables and, for leads, one chart (backlog and median first response time per day) as a PNG in a
multipart/related part referenced by ``cid:``, which Thunderbird and Outlook show inline.  Digests go to the
agents' and leads' own addresses, never to a customer, marked ``Auto-Submitted: auto-generated``.
"""

from __future__ import annotations

import datetime as dt
import html
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime

from postroom import chart, sla, stats
from postroom.config import Config, MailboxConfig
from postroom.timeline import Timeline

DAY = dt.timedelta(days=1)
CHART_DAYS = 7
_LEAD_ROWS = (
    ("opened", "New tickets"),
    ("closed", "Closed"),
    ("backlog", "Backlog (open at the end)"),
    ("unassigned", "Unassigned"),
    ("overdue", "Overdue"),
    ("breaches", "SLA breaches"),
    ("first_response_median", "First response, median (business min)"),
    ("first_response_p90", "First response, 90th percentile"),
    ("resolution_median", "Resolution, median (business min)"),
    ("resolution_p90", "Resolution, 90th percentile"),
)


@dataclass(frozen=True)
class Digest:
    to: str
    sender: str  # the shared address it comes from
    subject: str
    plain: str
    html: str
    png: bytes | None = None


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _table(head: list[str], rows: list[list[str]]) -> tuple[str, str]:
    """The same table as aligned plain text and as HTML."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    th = "".join(f'<th align="left" style="padding:2px 8px">{html.escape(h)}</th>' for h in head)
    trs = "".join(
        "<tr>" + "".join(f'<td style="padding:2px 8px">{html.escape(c)}</td>' for c in r) + "</tr>" for r in rows
    )
    markup = f'<table border="1" style="border-collapse:collapse"><tr>{th}</tr>{trs}</table>'
    return "\n".join(lines) if rows else "(none)", markup


def _ticket_rows(config: Config, box: MailboxConfig, ts: list[Timeline], clock: sla.Clock) -> list[list[str]]:
    rows: list[tuple[dt.datetime, list[str]]] = []
    for t in ts:
        dues = sla.open_dues(config, box, t, clock)
        due = min((d.at for d in dues), default=None)
        when = sla.local(config, due) if due else "-"
        rows.append((due or dt.datetime.max.replace(tzinfo=dt.UTC), [f"#{t.number}", when, t.customer, t.subject]))
    return [r for _, r in sorted(rows, key=lambda x: x[0])]


def agent_digest(config: Config, login: str, timelines: list[Timeline], now: dt.datetime) -> Digest | None:
    """An agent's open tickets by due time, those waiting on the customer, and the new ones since yesterday."""
    clock = sla.Clock(config.hours)
    plain: list[str] = [f"Good morning {config.agent_name(login)}, your tickets at {sla.local(config, now)}.\n"]
    markup: list[str] = [f"<p>Good morning {html.escape(config.agent_name(login))}, your tickets at "]
    markup.append(f"{html.escape(sla.local(config, now))}.</p>")
    total = 0
    boxes = [b for b in config.mailboxes.values() if login in b.agents]
    for box in boxes:
        mine = [t for t in timelines if t.mailbox == box.address and t.owner == login and t.created <= now]
        sections = (
            ("Open, by due time", [t for t in mine if t.state in ("new", "open")]),
            ("Waiting on the customer", [t for t in mine if t.state == "pending"]),
            ("New since yesterday", [t for t in mine if t.created > now - DAY and t.state != "closed"]),
        )
        for title, ts in sections:
            total += len(ts) if title != "New since yesterday" else 0
            text, table = _table(["Ticket", "Due", "Customer", "Subject"], _ticket_rows(config, box, ts, clock))
            plain.append(f"{box.tag}: {title} ({len(ts)})\n{text}\n")
            markup.append(f"<h3>{html.escape(box.tag)}: {html.escape(title)} ({len(ts)})</h3>{table}")
    if not total:
        return None
    return Digest(
        config.agents[login].address,
        boxes[0].address,
        f"Your tickets: {total} open or waiting ({now.astimezone(clock.zone):%Y-%m-%d})",
        "\n".join(plain),
        "<html><body>" + "".join(markup) + "</body></html>",
    )


def lead_digest(
    config: Config, box: MailboxConfig, timelines: list[Timeline], now: dt.datetime, days: int
) -> list[Digest]:
    """The mailbox's figures of the last ``days`` days against the ``days`` before, one mail per lead."""
    period = stats.Period(now - days * DAY, now)
    mine = [t for t in timelines if t.mailbox == box.address]
    this = stats.figures(config, mine, period)
    last = stats.figures(config, mine, period.previous())
    head = ["", "This period", "Previous period"]
    rows = [[label, _cell(_total(this)[k]), _cell(_total(last)[k])] for k, label in _LEAD_ROWS]
    text, table = _table(head, rows)
    agents = this["agent"]
    assert isinstance(agents, dict)
    backlog = [[who, str(f["backlog"]), str(f["overdue"])] for who, f in agents.items() if f["backlog"]]
    btext, btable = _table(["Agent", "Backlog", "Overdue"], backlog)
    bars, line = _series(config, mine, now)
    span = f"{sla.local(config, period.start)} to {sla.local(config, now)}"
    plain = f"{box.tag}: figures from {span}\n\n{text}\n\nBacklog per agent\n{btext}\n"
    chart_note = "Bars: backlog at the end of each day; line: median first response time of the day."
    markup = (
        f"<html><body><h2>{html.escape(box.tag)}: {html.escape(span)}</h2>{table}"
        f"<h3>Backlog per agent</h3>{btable}<h3>The last {CHART_DAYS} days</h3>"
        f'<p><img src="cid:CHART" alt="backlog and first response time" width="420" height="160"></p>'
        f"<p>{chart_note}</p></body></html>"
    )
    png = chart.bars_and_line(bars, line)
    subject = f"{box.tag} {'weekly' if days == 7 else 'daily'} figures: backlog {_total(this)['backlog']}"
    return [Digest(config.agents[lead].address, box.address, subject, plain, markup, png) for lead in box.leads]


def _total(result: dict[str, object]) -> dict[str, object]:
    total = result["total"]
    assert isinstance(total, dict)
    return total


def _series(config: Config, ts: list[Timeline], now: dt.datetime) -> tuple[list[float], list[float | None]]:
    bars: list[float] = []
    line: list[float | None] = []
    for i in range(CHART_DAYS, 0, -1):
        day = stats.Period(now - i * DAY, now - (i - 1) * DAY)
        total = _total(stats.figures(config, ts, day))
        bars.append(float(total["backlog"]))  # type: ignore[arg-type]
        median = total["first_response_median"]
        line.append(None if median is None else float(median))  # type: ignore[arg-type]
    return bars, line


def digests(config: Config, timelines: list[Timeline], now: dt.datetime) -> list[Digest]:
    """Every agent's digest, and the leads' (weekly ones on Mondays in the opening hours' time zone)."""
    out = [d for login in config.agents if (d := agent_digest(config, login, timelines, now)) is not None]
    weekly = config.sla.lead_digest == "weekly"
    if weekly and now.astimezone(sla.Clock(config.hours).zone).weekday() != 0:
        return out
    for box in config.mailboxes.values():
        out += lead_digest(config, box, timelines, now, 7 if weekly else 1)
    return out


def message(d: Digest, now: dt.datetime) -> EmailMessage:
    sender = d.sender
    domain = sender.rpartition("@")[2]
    msg = EmailMessage()
    msg["From"] = f"postroom digest <{sender}>"
    msg["To"] = d.to
    msg["Subject"] = d.subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = f"<postroom.digest.{uuid.uuid4().hex}@{domain}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(d.plain)
    if d.png is None:
        msg.add_alternative(d.html, subtype="html")
        return msg
    cid = f"chart.{uuid.uuid4().hex}@{domain}"
    msg.add_alternative(d.html.replace("cid:CHART", f"cid:{cid}"), subtype="html")
    html_part = msg.get_payload()[1]  # type: ignore[index]
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(d.png, "image", "png", cid=f"<{cid}>", filename="chart.png")
    return msg
