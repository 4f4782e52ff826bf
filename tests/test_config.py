"""The config schema: the shipped example loads, mistakes name the file and the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from postroom.config import (
    ConfigError,
    MailboxConfig,
    SlaPolicy,
    example_config_path,
    load_config,
    parse_config,
    to_toml,
)


def test_example_config_loads_with_the_documented_team() -> None:
    config = load_config(example_config_path(), environ={})
    box = config.mailboxes["support"]
    assert box.address == "support@example.test"
    assert box.agents == ["meier", "mueller", "schulze"]
    for login in box.agents:
        agent = config.agents[login]
        assert agent.address == f"{login}@example.test"
        assert config.agent_folder(login) == login.capitalize()


def test_every_key_of_the_schema_is_in_the_example() -> None:
    data = tomllib.loads(example_config_path().read_text())
    for section in ("milter", "smtpd", "redis", "database", "hours", "autoreply", "mailer", "sla", "metrics"):
        model = type(getattr(load_config(example_config_path(), environ={}), section))
        assert set(data[section]) == set(model.model_fields), section
    assert "rules_file" in data
    support = data["mailboxes"]["support"]
    assert set(support) == set(MailboxConfig.model_fields)
    assert set(support["sla"]["normal"]) == set(SlaPolicy.model_fields)


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "POSTROOM_REDIS_URL": "redis://127.0.0.1:7777/3",
        "POSTROOM_DATABASE_URL": "sqlite:////tmp/x.sqlite3",
        "POSTROOM_MILTER_SOCKET": "unix:/tmp/m.sock",
    }
    config = load_config(example_config_path(), environ=env)
    assert config.redis.url == env["POSTROOM_REDIS_URL"]
    assert config.database.url == env["POSTROOM_DATABASE_URL"]
    assert config.milter.socket == env["POSTROOM_MILTER_SOCKET"]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[milter]\nsokcet = 'unix:/x'\n", "milter.sokcet: unknown key"),
        ("[milter]\non_error = 'bounce'\n", "milter.on_error"),
        ("[redis]\ntimeout_seconds = -1\n", "redis.timeout_seconds"),
        ("colour = 'blue'\n", "colour: unknown key"),
        ("[agents.meier]\naddress = 'not an address'\n", "agents.meier.address"),
        (
            "[mailboxes.support]\naddress = 'support@example.test'\ntag = 'Support'\nagents = ['nobody']\n",
            "unknown agent 'nobody'",
        ),
        ("[mailboxes.support]\naddress = 'support@example.test'\n", "mailboxes.support.tag: Field required"),
        ("[milter\n", "not valid TOML"),
        ("[sla]\nremind_before = '1 hour'\n", "sla.remind_before: '1 hour' is not a duration like 30m"),
        (
            "[mailboxes.s]\naddress = 's@example.test'\ntag = 'S'\n[mailboxes.s.sla.normal]\nfirst_response = '4'\n",
            "mailboxes.s.sla.normal.first_response",
        ),
        ("[mailboxes.s]\naddress = 's@example.test'\ntag = 'S'\n[mailboxes.s.sla.asap]\n", "mailboxes.s.sla.asap"),
        (
            "[mailboxes.s]\naddress = 's@example.test'\ntag = 'S'\nleads = ['boss']\n",
            "mailboxes.s.leads[0]: unknown agent 'boss'",
        ),
        ("[metrics]\nmilter_listen = '0.0.0.0:9151'\n", "must be a loopback HOST:PORT"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml", environ={})


def test_mailbox_for_maps_detail_addresses() -> None:
    config = parse_config({"mailboxes": {"support": {"address": "support@example.test", "tag": "Support"}}}, environ={})
    assert config.mailbox_for("<Support+Meier@Example.test>") is not None
    hit = config.mailbox_for("support+Meier@example.test")
    assert hit is not None and hit[2] == "Meier"
    assert config.mailbox_for("sales@example.test") is None


def test_to_toml_round_trips_the_example() -> None:
    config = load_config(example_config_path(), environ={})
    assert parse_config(tomllib.loads(to_toml(config)), environ={}) == config
