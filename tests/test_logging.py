"""Logs never carry secrets: the redaction processor, and real processes that hit errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bus.proxy import Proxy
from monitoring.logging import REDACTED, redact
from tests.conftest import scaled
from tests.support import bot_output_after_attempts, free_port
from tests.test_bridge_support import bridge_config, running_bridge

SECRET = "s3cret-T0ken.value"


@pytest.mark.parametrize(
    "text",
    [
        f"ws://127.0.0.1:8000/ws?role=publisher&token={SECRET}&source=bot",
        f"ws://h/ws?token={SECRET}",
        f"Cannot connect to ws://h/ws?source=a&TOKEN={SECRET}: refused",
        f"Authorization: Bearer {SECRET}",
        f"subprotocols tradebus, bearer.{SECRET}",
    ],
)
def test_redact_removes_token_values(text: str) -> None:
    cleaned = redact(text)
    assert SECRET not in cleaned
    assert REDACTED in cleaned


def test_redact_keeps_ordinary_text() -> None:
    text = "ws://127.0.0.1:8000/ws?role=publisher&source=bot-1&epoch=12"
    assert redact(text) == text


async def test_a_publisher_refused_by_the_bridge_does_not_log_its_token(proxy: Proxy) -> None:
    # a real bridge refuses the handshake (wrong token); aiohttp's error quotes the URL
    config = bridge_config(proxy, publish_tokens=("leak-check=the-right-token",))
    async with running_bridge(config) as server:
        logged = await bot_output_after_attempts(
            f"ws://127.0.0.1:{server.port}/ws",
            "leak-check",
            2,
            token=SECRET,
            configure_logging=True,
        )
    assert "publisher_connect_failed" in logged, logged[-2000:]
    assert "401" in logged, logged[-2000:]
    assert SECRET not in logged


def test_tap_does_not_print_the_token_of_its_url() -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws?token={SECRET}"
    done = subprocess.run(
        [sys.executable, "-m", "tradebus", "tap", "--url", url, "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=scaled(30),
    )
    assert done.returncode != 0
    assert "cannot connect" in done.stderr
    assert SECRET not in done.stderr + done.stdout


def test_a_bad_log_level_stops_a_command_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tradebus", "proxy", "--frontend", "tcp://127.0.0.1:*"],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        env={**os.environ, "TRADEBUS_LOG_LEVEL": "loud"},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "tradebus proxy: error: TRADEBUS_LOG_LEVEL='loud': "
        "expected one of debug, info, warning, error, critical"
    ]
