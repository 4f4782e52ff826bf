"""The shipped sweep units: systemd accepts them, the timer starts the service, the service runs the sweep."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_sweep_units_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists; the installed path is /usr/local/bin/postroom.
    service = (SYSTEMD_DIR / "postroom-sweep.service").read_text()
    assert "ExecStart=/usr/local/bin/postroom sweep --config /etc/postroom/postroom.toml" in service
    (tmp_path / "postroom-sweep.service").write_text(service.replace("/usr/local/bin/postroom", "/bin/true"))
    shutil.copy(SYSTEMD_DIR / "postroom-sweep.timer", tmp_path)
    for unit in ("postroom-sweep.service", "postroom-sweep.timer"):
        done = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    timer = (SYSTEMD_DIR / "postroom-sweep.timer").read_text()
    assert "Unit=postroom-sweep.service" in timer and "OnUnitActiveSec=1min" in timer
