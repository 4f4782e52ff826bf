"""``postroom config check``: the pre-flight names every mistake a daemon would stop at, with file, line and key."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from postroom.admin.cli import main
from postroom.config import example_config_path
from postroom.history import migrate
from postroom.tomllines import key_lines

GOOD = """\
[agents.meier]
address = "meier@example.test"

[mailboxes.support]
address = "support@example.test"
tag = "Support"
agents = ["meier"]
"""


def check(config: Path, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["config", "check", "--config", str(config), *extra], env={})
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "postroom.toml"
    path.write_text(text)
    return path


def test_the_shipped_example_passes_and_says_what_it_loaded() -> None:
    code, out = check(example_config_path())
    assert code == 0, out
    assert "OK (1 mailbox, 3 agents, 0 rules, 1 DKIM key, 9 reply templates, 2 canned replies)" in out


def test_the_old_positional_form_still_works_and_says_it_is_deprecated() -> None:
    res = CliRunner().invoke(main, ["config", "check", str(example_config_path())], env={})
    assert res.exit_code == 0
    assert "deprecated; use `config check --config PATH`" in res.output and ": OK (" in res.output


# One case per class of mistake: the extra TOML, and the "LINE: key: message" expected for it.  Line numbers
# count from the first line of GOOD + extra.
MISTAKES = {
    "unknown key": ("[milter]\nsokcet = 'unix:/x'\n", r":10: milter\.sokcet: unknown key"),
    "bad value": ("[redis]\ntimeout_seconds = 'soon'\n", r":10: redis\.timeout_seconds: .*number"),
    "redis url not redis": ('[redis]\nurl = "http://localhost:6379"\n', r":10: redis\.url: .*not a Redis URL"),
    "database without driver": ('[database]\nurl = "mysql://x"\n', r":10: database\.url: .*driver is not installed"),
    "database url nonsense": ('[database]\nurl = "not a url"\n', r":10: database\.url: .*not a database URL"),
    "unknown agent": (
        '[mailboxes.sales]\naddress = "sales@example.test"\ntag = "Sales"\nagents = ["meier",\n  "nobody"]\n',
        r":12: mailboxes\.sales\.agents\[1\]: unknown agent 'nobody'",
    ),
    "one address, two agents": (
        '[agents.mueller]\naddress = "MEIER@example.test"\n',
        r":10: agents\.mueller\.address: MEIER@example\.test is also agents\.meier\.address",
    ),
    "one address, two mailboxes": (
        '[mailboxes.help]\naddress = "support@example.test"\ntag = "Help"\n',
        r":10: mailboxes\.help\.address: .* is also mailboxes\.support\.address",
    ),
    "missing dkim key": (
        '[dkim."example.test"]\nselector = "s1"\nkey_file = "nope.key"\n',
        r":11: dkim\.example\.test\.key_file: .*nope\.key: No such file",
    ),
    "missing rules file": ('\nrules_file = "nope.toml"\n', r":9: rules_file: .*nope\.toml: no such file"),
    "missing templates dir": (
        '[autoreply]\nacknowledge = true\ntemplates_dir = "tpl"\n',
        r":11: autoreply\.templates_dir: .*tpl: not a directory",
    ),
    "missing canned dir": (None, r":8: mailboxes\.support\.canned_dir: .*canned: not a directory"),
    "required key missing": ('[mailboxes.sales]\naddress = "sales@example.test"\n', r":9: mailboxes\.sales\.tag: "),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_mistake_names_file_line_and_key(tmp_path: Path, mistake: str) -> None:
    extra, expected = MISTAKES[mistake]
    text = GOOD + 'canned_dir = "canned"\n' if extra is None else GOOD + "\n" + extra
    if mistake == "missing rules file":  # a top-level key must come before the first table
        text = 'rules_file = "nope.toml"\n' + GOOD
        expected = r":1: rules_file: .*nope\.toml: no such file"
    path = write(tmp_path, text)
    code, out = check(path)
    assert code == 2, out
    assert re.search(re.escape(str(path)) + expected, out), out
    assert "Traceback" not in out


def test_every_mistake_of_a_file_is_reported_in_one_run(tmp_path: Path) -> None:
    text = (
        'rules_file = "nope.toml"\n'  # 1
        "[milter]\n"
        "sokcet = 'x'\n"  # 3
        "[redis]\n"
        'url = "http://x"\n'  # 5
        "[database]\n"
        'url = "mysql://x"\n'  # 7
        "[agents.meier]\n"
        'address = "meier@example.test"\n'
        "[agents.mueller]\n"
        'address = "meier@example.test"\n'  # 11
        "[mailboxes.support]\n"
        'address = "support@example.test"\n'
        'tag = "Support"\n'
        'agents = ["meier", "nobody"]\n'  # 15
        'canned_dir = "canned"\n'  # 16
        '[dkim."example.test"]\n'
        'selector = "s1"\n'
        'key_file = "nope.key"\n'  # 19
    )
    path = write(tmp_path, text)
    code, out = check(path)
    assert code == 2
    found = re.findall(re.escape(str(path)) + r":(\d+): ([\w.\[\]-]+):", out)
    assert found == [
        ("1", "rules_file"),
        ("3", "milter.sokcet"),
        ("5", "redis.url"),
        ("7", "database.url"),
        ("11", "agents.mueller.address"),
        ("15", "mailboxes.support.agents[1]"),
        ("16", "mailboxes.support.canned_dir"),
        ("19", "dkim.example.test.key_file"),
    ], out
    assert f"{path}: 8 errors" in out


def test_a_broken_rules_file_is_named_with_its_own_line(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text('[[rule]]\nname = "x"\nassign = "nobody"\n')
    path = write(tmp_path, 'rules_file = "rules.toml"\n' + GOOD)
    code, out = check(path)
    assert code == 2
    assert re.search(re.escape(str(tmp_path / "rules.toml")) + r':3: rule "x": .*nobody', out), out


def test_a_key_file_that_is_no_key_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "k.key").write_text("not a key\n")
    path = write(tmp_path, GOOD + '[dkim."example.test"]\nselector = "s1"\nkey_file = "k.key"\n')
    code, out = check(path)
    assert code == 2 and f"{path}:10: dkim.example.test.key_file: " in out and "not a PEM private key" in out


def test_an_empty_file_is_an_error_not_ok(tmp_path: Path) -> None:
    code, out = check(write(tmp_path, ""))
    assert code == 2 and "mailboxes: no [mailboxes.NAME] table" in out


def test_toml_syntax_error_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "[milter\n")
    code, out = check(path)
    assert code == 2 and f"{path}:8: not valid TOML" in out


def test_a_bad_environment_override_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    res = CliRunner().invoke(main, ["config", "check", "--config", str(path)], env={"POSTROOM_REDIS_URL": "http://x"})
    assert res.exit_code == 2
    assert f"{path}: redis.url (from POSTROOM_REDIS_URL): " in res.output


def test_the_example_copied_alone_fails_as_the_milter_would(tmp_path: Path) -> None:
    """The deploy guide's old step 1 copied only postroom.toml: its key and canned replies stayed behind."""
    path = tmp_path / "postroom.toml"
    shutil.copy(example_config_path(), path)
    code, out = check(path)
    assert code == 2
    assert re.search(re.escape(str(path)) + r":\d+: dkim\.example\.test\.key_file: ", out)
    assert re.search(re.escape(str(path)) + r":\d+: mailboxes\.support\.canned_dir: ", out)


def test_connect_reports_redis_persistence_and_the_schema(tmp_path: Path, redis_url: str) -> None:
    db = tmp_path / "history.sqlite3"
    path = write(tmp_path, GOOD + f'[redis]\nurl = "{redis_url}"\n[database]\nurl = "sqlite:///{db}"\n')
    code, out = check(path, "--connect")
    assert code == 0, out
    assert "persistence: none" in out and "runs without AOF" in out
    assert "no file yet (postroom db upgrade creates it" in out and not db.exists()
    migrate(f"sqlite:///{db}")
    client = redis.Redis.from_url(redis_url)
    client.config_set("appendonly", "yes")
    try:
        code, out = check(path, "--connect")
    finally:
        client.config_set("appendonly", "no")
        client.close()
    assert code == 0, out
    assert "persistence: AOF (appendfsync everysec)" in out and "without AOF" not in out
    assert "schema at the newest revision" in out


def test_connect_fails_on_an_unreachable_redis_and_database(tmp_path: Path) -> None:
    from postroom_testbed import free_port  # noqa: PLC0415

    port = free_port()
    db = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x"
    path = write(tmp_path, GOOD + f'[redis]\nurl = "redis://127.0.0.1:{port}/0"\ntimeout_seconds = 0.5\n')
    path.write_text(path.read_text() + f'[database]\nurl = "{db}"\n')
    code, out = check(path, "--connect")
    assert code == 2
    assert f"redis.url redis://127.0.0.1:{port}/0: cannot reach Redis" in out
    assert "database.url postgresql+psycopg://nobody@127.0.0.1:" in out and "cannot connect" in out


_keys = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
_values = st.one_of(
    st.integers(), st.text(max_size=20), st.lists(st.integers(), max_size=3), st.just('multi\n"line"\n[x]')
)
_docs = st.dictionaries(_keys, st.dictionaries(_keys, _values, max_size=4), max_size=4)


@given(_docs, st.booleans())
def test_key_lines_finds_the_line_of_every_key(doc: dict[str, dict[str, object]], multiline: bool) -> None:
    lines = ["# a comment = 1"]
    expected: dict[tuple[str, ...], int] = {}
    for table, values in doc.items():
        lines.append(f"[{table}]")
        expected[(table,)] = len(lines)
        for key, value in values.items():
            if isinstance(value, str) and multiline:
                lines.append(f'{key} = """')
                expected[(table, key)] = len(lines)
                lines += [*value.replace("\\", "\\\\").replace('"', '\\"').split("\n"), '"""']
            elif isinstance(value, list):
                lines.append(f"{key} = [")
                expected[(table, key)] = len(lines)
                lines += [f"  {v}," for v in value] + ["]"]
            else:
                lines.append(f"{key} = {value!r}".replace("'", '"') if isinstance(value, int) else f"{key} = 0")
                expected[(table, key)] = len(lines)
    index = key_lines("\n".join(lines) + "\n")
    for path, line in expected.items():
        assert index.line(path) == line, (path, "\n".join(lines))
