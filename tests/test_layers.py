"""The layers a reader of the tree should see: the pipeline and the domain load no database driver."""

from __future__ import annotations

import subprocess
import sys

DRIVERS = ("sqlalchemy", "alembic", "redis", "hiredis")


def loaded_drivers(module: str) -> list[str]:
    code = f"import sys, {module}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({DRIVERS!r}))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.split()


def test_pipeline_loads_no_driver() -> None:
    assert loaded_drivers("postroom.pipeline") == []


def test_domain_and_memory_store_load_no_driver() -> None:
    assert loaded_drivers("postroom.tickets") == []
    assert loaded_drivers("postroom.store.memory") == []


def test_redis_adapter_does_load_redis() -> None:
    # The check above can fail: the adapter really imports the driver.
    assert "redis" in loaded_drivers("postroom.store.redis")
