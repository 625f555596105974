"""Every tradebus client with CURVE keys: the library clients against a CURVE server built
in the test from bus.keys (real loopback sockets), the command-line tools as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from structlog.testing import capture_logs

from bot_client.errors import AuthRefusedError, SettingsError
from bot_client.publisher import Publisher
from bridge.app import start_bridge
from bridge.config import BridgeConfig
from bridge.errors import ConfigError
from bus.envelope import encode_event
from bus.errors import AuthError
from bus.keys import (
    PROXY_KEY_NAME,
    BusAuthenticator,
    ServerKeys,
    configure_server,
    create_key,
    list_keys,
    load_client_keys,
    load_server_keys,
)
from bus.proxy import SNAPSHOT_COMMAND, STATUS_OK
from bus.subscriber import BlockingSubscriber, Subscriber
from tests.conftest import scaled
from tests.test_bus_keys import make_keys
from tradebus.up import ensure_stack_keys

Context = zmq.Context[zmq.Socket[bytes]]


class Bus:
    """A stand-in proxy with CURVE on its three endpoints: XSUB for publishers, PUB for
    subscribers, ROUTER for snapshots (answers every request with an empty snapshot)."""

    def __init__(self, context: Context, keys: ServerKeys) -> None:
        self.keys = keys
        self.authenticator = BusAuthenticator(context, keys)
        self.authenticator.start()
        self.xsub: zmq.Socket[bytes] = context.socket(zmq.XSUB)
        self.pub: zmq.Socket[bytes] = context.socket(zmq.PUB)
        self.router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        self.endpoints: dict[str, str] = {}
        for name, socket in (("xsub", self.xsub), ("pub", self.pub), ("router", self.router)):
            socket.linger = 0
            configure_server(socket, keys)
            port = socket.bind_to_random_port("tcp://127.0.0.1")
            self.endpoints[name] = f"tcp://127.0.0.1:{port}"
        self.xsub.send(b"\x01")  # subscribe to everything, as the proxy does
        self.snapshot_requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._answer_snapshots, daemon=True)
        self._thread.start()

    def _answer_snapshots(self) -> None:
        while not self._stop.is_set():
            if self.router.poll(20):
                frames = self.router.recv_multipart()
                # identity, the client's envelope up to its empty delimiter, the request
                envelope = frames[: frames.index(b"") + 1]
                if frames[len(envelope)] == SNAPSHOT_COMMAND:
                    self.snapshot_requests += 1
                self.router.send_multipart([*envelope, SNAPSHOT_COMMAND, STATUS_OK])

    def publish(self, topic: str, number: int) -> None:
        type_name = topic.split(".")[0]
        self.pub.send_multipart(
            encode_event(topic, type_name, {"n": number}, "bus-test", 1, number)
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(scaled(5))
        for socket in (self.xsub, self.pub, self.router):
            socket.close(linger=0)
        self.authenticator.stop()


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    make_keys(directory)
    create_key(directory, "demo-bot", ["demo-bot"])
    create_key(directory, "bridge")
    return directory


@pytest.fixture
def stranger_dir(tmp_path: Path, key_dir: Path) -> Path:
    """A client directory whose key the bus does not know, with the bus's proxy.key."""
    directory = tmp_path / "stranger"
    create_key(directory, "stranger", ["stranger"])
    (directory / "proxy.key").write_bytes((key_dir / "proxy.key").read_bytes())
    return directory


@pytest.fixture
def bus(key_dir: Path, zmq_context: Context) -> Iterator[Bus]:
    running = Bus(zmq_context, load_server_keys(key_dir))
    yield running
    running.close()


# -- bus.Subscriber / BlockingSubscriber -----------------------------------------------------------
def test_a_blocking_subscriber_with_keys_syncs_its_snapshot_and_receives(
    bus: Bus, key_dir: Path, zmq_context: Context
) -> None:
    subscriber = BlockingSubscriber(
        ["market_data"],
        endpoint=bus.endpoints["pub"],
        snapshot=True,
        snapshot_endpoint=bus.endpoints["router"],
        snapshot_timeout=scaled(5),
        context=zmq_context,
        keys=load_client_keys(key_dir, "viewer"),
    )
    with subscriber:
        # the snapshot DEALER got through the CURVE ROUTER: it used the keys too
        assert bus.snapshot_requests == 1
        item = None
        for number in range(1, int(scaled(500))):
            bus.publish("market_data.BTC-USD", number)
            item = subscriber.recv(0.01)
            if item is not None:
                break
        assert item is not None
        assert item.topic == "market_data.BTC-USD"  # type: ignore[union-attr]


def test_a_refused_subscriber_stops_at_start_with_the_key_named(
    bus: Bus, stranger_dir: Path, zmq_context: Context
) -> None:
    keys = load_client_keys(stranger_dir)
    subscriber = BlockingSubscriber(endpoint=bus.endpoints["pub"], context=zmq_context, keys=keys)
    with pytest.raises(AuthError, match=rf"refused key stranger \(fingerprint {keys.fingerprint}"):
        subscriber.start()
    assert subscriber._socket is None, "a failed start must close its socket"


async def test_the_asyncio_subscriber_takes_keys_the_same_way(
    bus: Bus, key_dir: Path, stranger_dir: Path, zmq_context: Context
) -> None:
    refused = Subscriber(
        endpoint=bus.endpoints["pub"], context=zmq_context, keys=load_client_keys(stranger_dir)
    )
    with pytest.raises(AuthError, match="refused key stranger"):
        await refused.start()
    admitted = Subscriber(
        ["market_data"],
        endpoint=bus.endpoints["pub"],
        snapshot=True,
        snapshot_endpoint=bus.endpoints["router"],
        snapshot_timeout=scaled(5),
        context=zmq_context,
        keys=load_client_keys(key_dir, "viewer"),
    )
    async with admitted:
        assert bus.snapshot_requests == 1


# -- bot_client ------------------------------------------------------------------------------------
def test_a_publisher_with_keys_is_admitted_and_known_by_its_key_name(
    bus: Bus, key_dir: Path, zmq_context: Context
) -> None:
    publisher = Publisher(
        url=bus.endpoints["xsub"],
        source_id="demo-bot",
        keys=str(key_dir),
        key_name="demo-bot",
        publish_interval=0,
        heartbeat_interval=0,
        context=zmq_context,
    )
    try:
        assert publisher.wait_admitted(scaled(5))
        publisher.publish("ai_decision", {"action": "BUY"})
        assert bus.xsub.poll(int(scaled(5) * 1000))
        topic = bus.xsub.recv(copy=False)
        assert topic.bytes == b"ai_decision"
        assert topic.get("User-Id") == "demo-bot"
        assert bus.keys.sources_for(topic.get("User-Id")) == {"demo-bot"}
    finally:
        publisher.close(scaled(2))
    assert publisher.status()["auth_refusals"] == 0


def test_a_refused_publisher_says_so_once_counts_it_and_sends_nothing(
    bus: Bus, stranger_dir: Path, zmq_context: Context
) -> None:
    with capture_logs() as logs:
        publisher = Publisher(
            url=bus.endpoints["xsub"],
            source_id="stranger",
            keys=str(stranger_dir),
            heartbeat_interval=0,
            context=zmq_context,
        )
        try:
            with pytest.raises(AuthRefusedError, match="refused key stranger"):
                publisher.wait_admitted(scaled(5))
            publisher.publish("ai_decision", {"action": "BUY"})
            assert not publisher.connected
        finally:
            publisher.close(0.1)
    assert publisher.status()["auth_refusals"] >= 1
    refusals = [entry for entry in logs if entry["event"] == "bus.publisher_refused"]
    assert len(refusals) == 1
    assert refusals[0]["key"] == "stranger"
    assert not bus.xsub.poll(0)


def test_publisher_key_settings_fail_at_construction_with_the_file_named(
    key_dir: Path, zmq_context: Context
) -> None:
    secret = key_dir / "demo-bot.key_secret"
    secret.chmod(0o644)
    with pytest.raises(SettingsError) as caught:
        Publisher(url="tcp://127.0.0.1:5555", keys=str(key_dir), key_name="demo-bot")
    assert str(caught.value) == (
        f"SYSTEM__TRADEBUS_KEYS: {secret}: secret key file is readable by group/others "
        "(mode 0644); chmod 600 it"
    )
    with pytest.raises(SettingsError, match="CURVE keys are for the bus"):
        Publisher(url="ws://127.0.0.1:8000/ws", keys=str(key_dir))
    with pytest.raises(SettingsError, match="SYSTEM__TRADEBUS_KEY_NAME='a b'"):
        Publisher.from_env(
            {
                "SYSTEM__ENABLE_WEBSOCKET_PUBLISHING": "true",
                "SYSTEM__TRADEBUS_KEYS": str(key_dir),
                "SYSTEM__TRADEBUS_KEY_NAME": "a b",
            }
        )


# -- bridge ----------------------------------------------------------------------------------------
async def test_the_bridge_with_keys_starts_and_a_refused_key_stops_it(
    bus: Bus, key_dir: Path, stranger_dir: Path
) -> None:
    base = BridgeConfig(
        host="127.0.0.1",
        port=0,
        bus=bus.endpoints["pub"],
        snapshot=bus.endpoints["router"],
        publish_to=bus.endpoints["xsub"],
        snapshot_timeout=scaled(5),
    )
    with pytest.raises(ConfigError, match="refused key stranger"):
        await start_bridge(base.replace(keys=str(stranger_dir), key_name="stranger"))
    server = await start_bridge(base.replace(keys=str(key_dir)))
    try:
        assert server.bridge.keys is not None
        assert server.bridge.keys.name == "bridge"
    finally:
        await server.close()


# -- tradebus up -----------------------------------------------------------------------------------
def test_up_creates_the_stack_keys_it_lacks_and_keeps_existing_ones(tmp_path: Path) -> None:
    directory = tmp_path / "stack"
    create_key(directory, "bridge")
    before = (directory / "bridge.key_secret").read_bytes()
    assert ensure_stack_keys(str(directory)) == [PROXY_KEY_NAME, "demo-bot"]
    assert (directory / "bridge.key_secret").read_bytes() == before
    roles = {info.name: (info.role, info.sources) for info in list_keys(directory)}
    assert roles == {
        "bridge": ("subscriber", frozenset()),
        "demo-bot": ("publisher", frozenset({"demo-bot"})),
        "proxy": ("proxy", frozenset()),
    }
    assert ensure_stack_keys(str(directory)) == []
    server = load_server_keys(directory)
    assert {info.name for info in server.authorized.values()} == {"bridge", "demo-bot"}


# -- the command line ------------------------------------------------------------------------------
def tradebus(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tradebus", *args],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        cwd=cwd,
        env={**os.environ, "TRADEBUS_LOG_LEVEL": "WARNING"},
    )


def test_keys_new_and_list_from_the_command_line(tmp_path: Path) -> None:
    for args in (["proxy"], ["bot-1", "--sources", "bot-1,bot-1.paper"], ["viewer"]):
        created = tradebus("keys", "new", *args, cwd=tmp_path)
        assert created.returncode == 0, created.stderr
    assert stat_mode(tmp_path / "tradebus-keys" / "bot-1.key_secret") == 0o600
    listed = tradebus("keys", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == ["NAME", "ROLE", "FINGERPRINT", "SOURCES"]
    assert [(row[0], row[1], row[3]) for row in rows[1:]] == [
        ("bot-1", "publisher", "bot-1,bot-1.paper"),
        ("proxy", "proxy", "-"),
        ("viewer", "subscriber", "-"),
    ]
    again = tradebus("keys", "new", "viewer", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1
    assert "viewer.key: already exists; keys are never overwritten" in again.stderr
    assert "--sources" in tradebus("keys", "--help").stdout


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (["record", "{out}", "--keys", "{dir}", "--key-name", "viewer"], "viewer"),
        (["replay", "{out}", "--keys", "{dir}", "--key-name", "viewer"], "viewer"),
        (["bridge", "--keys", "{dir}", "--port", "0"], "bridge"),
        (["demo", "--url", "tcp://127.0.0.1:1", "--keys", "{dir}", "--key-name", "bot-1"], "bot-1"),
        (["proxy", "--keys", "{dir}", "--frontend", "tcp://127.0.0.1:*"], "proxy"),
    ],
)
def test_a_group_readable_secret_stops_each_program_with_one_line(
    tmp_path: Path, command: list[str], name: str
) -> None:
    directory = tmp_path / "keys"
    make_keys(directory)
    create_key(directory, "bridge")
    (directory / f"{name}.key_secret").chmod(0o644)
    out = tmp_path / "out.jsonl"
    if command[0] == "replay":
        out.write_text('{"tradebus_recording": 1}\n')
    argv = [part.format(dir=directory, out=out) for part in command]
    result = tradebus(*argv)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"{directory}/{name}.key_secret: secret key file is readable by group/others" in (
        result.stderr
    )
    assert "(mode 0644); chmod 600 it" in result.stderr
    if command[0] == "record":
        assert not out.exists(), "a bad key must stop record before it creates its file"


def test_a_missing_key_directory_is_one_line_too(tmp_path: Path) -> None:
    result = tradebus("record", str(tmp_path / "out.jsonl"), "--keys", str(tmp_path / "none"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"{tmp_path / 'none'}: no such key directory" in result.stderr
