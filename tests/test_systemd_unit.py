"""The shipped unit passes systemd's own checker and keeps the settings vetd relies on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import IN_CI, ROOT

UNIT = ROOT / "systemd" / "vetd.service"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    analyze = shutil.which("systemd-analyze")
    vetd = shutil.which("vetd")
    if analyze is None or vetd is None:
        (pytest.fail if IN_CI else pytest.skip)("systemd-analyze or the installed vetd is missing")
    # verify checks that ExecStart exists: point it at this machine's vetd, change nothing else
    unit = tmp_path / "vetd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/vetd", vetd))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [l for l in (r.stdout + r.stderr).splitlines() if "vetd.service" in l]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


def test_unit_is_notify_type_with_watchdog_reload_and_hardening():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=CAP_SYS_ADMIN",
                 "ExecStartPre=/usr/local/bin/vetd --check-config"):
        assert line in text, line
    # readers die with the first process and are restarted with it; procwatch needs netlink
    assert "Restart=on-failure" in text
    families = next(ln for ln in text.splitlines() if ln.startswith("RestrictAddressFamilies="))
    assert {"AF_UNIX", "AF_NETLINK"} <= set(families.split("=", 1)[1].split())
