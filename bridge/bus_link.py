"""The bridge's ZeroMQ side: subscriber, snapshot/history dealer, publishing link.

An adapter around the pure hub: it carries out the hub's upstream commands
(bridge/upstream.py) on the sockets, drains the SUB socket in batches into
``Hub.dispatch``, hands the proxy's snapshot and history replies to the hub, and reports
link events and answers to the bridge's bus health (bridge/bus_health.py) through the
callbacks it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final, assert_type

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from bridge.config import BridgeConfig
from bridge.errors import ConfigError
from bridge.hub import Hub
from bridge.upstream import HistoryAsk, SnapshotSync, SubscribePrefix, UnsubscribePrefix
from bus.errors import AuthError as BusAuthError
from bus.history import HistoryPosition
from bus.keys import ClientKeys, configure_client, connect_checked_async
from bus.proxy import (
    HISTORY_COMMAND,
    SNAPSHOT_COMMAND,
    STATUS_ERROR,
    STATUS_OK,
    SYNC_PREFIX,
    history_request,
    snapshot_request,
)
from bus.transport import receiver
from monitoring.logging import get_logger

MAX_BATCH: Final = 4096
PROBE_PATTERN: Final = "tradebus_probe"


async def cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks``, wait until each has ended, and forget them."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()


class BusLink:
    """The sockets to the proxy. ``on_batch`` runs after each routed batch (the bridge
    writes to its clients), ``on_reply`` after each reply the hub was given,
    ``on_answer(now)`` on any answer of the proxy, ``on_link(up)`` on the SUB socket's
    link events and ``on_publisher`` when the publishing link is subscribed to."""

    def __init__(
        self,
        config: BridgeConfig,
        keys: ClientKeys | None,
        hub: Hub,
        *,
        on_batch: Callable[[], None],
        on_reply: Callable[[], None],
        on_answer: Callable[[float], None],
        on_link: Callable[[bool], None],
        on_publisher: Callable[[], None],
    ) -> None:
        self.config = config
        self.keys = keys
        self.hub = hub
        self.log = get_logger("bridge")
        self._on_batch = on_batch
        self._on_reply = on_reply
        self._on_answer = on_answer
        self._on_link = on_link
        self._on_publisher = on_publisher
        self._context: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._sub_raw: zmq.Socket[bytes] | None = None
        self._sub_monitor: zmq.asyncio.Socket | None = None
        self.dealer: zmq.asyncio.Socket | None = None
        self.pub: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # the marker nonce of each snapshot or history request in flight, by sync id
        self._markers: dict[int, bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        config = self.config
        self._loop = asyncio.get_running_loop()
        self._context = zmq.asyncio.Context()
        sub = self._context.socket(zmq.SUB)
        sub.linger = 0
        sub.rcvhwm = 1_000_000
        sub.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        self._sub = sub
        if self.keys is None:
            sub.connect(config.bus)
        else:
            configure_client(sub, self.keys)
            try:
                # a refused key stops start-up, not a bridge that stays silently empty
                await connect_checked_async(sub, config.bus, self.keys)
            except BusAuthError as error:
                sub.close(linger=0)
                self._sub = None
                self._context.term()
                self._context = None
                raise ConfigError(str(error)) from None
        # after connecting: a key check (connect_checked_async) uses a monitor of its own
        self._sub_monitor = sub.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self._sub_raw = zmq.Socket.shadow(sub.underlying)
        if config.snapshot:
            dealer = self._context.socket(zmq.DEALER)
            dealer.linger = 0
            if self.keys is not None:
                configure_client(dealer, self.keys)
            dealer.connect(config.snapshot)
            self.dealer = dealer
        if config.publish_to:
            pub = self._context.socket(zmq.XPUB)
            pub.linger = 1000
            pub.sndhwm = 100_000
            pub.setsockopt(zmq.XPUB_NODROP, 1)
            if self.keys is not None:
                configure_client(pub, self.keys)
            pub.connect(config.publish_to)
            self.pub = pub
        self.apply()
        self._loop.add_reader(int(self._sub_raw.getsockopt(zmq.FD)), self._on_upstream)
        self._loop.call_soon(self._on_upstream)
        self._tasks = [asyncio.create_task(self._watch_sub(), name="bridge-sub-monitor")]
        if self.dealer is not None:
            self._tasks.append(asyncio.create_task(self._read_replies(), name="bridge-snap"))
        if self.pub is not None:
            self._tasks.append(asyncio.create_task(self._read_publisher(), name="bridge-pub"))

    async def stop(self) -> None:
        if self._loop is not None and self._sub_raw is not None:
            self._loop.remove_reader(int(self._sub_raw.getsockopt(zmq.FD)))
        await cancel_and_wait(self._tasks)
        # a reader call already scheduled must find no socket, not a closed one's handle
        self._sub_raw = None
        if self._sub is not None and self._sub_monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disable_monitor()
        for socket in (self._sub_monitor, self._sub, self.dealer, self.pub):
            if socket is not None:
                socket.close(linger=0)
        if self._context is not None:
            self._context.term()

    # -- the hub's commands -------------------------------------------------------------
    def apply(self) -> None:
        """Carry out the hub's upstream commands."""
        sub = self._sub
        commands = self.hub.upstream_ops
        if sub is None or not commands:
            return
        dealer = self.dealer
        for command in commands:
            if isinstance(command, SubscribePrefix):
                sub.subscribe(command.prefix)
            elif isinstance(command, UnsubscribePrefix):
                sub.unsubscribe(command.prefix)
            elif dealer is None:
                continue  # no snapshot service: the hub serves from what it holds
            elif isinstance(command, SnapshotSync):
                sub.subscribe(SYNC_PREFIX + command.nonce)
                self._markers[command.sync_id] = command.nonce
                request = snapshot_request(command.nonce, list(command.patterns))
                dealer.send_multipart([b"s%d" % command.sync_id, b"", *request])
            else:
                assert_type(command, HistoryAsk)
                sub.subscribe(SYNC_PREFIX + command.nonce)
                self._markers[command.sync_id] = command.nonce
                wanted = [
                    HistoryPosition(p.topic.encode(), p.source.encode(), p.epoch, p.seq)
                    for p in command.positions
                ]
                request = history_request(command.nonce, wanted, list(command.patterns))
                dealer.send_multipart([b"h%d" % command.sync_id, b"", *request])
        commands.clear()
        if self._loop is not None:
            # a subscription is a send on the SUB socket, after which its edge-triggered
            # FD may not signal messages already waiting: look for them explicitly
            self._loop.call_soon(self._on_upstream)

    def end_marker(self, sync_id: int) -> None:
        nonce = self._markers.pop(sync_id, None)
        if nonce is not None and self._sub is not None:
            self._sub.unsubscribe(SYNC_PREFIX + nonce)

    def end_finished_markers(self) -> None:
        """Markers of requests the hub no longer waits for (timed out)."""
        for sync_id in [s for s in self._markers if s not in self.hub.upstream.syncs]:
            self.end_marker(sync_id)

    def send_probe(self) -> None:
        if self.dealer is not None:
            with contextlib.suppress(zmq.Again):
                self.dealer.send_multipart(
                    [b"p", b"", *snapshot_request(b"", [PROBE_PATTERN])], flags=zmq.NOBLOCK
                )

    async def publish(self, frames: list[bytes]) -> None:
        assert self.pub is not None
        await self.pub.send_multipart(frames)

    # -- reading ------------------------------------------------------------------------
    def _on_upstream(self) -> None:
        """Drain the SUB socket in batches: route each batch, then write once per client.

        The ZeroMQ FD is edge-triggered: it only signals again once the socket's events
        were read, so this drains until nothing is queued and EVENTS agrees; after a full
        batch it yields to the loop (clients' reads, timers) and continues in the next turn.
        """
        raw = self._sub_raw
        if raw is None or raw.closed:
            return
        hub = self.hub
        on_batch = self._on_batch
        receive = receiver(raw)  # one C call per message (bus.transport)
        readable = raw.getsockopt
        while True:
            batch: list[tuple[bytes, ...]] = []
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(receive())
                except zmq.Again:
                    break
            if batch:
                hub.dispatch(batch, time.monotonic(), time.time_ns())
                on_batch()
            if len(batch) == MAX_BATCH:
                assert self._loop is not None
                self._loop.call_soon(self._on_upstream)
                return
            # reading EVENTS is what re-arms the edge-triggered FD; a message that arrived
            # meanwhile is read now, or the FD would not signal it
            if not int(readable(zmq.EVENTS)) & zmq.POLLIN:
                return

    async def _read_replies(self) -> None:
        assert self.dealer is not None
        while True:
            frames = await self.dealer.recv_multipart()
            if (
                len(frames) < 4
                or frames[1] != b""
                or frames[2] not in (SNAPSHOT_COMMAND, HISTORY_COMMAND)
            ):
                self.log.warning("bridge.snapshot_malformed", frames=len(frames))
                continue
            tag, status, body = frames[0], frames[3], frames[4:]
            now = time.monotonic()
            self._on_answer(now)
            if tag.startswith(b"p"):
                continue
            try:
                sync_id = int(tag[1:])
            except ValueError:
                continue
            self.end_marker(sync_id)
            if tag.startswith(b"h"):
                # an old proxy (error: expected SNAPSHOT) or history off: served as before;
                # the events of an incomplete answer still prove the gaps they cover
                answered = frames[2] == HISTORY_COMMAND and status != STATUS_ERROR
                answered = answered and len(body) % 3 == 0
                messages = [body[i : i + 3] for i in range(0, len(body), 3)] if answered else []
                self.hub.history_reply(sync_id, answered and status == STATUS_OK, messages, now)
            elif status in (STATUS_OK, b"unsynced") and len(body) % 3 == 0:
                messages = [body[i : i + 3] for i in range(0, len(body), 3)]
                self.hub.snapshot_reply(sync_id, status == STATUS_OK, messages, now)
            else:
                self.log.warning(
                    "bridge.snapshot_failed",
                    status=status.decode(errors="replace"),
                    detail=body[0].decode(errors="replace") if body else None,
                )
                self.hub.sync_failed(sync_id)
            self.apply()
            self._on_reply()

    async def _watch_sub(self) -> None:
        assert self._sub_monitor is not None
        while True:
            event = parse_monitor_message(await self._sub_monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._on_link(True)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._on_link(False)

    async def _read_publisher(self) -> None:
        assert self.pub is not None
        while True:
            message = await self.pub.recv()
            if message[:1] == b"\x01":
                self._on_publisher()
