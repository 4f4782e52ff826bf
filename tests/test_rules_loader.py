"""The rules file loader: the shipped example loads, every mistake names file, rule and line, nothing else escapes."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom.autoreply import load_templates
from postroom.bundle import Loaded, LoadError, load_all, reload
from postroom.config import example_config_path, load_config, parse_config, to_toml
from postroom.rules import (
    RulesError,
    Ruleset,
    context_for,
    load_rules,
    parse_rules,
)
from postroom.rules.actions import ACTIONS
from postroom.rules.predicates import CONDITIONS

EXAMPLE_RULES = example_config_path().parent / "rules.toml"
CONFIG = load_config(example_config_path(), environ={})
CTX = context_for(CONFIG, load_templates(CONFIG))


def problems(text: str) -> list[str]:
    with pytest.raises(RulesError) as err:
        parse_rules(text, "r.toml", CTX)
    return [p.format("r.toml") for p in err.value.problems]


def test_the_shipped_example_loads_against_the_shipped_config_and_templates() -> None:
    ruleset = load_rules(EXAMPLE_RULES, CONFIG, load_templates(CONFIG))
    names = [r.name for r in ruleset.rules]
    assert names[0] == "spam flagged by the filter"
    assert names[-1] == "everything else, in turn"
    assert set(ruleset.groups) == {"billing", "firstline"}
    # Every condition and action key is documented in the example's header comment.
    text = EXAMPLE_RULES.read_text()
    for key in [c.key for c in CONDITIONS] + [a.key for a in ACTIONS]:
        assert f"#   {key} = " in text or f"  {key} = " in text, key


BROKEN = """\
[groups]
billing = ["meier", "nobody"]

[[rule]]
name = "typo"
subjet_contains = "invoice"
tag = "billing"

[[rule]]
name = "bad regex"
tag = "x"
subject_regex = "(unclosed"

[[rule]]
name = "ghost agent"
assign = "meyer"

[[rule]]
name = "catch all"
tag = "all"
stop = true

[[rule]]
name = "never reached"
subject_contains = "x"
tag = "y"
"""


def test_every_error_names_file_rule_and_line() -> None:
    assert problems(BROKEN) == [
        "r.toml:2: group 'billing': unknown agent 'nobody' (agents: meier, mueller, schulze)",
        "r.toml:6: rule \"typo\": unknown key 'subjet_contains' (did you mean 'subject_contains'?)",
        "r.toml:12: rule \"bad regex\": subject_regex: bad regular expression '(unclosed': "
        "missing ), unterminated subpattern at position 0",
        "r.toml:16: rule \"ghost agent\": assign: unknown agent 'meyer' (agents: meier, mueller, schulze)",
        'r.toml:23: rule "never reached": unreachable: rule "catch all" (line 18) matches every mail and stops',
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[rule]]\nname = "a"\ntag = "x"\n[[rule]]\nname = "a"\ntag = "y"\n', 'r.toml:4: rule "a": the name is'),
        ('[[rule]]\ntag = "x"\n', 'r.toml:1: rule "#1": has no name'),
        ('[[rule]]\nname = "quiet"\nsubject_contains = "x"\n', 'r.toml:1: rule "quiet": does nothing'),
        ('[[rule]]\nname = "p"\npriority = "asap"\n', 'r.toml:3: rule "p": priority: must be one of low, normal'),
        ('[[rule]]\nname = "f"\nfolder = "a/b"\n', "r.toml:3: rule \"f\": folder: folder 'a/b' must match"),
        (
            '[[rule]]\nname = "t"\nauto_reply = "thanks"\n',
            "r.toml:3: rule \"t\": auto_reply: unknown template 'thanks'",
        ),
        (
            '[[rule]]\nname = "g"\nassign_round_robin = "sales"\n',
            'r.toml:3: rule "g": assign_round_robin: unknown group',
        ),
        (
            '[[rule]]\nname = "two"\nassign = "meier"\nassign_least_open = "support"\n',
            'r.toml:4: rule "two": assign_least_open and assign: one assignment per rule',
        ),
        ('colour = "blue"\n[[rule]]\nname = "x"\ntag = "y"\n', "r.toml:1: unknown key 'colour'"),
        ('[[rule]]\nname = "syntax"\ntag = "x\n', 'r.toml:3: rule "syntax": not valid TOML'),
        ('[[rule]]\nname = "h"\n[rule.header]\nname = "X-A"\n', 'r.toml:3: rule "h": header: needs exactly one of'),
        (
            '[[rule]]\nname = "spam"\nsubject_contains = "spam"\nstop = true\n'
            '[[rule]]\nname = "spam and pdf"\nsubject_contains = "spam"\nhas_attachment = true\ntag = "x"\n',
            'r.toml:5: rule "spam and pdf": unreachable: rule "spam" (line 1) matches every mail this one matches',
        ),
    ],
)
def test_single_mistakes(text: str, expected: str) -> None:
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_rules_checked_without_a_config_still_catch_the_files_own_mistakes() -> None:
    ruleset = parse_rules('[[rule]]\nname = "a"\nassign = "anyone"\nmailbox = "anything"\n', "r.toml")
    assert ruleset.rules[0].name == "a"
    with pytest.raises(RulesError, match="bad regular expression"):
        parse_rules('[[rule]]\nname = "a"\nbody_regex = "["\ntag = "x"\n', "r.toml")


def test_unreadable_and_non_utf8_files_are_located_errors(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"nope\.toml:1: cannot read"):
        load_rules(tmp_path / "nope.toml", CONFIG)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[[rule]]\nname = "umlaut"\nsubject_contains = "K\xfcndigung"\ntag = "x"\n')
    with pytest.raises(RulesError, match=r'latin\.toml:3: rule "umlaut": not UTF-8 text'):
        load_rules(latin, CONFIG)


# -- property: whatever an admin (or a fuzzer) writes, the loader answers with rules or located errors --

KEYS = [c.key for c in CONDITIONS] + [a.key for a in ACTIONS] + ["name", "stop", "nmae", "groups", "rule"]
VALUES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["(", "[a-", "meier", "nobody", "support", "urgent", "18:00-08:00", "sat", ".pdf", "image/*"]),
    st.integers(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.sampled_from(["name", "contains", "regex", "present", "x"]), st.text(max_size=8), max_size=3),
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"


RULE_TABLES = st.lists(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5), max_size=5)


def check_outcome(text: str) -> None:
    lines = max(1, len(text.splitlines()))
    try:
        ruleset = parse_rules(text, "fuzz.toml", CTX)
    except RulesError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert 1 <= problem.line <= lines + 1, (problem, text)
            assert problem.format("fuzz.toml").startswith(f"fuzz.toml:{problem.line}: ")
        return
    assert isinstance(ruleset, Ruleset)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(RULE_TABLES)
def test_random_rule_structures_give_rules_or_located_errors(tables: list[dict[str, Any]]) -> None:
    text = "".join("[[rule]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items()) for table in tables)
    check_outcome(text)


FRAGMENTS = st.sampled_from(
    [
        "[[rule]]\n",
        "[groups]\n",
        "[rule.header]\n",
        'name = "n"\n',
        'name = "n"\n',
        "tag = 'x'\n",
        "stop = true\n",
        'subject_regex = "("\n',
        'assign = "meier"\n',
        "header = { name = 'X', contains = 'y' }\n",
        "billing = ['meier']\n",
        "rule = 5\n",
        '"quoted" = 1\n',
        "= broken\n",
        "[[rule\n",
        "x = [[[[[\n",
        "x = 1" + "0" * 5000 + "\n",
        "\n",
    ]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(FRAGMENTS, st.text(alphabet=string.printable, max_size=30)), max_size=12))
def test_random_toml_ish_text_gives_rules_or_located_errors(parts: list[str]) -> None:
    check_outcome("".join(parts))


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_random_text_gives_rules_or_located_errors(text: str) -> None:
    check_outcome(text)


# -- loading with the config, and the SIGHUP reload --


def write_setup(tmp_path: Path, rules_text: str) -> Path:
    config = parse_config({**CONFIG.model_dump(), "rules_file": "rules.toml"}, environ={})
    (tmp_path / "rules.toml").write_text(rules_text)
    path = tmp_path / "postroom.toml"
    text = to_toml(config).replace(f'rules_file = "{config.rules_file}"', 'rules_file = "rules.toml"')
    path.write_text(text)
    return path


def test_rules_file_is_found_relative_to_the_config(tmp_path: Path) -> None:
    path = write_setup(tmp_path, '[[rule]]\nname = "one"\ntag = "x"\n')
    loaded = load_all(path, environ={})
    assert loaded.config.rules_file == str(tmp_path / "rules.toml")
    assert [r.name for r in loaded.rules.rules] == ["one"]
    assert "ack" in loaded.templates.names()


def test_a_broken_rules_file_on_reload_keeps_the_old_rules_and_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_setup(tmp_path, '[[rule]]\nname = "one"\ntag = "x"\n')
    first = reload(path, environ={})
    assert isinstance(first, Loaded)
    (tmp_path / "rules.toml").write_text('[[rule]]\nname = "two"\nassign = "nobody"\n')
    second = reload(path, environ={})
    assert isinstance(second, LoadError)
    assert f"{tmp_path / 'rules.toml'}:3: rule \"two\": assign: unknown agent 'nobody'" in second.problems[0]
    assert "keeping the running config and rules" in caplog.text and "unknown agent 'nobody'" in caplog.text
    # What a holder keeps is the first bundle, untouched.
    assert [r.name for r in first.rules.rules] == ["one"]
    (tmp_path / "rules.toml").write_text('[[rule]]\nname = "three"\ntag = "y"\n')
    third = reload(path, environ={})
    assert isinstance(third, Loaded) and [r.name for r in third.rules.rules] == ["three"]


def test_a_broken_config_on_reload_is_an_error_too(tmp_path: Path) -> None:
    path = write_setup(tmp_path, '[[rule]]\nname = "one"\ntag = "x"\n')
    path.write_text("colour = 'blue'\n" + path.read_text())
    result = reload(path, environ={})
    assert isinstance(result, LoadError)
    assert result.problems == [f"{path}:1: colour: unknown key"]
