"""The bot client reads the working directory's ``.env`` as the guide's bots did.

Real environment variables win over the file; a disabled publisher says so once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
import zmq

from bot_client import PublisherSettings
from bus.envelope import Event
from bus.proxy import Proxy
from tests.conftest import scaled, synced_subscriber

ROOT = Path(__file__).resolve().parent.parent

# A guide-era bot: one import changed, settings from the environment (and .env)
BOT = textwrap.dedent(
    """
    import asyncio
    from bot_client import WebSocketPublisher

    async def main():
        publisher = WebSocketPublisher()
        await publisher.initialize()
        await publisher.initialize()  # a second start must not repeat the notice
        await publisher.publish_market_data("BTC-USD", 45000.0)
        await publisher.close()

    asyncio.run(main())
    """
)


def run_bot(directory: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEM__")}
    return subprocess.run(
        [sys.executable, "-c", BOT],
        cwd=directory,
        env={**clean, "PYTHONPATH": str(ROOT), **environment},
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )


def test_settings_come_from_dotenv_and_real_variables_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(
        "# the guide's .env\n"
        "SYSTEM__ENABLE_WEBSOCKET_PUBLISHING=true\n"
        "SYSTEM__WEBSOCKET_QUEUE_SIZE=250\n"
        'SYSTEM__TRADEBUS_SOURCE_ID="bot-from-file"\n'
    )
    for name in list(os.environ):
        if name.startswith("SYSTEM__"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYSTEM__WEBSOCKET_QUEUE_SIZE", "7")
    settings = PublisherSettings.from_env()
    assert settings.enabled is True
    assert settings.source_id == "bot-from-file"
    assert settings.queue_size == 7  # the real variable, not the file's 250
    assert "SYSTEM__ENABLE_WEBSOCKET_PUBLISHING" not in os.environ  # read, not exported

    class BotSettings:  # the guide's bots passed a settings object
        class system:  # noqa: N801
            websocket_queue_size = 3

    from_object = PublisherSettings.from_object(BotSettings())
    assert (from_object.enabled, from_object.queue_size) == (True, 3)


def test_a_bad_value_in_dotenv_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("SYSTEM__WEBSOCKET_TIMEOUT=soon\n")
    monkeypatch.delenv("SYSTEM__WEBSOCKET_TIMEOUT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^SYSTEM__WEBSOCKET_TIMEOUT='soon': expected seconds"):
        PublisherSettings.from_env()


def test_a_bot_publishes_where_its_dotenv_says(
    tmp_path: Path, proxy: Proxy, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    (tmp_path / ".env").write_text(
        "SYSTEM__ENABLE_WEBSOCKET_PUBLISHING=true\n"
        f"SYSTEM__WEBSOCKET_DASHBOARD_URL={proxy.frontend_endpoint}\n"
        "SYSTEM__TRADEBUS_SOURCE_ID=dotenv-bot\n"
    )
    with synced_subscriber(proxy, zmq_context, ["market_data"]) as subscriber:
        result = run_bot(tmp_path)
        assert result.returncode == 0, result.stderr
        item = subscriber.recv(scaled(10))
    assert isinstance(item, Event)
    assert item.source == "dotenv-bot"
    assert orjson.loads(item.payload)["data"]["price"] == 45000.0
    assert "websocket.publisher_disabled" not in result.stdout + result.stderr


def test_a_disabled_publisher_says_so_once(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SYSTEM__ENABLE_WEBSOCKET_PUBLISHING=true\n")
    # the real variable wins over the file: publishing is off
    result = run_bot(tmp_path, SYSTEM__ENABLE_WEBSOCKET_PUBLISHING="false")
    assert result.returncode == 0, result.stderr
    # a guide bot configures no logging: structlog's default console lines on stdout
    notices = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "websocket.publisher_disabled" in line
    ]
    assert len(notices) == 1, result.stdout + result.stderr
    assert "warning" in notices[0]
    assert "SYSTEM__ENABLE_WEBSOCKET_PUBLISHING=true" in notices[0]
