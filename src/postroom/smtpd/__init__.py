"""The aiosmtpd adapter: an after-queue content filter between two Postfix listeners (the amavis pattern)."""

from postroom.smtpd.server import run, serve

__all__ = ["run", "serve"]
