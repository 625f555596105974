"""The aiohttp application: the /ws endpoint and the ZeroMQ upstream around the pure Hub.

aiohttp does the handshake, reads client frames, answers and sends pings and closes
connections. Everything the bridge sends is built by the hub as complete WebSocket frames
and written straight to the connection's transport, one write per client per loop turn.
aiohttp's own writes (pings, pongs, close frames) are also whole frames written
synchronously, so the two never interleave inside a frame; nothing is written after a
connection starts closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bridge.admission import HostPolicy, exposure_warning
from bridge.auth import Authenticator
from bridge.bus_health import BusHealth
from bridge.bus_link import BusLink, cancel_and_wait
from bridge.client import Client, SlowConsumerError
from bridge.config import BridgeConfig
from bridge.edge import EdgeGuard, edge_of
from bridge.errors import ConfigError
from bridge.handshake import Admission
from bridge.hub import Hub
from bridge.limits import TokenBucket
from bridge.metrics import BridgeCollector, BridgeView
from bridge.protocol import (
    Ignore,
    Ping,
    PublishRequest,
    RequestError,
    Subscribe,
    Unsubscribe,
    parse_request,
)
from bridge.rfc6455 import CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED_DATA, close_code_allowed
from bus.errors import KeyFileError
from bus.keys import ClientKeys, load_client_keys
from monitoring.logging import get_logger

SUBPROTOCOL: Final = "tradebus"
BACKLOG_RETRY: Final = 0.005
HOUSEKEEPING_INTERVAL: Final = 0.5
# how often a closing connection's unsent bytes are checked before it is aborted
ABORT_POLL: Final = 0.1
# units of request work (a pattern, a position, a topic looked at, a frame queued) that
# cost as much of a connection's rate limit as one message
WORK_PER_TOKEN: Final = 20.0
LISTEN_BACKLOG: Final = 128  # as aiohttp's TCPSite

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN_LATER: Final = 1013
# after start-up, how long WebSocket publishers' events may wait for the bus links
# before they are refused with "bus_unavailable"
PUBLISH_HOLD_SECONDS: Final = 1.0
CLOSE_TOKEN_EXPIRED: Final = 4001
CLOSE_SLOW_CONSUMER: Final = 4008

PLACEHOLDER_PAGE: Final = (
    "<!doctype html><meta charset=utf-8><title>tradebus</title>"
    "<p>tradebus bridge is running. The dashboard is not installed "
    "(bridge/static/index.html is missing). WebSocket endpoint: <code>/ws</code>.</p>"
)


class Bridge:
    """One bridge: the hub, the bus link, the connections, the timers."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.log = get_logger("bridge")
        self.hub = Hub(
            conflate_types=config.conflate_types,
            history_events=config.history_events,
            history_seconds=config.history_seconds,
            max_subscriptions=config.max_subscriptions,
            upstream_linger=config.upstream_linger,
            snapshot_timeout=config.snapshot_timeout,
            stale_after=config.stale_after,
            track_sources=config.track_sources,
            snapshots_available=bool(config.snapshot),
            max_lingering=config.max_lingering,
            max_topics=config.max_topics,
            max_sources=config.max_sources,
            forget_sources_after=config.forget_sources_after,
            bus_history=bool(config.snapshot),
        )
        self.auth = Authenticator(
            config.tokens,
            config.publish_token_sources(),
            config.jwt_secret,
            jwt_audience=config.jwt_audience,
            jwt_issuer=config.jwt_issuer,
            jwt_max_lifetime=config.jwt_max_lifetime,
        )
        self.admission = Admission(config, self.auth)
        self.hosts = HostPolicy.from_settings(config.host, config.server_names)
        self.keys: ClientKeys | None = None
        if config.keys:
            try:
                self.keys = load_client_keys(config.keys, config.key_name)
            except KeyFileError as error:
                raise ConfigError(f"bridge setting keys: {error}") from None
        self.health = BusHealth(probing=bool(config.snapshot), publishing=bool(config.publish_to))
        self.link = BusLink(
            config,
            self.keys,
            self.hub,
            on_batch=self.flush,
            on_reply=self._after_reply,
            on_answer=self._bus_seen,
            on_link=self._link_changed,
            on_publisher=self._publisher_linked,
        )
        self.registry = CollectorRegistry()
        self.registry.register(BridgeCollector(self.view))
        # set while a WebSocket publisher's event can go onto the bus right away
        self._bus_usable = asyncio.Event()
        self._publish_grace_until = 0.0
        self.edge = EdgeGuard(
            handshake_timeout=config.handshake_timeout,
            max_handshakes_per_ip=config.max_handshakes_per_ip,
            max_handshakes=config.max_handshakes,
            on_refused=lambda reason, ip: self.admission.reject(reason, ip=ip),
        )
        self.slow_closed_bytes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closing_tasks: set[asyncio.Task[bool]] = set()
        self._job_waiters: dict[Client, asyncio.Future[None]] = {}
        self._backlog: set[Client] = set()
        self._backlog_timer: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ready(self) -> bool:
        """Connected to the bus: the proxy answers and the subscriber's link is up."""
        return self.health.ready

    @property
    def publish_ready(self) -> bool:
        return self.health.publish_ready

    @property
    def rejected(self) -> dict[str, int]:
        """Handshakes refused, by reason."""
        return self.admission.rejected

    def view(self) -> BridgeView:
        """What /metrics reports, read at scrape time (bridge/metrics.py)."""
        return BridgeView(
            hub=self.hub,
            rejected=self.admission.rejected,
            handshakes_open=self.edge.handshakes_total,
            protocol_errors=self.edge.protocol_errors,
            ready=self.ready,
        )

    # -- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        self._loop = asyncio.get_running_loop()
        self._publish_grace_until = time.monotonic() + PUBLISH_HOLD_SECONDS
        await self.link.start()
        self._tasks = [asyncio.create_task(self._housekeeping(), name="bridge-timers")]
        self._probe(time.monotonic())
        self.log.info(
            "bridge.started",
            bus=config.bus,
            snapshot=config.snapshot or None,
            publish_to=config.publish_to or None,
            allow_publish=config.allow_publish,
            auth=self.auth.required,
        )
        risk = exposure_warning(config.host, self.auth.required)
        if risk is not None:
            self.log.warning("bridge.unauthenticated_exposure", host=config.host, risk=risk)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        if self._backlog_timer is not None:
            self._backlog_timer.cancel()
        await self.link.stop()
        self.log.info("bridge.stopped", deliveries=self.hub.stats.deliveries)

    def close_all(self) -> None:
        """Close every client with 1001 (the server is going away)."""
        for client in list(self.hub.clients):
            self.close_client(client, CLOSE_GOING_AWAY, "server shutting down")

    # -- bus health -----------------------------------------------------------------------
    def _after_reply(self) -> None:
        self.flush()
        self._wake_job_waiters()

    def _link_changed(self, up: bool) -> None:
        if up:
            if self.health.link_up():
                # what the proxy forwarded before the subscriptions were back in force
                # shows as gaps: the hub asks the proxy's history for those for a while
                self.hub.link_restored(time.monotonic())
            # ready again once the snapshot service answers too: ask now, not in 5 s
            self._probe(time.monotonic())
        elif self.health.link_down():
            self._update_bus_usable()
            self.log.warning("bridge.bus_unavailable", bus=self.config.bus)

    def _bus_seen(self, now: float) -> None:
        if self.health.answered(now):
            self._update_bus_usable()
            self.log.info("bridge.bus_connected", bus=self.config.bus)

    def _publisher_linked(self) -> None:
        if self.health.publisher_linked():
            self._update_bus_usable()
            self.log.info("bridge.publisher_connected", publish_to=self.config.publish_to)

    def _update_bus_usable(self) -> None:
        if self.health.usable:
            self._bus_usable.set()
        else:
            self._bus_usable.clear()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            now = time.monotonic()
            self.hub.housekeeping(now)
            self.link.end_finished_markers()
            self._probe(now)
            self._apply_upstream()
            self.flush()
            self._wake_job_waiters()

    def _probe(self, now: float) -> None:
        lost, send = self.health.probe(now)
        if lost:
            self._update_bus_usable()
            self.log.warning("bridge.bus_unavailable", snapshot=self.config.snapshot)
        if send:
            self.link.send_probe()

    def _apply_upstream(self) -> None:
        self.link.apply()

    async def publish(self, frames: list[bytes]) -> None:
        await self.link.publish(frames)

    # -- writing ------------------------------------------------------------------------
    def schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every dirty client's queued frames: one transport write per client."""
        self._flush_scheduled = False
        hub = self.hub
        dirty = hub.dirty
        if not dirty:
            return
        high = self.config.write_buffer_high
        limit = self.config.max_queue_bytes
        slow: list[Client] = []
        backlog = self._backlog
        for client in dirty:
            frames = client.frames
            if not frames:
                continue
            transport = client.transport
            if client.conn.closed or transport.is_closing():
                frames.clear()  # aiohttp is closing it: nothing may follow its close frame
                continue
            buffered = transport.get_write_buffer_size()
            if buffered < high and not client.special:
                # the common case, kept inline: the socket keeps up, write all at once
                transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
                frames.clear()
                continue
            try:
                data = client.take(buffered, high, limit)
            except SlowConsumerError:
                slow.append(client)
                continue
            if data is not None:
                transport.write(data)
            elif client.frames:
                backlog.add(client)
        dirty.clear()
        hub.observe_latency(time.time_ns())
        for client in slow:
            self._close_slow(client)
        if backlog and self._backlog_timer is None and self._loop is not None:
            self._backlog_timer = self._loop.call_later(BACKLOG_RETRY, self._retry_backlog)

    def _retry_backlog(self) -> None:
        self._backlog_timer = None
        self.hub.dirty.update(c for c in self._backlog if c in self.hub.clients)
        self._backlog.clear()
        self.flush()

    def _close_slow(self, client: Client) -> None:
        queued = client.queued_bytes() + client.transport.get_write_buffer_size()
        self.hub.stats.slow_disconnects += 1
        self.hub.stats.drop("slow_consumer", len(client.frames) + len(client.held or ()))
        self.log.warning(
            "websocket.slow_consumer", client=client.id, ip=client.ip, queued_bytes=queued
        )
        self.close_client(client, CLOSE_SLOW_CONSUMER, "slow consumer")

    def close_client(self, client: Client, code: int, reason: str) -> None:
        """Close from the server side: no more frames, a close frame, then a hard stop.

        Frames still queued in the bridge are dropped, so the close frame follows only what
        the transport already holds (at most about ``write_buffer_high``). The connection
        is cut only once that close frame was handed to the kernel, or when the client
        read nothing for two ping intervals (a dead peer by the heartbeat's rule).
        """
        self.hub.remove_client(client, time.monotonic())
        self._backlog.discard(client)
        ws: web.WebSocketResponse = client.conn
        transport = client.transport
        if ws.closed:
            return
        task = asyncio.create_task(ws.close(code=code, message=reason.encode(), drain=False))
        # the loop keeps only weak references to tasks: hold it until it is done
        self._closing_tasks.add(task)
        task.add_done_callback(self._closing_tasks.discard)
        if self._loop is not None and transport is not None:
            # a client that reads nothing never answers the close frame
            now = self._loop.time()
            self._loop.call_at(
                now + self.config.close_timeout + 0.5,
                self._abort_once_flushed,
                transport,
                now + 2 * self.config.ping_interval,
            )

    def _abort_once_flushed(self, transport: Any, deadline: float) -> None:
        """Abort ``transport`` when its close frame is out, or it stalled to ``deadline``."""
        if self._loop is None:
            return
        if transport.get_write_buffer_size() == 0 or self._loop.time() >= deadline:
            transport.abort()
            return
        self._loop.call_later(ABORT_POLL, self._abort_once_flushed, transport, deadline)

    # -- connections --------------------------------------------------------------------
    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        """One WebSocket connection, from handshake to close (one coroutine per client)."""
        config, hub = self.config, self.hub
        assert self._loop is not None
        edge = edge_of(request.transport)
        if edge is not None:
            early = edge.websocket_started()
            if early is not None:
                self.admission.reject("early_data", ip=request.remote or "")
                raise web.HTTPBadRequest(text=early + "\n")
        try:
            client, initial = self.admission.admit(request)
        except web.HTTPException:
            if edge is not None:
                edge.websocket_refused()
            raise
        grant = client.grant
        ws = web.WebSocketResponse(
            heartbeat=config.ping_interval,
            compress=False,
            # aiohttp refuses a message of exactly max_msg_size: the limit announced in
            # the greeting is the largest message accepted
            max_msg_size=config.max_message_bytes + 1,
            autoclose=False,
            timeout=config.close_timeout,
            protocols=(SUBPROTOCOL,),
        )
        # counted before the handshake's first await, so concurrent handshakes see it
        claims_source = self.admission.opened(client)
        try:
            await ws.prepare(request)
            if edge is not None:
                edge.websocket_open()
            client.transport = request.transport
            client.conn = ws
            client.push(hub.greeting(client, config.ping_interval, config.max_message_bytes))
            hub.add_client(client, time.time_ns(), receive_all=initial is None)
            self.log.info(
                "websocket.client_connected",
                client=client.id,
                session=client.session,
                ip=client.ip,
                role="publisher" if client.publisher else "subscriber",
                may_publish=client.may_publish,
                subject=grant.subject,
            )
            expiry: asyncio.TimerHandle | None = None
            if grant.expires_at is not None:
                expiry = self._loop.call_later(
                    max(0.0, grant.expires_at - time.time()), self._expire, client
                )
            now = time.monotonic()
            if client.may_publish:
                bucket = TokenBucket(config.publish_rate_limit, config.publish_rate_burst, now)
            else:
                bucket = TokenBucket(config.rate_limit, config.rate_burst, now)
            errors = 0
            close_code, close_reason = CLOSE_NORMAL, ""
            decided = True  # False when the close code is aiohttp's to tell
            try:
                if initial:
                    try:
                        self._request(client, Subscribe(tuple(initial), True, None, None))
                    except RequestError as error:
                        # e.g. patterns outside the token's or over max_subscriptions: the
                        # client is told, as for the same request sent as a message
                        hub.error(client, error.code, str(error), None)
                        errors += 1
                self._apply_upstream()
                self.flush()
                while True:
                    message = await ws.receive()
                    if message.type is WSMsgType.TEXT:
                        if not bucket.take(time.monotonic()):
                            if not client.may_publish:
                                close_code, close_reason = CLOSE_POLICY, "rate limit exceeded"
                                self.log.warning(
                                    "websocket.rate_limited", client=client.id, ip=client.ip
                                )
                                break
                            # a publisher above its rate is slowed down, not dropped: not
                            # reading its socket pushes back on it through TCP
                            await asyncio.sleep(bucket.reserve(time.monotonic()))
                        try:
                            failed = await self._handle(client, message.data)
                        except Exception:
                            self.log.exception("websocket.internal_error", client=client.id)
                            close_code, close_reason = CLOSE_INTERNAL_ERROR, "internal error"
                            break
                        if failed == "bus_unavailable":
                            # Nothing this connection sends after a refused event may reach
                            # the bus before it: the publisher resends from the refused one
                            # on its next connection, in order.
                            close_code, close_reason = CLOSE_TRY_AGAIN_LATER, "bus unavailable"
                            self.flush()  # the error reply goes out before the close frame
                            break
                        if failed:
                            errors += 1
                            if errors > config.max_errors:
                                close_code, close_reason = CLOSE_POLICY, "too many invalid messages"
                                break
                        self._apply_upstream()
                        self.schedule_flush()
                        if client.jobs:
                            # one snapshot or resume in flight per connection: the next
                            # message is read once this one is served
                            await self._jobs_served(client)
                        if client.work:
                            # requests cost in proportion to their work (patterns,
                            # positions, topics, frames), paid by not reading for a while
                            pause = bucket.charge(time.monotonic(), client.work / WORK_PER_TOKEN)
                            client.work = 0
                            if pause > 0:
                                await asyncio.sleep(pause)
                        continue
                    if message.type is WSMsgType.BINARY:
                        # every message of the protocol is JSON text (docs/websocket-protocol.md)
                        close_code = CLOSE_UNSUPPORTED_DATA
                        close_reason = "binary messages are not accepted: send JSON as text"
                    elif message.type is WSMsgType.ERROR:
                        close_code = ws.close_code or CLOSE_TOO_BIG
                        close_reason = str(message.data)
                        if close_code == CLOSE_TOO_BIG:
                            self.log.warning(
                                "websocket.message_too_big", client=client.id, ip=client.ip
                            )
                    elif message.type is WSMsgType.CLOSE:
                        close_code = int(message.data) if message.data else CLOSE_NORMAL
                        close_reason = message.extra or ""
                        if not close_code_allowed(close_code):
                            # 1005, 1006, 1015 and codes outside the ranges must never be
                            # sent, so they are not echoed either (RFC 6455 7.4)
                            close_code = CLOSE_PROTOCOL_ERROR
                            close_reason = "invalid close code"
                    elif edge is not None and edge.failure is not None:
                        close_code, close_reason = edge.failure
                    else:
                        decided = False
                    break
            finally:
                if expiry is not None:
                    expiry.cancel()
                was_registered = client in hub.clients
                hub.remove_client(client, time.monotonic())
                self._backlog.discard(client)
                self._apply_upstream()
                if was_registered and not ws.closed:
                    await ws.close(code=close_code, message=close_reason.encode()[:120])
                if not decided and ws.close_code is not None:
                    close_code = int(ws.close_code)  # e.g. 1006: the peer vanished
                self.log.info(
                    "websocket.client_disconnected",
                    client=client.id,
                    ip=client.ip,
                    code=close_code,
                    reason=close_reason[:120],
                )
            return ws
        finally:
            if edge is not None and not ws.prepared:
                edge.websocket_refused()
            self.admission.closed(client, claims_source)

    async def _jobs_served(self, client: Client) -> None:
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._job_waiters[client] = waiter
        try:
            # upstream syncs time out after snapshot_timeout (housekeeping), which serves
            # the job from what the bridge holds: this bound is only a safety net
            await asyncio.wait_for(waiter, self.config.snapshot_timeout + 2 * HOUSEKEEPING_INTERVAL)
        except TimeoutError:
            pass
        finally:
            self._job_waiters.pop(client, None)

    def _wake_job_waiters(self) -> None:
        for client, waiter in list(self._job_waiters.items()):
            if not waiter.done() and (not client.jobs or client not in self.hub.clients):
                waiter.set_result(None)

    def _expire(self, client: Client) -> None:
        if client in self.hub.clients:
            self.log.info("websocket.token_expired", client=client.id, ip=client.ip)
            self.close_client(client, CLOSE_TOKEN_EXPIRED, "token expired")

    def _request(self, client: Client, request: Subscribe | Unsubscribe) -> None:
        now = time.monotonic()
        if isinstance(request, Subscribe):
            self.hub.subscribe(client, request, now)
        else:
            self.hub.unsubscribe(client, request, now)

    async def _handle(self, client: Client, data: str | bytes) -> str | None:
        """Handle one client message; the error code when it was refused (and told)."""
        hub = self.hub
        try:
            request = parse_request(
                data,
                max_patterns=self.config.max_subscriptions,
                max_positions=self.config.max_resume_positions,
            )
            if isinstance(request, Subscribe | Unsubscribe):
                self._request(client, request)
            elif isinstance(request, Ping):
                hub.pong(client, request.request_id)
            elif isinstance(request, PublishRequest):
                await self._publish_request(client, request)
            else:
                assert isinstance(request, Ignore)
        except RequestError as error:
            hub.error(client, error.code, str(error), error.request_id)
            if error.code in ("publish_forbidden", "bad_event", "bus_unavailable"):
                self.log.warning(
                    "websocket.publish_rejected", client=client.id, ip=client.ip, code=error.code
                )
            return error.code
        return None

    async def _publish_request(self, client: Client, request: PublishRequest) -> None:
        grace = self._publish_grace_until - time.monotonic()
        if client.may_publish and not self._bus_usable.is_set() and grace > 0:
            # Just after start-up the bus links take a moment: hold this connection's
            # events (its later messages wait behind, so order is kept) rather than
            # refuse a publisher that connected a moment too early.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._bus_usable.wait(), grace)
        if client.may_publish and not self._bus_usable.is_set():
            self.hub.stats.reject_publish("bus_unavailable")
            raise RequestError(
                "bus_unavailable", "the bridge is not connected to the bus", request.request_id
            )
        frames = self.hub.publish(client, request, time.time_ns())
        if frames is None:
            self.hub.ack(client, request.request_id, duplicate=True)
            return
        await self.publish(frames)
        if client in self.hub.clients:
            self.hub.ack(client, request.request_id)


# -- HTTP endpoints -----------------------------------------------------------------------
async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE_KEY]
    body = {"ready": bridge.ready, "bus": bridge.config.bus, "clients": len(bridge.hub.clients)}
    return web.json_response(body, status=200 if bridge.ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE_KEY]
    return web.Response(
        body=generate_latest(bridge.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def _static_root(request: web.Request) -> Path:
    return Path(request.app[BRIDGE_KEY].config.static_dir).resolve()


async def _index(request: web.Request) -> web.StreamResponse:
    page = _static_root(request) / "index.html"
    if page.is_file():
        return web.FileResponse(page)
    return web.Response(text=PLACEHOLDER_PAGE, content_type="text/html")


async def _static(request: web.Request) -> web.StreamResponse:
    root = _static_root(request)
    target = (root / request.match_info["path"]).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(target)


BRIDGE_KEY: Final = web.AppKey("bridge", Bridge)


@web.middleware
async def _request_started(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A whole request line and headers arrived: the socket's handshake deadline is met."""
    edge = edge_of(request.transport)
    if edge is None:
        return await handler(request)
    edge.request_started()
    try:
        return await handler(request)
    finally:
        edge.request_done()


@web.middleware
async def _host_allowlist(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every route answers only requests addressed to a Host this bridge serves (DNS
    rebinding: bridge/admission.py), before any upgrade or page."""
    bridge = request.app[BRIDGE_KEY]
    host = request.headers.get("Host")
    local_port: int | None = None
    if request.transport is not None:
        sockname = request.transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            local_port = int(sockname[1])
    if not bridge.hosts.allows(host, local_port):
        bridge.admission.reject(
            "host", ip=request.remote or "", host=host[:200] if host else None, path=request.path
        )
        raise web.HTTPMisdirectedRequest(
            text="this bridge does not serve that Host name (see --server-names)\n"
        )
    return await handler(request)


def create_app(config: BridgeConfig | None = None) -> web.Application:
    """The bridge as an aiohttp application; the bus connection starts with the app."""
    bridge = Bridge(config or BridgeConfig.from_env())
    # the handshake deadline is met by any complete request, even one the Host rule refuses
    app = web.Application(middlewares=[_request_started, _host_allowlist])
    app[BRIDGE_KEY] = bridge
    app.router.add_get("/ws", bridge.handle_ws)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/", _index)
    app.router.add_get("/static/{path:.+}", _static)

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await bridge.start()
        yield
        await bridge.stop()

    async def going_away(_app: web.Application) -> None:
        # before aiohttp's server shutdown cancels the handlers: every client is told
        # 1001 rather than losing its connection without a close frame
        bridge.close_all()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(going_away)
    return app


def ssl_context(config: BridgeConfig) -> ssl.SSLContext | None:
    if not config.cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.cert, config.key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load TLS certificate/key: {error}") from None
    return context


class BridgeServer:
    """A started bridge: ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self,
        runner: web.AppRunner,
        app: web.Application,
        port: int,
        listener: asyncio.Server | None = None,
    ) -> None:
        self.runner = runner
        self.app = app
        self.listener = listener
        self.port = port

    @property
    def bridge(self) -> Bridge:
        return self.app[BRIDGE_KEY]

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        # the app's on_shutdown closes the clients (create_app)
        await self.runner.cleanup()


async def start_bridge(config: BridgeConfig) -> BridgeServer:
    """Start serving ``config``; access logs are off because URLs may carry tokens."""
    app = create_app(config)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=config.close_timeout,
        keepalive_timeout=config.keepalive_timeout,
    )
    await runner.setup()
    assert runner.server is not None
    # every socket passes through the bridge's edge before aiohttp's handler (bridge/edge.py)
    factory = app[BRIDGE_KEY].edge.factory(runner.server)
    try:
        listener = await asyncio.get_running_loop().create_server(
            factory, config.host, config.port, ssl=ssl_context(config), backlog=LISTEN_BACKLOG
        )
    except OSError as error:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {error}") from None
    port = config.port
    for sock in listener.sockets:
        address = sock.getsockname()
        if isinstance(address, tuple):
            port = address[1]
            break
    return BridgeServer(runner, app, port, listener)


async def run_bridge(config: BridgeConfig) -> None:
    """Serve until cancelled (for ``tradebus bridge`` and ``tradebus up``)."""
    server = await start_bridge(config)
    scheme = "wss" if config.cert else "ws"
    server.bridge.log.info(
        "bridge.listening", url=f"{scheme}://{config.host}:{server.port}/ws", port=server.port
    )
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()
