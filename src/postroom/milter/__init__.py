"""The Postfix milter adapter (pymilter)."""

from postroom.milter.adapter import PostroomMilter, Runtime, make_factory, run

__all__ = ["PostroomMilter", "Runtime", "make_factory", "run"]
