"""A team's service, the parts that need no server: a password bound for plain http."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e  # `kd-mlflow compare` in its own process

WARNING = "warning: MLFLOW_TRACKING_PASSWORD is sent in clear"


def _compare(uri: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_TRACKING_USERNAME="alice",
        MLFLOW_TRACKING_PASSWORD="alice-test-password-1",
        KD_MLFLOW_NETWORK_TIMEOUT="2",
    )
    return subprocess.run(
        [sys.executable, "-m", "kd_mlflow", "compare"], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_password_for_plain_http_beyond_loopback_is_warned_of_once():
    # 192.0.2.1 is TEST-NET-1: never routed, so the command fails after its retries.
    done = _compare("http://192.0.2.1:5000")
    assert done.returncode == 1, done.stderr
    assert done.stderr.count(WARNING) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_no_warning_for_loopback():
    done = _compare("http://127.0.0.1:9")  # nothing listens: refused at once
    assert done.returncode == 1, done.stderr
    assert WARNING not in done.stderr
