"""Who may connect, publish and see what (issue 12), against a real bridge on loopback.

DNS rebinding is played the way a browser would: a page on evil.example whose name points
at 127.0.0.1 reaches the loopback bridge with ``Host: evil.example:PORT`` and
``Origin: http://evil.example:PORT``; the test sends exactly those headers to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from asyncio.subprocess import PIPE
from collections.abc import Iterator
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
import websockets
import zmq
from aiohttp import web
from structlog.testing import capture_logs

from bridge.app import BRIDGE_KEY, BridgeServer, create_app
from bridge.config import BridgeConfig
from bridge.errors import ConfigError
from bus.proxy import Proxy
from tests.conftest import scaled
from tests.test_bridge_support import (
    BusPublisher,
    bridge_config,
    collect_events,
    connect,
    recv_until,
    request,
    running_bridge,
    subscribe,
    wait_for,
    ws_url,
)

SECRET = "edge-admission-secret-of-at-least-32-bytes"
TOKEN = "tok-3f9a1c"


@pytest.fixture
def publisher(zmq_context: zmq.Context[zmq.Socket[bytes]], proxy: Proxy) -> Iterator[BusPublisher]:
    bus = BusPublisher(zmq_context, proxy.frontend_endpoint, "bot-1")
    yield bus
    bus.close()


def make_jwt(**claims: Any) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def in_a_minute() -> int:
    return int(time.time()) + 60


async def http_status(server: BridgeServer, path: str, headers: dict[str, str]) -> int:
    """The status of a plain GET to the loopback bridge with the given headers."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{server.port}{path}",
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=scaled(5)),
        ) as response,
    ):
        return response.status


async def handshake_status(server: BridgeServer, query: str = "", **kwargs: Any) -> int:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(ws_url(server, query), open_timeout=scaled(5), **kwargs)
    status: int = refused.value.response.status_code
    return status


async def ws_status(server: BridgeServer, query: str, host: str, origin: str | None) -> int:
    """The HTTP status of a WebSocket handshake sent with this Host (and Origin)."""
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(
                ws_url(server, query),
                headers={"Host": host},
                origin=origin,
                timeout=aiohttp.ClientWSTimeout(ws_close=scaled(5)),
            )
        except aiohttp.WSServerHandshakeError as refused:
            return refused.status
        await ws.close()
        return 101


async def publish(client: Any, message_id: int, **event: Any) -> dict[str, Any]:
    """Send one event with an id; the bridge's ack or error for it."""
    body = {"type": "custom_event", "data": {"n": message_id}, "id": message_id, **event}
    await client.send(orjson.dumps(body).decode())
    reply, _ = await recv_until(client, lambda m: m.get("id") == message_id)
    return reply


# -- Host allowlist ---------------------------------------------------------------------
async def test_a_rebound_name_reaches_no_route_and_cannot_publish(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    async with running_bridge(bridge_config(proxy, allow_publish=True)) as server:
        evil = f"evil.example:{server.port}"
        for path in ("/metrics", "/ready", "/health", "/", "/static/dashboard.js"):
            assert await http_status(server, path, {"Host": evil}) == 421, path
        # the rebinding page's WebSocket: same-site by its Origin, trusted by loopback
        status = await ws_status(server, "role=publisher&source=forged", evil, f"http://{evil}")
        assert status == 421
        assert server.bridge.hub.stats.published == 0
        assert server.bridge.rejected["host"] == 6
        # its own names keep working, the dashboard's addresses first
        for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "127.0.0.1"):
            assert await http_status(server, "/ready", {"Host": host}) == 200, host
        assert await http_status(server, "/ready", {"Host": "localhost:1"}) == 421
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.port}/metrics") as response,
        ):
            metrics = await response.text()
        assert 'tradebus_bridge_connections_rejected_total{reason="host"} 7.0' in metrics


async def test_server_names_are_served_on_any_port_or_the_one_given(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    config = bridge_config(proxy, server_names=("dash.example.com", "other.example:8443"))
    async with running_bridge(config) as server:
        for host in ("dash.example.com", "dash.example.com:9999", "other.example:8443"):
            assert await http_status(server, "/ready", {"Host": host}) == 200, host
        for host in ("other.example:8000", "evil.example", "dash.example.com.evil.example"):
            assert await http_status(server, "/ready", {"Host": host}) == 421, host


def test_a_wildcard_bind_serves_ip_literals_and_loopback_names_only() -> None:
    from bridge.admission import HostPolicy

    policy = HostPolicy.from_settings("0.0.0.0", ())
    assert policy.allows("172.18.0.3:8000", 8000)
    assert policy.allows("[::1]:8000", 8000)
    assert policy.allows("localhost:8000", 8000)  # a container's port mapped to the host
    assert not policy.allows("dashboard-backend:8000", 8000)
    assert not policy.allows("evil.example:8000", 8000)
    assert not policy.allows("127.0.0.1:9000", 8000)
    assert not policy.allows(None, 8000)
    assert not policy.allows("user@localhost:8000", 8000)
    specific = HostPolicy.from_settings("10.0.0.5", ("dashboard-backend",))
    assert specific.allows("10.0.0.5:8000", 8000)
    assert specific.allows("dashboard-backend:8000", 8000)
    assert not specific.allows("localhost:8000", 8000)  # not reachable there anyway


# -- Origins ----------------------------------------------------------------------------
async def test_a_loopback_bridge_trusts_its_own_origin_not_every_local_page(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    async with running_bridge(bridge_config(proxy)) as server:
        port = server.port
        for origin in (f"http://localhost:{port + 1}", "http://localhost:5173", "http://127.0.0.1"):
            assert await handshake_status(server, origin=origin) == 403, origin
        # same host, other scheme: another origin
        assert await handshake_status(server, origin=f"https://127.0.0.1:{port}") == 403
        client = await connect(server, origin=f"http://127.0.0.1:{port}")
        await client.close()
        # the dashboard opened as http://localhost:PORT/
        assert await ws_status(server, "", f"localhost:{port}", f"http://localhost:{port}") == 101


# -- Publishing -------------------------------------------------------------------------
async def test_a_browser_never_publishes_without_a_token(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    config = bridge_config(proxy, allow_publish=True, publish_networks=("127.0.0.0/8",))
    async with running_bridge(config) as server:
        page = await connect(server, "role=publisher", origin=f"http://127.0.0.1:{server.port}")
        reply = await publish(page, 1)
        assert (reply["type"], reply["code"]) == ("error", "publish_forbidden")
        await page.close()
        bot = await connect(server, "role=publisher")  # no Origin: a program on loopback
        assert (await publish(bot, 2))["type"] == "ack"
        await bot.close()
        assert server.bridge.hub.stats.publish_rejected["forbidden"] == 1


async def test_a_publish_token_publishes_only_its_source(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    config = bridge_config(proxy, publish_tokens=(f"bot-1={TOKEN}", f"bot-2={TOKEN}"))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with running_bridge(config) as server:
        reader = await connect(server, additional_headers=bearer)
        await subscribe(reader, ["custom_event"])
        status = await handshake_status(
            server, "role=publisher&source=bot-3", additional_headers=bearer
        )
        assert status == 403
        assert server.bridge.rejected["source_forbidden"] == 1
        for query, source in (
            ("role=publisher&source=bot-2", "bot-2"),
            ("role=publisher", "bot-1"),
        ):
            writer = await connect(server, query, additional_headers=bearer)
            assert (await publish(writer, 7))["type"] == "ack"
            (event,) = await collect_events(reader, 1)
            assert event["source"] == source
            await writer.close()
            await wait_for(
                lambda: not server.bridge.admission.publishing_sources, "source released"
            )
        await reader.close()


async def test_a_jwt_publishes_only_the_sources_it_names(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    async with running_bridge(bridge_config(proxy, jwt_secret=SECRET)) as server:
        named = make_jwt(exp=in_a_minute(), publish=True, sources=["jwt-bot"])
        assert await handshake_status(server, f"role=publisher&source=bot-1&token={named}") == 403
        writer = await connect(server, f"role=publisher&source=jwt-bot&token={named}")
        assert (await publish(writer, 1))["type"] == "ack"
        await writer.close()
        # publish: true naming no source publishes nothing
        unnamed = make_jwt(exp=in_a_minute(), publish=True)
        assert await handshake_status(server, f"role=publisher&source=x&token={unnamed}") == 403
        anyone = await connect(server, f"role=publisher&token={unnamed}")
        reply = await publish(anyone, 2)
        assert (reply["type"], reply["code"]) == ("error", "publish_forbidden")
        await anyone.close()
        assert server.bridge.rejected["source_forbidden"] == 2


def test_a_bare_publish_token_stops_the_bridge_with_one_line_that_hides_it() -> None:
    with pytest.raises(ConfigError) as refused:
        BridgeConfig(publish_tokens=("bot-1=fine", TOKEN))
    assert "entry 2 is not SOURCE=TOKEN" in str(refused.value)
    assert TOKEN not in str(refused.value)
    with pytest.raises(ConfigError):
        BridgeConfig(publish_tokens=("bad source!=tok",))
    with pytest.raises(ConfigError):
        BridgeConfig(publish_tokens=("abc==",))  # a base64 token, not SOURCE=TOKEN
    done = subprocess.run(
        [sys.executable, "-m", "tradebus", "bridge", "--publish-tokens", TOKEN],
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "SOURCE=TOKEN" in done.stderr
    assert TOKEN not in done.stderr + done.stdout


# -- Grants -----------------------------------------------------------------------------
async def test_an_empty_topics_claim_grants_nothing(proxy: Proxy, publisher: BusPublisher) -> None:
    await publisher.connected()
    async with running_bridge(bridge_config(proxy, jwt_secret=SECRET)) as server:
        everything = await connect(server, "token=" + make_jwt(exp=in_a_minute()))
        nothing = await connect(server, "token=" + make_jwt(exp=in_a_minute(), topics=[]))
        await subscribe(everything, ["ai_decision"])
        error = await request(nothing, {"op": "subscribe", "topics": ["ai_decision"]}, "subscribed")
        assert error["code"] == "forbidden"
        await publisher.publish("ai_decision", {"action": "BUY"})
        await collect_events(everything, 1)
        # had the event been routed to it, it would be queued ahead of this pong
        await nothing.send('{"op": "ping", "id": 9}')
        pong, before = await recv_until(nothing, lambda m: m["type"] == "pong")
        assert pong["id"] == 9
        assert before == [], before
        await everything.close()
        await nothing.close()


async def test_tokens_must_expire_soon_enough_and_name_this_bridge(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    config = bridge_config(
        proxy,
        jwt_secret=SECRET,
        jwt_audience="tradebus",
        jwt_issuer="https://auth.example",
        jwt_max_lifetime=3600.0,
    )
    good = {"aud": "tradebus", "iss": "https://auth.example"}
    async with running_bridge(config) as server:
        refused = {
            "no exp": make_jwt(**good),
            "exp beyond the longest lifetime": make_jwt(exp=int(time.time()) + 7200, **good),
            "other audience": make_jwt(exp=in_a_minute(), aud="other", iss=good["iss"]),
            "no audience": make_jwt(exp=in_a_minute(), iss=good["iss"]),
            "other issuer": make_jwt(exp=in_a_minute(), aud="tradebus", iss="https://evil"),
        }
        for why, token in refused.items():
            assert await handshake_status(server, f"token={token}") == 401, why
        client = await connect(server, "token=" + make_jwt(exp=in_a_minute(), **good))
        await client.close()


async def test_source_names_reach_only_grants_covering_the_status_topic(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    async with running_bridge(bridge_config(proxy, jwt_secret=SECRET)) as server:
        watcher = await connect(server, "token=" + make_jwt(exp=in_a_minute()))
        prices = await connect(
            server, "token=" + make_jwt(exp=in_a_minute(), topics=["market_data"])
        )
        await publisher.publish("system_status", {"status": "alive"})
        status, _ = await recv_until(watcher, lambda m: m["type"] == "source_status")
        assert status["source"] == "bot-1"
        await prices.send('{"op": "ping", "id": 1}')
        _pong, before = await recv_until(prices, lambda m: m["type"] == "pong")
        assert not [m for m in before if m["type"] == "source_status"], before
        # nor in the greeting of a later connection, which lists every known source
        late = await connect(server, "token=" + make_jwt(exp=in_a_minute(), topics=["market_data"]))
        await late.send('{"op": "ping", "id": 2}')
        _pong, before = await recv_until(late, lambda m: m["type"] == "pong")
        assert not [m for m in before if m["type"] == "source_status"], before
        for client in (watcher, prices, late):
            await client.close()


# -- start-up warning -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "tokens", "warned"),
    [("0.0.0.0", (), True), ("0.0.0.0", ("t",), False), ("127.0.0.1", (), False)],
)
async def test_an_open_bridge_on_a_public_address_warns_at_start(
    proxy: Proxy, host: str, tokens: tuple[str, ...], warned: bool
) -> None:
    # the application starts (bus links, timers) without listening anywhere
    app = create_app(bridge_config(proxy, host=host, tokens=tokens))
    runner = web.AppRunner(app)
    with capture_logs() as logs:
        await runner.setup()
        await runner.cleanup()
    warnings = [e for e in logs if e["event"] == "bridge.unauthenticated_exposure"]
    assert bool(warnings) is warned
    if warned:
        assert warnings[0]["log_level"] == "warning"
        assert "without any token or JWT secret" in warnings[0]["risk"]
    assert app[BRIDGE_KEY].config.host == host


# -- the bot client's token -------------------------------------------------------------
async def test_the_bot_client_sends_its_token_in_a_header_not_the_url() -> None:
    seen: list[web.Request] = []
    arrived = asyncio.Event()

    async def refuse(request: web.Request) -> web.Response:
        seen.append(request)
        arrived.set()
        return web.Response(status=401, text="token_invalid\n")

    app = web.Application()
    app.router.add_get("/ws", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    script = textwrap.dedent(
        f"""
        import time
        from bot_client import Publisher
        publisher = Publisher(
            url="ws://127.0.0.1:{port}/ws", token="{SECRET}", source_id="hdr-check",
            retry_delay=0.05, heartbeat_interval=0,
        )
        publisher.publish("custom_event", {{"n": 1}})
        deadline = time.monotonic() + 10
        while publisher.status()["connect_attempts"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        publisher.close(timeout=0.5)
        """
    )
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=PIPE, stderr=PIPE
        )
        out, err = await asyncio.wait_for(child.communicate(), scaled(30))
        await asyncio.wait_for(arrived.wait(), scaled(5))
    finally:
        await runner.cleanup()
    first = seen[0]
    assert first.headers["Authorization"] == f"Bearer {SECRET}"
    assert "token" not in first.query
    assert SECRET not in str(first.rel_url)
    # no configure_logging(): structlog's default output, with no redaction of its own
    logged = (out + err).decode()
    assert "publisher_connect_failed" in logged, logged[-2000:]
    assert "401" in logged, logged[-2000:]
    assert SECRET not in logged


async def test_no_log_line_of_the_bot_client_quotes_a_token_put_in_its_url(
    proxy: Proxy,
) -> None:
    config = bridge_config(proxy, tokens=("the-right-token",))
    async with running_bridge(config) as server:
        script = textwrap.dedent(
            f"""
            import time
            from bot_client import Publisher
            publisher = Publisher(
                url="ws://127.0.0.1:{server.port}/ws?token={SECRET}", source_id="url-check",
                retry_delay=0.05, heartbeat_interval=0,
            )
            publisher.publish("custom_event", {{"n": 1}})
            deadline = time.monotonic() + 10
            while publisher.status()["connect_attempts"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            publisher.close(timeout=0.5)
            """
        )
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=PIPE, stderr=PIPE
        )
        out, err = await asyncio.wait_for(child.communicate(), scaled(30))
    logged = (out + err).decode()
    assert "publisher_started" in logged, logged[-2000:]
    assert "publisher_connect_failed" in logged, logged[-2000:]
    assert SECRET not in logged


async def test_a_bot_with_a_publish_token_reaches_subscribers(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    from bot_client import Publisher

    await publisher.connected()
    config = bridge_config(proxy, publish_tokens=(f"bot-9={TOKEN}",))
    async with running_bridge(config) as server:
        reader = await connect(server, additional_headers={"Authorization": f"Bearer {TOKEN}"})
        await subscribe(reader, ["custom_event"])
        bot = Publisher(
            url=f"ws://127.0.0.1:{server.port}/ws",
            token=TOKEN,
            source_id="bot-9",
            heartbeat_interval=0,
        )
        try:
            bot.publish("custom_event", {"n": 1})
            (event,) = await collect_events(reader, 1)
            assert event["source"] == "bot-9"
        finally:
            await asyncio.to_thread(bot.close, 2.0)
        await reader.close()


async def test_tap_sends_as_its_publish_tokens_source(
    proxy: Proxy, publisher: BusPublisher
) -> None:
    await publisher.connected()
    config = bridge_config(proxy, publish_tokens=(f"checker={TOKEN}",))
    async with running_bridge(config) as server:
        reader = await connect(server, additional_headers={"Authorization": f"Bearer {TOKEN}"})
        await subscribe(reader, ["ai_decision"])
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tradebus", "tap", "--url", ws_url(server),
            "--send", "ai_decision", "--token", TOKEN,
            stdout=PIPE, stderr=PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(child.communicate(), scaled(30))
        assert child.returncode == 0, (out + err).decode()[-2000:]
        (event,) = await collect_events(reader, 1)
        assert event["source"] == "checker"
        await reader.close()


@pytest.mark.parametrize("stack", ["base", "websocket"])
def test_compose_clients_reach_the_bridge_by_its_service_name(stack: str) -> None:
    # the bot of the WebSocket override and `tap --docker-url` use ws://dashboard-backend:8000
    from bridge.admission import HostPolicy
    from tests.test_compose import clean_environment, command_of, environment_of, parse, services
    from tradebus.bridge import config_from_args

    backend = services(stack)["dashboard-backend"]
    with pytest.MonkeyPatch.context() as patch:
        clean_environment(patch, environment_of(backend))
        config = config_from_args(parse(command_of(backend)))
    policy = HostPolicy.from_settings(config.host, config.server_names)
    assert policy.allows("dashboard-backend:8000", 8000)
