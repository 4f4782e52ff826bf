"""The bundle: everything a mail is decided with (config, rules, templates, DKIM keys, canned replies), loaded as
one immutable :class:`Loaded`, and the SIGHUP reload that swaps in a new bundle only when all of it is good.

For the milter's Runtime holder::

    def on_sighup() -> None:
        result = reload(config_path)              # logs why when it fails
        if isinstance(result, Loaded):
            holder.set(runtime.reloaded(result))
        # else: the old bundle stays; connections in flight keep the one they started with either way

Nothing here touches a connection: a reload only changes what the *next* connection reads from the holder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from postroom.autoreply import NO_TEMPLATES, TemplateError, Templates, load_templates
from postroom.commands import CannedError, load_canned
from postroom.config import Config, ConfigError, config_lines, load_config
from postroom.dkim import DkimError, Keyring
from postroom.rules.engine import NO_RULES, Ruleset
from postroom.rules.loader import RulesError, load_rules
from postroom.words import plural

log = logging.getLogger("postroom")


@dataclass(frozen=True)
class Loaded:
    config: Config
    rules: Ruleset
    templates: Templates
    keys: Keyring
    canned: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


class LoadError(RuntimeError):
    """Why a config could not be (re)loaded: every problem, each naming its file (and key or line)."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


def load_all(config_path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Loaded:
    """The config and what it names: ``rules_file``, ``[autoreply] templates_dir``, the DKIM keys, canned replies.

    Every problem of all of them is collected before :class:`LoadError` is raised, each naming its file and line
    (the config's line and key for a file the config names that is missing or unreadable).
    """
    name = os.fspath(config_path)
    try:
        config = load_config(name, environ)
    except ConfigError as exc:
        raise LoadError(name, exc.problems) from None
    keyed: list[tuple[tuple[str, ...], str]] = []
    problems: list[str] = []
    templates = NO_TEMPLATES
    if config.autoreply.acknowledge and not Path(config.autoreply.templates_dir).is_dir():
        keyed.append((("autoreply", "templates_dir"), f"{config.autoreply.templates_dir}: not a directory"))
    else:
        try:
            templates = load_templates(config)
        except TemplateError as exc:
            problems += exc.problems
    rules = NO_RULES
    if config.rules_file and not Path(config.rules_file).is_file():
        keyed.append((("rules_file",), f"{config.rules_file}: no such file"))
    elif config.rules_file:
        try:
            rules = load_rules(config.rules_file, config, templates if not problems and not keyed else None)
        except RulesError as exc:
            problems += [p.format(exc.path) for p in exc.problems]
    keys = Keyring({})
    try:
        keys = Keyring.from_config(config)
    except DkimError as exc:
        keyed += exc.problems
    canned: Mapping[str, Mapping[str, str]] = {}
    try:
        canned = load_canned(config)
    except CannedError as exc:
        keyed += exc.problems
    if keyed:
        lines = config_lines(name)
        problems = [
            f"{name}:{lines.line(k)}: {'.'.join(k)}: {m}" for k, m in sorted(keyed, key=lambda p: lines.line(p[0]))
        ] + problems
    if problems:
        raise LoadError(name, problems)
    return Loaded(config, rules, templates, keys, canned)


def reload(config_path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Loaded | LoadError:
    """Load again for SIGHUP: the new bundle, or the error (already logged) so the caller keeps the old one."""
    try:
        loaded = load_all(config_path, environ)
    except LoadError as exc:
        log.error("reload of %s failed, keeping the running config and rules:\n%s", exc.path, exc)
        return exc
    log.info(
        "reloaded %s: %s, %s from %s",
        os.fspath(config_path),
        plural(len(loaded.config.mailboxes), "mailbox"),
        plural(len(loaded.rules.rules), "rule"),
        loaded.rules.source or "(no rules file)",
    )
    return loaded
