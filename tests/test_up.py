"""``tradebus up`` as a user runs it: a subprocess on random ports, real clients, clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import websockets.sync.client as ws_client

from tests.conftest import scaled

RANDOM_PORTS = [
    "--port",
    "0",
    "--metrics-port",
    "0",
    "--frontend",
    "tcp://127.0.0.1:*",
    "--backend",
    "tcp://127.0.0.1:*",
    "--snapshot",
    "tcp://127.0.0.1:*",
]


@dataclass
class Stack:
    process: subprocess.Popen[str]
    dashboard: str
    websocket: str
    metrics: str
    banner: list[str]


def start_up(*extra: str, log_level: str = "WARNING") -> Stack:
    process = subprocess.Popen(
        [sys.executable, "-m", "tradebus", "up", *RANDOM_PORTS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TRADEBUS_LOG_LEVEL": log_level},
    )
    assert process.stdout is not None
    banner: list[str] = []
    deadline = time.monotonic() + scaled(20)
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        banner.append(line)
        if line.startswith("Ctrl-C"):
            break
    text = "".join(banner)
    found = re.search(r"Dashboard: (http://localhost:(\d+)/)", text)
    metrics = re.search(r"metrics +(http://127\.0\.0\.1:\d+/metrics)", text)
    wants_metrics = "--no-metrics" not in extra
    if not found or (wants_metrics and not metrics):
        process.kill()
        _, errors = process.communicate(timeout=scaled(5))
        pytest.fail(f"tradebus up did not start:\n{text}\n{errors}")
    port = found.group(2)
    return Stack(
        process,
        found.group(1),
        f"ws://127.0.0.1:{port}/ws",
        metrics.group(1) if metrics else "",
        banner,
    )


@pytest.fixture
def stack() -> Iterator[Stack]:
    running = start_up("--demo-speed", "20", "--demo-seed", "3")
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.communicate(timeout=scaled(5))


def receive_types(url: str, wanted: set[str], limit: float) -> dict[str, dict[str, object]]:
    """First event of each wanted type, read with the independent `websockets` client."""
    seen: dict[str, dict[str, object]] = {}
    deadline = time.monotonic() + scaled(limit)
    with ws_client.connect(url, open_timeout=scaled(5)) as ws:
        while set(seen) < wanted:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {sorted(seen)} of {sorted(wanted)} arrived"
            message = json.loads(ws.recv(timeout=remaining))
            if message.get("type") in wanted and "data" in message:
                seen.setdefault(message["type"], message)
    return seen


def stop(stack: Stack, signum: int) -> tuple[int, str]:
    stack.process.send_signal(signum)
    _, errors = stack.process.communicate(timeout=scaled(15))
    return stack.process.returncode, errors


def test_up_serves_the_demo_to_browsers_and_stops_on_sigterm(stack: Stack) -> None:
    assert stack.dashboard.startswith("http://localhost:")
    port = stack.dashboard.split(":")[2].rstrip("/")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=scaled(5)) as reply:
        assert json.loads(reply.read())["status"] == "ok"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=scaled(5)) as reply:
        assert reply.status == 200
        assert b"<html" in reply.read().lower()
    events = receive_types(
        stack.websocket,
        {"market_data", "ai_decision", "trading_decision", "system_status", "indicator_update"},
        limit=10,
    )
    decision = events["trading_decision"]
    assert decision["source"] == "demo-bot"
    data = decision["data"]
    assert isinstance(data, dict)
    assert set(data["risk_analysis"]) == {"stop_loss", "take_profit", "risk_reward_ratio"}
    with urllib.request.urlopen(stack.metrics, timeout=scaled(5)) as reply:
        metrics = reply.read().decode()
    assert re.search(r'tradebus_proxy_events_total\{type="market_data"\} [1-9]', metrics)
    assert re.search(r'tradebus_publisher_sent_events_total\{source="demo-bot"\} [1-9]', metrics)
    assert 'tradebus_publisher_connected{source="demo-bot"} 1.0' in metrics
    assert "tradebus_bridge_" in metrics  # the bridge's own figures, in the same scrape
    code, errors = stop(stack, signal.SIGTERM)
    assert code == 0, errors
    assert "Traceback" not in errors
    assert "tradebus stopped." in errors


def test_up_stops_on_ctrl_c_and_frees_its_ports(stack: Stack) -> None:
    port = int(stack.dashboard.split(":")[2].rstrip("/"))
    code, errors = stop(stack, signal.SIGINT)
    assert code == 0, errors
    assert "Traceback" not in errors
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # the bridge's port is free again


def test_demo_via_websocket_reaches_browsers_like_a_guide_bot() -> None:
    stack = start_up("--demo-via-websocket", "--demo-speed", "20", "--no-metrics", log_level="INFO")
    try:
        events = receive_types(stack.websocket, {"market_data", "trading_decision"}, limit=10)
        assert events["market_data"]["source"] == "demo-bot"
        code, errors = stop(stack, signal.SIGTERM)
        assert code == 0, errors
        # the guide's troubleshooting greps find the connection and publish events
        websocket_lines = [
            json.loads(line) for line in errors.splitlines() if re.search("(?i)websocket", line)
        ]
        connected = [e for e in websocket_lines if e["event"] == "websocket.client_connected"]
        assert {e["role"] for e in connected} == {"publisher", "subscriber"}
        publish_lines = [
            line for line in errors.splitlines() if re.search("WebSocket.*publish", line)
        ]
        assert any('"websocket.publisher_connected"' in line for line in publish_lines)
        assert any('"websocket.publisher_closed"' in line for line in publish_lines)
    finally:
        if stack.process.poll() is None:
            stack.process.kill()
            stack.process.communicate(timeout=scaled(5))


def test_a_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tradebus",
                "up",
                *RANDOM_PORTS[2:],
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=scaled(20),
            env={**os.environ, "TRADEBUS_LOG_LEVEL": "ERROR"},
        )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tradebus up: error: ")
    assert f"127.0.0.1:{port}" in last


CHECK_STACK = Path(__file__).resolve().parent.parent / "compose" / "check_stack.sh"


def run_check_stack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CHECK_STACK), *args],
        capture_output=True,
        text=True,
        timeout=scaled(60),
        env={
            **os.environ,
            "TRADEBUS": f"{sys.executable} -m tradebus",
            "PYTHON": sys.executable,
        },
    )


def test_check_stack_proves_delivery_through_tradebus_up(stack: Stack) -> None:
    url = stack.dashboard.replace("localhost", "127.0.0.1").rstrip("/")
    result = run_check_stack("--url", url, "--metrics", stack.metrics, "--timeout", "15")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "received: tap summary: 5 events" in result.stdout
    assert "All checks passed" in result.stdout


def test_check_stack_fails_without_a_stack() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = run_check_stack("--url", f"http://127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 1
    assert "FAIL no answer from" in result.stderr
    assert "is the stack running?" in result.stderr
