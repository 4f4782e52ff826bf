"""``python -m postroom_testbed``: run a stack until Ctrl-C and print how to reach it."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Sequence

from postroom_testbed.dovecot import Login, MailUser
from postroom_testbed.stack import Stack

# ---------------------------------------------------------------------------------------------
# demo


def main(argv: Sequence[str] | None = None) -> int:
    """Run a stack until Ctrl-C and print how to reach it: ``python -m postroom_testbed``."""
    parser = argparse.ArgumentParser(prog="python -m postroom_testbed", description=main.__doc__)
    parser.add_argument(
        "--milter", default=None, help='"auto" for unix:<tempdir>/milter.sock, or a Postfix milter spec'
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir on exit")
    args = parser.parse_args(argv)
    # Killed by a signal, Python would skip the with-block's clean-up and leave the daemons
    # running. Also set SIGINT: a shell starts background jobs with it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    users = [MailUser("support@example.test"), MailUser("alice@customer.test")]
    logins = [Login("meier")]
    with Stack(users=users, logins=logins, milter=args.milter, keep_dir=args.keep) as stack:
        print(
            f"""\
postroom testbed in {stack.root}
  SMTP (MX)      127.0.0.1:{stack.postfix.smtp_port}
  submission     127.0.0.1:{stack.postfix.submission_port}  (AUTH PLAIN {logins[0].name} / {logins[0].password})
  IMAP           127.0.0.1:{stack.dovecot.imap_port}  ({", ".join(u.address for u in users)} / secret)
  Redis          {stack.redis.url}
  milter         {stack.postfix.milter or "(none)"}
  logs           {stack.postfix.log_path} {stack.dovecot.log_path}
  try: swaks --server 127.0.0.1:{stack.postfix.smtp_port} --to support+Meier@example.test
Ctrl-C stops it.""",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
