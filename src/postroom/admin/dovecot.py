"""``postroom dovecot-snippet`` and ``postroom imap-event``: the Dovecot side of the shared mailboxes.

Each shared mailbox stays one Dovecot user (support@example.test: LMTP files support+Meier@ into its folder Meier)
and is shown to its agents as a public namespace named after its tag ("Support": the mailbox's INBOX, with the
folders Support/Meier, Support/Mueller, Support/Done below it).  Agents log in with their own credentials; a
global ACL file (Dovecot's acl + imap_acl plugins, vfile) lets exactly the mailbox's agents in.  IMAPSieve runs
``postroom imap-event`` (through sieve_extprograms' vnd.dovecot.pipe, the pattern Dovecot documents for spam
training) for every mail an agent copies or moves into one of those folders.  postroom itself logs in as a master
user ("support@example.test*postroom"), which sees the mailbox's private namespace (INBOX, Meier, ...): its moves
there never run the hook again.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import imaplib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from postroom.admin.common import CONFIG_OPTION, fail, load_or_exit, redis_store
from postroom.admin.snippets import dovecot_snippet
from postroom.config import Config, MailboxConfig
from postroom.imap_event import namespace_prefix

log = logging.getLogger("postroom.imap_event")

# Read, keep flags, move in (insert, post) and out (delete flag, expunge), create folders; not "x" (delete a
# folder: Support/Meier with its mail) nor "a" (change the ACLs).  RFC 4314 letters as Dovecot spells them.
AGENT_RIGHTS = "lrwstipek"
SIEVE_PROGRAM = "postroom-imap-event"
DEFAULT_CONFIG = Path("/etc/postroom/postroom.toml")  # read when it exists and no --config is given
DEFAULT_DIR = Path("/etc/dovecot/postroom")
DEFAULT_LOCATION = "maildir:/var/vmail/{address}/Maildir"


@dataclass(frozen=True)
class Layout:
    """Where the files the Dovecot config names live, and how a shared mailbox's own mail is found."""

    directory: Path
    # Dovecot mail location of a shared mailbox's own mail; {address}, {local} and {domain} are filled in.
    mail_location: str
    config_path: Path
    python: str = sys.executable

    @property
    def conf(self) -> Path:
        return self.directory / "postroom.conf"

    @property
    def acl(self) -> Path:
        return self.directory / "acl"

    @property
    def sieve(self) -> Path:
        return self.directory / "postroom.sieve"

    @property
    def bin_dir(self) -> Path:
        return self.directory / "bin"

    @property
    def master_users(self) -> Path:
        return self.directory / "master-users"


def _location(layout: Layout, box: MailboxConfig) -> str:
    local, _, domain = box.address.partition("@")
    return layout.mail_location.format(address=box.address, local=local, domain=domain)


def _folders(config: Config, box: MailboxConfig) -> list[str]:
    folders = [config.agent_folder(login) for login in box.agents]
    extra = [f for f in (box.inbox_folder, box.done_folder) if f]
    return list(dict.fromkeys([*extra, *folders]))


def _namespace(config: Config, key: str, box: MailboxConfig, layout: Layout) -> str:
    prefix = namespace_prefix(box)
    name = re.sub(r"[^A-Za-z0-9_]", "_", key)
    # INDEXPVT: each agent keeps their own \Seen flags, so one agent reading a mail does not hide it from the rest.
    # subscriptions = yes: one list for the whole team, kept in the mailbox itself; `postroom imap-subscribe`
    # puts the mailbox's own INBOX ("Support") on it once, the folders below it are subscribed automatically.
    lines = [
        f"# {box.address}: agents {', '.join(box.agents)} see it as {prefix}, {prefix}/<folder>",
        f"namespace postroom_{name} {{",
        "  type = public",
        "  separator = /",
        f"  prefix = {prefix}/",
        f"  location = {_location(layout, box)}:INDEXPVT=~/postroom-index/{name}",
        "  subscriptions = yes",
        "  list = children",
    ]
    for folder in _folders(config, box):
        lines += [f"  mailbox {folder} {{", "    auto = subscribe", "  }"]
    lines.append("}")
    return "\n".join(lines)


def problems(config: Config) -> list[str]:
    """What would make the IMAP side ambiguous: two mailboxes shown as one folder, an agent folder named like a
    folder that already means something else."""
    found: list[str] = []
    seen: dict[str, str] = {}
    for key, box in config.mailboxes.items():
        prefix = namespace_prefix(box)
        if prefix.lower() in seen:
            found.append(f"mailboxes.{key} and mailboxes.{seen[prefix.lower()]} would both be the folder {prefix}")
        seen[prefix.lower()] = key
        special = {"INBOX": "the mailbox's INBOX", box.done_folder: "done_folder", box.inbox_folder: "inbox_folder"}
        for login in box.agents:
            folder = config.agent_folder(login)
            if folder in special or folder.upper() == "INBOX":
                what = special.get(folder, "the mailbox's INBOX")
                found.append(f"mailboxes.{key}: agent {login}'s folder {folder} is also {what}")
    return found


def acl_text(config: Config) -> str:
    """The global ACL file: a mailbox's agents may work in it and its folders (not delete them); nobody else sees it."""
    lines = ["# Written by postroom dovecot-snippet: <mailbox pattern> <identifier> <rights>."]
    for box in config.mailboxes.values():
        prefix = namespace_prefix(box)
        for login in box.agents:
            lines.append(f"{prefix} user={login} {AGENT_RIGHTS}")
            lines.append(f"{prefix}/* user={login} {AGENT_RIGHTS}")
    # postroom's master user works in each shared mailbox's private namespace (INBOX, Meier, ...).
    lines.append(f"* user={config.imap.master_user} {AGENT_RIGHTS}x")
    return "\n".join(lines) + "\n"


SIEVE_SCRIPT = f"""\
# Written by postroom dovecot-snippet.  IMAPSieve runs this for every mail copied or moved into a folder of a
# shared mailbox; postroom imap-event reads the mail on stdin and applies the move (assign, close, release).
require ["vnd.dovecot.pipe", "vnd.dovecot.environment", "variables", "imapsieve", "environment", "copy"];
set "mailbox" "";
set "user" "";
if environment :matches "imap.mailbox" "*" {{ set "mailbox" "${{1}}"; }}
if environment :matches "imap.user" "*" {{ set "user" "${{1}}"; }}
pipe :copy "{SIEVE_PROGRAM}" ["${{mailbox}}", "${{user}}"];
"""


def wrapper_text(layout: Layout) -> str:
    """The program sieve_pipe_bin_dir holds: postroom imap-event with this config, from this installation."""
    return (
        "#!/bin/sh\n"
        "# Written by postroom dovecot-snippet; Dovecot runs it as the mail user with MAILBOX USER and the mail.\n"
        f'exec "{layout.python}" -m postroom.imap_event --config "{layout.config_path}" "$@"\n'
    )


def _imapsieve(config: Config, layout: Layout) -> list[str]:
    lines: list[str] = []
    n = 0
    for box in config.mailboxes.values():
        prefix = namespace_prefix(box)
        for pattern in (prefix, f"{prefix}/*"):
            n += 1
            lines += [
                f"  imapsieve_mailbox{n}_name = {pattern}",
                f"  imapsieve_mailbox{n}_causes = COPY",
                f"  imapsieve_mailbox{n}_before = file:{layout.sieve}",
            ]
    return lines


def dovecot_config(config: Config, layout: Layout) -> str:
    """The whole Dovecot side: LMTP, master user, ACLs, one public namespace per mailbox, imapsieve."""
    parts = [
        f"# Written by postroom dovecot-snippet from {layout.config_path}; !include it from dovecot.conf (or save",
        "# it as conf.d/90-postroom.conf).  Agents log in with their own passdb entry (the login of [agents.*]).",
        dovecot_snippet(config).rstrip("\n"),
        "",
        "# postroom's own IMAP access: it logs in as '<mailbox address>*" + config.imap.master_user + "'.",
        "auth_master_user_separator = *",
        "passdb {",
        "  driver = passwd-file",
        f"  args = scheme=SSHA512 {layout.master_users}",
        "  master = yes",
        "  result_success = continue",
        "}",
        "",
        "mail_plugins = $mail_plugins acl",
        "protocol imap {",
        "  mail_plugins = $mail_plugins imap_acl imap_sieve",
        "}",
    ]
    for key, box in config.mailboxes.items():
        parts += ["", _namespace(config, key, box, layout)]
    parts += [
        "",
        "plugin {",
        f"  acl = vfile:{layout.acl}",
        "  sieve_plugins = sieve_imapsieve sieve_extprograms",
        "  sieve_global_extensions = +vnd.dovecot.pipe +vnd.dovecot.environment",
        f"  sieve_pipe_bin_dir = {layout.bin_dir}",
        *_imapsieve(config, layout),
        "}",
    ]
    return "\n".join(parts) + "\n"


def ssha512(password: str) -> str:
    """A Dovecot {SSHA512} hash: base64(sha512(password + salt) + salt)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return "{SSHA512}" + base64.b64encode(digest + salt).decode("ascii")


def master_password(config: Config, *, create: bool) -> str:
    """The master user's password from [imap] master_password_file; ``create`` makes one if the file is missing."""
    path = Path(config.imap.master_password_file)
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24) + "\n")
    try:
        first = path.read_text().splitlines()
    except OSError as exc:
        raise fail(f"imap.master_password_file {path}: {exc.strerror}") from None
    if not first or not first[0].strip():
        raise fail(f"imap.master_password_file {path}: the first line must be the password")
    return first[0].strip()


def _write(path: Path, text: str, mode: int) -> None:
    path.write_text(text)
    path.chmod(mode)


def _readable_by_dovecot(path: Path) -> None:
    # Dovecot's auth process runs as the user "dovecot": group-readable for it, for nobody else.
    try:
        os.chown(path, -1, grp.getgrnam("dovecot").gr_gid)
    except (KeyError, PermissionError):
        path.chmod(0o644)


def write_files(config: Config, layout: Layout) -> list[Path]:
    """Write the config, ACL file, sieve script (compiled), pipe program and master-user file into the directory."""
    layout.bin_dir.mkdir(parents=True, exist_ok=True)
    for directory in (layout.directory, layout.bin_dir):
        directory.chmod(0o755)
    password = master_password(config, create=True)
    _write(layout.conf, dovecot_config(config, layout), 0o644)
    _write(layout.acl, acl_text(config), 0o644)
    _write(layout.master_users, f"{config.imap.master_user}:{ssha512(password)}\n", 0o640)
    _readable_by_dovecot(layout.master_users)
    _write(layout.sieve, SIEVE_SCRIPT, 0o644)
    _write(layout.bin_dir / SIEVE_PROGRAM, wrapper_text(layout), 0o755)
    compiled = layout.sieve.with_suffix(".svbin")
    # Compiled once here: the IMAP processes (the mail user) may not write beside the script.
    result = subprocess.run(
        ["sievec", "-c", str(layout.conf), str(layout.sieve), str(compiled)],
        capture_output=True,
        text=True,
        check=False,
    )
    written = [layout.conf, layout.acl, layout.master_users, layout.sieve, layout.bin_dir / SIEVE_PROGRAM]
    if result.returncode == 0:
        compiled.chmod(0o644)  # read by the IMAP processes, which run as the mail user
        written.append(compiled)
    else:
        click.echo(
            f"note: sievec could not compile {layout.sieve} ({result.stderr.strip()}); Dovecot compiles it in memory"
            f" each time instead; run sievec -c /etc/dovecot/dovecot.conf {layout.sieve} once it is included",
            err=True,
        )
    return written


@click.command("dovecot-snippet")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Make the whole shared-mailbox configuration from this config file [default: /etc/postroom/postroom.toml"
    " if it exists; without a config: the LMTP lines only].",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DIR,
    show_default=True,
    help="Where the ACL file, the sieve script, the pipe program and the master-user file live.",
)
@click.option(
    "--mail-location",
    default=DEFAULT_LOCATION,
    show_default=True,
    help="Dovecot mail location of a shared mailbox's own mail; {address}, {local} and {domain} are filled in.",
)
@click.option(
    "--python",
    "python",
    default=sys.executable,
    show_default="this interpreter",
    help="The Python that runs postroom imap-event as Dovecot's mail user (which must be able to run it).",
)
@click.option("--write", is_flag=True, help="Write postroom.conf and the files it names into --dir.")
def dovecot_snippet_command(
    config_path: Path | None, directory: Path, mail_location: str, python: str, write: bool
) -> None:
    """Print the Dovecot configuration of the shared mailboxes: agents log in with their own credentials.

    Each shared mailbox is shown to its agents (mailboxes.*.agents; empty: every agent) as a public namespace
    named after its tag: "Support" is its INBOX, Support/Meier and Support/Done its folders.  ACLs keep everyone
    else out.  Moving a mail into a folder runs `postroom imap-event` (IMAPSieve): into an agent's folder assigns
    the ticket, into Done closes it, back into the INBOX releases it.  postroom logs in as the master user
    [imap] master_user.  With --write the files are written into --dir; include postroom.conf from dovecot.conf.
    """
    if config_path is None and DEFAULT_CONFIG.exists():
        config_path = DEFAULT_CONFIG  # the default every other command reads
    if config_path is None:
        if write:
            raise fail("--write needs --config")
        click.echo(dovecot_snippet(None), nl=False)
        return
    config = load_or_exit(config_path)
    trouble = problems(config)
    if trouble:
        raise fail("\n".join(f"{config_path}: {p}" for p in trouble))
    for token in re.findall(r"{(\w*)}", mail_location):
        if token not in ("address", "local", "domain"):
            raise fail(f"--mail-location: unknown placeholder {{{token}}}; use {{address}}, {{local}}, {{domain}}")
    layout = Layout(directory.resolve(), mail_location, config_path.resolve(), python)
    if not write:
        click.echo(dovecot_config(config, layout), nl=False)
        return
    for path in write_files(config, layout):
        click.echo(f"wrote {path}")
    click.echo(f"now add to dovecot.conf:  !include {layout.conf}   and reload Dovecot")


@click.command("imap-subscribe")
@CONFIG_OPTION
def imap_subscribe_command(config_path: Path) -> None:
    """Subscribe each shared mailbox's INBOX ("Support") for the whole team, once Dovecot runs the snippet.

    Mail clients such as Thunderbird show only subscribed folders.  The folders below it (Support/Meier,
    Support/Done) are subscribed by Dovecot itself; the mailbox's own INBOX is not, and the subscriptions of a
    shared mailbox are one list for all its agents: postroom subscribes it as the master user.  Run it again
    after adding a mailbox.
    """
    from postroom import imap_event  # noqa: PLC0415

    config = load_or_exit(config_path)
    try:
        for line in imap_event.subscribe_team_inboxes(config):
            click.echo(line)
    except (OSError, IndexError, imaplib.IMAP4.error) as exc:
        raise fail(f"IMAP as the master user at {config.imap.host}:{config.imap.port} failed: {exc}") from None


@click.command("imap-event")
@CONFIG_OPTION
@click.argument("folder")
@click.argument("user")
def imap_event_command(config_path: Path, folder: str, user: str) -> None:
    """Apply a mail an agent moved into FOLDER of a shared mailbox (run by Dovecot's IMAPSieve; the mail on stdin).

    Into an agent's folder: the ticket is assigned to that agent, with USER (the IMAP login) as actor; into the
    mailbox's done_folder: closed; back into its INBOX: released.  A move of another agent's ticket follows the
    mailbox's on_rival_reply.  Exits 0 after logging a problem: the move itself always stands.
    """
    from postroom import imap_event  # noqa: PLC0415  (the mail path does not need it)

    config = load_or_exit(config_path)
    logging.basicConfig(level=logging.WARNING, format="postroom imap-event: %(message)s", stream=sys.stderr)
    imap_event.run_event(config, config_path.resolve(), folder, user, sys.stdin.buffer)


@click.command("imap-event-followup", hidden=True)
@CONFIG_OPTION
@click.argument("followup_json")
def imap_event_followup_command(config_path: Path, followup_json: str) -> None:
    """Move a mail back and leave a note, as the master user (started by imap-event, not by hand)."""
    from postroom import imap_event  # noqa: PLC0415

    config = load_or_exit(config_path)
    logging.basicConfig(level=logging.WARNING, format="postroom imap-event: %(message)s", stream=sys.stderr)
    followup = imap_event.Followup(**json.loads(followup_json))
    try:
        log.debug("%s", imap_event.run_followup(config, followup))
    except (OSError, IndexError, imaplib.IMAP4.error) as exc:
        # Nobody reads this process's output (it is detached from Dovecot): the ticket's history tells.
        why = f"{exc.__class__.__name__}: {exc}"
        imap_event.record_failed_followup(config, redis_store(config), followup, why, time.time())
        raise SystemExit(1) from None
