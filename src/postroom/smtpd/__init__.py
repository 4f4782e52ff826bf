"""The aiosmtpd adapter: an after-queue content filter between two Postfix listeners (the amavis pattern)."""

from postroom.smtpd.server import FilterHandler, run, serve

__all__ = ["FilterHandler", "run", "serve"]
