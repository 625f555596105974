"""Every mistake a newcomer made (issue 15) gets one line naming what they gave.

The line names the flag, variable or argument the user actually set, the value and the
expected form: never a traceback, never another spelling of the same setting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bus
from bot_client import settings as publisher_settings
from bot_client.settings import PublisherSettings
from bridge import config as bridge_config
from bridge.config import BridgeConfig
from bus import proxy_config, settings
from bus.errors import SettingError
from bus.proxy_config import ProxyConfig
from common.errors import TradebusError
from tests.conftest import scaled

ROOT = Path(__file__).resolve().parent.parent
ENDPOINT = "expected a ZeroMQ endpoint tcp://host:port or ipc://path"
WS_HINT = "(ws:// is a bridge's WebSocket URL; the bus speaks tcp:// or ipc://)"


def one_line(args: list[str], environment: dict[str, str], tmp_path: Path) -> str:
    """The command's whole stderr, checked to be one line with exit status 2."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TRADEBUS__", "SYSTEM__"))}
    result = subprocess.run(
        [sys.executable, "-m", "tradebus", *args],
        cwd=tmp_path,  # no .env of the repository's working directory is read
        env={**clean, **environment, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=scaled(20),
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


CASES = [
    pytest.param(
        ["bridge", "--port", "0", "--bus", "ws://localhost:8000/ws"],
        {},
        f"tradebus bridge: error: --bus='ws://localhost:8000/ws': {ENDPOINT} {WS_HINT}",
        id="bridge --bus ws://",
    ),
    pytest.param(
        ["record", "out.jsonl", "--backend", "ws://localhost:8000/ws", "--duration", "1"],
        {},
        f"tradebus record: error: --backend='ws://localhost:8000/ws': {ENDPOINT} {WS_HINT}",
        id="record --backend ws://",
    ),
    pytest.param(
        ["up", "--no-demo", "--no-metrics"],
        {"TRADEBUS__BRIDGE_PORT": "abc"},
        "tradebus up: error: TRADEBUS__BRIDGE_PORT='abc': expected a port number 0..65535",
        id="TRADEBUS__BRIDGE_PORT=abc up",
    ),
    pytest.param(
        ["proxy"],
        {"TRADEBUS__PROXY_FRONTEND_HWM": "lots"},
        "tradebus proxy: error: TRADEBUS__PROXY_FRONTEND_HWM='lots': "
        "expected a whole number above 0",
        id="TRADEBUS__PROXY_FRONTEND_HWM=lots proxy",
    ),
    pytest.param(
        ["bridge"],
        {"TRADEBUS__BRIDGE_PORT": "abc"},
        "tradebus bridge: error: TRADEBUS__BRIDGE_PORT='abc': expected a port number 0..65535",
        id="TRADEBUS__BRIDGE_PORT=abc bridge",
    ),
    pytest.param(
        ["bridge", "--port", "0"],
        {"TRADEBUS__BRIDGE_RATE_LIMIT": "-1"},
        "tradebus bridge: error: TRADEBUS__BRIDGE_RATE_LIMIT='-1': expected a number above 0",
        id="TRADEBUS__BRIDGE_RATE_LIMIT=-1 bridge",
    ),
    pytest.param(
        ["demo", "--url", "http://localhost:8000/ws", "--duration", "1"],
        {},
        "tradebus demo: error: --url='http://localhost:8000/ws': "
        "expected a ws://, wss://, tcp://host:port or ipc://path URL",
        id="demo --url http://",
    ),
    pytest.param(
        ["bridge", "--port", "0"],
        {"TRADEBUS__BRIDGE_JWT_SECRET": "short-secret"},
        "tradebus bridge: error: TRADEBUS__BRIDGE_JWT_SECRET=<hidden>: "
        "expected a secret of at least 32 bytes (RFC 7518)",
        id="a secret is named, never shown",
    ),
    pytest.param(
        ["bridge", "--port", "0"],
        {"TRADEBUS__BRIDGE_PUBLISH_TOKENS": "only-a-secret"},
        "tradebus bridge: error: TRADEBUS__BRIDGE_PUBLISH_TOKENS=<hidden>: expected SOURCE=TOKEN "
        "entries, comma-separated, such as bot-1=TOKEN (entry 1 is not SOURCE=TOKEN)",
        id="a bad publish token is named, never shown",
    ),
    pytest.param(
        ["tap", "--url", "localhost:8000", "--duration", "1"],
        {},
        "tradebus tap: error: --url='localhost:8000': "
        "expected a ws:// or wss:// URL such as ws://localhost:8000/ws",
        id="tap --url without ws://",
    ),
    pytest.param(
        ["replay", "in.jsonl", "--speed", "0"],
        {},
        "tradebus replay: error: argument --speed: expected a speed factor (e.g. 2 or 0.5) "
        "above 0, got '0' (see --help)",
        id="a flag without a variable: the same forms, worded by argparse",
    ),
    pytest.param(
        ["up", "--no-demo", "--no-metrics", "--port", "x"],
        {"TRADEBUS__BRIDGE_PORT": "8000"},
        "tradebus up: error: --port='x': expected a port number 0..65535",
        id="the flag wins and is the one named",
    ),
]


@pytest.mark.parametrize(("args", "environment", "expected"), CASES)
def test_a_mistake_is_one_line_naming_what_was_given(
    args: list[str], environment: dict[str, str], expected: str, tmp_path: Path
) -> None:
    assert one_line(args, environment, tmp_path) == expected


def test_a_subscriber_names_its_argument_or_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(SettingError) as raised:
        bus.BlockingSubscriber(endpoint="ws://localhost:8000/ws")
    assert str(raised.value) == f"endpoint='ws://localhost:8000/ws': {ENDPOINT} {WS_HINT}"
    monkeypatch.setenv("TRADEBUS__PROXY_BACKEND", "localhost:5556")
    with pytest.raises(SettingError) as raised:
        bus.Subscriber()
    assert str(raised.value) == f"TRADEBUS__PROXY_BACKEND='localhost:5556': {ENDPOINT}"


@pytest.mark.parametrize(
    ("text", "bind", "ok"),
    [
        ("tcp://127.0.0.1:5556", False, True),
        ("tcp://[::1]:5556", False, True),
        ("tcp://bus-proxy:5556", False, True),
        ("ipc:///run/tradebus.sock", False, True),
        ("tcp://127.0.0.1:*", True, True),
        ("tcp://*:5555", True, True),
        ("tcp://127.0.0.1:*", False, False),
        ("tcp://127.0.0.1", False, False),
        ("tcp://127.0.0.1:0", False, False),
        ("tcp://127.0.0.1:70000", False, False),
        ("tcp://127.0.0.1:5556/ws", False, False),
        ("127.0.0.1:5556", False, False),
        ("udp://127.0.0.1:5556", False, False),
        ("ws://127.0.0.1:5556", False, False),
    ],
)
def test_endpoint_forms(text: str, bind: bool, ok: bool) -> None:
    given = settings.Given("--endpoint", text)
    if ok:
        assert settings.endpoint(bind=bind).parse(given, SettingError) == text
    else:
        with pytest.raises(SettingError, match=r"^--endpoint="):
            settings.endpoint(bind=bind).parse(given, SettingError)


def test_pick_prefers_the_flag_then_the_variable() -> None:
    environ = {"X_PORT": "1"}
    assert settings.pick("--port", "2", "X_PORT", environ) == settings.Given("--port", "2")
    assert settings.pick("--port", None, "X_PORT", environ) == settings.Given("X_PORT", "1")
    assert settings.pick("--port", None, "Y_PORT", environ) is None


# -- the settings helper behind the proxy's, the bridge's and the publisher's settings --------
def read_proxy(environ: dict[str, str], flags: dict[str, str | None]) -> object:
    return ProxyConfig.from_env(environ, flags=flags)


def read_bridge(environ: dict[str, str], flags: dict[str, str | None]) -> object:
    return BridgeConfig.from_env(environ, flags=flags)


def read_publisher(environ: dict[str, str], flags: dict[str, str | None]) -> object:
    assert not flags  # the publisher's settings have variables and keywords only
    return PublisherSettings.from_env(environ)


SYSTEMS = [
    pytest.param(proxy_config.SETTINGS, read_proxy, id="proxy"),
    pytest.param(bridge_config.SETTINGS, read_bridge, id="bridge"),
    pytest.param(publisher_settings.SPECS, read_publisher, id="publisher"),
]
JUNK = "not:a/value!"


def refusing(table: tuple[settings.Setting, ...]) -> list[settings.Setting]:
    """The settings whose form refuses JUNK (text settings take anything)."""
    refused = []
    for setting in table:
        try:
            setting.form.convert(JUNK)
        except ValueError:
            refused.append(setting)
    return refused


@pytest.mark.parametrize(("table", "read"), SYSTEMS)
def test_every_variable_of_every_settings_system_gets_the_one_line(
    table: tuple[settings.Setting, ...], read: Any
) -> None:
    checked = refusing(table)
    assert len(checked) >= 5
    for setting in checked:
        with pytest.raises(TradebusError) as raised:
            read({setting.variable: JUNK}, {})
        shown = "<hidden>" if setting.secret else repr(JUNK)
        line = f"{setting.variable}={shown}: expected {setting.form.expected}"
        assert str(raised.value).startswith(line), setting
        assert "\n" not in str(raised.value)
        assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(("table", "read"), SYSTEMS[:2])
def test_the_flag_wins_over_the_variable_and_is_the_one_named(
    table: tuple[settings.Setting, ...], read: Any
) -> None:
    for setting in refusing(table):
        assert setting.flag is not None
        with pytest.raises(TradebusError) as raised:
            read({setting.variable: JUNK}, {setting.field: "-" + JUNK})
        assert str(raised.value).startswith(f"{setting.flag}="), setting


@pytest.mark.parametrize(
    ("read", "variable", "secret"),
    [
        (read_bridge, "TRADEBUS__BRIDGE_JWT_SECRET", "short-secret-0123"),
        (read_bridge, "TRADEBUS__BRIDGE_PUBLISH_TOKENS", "bot-1=fine,short-secret-0123"),
        (read_publisher, "SYSTEM__TRADEBUS_TOKEN", " "),
    ],
)
def test_a_secret_is_named_and_never_shown(read: Any, variable: str, secret: str) -> None:
    with pytest.raises(TradebusError, match=rf"^{variable}=<hidden>: expected ") as raised:
        read({variable: secret}, {})
    assert repr(secret) not in str(raised.value)
    assert "short-secret" not in str(raised.value)


def test_the_proxy_reads_its_variables_and_flags() -> None:
    config = ProxyConfig.from_env(
        {"TRADEBUS__PROXY_OWNER_IDLE": "5", "TRADEBUS__PROXY_FRONTEND_HWM": "7"},
        flags={"owner_idle_s": "9", "backend": "tcp://127.0.0.1:6000"},
        cache=False,
    )
    assert (config.owner_idle_s, config.frontend_hwm) == (9.0, 7)
    assert (config.backend, config.cache) == ("tcp://127.0.0.1:6000", False)
    with pytest.raises(SettingError, match=r"^TRADEBUS__PROXY_EPOCH_SKEW='0': expected seconds"):
        ProxyConfig.from_env({"TRADEBUS__PROXY_EPOCH_SKEW": "0"})


def test_booleans_and_numbers_read_alike_everywhere() -> None:
    for word, value in [("yes", True), ("ON", True), ("0", False), ("off", False)]:
        bridge = BridgeConfig.from_env({"TRADEBUS__BRIDGE_ALLOW_PUBLISH": word})
        publisher = PublisherSettings.from_env({"SYSTEM__ENABLE_WEBSOCKET_PUBLISHING": word})
        assert bridge.allow_publish is value is publisher.enabled
    for text in ("nan", "inf", "-1"):
        for read in (
            lambda t: ProxyConfig.from_env({"TRADEBUS__PROXY_HISTORY_SECONDS": t}),
            lambda t: BridgeConfig.from_env({"TRADEBUS__BRIDGE_HISTORY_SECONDS": t}),
            lambda t: PublisherSettings.from_env({"SYSTEM__WEBSOCKET_TIMEOUT": t}),
        ):
            with pytest.raises(TradebusError, match=f"={text!r}: expected"):
                read(text)
