"""``postroom stats``: the figures of a fixture history, computed by hand in tests/slafix.py."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from postroom.admin.cli import main
from postroom.admin.common import redis_store
from postroom.config import to_toml
from postroom.history import TICKETS, make_engine
from postroom.stats import percentile
from postroom.tickets import NewTicket

from .slafix import BOX, at, sla_config, write_history

WEEK = ["--since", "2026-11-23T00:00:00Z", "--until", "2026-11-30T00:00:00Z"]


@pytest.fixture
def config_file(tmp_path: Path, sqlite_url: str, redis_url: str) -> Path:
    config = sla_config(database={"url": sqlite_url}, redis={"url": redis_url})
    path = tmp_path / "postroom.toml"
    path.write_text(to_toml(config))
    write_history(sqlite_url)
    store = redis_store(sla_config(redis={"url": redis_url}))
    for n in range(1, 5):  # tickets 1 and 2 are tagged billing in Redis, where tags live
        tags = ("billing",) if n <= 2 else ()
        store.open(BOX, NewTicket(f"c{n}@customer.test", "s", (), (), tags=tags), at("2026-11-23T08:00"))
    return path


def _stats(path: Path, *args: str) -> str:
    res = CliRunner().invoke(main, ["stats", "--config", str(path), *WEEK, *args], env={"POSTROOM_REDIS_URL": None})
    assert res.exit_code == 0, res.output
    return res.output


def test_stats_json_equals_the_figures_by_hand(config_file: Path) -> None:
    result = json.loads(_stats(config_file, "--json"))
    assert result["period"] == {"start": "2026-11-23T00:00:00Z", "end": "2026-11-30T00:00:00Z"}
    assert result["total"] == {
        "opened": 3,  # 1, 2, 3 (4 was opened the Sunday before)
        "closed": 2,  # 1 and 4
        "backlog": 2,  # 2 and 3
        "unassigned": 1,  # 3
        "overdue": 1,  # 2; 3 is due only on the next Monday
        "breaches": 4,  # 2: first response, next response, resolution; 4: resolution
        "first_response_median": 60.0,  # of 60 (1), 150 (2), 30 (4)
        "first_response_p90": 150.0,
        "resolution_median": 540.0,  # of 120 (1) and 960 (4)
        "resolution_p90": 960.0,
    }
    meier = result["agent"]["meier"]
    assert (meier["opened"], meier["closed"], meier["backlog"], meier["breaches"]) == (2, 1, 1, 3)
    assert result["agent"]["unassigned"]["backlog"] == 1
    assert result["priority"]["high"]["opened"] == 1
    assert result["priority"]["normal"]["first_response_median"] == 60.0
    billing = result["tag"]["billing"]
    assert (billing["opened"], billing["closed"], billing["backlog"]) == (2, 1, 1)
    assert result["mailbox"]["Support"]["opened"] == 3


def test_stats_csv_has_the_same_figures(config_file: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(_stats(config_file, "--csv"))))
    total = next(r for r in rows if r["group"] == "total")
    assert (total["opened"], total["breaches"], total["first_response_p90"]) == ("3", "4", "150.0")
    assert {(r["group"], r["key"]) for r in rows} >= {("agent", "meier"), ("agent", "mueller"), ("tag", "billing")}


def test_a_period_before_the_history_is_empty(config_file: Path) -> None:
    res = json.loads(_stats(config_file, "--json", "--since", "2026-01-01T00:00:00Z", "--until", "2026-01-02"))
    assert res["total"]["opened"] == 0
    assert res["total"]["first_response_median"] is None


def test_bad_times_are_clear_errors(config_file: Path) -> None:
    res = CliRunner().invoke(main, ["stats", "--config", str(config_file), "--since", "yesterday"])
    assert res.exit_code == 2
    assert "--since 'yesterday' is not an ISO time" in res.output


def test_nearest_rank_percentile() -> None:
    assert percentile([30, 60, 150], 0.9) == 150
    assert percentile(list(range(1, 11)), 0.9) == 9
    assert percentile([5], 0.9) == 5


def test_without_redis_the_tags_come_from_the_history(config_file: Path, sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:  # as the history writer keeps them (schema 0003)
        conn.execute(update(TICKETS).where(TICKETS.c.number.in_((1, 2))).values(tags="billing"))
    engine.dispose()
    dead = {"POSTROOM_REDIS_URL": "redis://127.0.0.1:1/0"}
    res = CliRunner().invoke(main, ["stats", "--config", str(config_file), *WEEK, "--json"], env=dead)
    assert res.exit_code == 0, res.output
    billing = json.loads(res.stdout)["tag"]["billing"]
    assert (billing["opened"], billing["closed"], billing["backlog"]) == (2, 1, 1)  # as from Redis above
