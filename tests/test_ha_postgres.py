"""PostgreSQL as the shared history of several hosts: a private server this module may stop and start at will."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text

from postroom.config import example_config_path, load_config, to_toml, with_changes
from postroom_testbed.ha import PostgresServer

HOSTS = 4  # upgrades started at the same moment, as by hosts deployed together


def test_db_upgrade_from_several_hosts_at_once_leaves_one_schema_at_head(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database()
    config = with_changes(load_config(example_config_path(), environ={}), {"database": {"url": url}})
    path = tmp_path / "postroom.toml"
    path.write_text(to_toml(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    cmd = [sys.executable, "-m", "postroom", "db", "upgrade", "--config", str(path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for _ in range(HOSTS)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * HOSTS, outputs
    engine = create_engine(url)
    with engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
    engine.dispose()
    assert len(versions) == 1
    assert {"tickets", "messages", "events", "alembic_version"} <= set(tables)
