"""The alert rules in deploy/monitoring, checked and unit-tested by Prometheus's own promtool
(Debian's `prometheus` package, installed by `make system-deps`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (CI is set): apt-get install prometheus")
        pytest.skip("promtool is missing: apt-get install prometheus")
    return found


def test_alert_rules_are_valid_and_their_unit_tests_pass():
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", "alerts.yml"], cwd=MONITORING, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([tool, "test", "rules", "alerts_test.yml"], cwd=MONITORING, capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_a_broken_expectation_fails_the_rule_tests(tmp_path):
    """The rule tests can fail: the same file with one alert's expected label changed does."""
    import yaml

    tool = promtool()
    shutil.copy(MONITORING / "alerts.yml", tmp_path / "alerts.yml")
    doc = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())
    broken = []
    for group in doc["tests"]:
        for rule in group["alert_rule_test"]:
            for alert in rule.get("exp_alerts") or []:
                if alert["exp_labels"].get("check") == "ood_rate":
                    alert["exp_labels"]["check"] = "label_share"
                    broken.append(group)
    assert len(broken) == 1
    # Only that test group: promtool evaluates every rule at every step, and the other groups span
    # 25 hours of 1-minute steps (5 s of CPU); the one with the broken expectation takes 0.2 s.
    doc["tests"] = broken
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(doc))
    test = subprocess.run([tool, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert test.returncode != 0 and "HeadmasterDriftDetected" in test.stdout + test.stderr
