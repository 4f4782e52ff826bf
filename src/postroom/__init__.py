"""postroom: a team inbox at the SMTP level."""

__version__ = "0.1.0"
