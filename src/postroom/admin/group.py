"""What every ``postroom`` command shares at the top: one clear line instead of a traceback for a config or service
problem, and help text whose names of files and commands are never broken at a hyphen."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Iterator, Mapping, MutableMapping

import click
import redis
from redis.exceptions import RedisClusterException
from sqlalchemy.exc import SQLAlchemyError

from postroom.admin.common import EXIT_SERVICE, EXIT_USAGE
from postroom.bundle import LoadError
from postroom.config import ConfigError
from postroom.tickets import StoreUnavailable

_NB_HYPHEN = "\u2011"  # stands in for "-" inside a word while click wraps, then turns back into "-"


class _Formatter(click.HelpFormatter):
    """click's wrapping breaks after a hyphen ("docs/deploy- milter.md", "postroom postfix- snippet"); names of
    files and commands must stay whole to be copied, so hyphens inside words are hidden from the wrapper."""

    def write_text(self, text: str) -> None:
        super().write_text(re.sub(r"(?<=\S)-(?=\S)", _NB_HYPHEN, text))

    def write_dl(self, rows: Iterable[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        hidden = [(a, re.sub(r"(?<=\S)-(?=\S)", _NB_HYPHEN, b)) for a, b in rows]
        super().write_dl(hidden, col_max, col_spacing)

    def getvalue(self) -> str:
        return super().getvalue().replace(_NB_HYPHEN, "-")


class _Context(click.Context):
    formatter_class = _Formatter


def use_formatter(command: click.Command) -> None:
    command.context_class = _Context
    if isinstance(command, click.Group):
        # A command not loaded yet gets the formatter when it is (LazyCommands).
        subs = command.commands.loaded() if isinstance(command.commands, LazyCommands) else command.commands.values()
        for sub in subs:
            use_formatter(sub)


class LazyCommands(MutableMapping[str, click.Command]):
    """A group's subcommands by name, where one named as "module:attribute" is imported when it is first looked up
    (run, listed by --help, or walked by a test).  The daemons then never hold in memory what only the admin
    commands use: aiosmtpd through the sweep, SQLAlchemy's ORM through the tickets and time commands."""

    def __init__(self, commands: Mapping[str, click.Command], lazy: Mapping[str, str]) -> None:
        self._loaded = dict(commands)
        self._lazy = {name: where for name, where in lazy.items() if name not in self._loaded}

    def loaded(self) -> list[click.Command]:
        return list(self._loaded.values())

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded:
            module, _, attribute = self._lazy[name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self._lazy[name]} is not a click command")
            use_formatter(command)
            self._loaded[name] = command
        return self._loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._lazy.pop(name, None)
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        found = self._loaded.pop(name, None) is not None
        if self._lazy.pop(name, None) is None and not found:
            raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter([*self._loaded, *(name for name in self._lazy if name not in self._loaded)])

    def __len__(self) -> int:
        return len(self._loaded.keys() | self._lazy.keys())


class MainGroup(click.Group):
    """The command group, which turns every configuration or service problem into one clear line, never into a
    traceback: a mistake in a file is the admin's to fix (exit 2), an unreachable service the site's (exit 1)."""

    def add_lazy(self, lazy: Mapping[str, str]) -> None:
        """Subcommands by name as "module:attribute", imported when first looked up (see LazyCommands)."""
        self.commands = LazyCommands(self.commands, lazy)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (ConfigError, LoadError) as exc:
            for problem in exc.problems:
                click.echo(problem, err=True)
            raise SystemExit(EXIT_USAGE) from None
        except (StoreUnavailable, redis.RedisError, RedisClusterException) as exc:
            click.echo(f"postroom: Redis: {exc}", err=True)
        except SQLAlchemyError as exc:
            click.echo(f"postroom: database: {getattr(exc, 'orig', None) or exc}", err=True)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"postroom: {where}{exc.strerror or exc}", err=True)
        raise SystemExit(EXIT_SERVICE)
