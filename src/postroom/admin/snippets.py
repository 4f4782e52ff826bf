"""``postroom postfix-snippet`` and ``postroom dovecot-snippet``: the lines an admin adds, made from the config.

The after-queue recipe is Postfix's own (FILTER_README, "advanced content filter"), with one change: the filter
is set on the MX and submission listeners only, not in main.cf, so mail Postfix makes itself (bounces, local
sendmail) never goes through it.  The testbed builds its Postfix from the same option tables, so the end-to-end
tests run exactly what these commands print (docs/deploy-*.md quote them and a test keeps them in step).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import click

from postroom.admin.common import CONFIG_OPTION, load_or_exit
from postroom.config import Config

# The transport Postfix delivers to postroom with, named in content_filter.
TRANSPORT = "postroom"

# On the listeners whose mail postroom must see.  no_address_mappings: virtual aliases are expanded once, after
# the filter, so postroom sees support@ as the customer wrote it (FILTER_README).
FILTERED_LISTENER = {"receive_override_options": "no_address_mappings"}
# The submission listener also writes the agent's SMTP login into its Received header: the only way the login
# reaches an after-queue filter (the filter removes it again before the mail goes on).
SUBMISSION_LISTENER = {"smtpd_sasl_authenticated_header": "yes"}
# The smtp client that delivers to postroom: XFORWARD tells postroom (and, passed on, the re-injection listener)
# the original client; no MIME conversion, so what postroom signs is what it received.
TRANSPORT_OPTIONS = {
    "smtp_send_xforward_command": "yes",
    "disable_mime_output_conversion": "yes",
    "smtp_generic_maps": "",
}
# Where postroom hands mail back: no content filter (or mail would loop), no milters and none of the checks the
# mail already passed on the way in.
REINJECT_OPTIONS = {
    "content_filter": "",
    "receive_override_options": "no_unknown_recipient_checks,no_header_body_checks,no_milters",
    "smtpd_helo_restrictions": "",
    "smtpd_client_restrictions": "",
    "smtpd_sender_restrictions": "",
    "smtpd_relay_restrictions": "",
    "smtpd_recipient_restrictions": "permit_mynetworks,reject",
    "smtpd_data_restrictions": "",
    "mynetworks": "127.0.0.0/8",
    "smtpd_authorized_xforward_hosts": "127.0.0.0/8",
}
# Processes Postfix runs at most for the transport and the re-injection listener (FILTER_README's figure).
MAX_PROCESSES = 10


def content_filter(config: Config) -> str:
    return f"{TRANSPORT}:[{config.smtpd.listen_host}]:{config.smtpd.listen_port}"


def options(values: Mapping[str, str]) -> str:
    return "".join(f"\n  -o {name}={value}" for name, value in values.items())


def postfix_milter_spec(socket: str) -> str:
    """libmilter's socket notation (inet:PORT@HOST) in Postfix's (inet:HOST:PORT)."""
    m = re.match(r"^(inet6?):(\d+)(?:@(.+))?$", socket)
    if m:
        family, port, host = m.groups()
        host = host or ("::1" if family == "inet6" else "127.0.0.1")
        return f"inet:[{host}]:{port}" if ":" in host else f"inet:{host}:{port}"
    return "unix:" + socket.split(":", 1)[1]


def milter_snippet(config: Config) -> str:
    spec = postfix_milter_spec(config.milter.socket)
    lines = [
        "# --- milter mode, main.cf ---",
        f"smtpd_milters = {spec}",
        "# If postroom is down, customer mail is delivered as it is, never bounced.",
        "milter_default_action = accept",
        "milter_protocol = 6",
        f"recipient_delimiter = {config.recipient_delimiter}",
    ]
    if spec.startswith("unix:"):
        lines += [
            "# A chrooted smtpd (\"y\" in master.cf's chroot column, Debian's default) looks for the socket",
            "# inside /var/spool/postfix: turn chroot off for smtpd or put the socket there.",
        ]
    lines += [
        "",
        "# --- milter mode, master.cf: add to the submission service (port 587) ---",
        "# An agent's reply waits (the mail client retries) rather than leave unrewritten while postroom is down.",
        "  -o milter_default_action=tempfail",
    ]
    return "\n".join(lines) + "\n"


def after_queue_master_cf(config: Config) -> str:
    """The master.cf lines of after-queue mode, with every option the testbed also runs."""
    filtered = {"content_filter": content_filter(config), **FILTERED_LISTENER}
    s = config.smtpd
    return (
        "smtp      inet  n       -       y       -       -       smtpd"
        + options(filtered)
        + "\nsubmission inet n       -       y       -       -       smtpd"
        + "\n  # (keep the submission service's own -o lines: SASL, TLS, restrictions)"
        + options({**filtered, **SUBMISSION_LISTENER})
        + f"\n{TRANSPORT:<9} unix  -       -       n       -       {MAX_PROCESSES:<7} smtp"
        + options(TRANSPORT_OPTIONS)
        + f"\n{s.reinject_host}:{s.reinject_port} inet n  -       n       -       {MAX_PROCESSES:<7} smtpd"
        + options(REINJECT_OPTIONS)
        + "\n"
    )


def after_queue_snippet(config: Config) -> str:
    return (
        "# --- after-queue mode (postroom smtpd), main.cf ---\n"
        f"recipient_delimiter = {config.recipient_delimiter}\n"
        "\n"
        "# --- after-queue mode, master.cf: the -o lines go under your smtp and submission services; the postroom\n"
        "# transport and the re-injection listener are new services ---\n"
        f"# Postfix queues each mail, hands it to postroom on {config.smtpd.listen_host}:{config.smtpd.listen_port}"
        f" and takes it back on {config.smtpd.reinject_host}:{config.smtpd.reinject_port}.\n"
        + after_queue_master_cf(config)
    )


def postfix_snippet(config: Config, mode: str = "both") -> str:
    parts = []
    if mode in ("milter", "both"):
        parts.append(milter_snippet(config))
    if mode in ("after-queue", "both"):
        parts.append(after_queue_snippet(config))
    return "\n".join(parts)


def dovecot_snippet(config: Config | None) -> str:
    delimiter = config.recipient_delimiter if config is not None else "+"
    lines = [
        "# Dovecot (e.g. /etc/dovecot/conf.d/90-postroom.conf): LMTP files support+Meier@ into folder Meier of",
        "# the support mailbox, creating and subscribing the folder on first use.",
        f"recipient_delimiter = {delimiter}",
        "lmtp_save_to_detail_mailbox = yes",
        "lda_mailbox_autocreate = yes",
        "lda_mailbox_autosubscribe = yes",
    ]
    if config is not None:
        for box in config.mailboxes.values():
            folders = [config.agent_folder(login) for login in box.agents]
            if box.inbox_folder:
                folders.insert(0, box.inbox_folder)
            lines.append(f"# {box.address}: folders {', '.join(folders) or '(none)'}")
    return "\n".join(lines) + "\n"


@click.command("postfix-snippet")
@CONFIG_OPTION
@click.option(
    "--mode",
    type=click.Choice(["both", "milter", "after-queue"]),
    default="both",
    show_default=True,
    help="Which deployment to print: the milter, the after-queue content filter (postroom smtpd), or both.",
)
def postfix_snippet_command(config_path: Path, mode: str) -> None:
    """Print the main.cf and master.cf lines that put postroom in front of the shared mailbox.

    Milter mode (postroom milter) is the default deployment; after-queue mode (postroom smtpd) is Postfix's
    content_filter recipe.  See docs/deploy-milter.md and docs/deploy-after-queue.md.
    """
    click.echo(postfix_snippet(load_or_exit(config_path), mode), nl=False)
