"""The systemd unit: hardened to an exposure of 3.0 or below, and consistent with what the service does."""

from __future__ import annotations

import shutil

import pytest

from service_helpers import REPO, systemd_exposure

UNIT = REPO / "systemd" / "edge-inspector@.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_security_scores_3_or_below(tmp_path):
    assert systemd_exposure(UNIT, "edge-inspector@line1.service", tmp_path) <= 3.0


def test_every_relaxation_and_limit_the_issue_names_is_there():
    settings = unit_settings()
    assert settings["MemoryMax"] and settings["CapabilityBoundingSet"] == [""]
    assert settings["RestartPreventExitStatus"] == ["2"] and settings["StateDirectory"] == ["edge-inspector"]
    assert settings["IPAddressDeny"] == ["any"] and "localhost" in settings["IPAddressAllow"][0]
    text = UNIT.read_text()
    for relaxed in ("PrivateDevices", "ProcSubset", "PrivateNetwork", "@resources", "IP traffic"):
        assert f"Relaxation: {relaxed}" in text or "Relaxation for" in text and relaxed in text, relaxed
