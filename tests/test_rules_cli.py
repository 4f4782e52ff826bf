"""``postroom rules check`` and ``postroom rules test`` as an admin runs them."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from postroom.admin.cli import main
from postroom.config import example_config_path, load_config, parse_config, to_toml

EXAMPLE_CONFIG = example_config_path()
EXAMPLE_RULES = EXAMPLE_CONFIG.parent / "rules.toml"
FIXTURES = Path(__file__).parent / "fixtures" / "rules"
# Nothing listens here: a dry run that touched Redis or SQL would fail loudly.
NO_SERVICES = {"POSTROOM_REDIS_URL": "redis://127.0.0.1:1/0", "POSTROOM_DATABASE_URL": "sqlite:////nonexistent/h.db"}


def test_check_accepts_the_shipped_example_and_prints_the_table() -> None:
    res = CliRunner().invoke(main, ["rules", "check", str(EXAMPLE_RULES), "--config", str(EXAMPLE_CONFIG)])
    assert res.exit_code == 0, res.output
    assert f"{EXAMPLE_RULES}: OK (8 rules, 2 groups; against {EXAMPLE_CONFIG})" in res.output
    assert "spam flagged by the filter: if header X-Spam-Flag contains 'yes': folder Spam" in res.output


def test_check_reports_every_error_with_file_line_and_rule_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text(
        '[[rule]]\nname = "vip"\nsender_domain = "bigcorp.example"\nassign = "meyer"\n\n'
        '[[rule]]\nname = "regex"\nsubject_regex = "*oops"\ntag = "x"\n'
    )
    res = CliRunner().invoke(main, ["rules", "check", str(bad), "--config", str(EXAMPLE_CONFIG)])
    assert res.exit_code == 2
    assert f"{bad}:4: rule \"vip\": assign: unknown agent 'meyer' (agents: meier, mueller, schulze)" in res.output
    assert f'{bad}:8: rule "regex": subject_regex: bad regular expression' in res.output


def test_check_without_a_config_checks_the_file_itself(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["rules", "check", str(EXAMPLE_RULES)])
    assert res.exit_code == 0, res.output
    assert "without a config: agents and mailboxes not checked" in res.output
    missing = CliRunner().invoke(main, ["rules", "check", str(tmp_path / "none.toml")])
    assert missing.exit_code == 2 and f"{tmp_path / 'none.toml'}:1: cannot read" in missing.output


def write_config(tmp_path: Path, **autoreply: object) -> Path:
    data = load_config(EXAMPLE_CONFIG, environ={}).model_dump()
    data["rules_file"] = str(EXAMPLE_RULES)
    data["autoreply"] = {**data["autoreply"], "acknowledge": True, **autoreply}
    path = tmp_path / "postroom.toml"
    path.write_text(to_toml(parse_config(data, environ={})))
    return path


def test_test_shows_matches_owner_folder_headers_and_the_reply_without_services(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    res = CliRunner().invoke(
        main,
        ["rules", "test", "--config", str(config), str(FIXTURES / "outage-de.eml"), "--at", "2025-01-06T10:00"],
        env=NO_SERVICES,
    )
    assert res.exit_code == 0, res.output
    out = res.output
    assert "mail: 'Störung im Portal' from kunde@bigcorp.example" in out
    assert "at:   Mon 2025-01-06 10:00 Europe/Berlin (open)" in out
    assert "matched:    outage reports, key account, cancellations, documents, everything else, in turn" in out
    assert "owner:      schulze (Schulze)" in out  # the outage rule's assignment came first
    assert "folder:     Schulze  (recipient support+Schulze@example.test)" in out
    assert "Subject: [Support #NEW] Störung im Portal" in out
    assert "X-Postroom-Priority: urgent (Support #NEW)" in out
    assert "Importance: high" in out  # what Outlook and Thunderbird show
    assert "X-Postroom-Tags: outage key-account cancellation document (Support #NEW)" in out
    assert "auto-reply: auto-reply 'urgent' for Support #0 to kunde@bigcorp.example (not sent)" in out
    assert "Subject: Re: [Support #0] Störung im Portal" in out
    assert "Content-Language: de" in out


def test_test_with_another_rules_file_and_the_time_outside_opening_hours(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    rules = tmp_path / "new.toml"
    rules.write_text('[[rule]]\nname = "all to meier"\nassign = "meier"\nfolder = "Triage"\n')
    res = CliRunner().invoke(
        main,
        [
            "rules",
            "test",
            "--config",
            str(config),
            "--rules",
            str(rules),
            "--at",
            "2025-01-11T09:00",
            "--show-reply",
            str(FIXTURES / "outage-de.eml"),
        ],
        env=NO_SERVICES,
    )
    assert res.exit_code == 0, res.output
    assert "matched:    all to meier" in res.output
    assert "(closed)" in res.output
    assert "auto-reply 'closed'" in res.output
    assert "Auto-Submitted: auto-replied" in res.output
    assert "Montag, 13. Januar um 08:00 Uhr (Europe/Berlin)" in res.output


def test_test_needs_a_shared_mailbox_among_the_recipients(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    mail = tmp_path / "elsewhere.eml"
    mail.write_text("From: a@customer.test\nTo: someone@else.test\nSubject: hi\n\nbody\n")
    res = CliRunner().invoke(main, ["rules", "test", "--config", str(config), str(mail)], env=NO_SERVICES)
    assert res.exit_code == 2
    assert "not addressed to a shared mailbox" in res.output
    forced = CliRunner().invoke(
        main, ["rules", "test", "--config", str(config), "--mailbox", "support", str(mail)], env=NO_SERVICES
    )
    assert forced.exit_code == 0, forced.output
    assert "mailbox support <support@example.test>" in forced.output
