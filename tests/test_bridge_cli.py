"""``tradebus bridge`` as a subprocess: flags, environment, readiness, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from bus.proxy import Proxy
from tests.conftest import scaled
from tests.support import wait_until


def test_help_lists_the_settings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tradebus", "bridge", "--help"],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=True,
    )
    for flag in ("--allow-publish", "--jwt-secret", "--token", "--cert", "--max-queue-bytes"):
        assert flag in result.stdout
    assert "TRADEBUS__BRIDGE_PORT" in result.stdout


def test_bad_setting_is_one_line_and_status_2() -> None:
    env = dict(os.environ, TRADEBUS__BRIDGE_PORT="eighty")
    result = subprocess.run(
        [sys.executable, "-m", "tradebus", "bridge"],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "TRADEBUS__BRIDGE_PORT" in result.stderr


def test_serves_reports_ready_and_stops_on_sigterm(proxy: Proxy) -> None:
    env = dict(os.environ, TRADEBUS__BRIDGE_ALLOW_PUBLISH="true", TRADEBUS_LOG_LEVEL="info")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "tradebus", "bridge", "--port", "0",
            "--bus", proxy.backend_endpoint, "--snapshot", proxy.snapshot_endpoint,
            "--publish-to", proxy.frontend_endpoint,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        port = None
        lines = []
        deadline = time.monotonic() + scaled(20)
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            record = json.loads(line)
            if record["event"] == "bridge.started":
                assert record["allow_publish"] is True
            if record["event"] == "bridge.listening":
                port = record["port"]
        assert port, lines

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as reply:
                    return bool(reply.status == 200)
            except urllib.error.HTTPError:
                return False

        wait_until(ready, "/ready to answer 200", timeout=20, interval=0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=scaled(10)) == 0
        rest = process.stderr.read()
        assert "bridge.stopped" in rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
