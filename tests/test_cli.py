"""The postroom command's own subcommands (config check, dkim genkey, db upgrade)."""

from __future__ import annotations

import re
from pathlib import Path

import dns.zone
from click.testing import CliRunner

from postroom.admin.cli import main
from postroom.dkim import SigningKey, sign
from tests.dkim_check import assert_verified


def test_dkim_genkey_writes_a_private_key_and_a_record_that_loads_and_verifies(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["dkim", "genkey", "Example.ORG", "s1", "--dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    key_file = tmp_path / "example.org.s1.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    line = next(x for x in res.output.splitlines() if "IN TXT" in x)
    # The record as printed loads into a zone as DNS servers read it: strings of at most 255 bytes.
    zone = dns.zone.from_text(f"$ORIGIN example.org.\n$TTL 300\n@ IN SOA ns. h. 1 1 1 1 1\n@ IN NS ns.\n{line}\n")
    rdata = zone.find_rdataset("s1._domainkey", "TXT")[0]
    assert len(rdata.strings) == 2 and all(len(s) <= 255 for s in rdata.strings)
    record = b"".join(rdata.strings).decode()
    assert re.fullmatch(r"v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]+", record)
    assert 'key_file = "' + str(key_file) + '"' in res.output
    headers = [("From", "support@example.org"), ("To", "a@b.test"), ("Subject", "hi")]
    value = sign(SigningKey("example.org", "s1", key_file.read_bytes()), headers, b"body\r\n")
    msg = f"DKIM-Signature: {value}\r\n".encode() + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
    assert_verified(msg + b"\r\nbody\r\n", {"s1._domainkey.example.org.": record})
    again = runner.invoke(main, ["dkim", "genkey", "example.org", "s1", "--dir", str(tmp_path)])
    assert again.exit_code == 2 and "not overwriting" in again.output


def test_dkim_genkey_refuses_a_bad_domain_or_selector(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["dkim", "genkey", "bad domain!", "s 1", "--dir", str(tmp_path)])
    assert res.exit_code == 2
    assert "'bad domain!' is not a domain name" in res.output and "'s 1' is not a selector" in res.output
    assert list(tmp_path.iterdir()) == []


def test_db_upgrade_creates_the_schema(tmp_path: Path, db_url: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\nurl = "{db_url}"\n[mailboxes.s]\naddress = "s@example.test"\ntag = "S"\n')
    res = CliRunner().invoke(main, ["db", "upgrade", "--config", str(config)], env={"POSTROOM_DATABASE_URL": db_url})
    assert res.exit_code == 0, res.output
    assert "created the history schema (revision " in res.output
    again = CliRunner().invoke(main, ["db", "upgrade", "--config", str(config)], env={"POSTROOM_DATABASE_URL": db_url})
    assert again.exit_code == 0 and "already at the newest revision" in again.output


def test_config_example_copies_what_the_config_names_and_never_overwrites(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc).mkdir()
    (etc / "postroom.toml").write_text("# mine\n")
    res = CliRunner().invoke(main, ["config", "example", str(etc)])
    assert res.exit_code == 0, res.output
    assert f"{etc / 'postroom.toml'}: exists, left as it is" in res.output
    assert (etc / "postroom.toml").read_text() == "# mine\n"
    assert (etc / "rules.toml").is_file() and (etc / "canned" / "refund.txt").is_file()
    assert (etc / "templates" / "ack.en.txt").is_file()
    assert (etc / "dkim" / "example.test.postroom.key").stat().st_mode & 0o777 == 0o600
    assert not (etc / "demo-rules.toml").exists()


def test_help_never_breaks_a_name_at_its_hyphen_and_hides_the_worker() -> None:
    runner = CliRunner()
    for width in range(60, 121, 3):
        for command in (["smtpd"], ["postfix-snippet"], ["milter"], ["config", "check"]):
            out = runner.invoke(main, [*command, "--help"], terminal_width=width).output
            assert not re.search(r"\w-\n", out), (width, command, out)
    milter_help = runner.invoke(main, ["milter", "--help"]).output
    assert "milter-worker" not in milter_help
