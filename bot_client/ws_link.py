"""``WebSocketLink``: the publisher's I/O thread on a WebSocket to the bridge's publish ingest.

Every event carries an ``id``; the bridge acknowledges ids in order. Events are taken from
the publisher's outbox (``Delivery.take``), kept until acknowledged, and resent after a
reconnect with their original ``seq``, so the bridge recognises (and acknowledges without
republishing) the ones it already took. Reconnects back off (``SYSTEM__WEBSOCKET_RETRY_DELAY``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import orjson
from aiohttp import WSCloseCode

from bot_client.core import Entry, backoff_delay
from bot_client.links import IDLE_WAIT, LinkHost
from monitoring.logging import redact

# how long a new connection waits for the bridge's greeting before sending
GREETING_SECONDS: Final = 1.0
# how long a failed send waits for the bridge's close frame
READ_CLOSE_SECONDS: Final = 0.25
# Bridge error codes that mean "not now", not "never": the event is kept and resent.
TRANSIENT_ERRORS: Final = frozenset({"bus_unavailable"})
# Unacknowledged WebSocket events allowed in flight (resent after a reconnect).
WS_WINDOW: Final = 1_000


def _error_fields(error: BaseException) -> dict[str, Any]:
    """Log fields of a connection error: an HTTP refusal by its status, never its text,
    which quotes the request URL; other errors' text with anything token-like removed."""
    if isinstance(error, aiohttp.ClientResponseError):
        return {"status": error.status, "error": type(error).__name__}
    return {"error": redact(str(error) or type(error).__name__)}


class WebSocketLink:
    """A WebSocket client of the bridge's publish ingest (docs/publisher.md).

    Every event carries an ``id``; the bridge acknowledges ids in order. Unacknowledged
    events are resent after a reconnect with their original ``seq``, so the bridge
    recognises (and acknowledges without republishing) the ones it already took.
    """

    def __init__(self, host: LinkHost) -> None:
        self._host = host
        self._delivery = host.delivery
        self._counters = host.counters
        self._log = host.log
        self.connected = False
        settings = host.settings
        parts = urlsplit(settings.url)
        query = {"role": "publisher", "source": host.source, "epoch": str(host.epoch)}
        extra = parts.query + "&" if parts.query else ""
        self._url = urlunsplit(parts._replace(query=extra + urlencode(query)))
        # in a header, not the URL: URLs end up in error texts, proxies' logs, histories
        self._headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self._in_flight: deque[tuple[int, Entry]] = deque()
        self._next_id = 1
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._deadline = 0.0
        self._started = threading.Event()
        # consecutive "try again later" answers: they back off like failed connections
        self._deferrals = 0
        # sessions in a row that ended with events in flight and no ack: backed off
        self._fruitless = 0
        self._acked = False
        # the smallest message the bridge closed the connection on as too big (1009)
        self._too_big: int | None = None
        # the largest message the bridge says it takes (its greeting), if it says
        self._max_message_bytes: int | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._thread_main,
            name=f"tradebus-publisher-{self._host.source}",
            daemon=True,
        )
        self._thread.start()
        self._started.wait(5.0)

    def stop(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout + 5.0)

    def wake(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wakeup.set)

    def in_flight(self) -> int:
        return len(self._in_flight)

    def caller_socket(self) -> None:
        return None  # events go through the I/O thread's WebSocket

    def abandoned(self) -> list[Entry]:
        leftover = [entry for _id, entry in self._in_flight]
        self._in_flight.clear()
        return leftover

    # -- the thread ---------------------------------------------------------------------------
    def _thread_main(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._started.set()
        timers = asyncio.create_task(self._run_timers())
        try:
            async with aiohttp.ClientSession() as session:
                await self._connect_forever(session)
        except Exception as error:  # never let the I/O thread die silently
            self._log.error(
                "websocket.publisher_thread_failed",
                message="WebSocket publisher I/O thread failed",
                error=redact(repr(error)),
            )
            raise
        finally:
            timers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timers
            self.connected = False

    async def _run_timers(self) -> None:
        assert self._wakeup is not None
        run_timers = self._host.run_timers
        while True:
            now = time.monotonic()
            next_due = run_timers(now, self.connected)
            await asyncio.sleep(min(max(next_due - now, 0.0), IDLE_WAIT))

    async def _connect_forever(self, session: aiohttp.ClientSession) -> None:
        settings = self._host.settings
        counters = self._counters
        log = self._log
        assert self._stopping is not None
        delays = settings.backoff_delays()
        failures = 0
        ever_connected = False
        while not self._finished():
            try:
                async with asyncio.timeout(settings.timeout):
                    ws = await session.ws_connect(
                        self._url, heartbeat=settings.timeout / 2, headers=self._headers
                    )
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                failures += 1
                counters.connect_attempts += 1
                delay = backoff_delay(delays, failures)
                log.warning(
                    "websocket.publisher_connect_failed",
                    message="WebSocket publisher cannot reach the bridge; retrying",
                    url=settings.loggable_url,
                    **_error_fields(error),
                    attempt=failures,
                    retry_in=delay,
                    queued=self._host.queued(),
                )
                if self._stopping.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                continue
            if ever_connected:
                counters.reconnects += 1
            ever_connected = True
            failures = 0
            self.connected = True
            log.info(
                "websocket.publisher_connected",
                message="WebSocket publisher connected to the bridge",
                url=settings.loggable_url,
                resending=len(self._in_flight),
                queued=self._delivery.held(),
            )
            self._acked = False
            try:
                await self._session(ws)
            except (aiohttp.ClientError, ConnectionError, OSError) as error:
                # a send into a connection that just broke: the event stays unacknowledged
                # and is resent after the reconnect
                log.info(
                    "websocket.publisher_send_failed",
                    message="WebSocket publish failed on a broken connection; will resend",
                    **_error_fields(error),
                )
            finally:
                self.connected = False
                await ws.close()
            if ws.close_code == WSCloseCode.MESSAGE_TOO_BIG:
                self._refuse_largest_in_flight()
                self._fruitless = 0  # that session removed the event it could not take
            elif self._in_flight and not self._acked:
                self._fruitless += 1
            pause = max(self._deferrals, self._fruitless)
            if pause and not self._finished():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff_delay(delays, pause)):
                        await self._stopping.wait()
            if not self._finished():
                log.warning(
                    "websocket.publisher_disconnected",
                    message="WebSocket publisher lost the bridge; holding events",
                    url=settings.loggable_url,
                    close_code=ws.close_code,
                    in_flight=len(self._in_flight),
                )

    def _finished(self) -> bool:
        """Stopping and either everything is delivered or the close timeout is over."""
        assert self._stopping is not None
        if not self._stopping.is_set():
            return False
        idle = self._delivery.idle() and not self._in_flight
        return idle or time.monotonic() >= self._deadline

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await self._read_greeting(ws)
        reader = asyncio.create_task(self._read_acks(ws))
        try:
            for message_id, entry in list(self._in_flight):
                if self._refused_as_too_big(entry, message_id):
                    self._in_flight.remove((message_id, entry))
                    continue
                await ws.send_str(_with_id(entry, message_id))
                self._counters.resent += 1
            await self._write(ws, reader)
        except (aiohttp.ClientError, ConnectionError, OSError):
            # a send into a connection the bridge is closing: let the reader take the close
            # frame first, whose code may say why (1009: an event too big)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READ_CLOSE_SECONDS):
                    await asyncio.wait({reader})
            raise
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read_greeting(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The bridge's first message, ``connection_established``, says the largest message
        it takes; bigger events are then refused here, before they cost a connection (the
        bridge closes on them with 1009, or, when the close frame is lost, 1006)."""
        try:
            async with asyncio.timeout(min(self._host.settings.timeout, GREETING_SECONDS)):
                message = await ws.receive()
        except TimeoutError:
            return  # not a tradebus bridge, or an old one: 1009 closes tell instead
        if message.type != aiohttp.WSMsgType.TEXT:
            return  # closing: the session's first send finds out
        try:
            body = orjson.loads(message.data)
        except orjson.JSONDecodeError:
            return
        if isinstance(body, dict) and body.get("type") == "connection_established":
            limit = body.get("max_message_bytes")
            if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
                self._max_message_bytes = limit

    def _refused_as_too_big(self, entry: Entry, message_id: int) -> bool:
        """Refuse (count as rejected) an event the bridge would close the connection on."""
        size = _size_with_id(entry, message_id)
        if self._max_message_bytes is not None and size > self._max_message_bytes:
            self._refuse(entry, f"{size} bytes; the bridge takes at most {self._max_message_bytes}")
            return True
        if self._too_big is not None and size >= self._too_big:
            self._refuse(
                entry, f"{size} bytes; the bridge closed the connection (1009) on {self._too_big}"
            )
            return True
        return False

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, reader: asyncio.Task[None]) -> None:
        wakeup = self._wakeup
        stopping = self._stopping
        assert wakeup is not None
        assert stopping is not None
        while not reader.done():
            if self._finished():
                return
            wakeup.clear()
            batch: list[tuple[int, Entry]] = []
            for entry in self._delivery.take(WS_WINDOW - len(self._in_flight)):
                batch.append((self._next_id, entry))
                self._next_id += 1
            for message_id, entry in batch:
                if self._refused_as_too_big(entry, message_id):
                    continue
                self._in_flight.append((message_id, entry))
                await ws.send_str(_with_id(entry, message_id))
            if batch:
                continue
            waiters = [asyncio.ensure_future(wakeup.wait()), reader]
            if stopping.is_set():
                waiters.append(asyncio.ensure_future(asyncio.sleep(0.01)))
            else:
                waiters.append(asyncio.ensure_future(stopping.wait()))
            _done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                if task is not reader:
                    task.cancel()

    async def _read_acks(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        counters = self._counters
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                body = orjson.loads(message.data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(body, dict):
                continue
            kind = body.get("type")
            message_id = body.get("id")
            if kind == "ack" and isinstance(message_id, int):
                self._deferrals = 0
                self._fruitless = 0
                self._acked = True
                while self._in_flight and self._in_flight[0][0] <= message_id:
                    self._in_flight.popleft()
                    counters.sent += 1
                if self._wakeup is not None:
                    self._wakeup.set()
            elif kind == "error":
                if body.get("code") in TRANSIENT_ERRORS:
                    # the bridge cannot take events right now: end this connection, keep
                    # every unacknowledged event, and resend after a backoff delay
                    self._deferrals += 1
                    self._log.warning(
                        "websocket.publish_deferred",
                        message="WebSocket publish refused for now by the bridge; will resend",
                        code=body.get("code"),
                        reason=body.get("message"),
                        in_flight=len(self._in_flight),
                    )
                    return
                self._rejected(body, message_id)

    def _refuse_largest_in_flight(self) -> None:
        """The bridge closed with 1009: an event in flight was bigger than it accepts.

        Which one is not said, but the largest in flight is at least as big as it, so
        that one goes (counted as rejected) and its size is remembered as too big: every
        1009 removes one event the bridge cannot take and never one it can.
        """
        if not self._in_flight:
            return
        sizes = [_size_with_id(entry, message_id) for message_id, entry in self._in_flight]
        largest = max(range(len(sizes)), key=sizes.__getitem__)
        _message_id, entry = self._in_flight[largest]
        del self._in_flight[largest]
        self._too_big = min(sizes[largest], self._too_big or sizes[largest])
        self._refuse(
            entry,
            f"{sizes[largest]} bytes; the bridge closed the connection (1009) on {self._too_big}",
        )

    def _refuse(self, entry: Entry, reason: str) -> None:
        self._count_rejected(
            entry,
            "WebSocket publish rejected by the bridge: event too big",
            "message_too_big",
            reason,
        )

    def _rejected(self, body: dict[str, Any], message_id: Any) -> None:
        rejected: Entry | None = None
        if isinstance(message_id, int):
            while self._in_flight and self._in_flight[0][0] <= message_id:
                found_id, entry = self._in_flight.popleft()
                if found_id == message_id:
                    rejected = entry
                    break
                self._counters.sent += 1
        self._count_rejected(
            rejected,
            "WebSocket publish rejected by the bridge",
            body.get("code"),
            body.get("message"),
        )

    def _count_rejected(self, entry: Entry | None, message: str, code: Any, reason: Any) -> None:
        """Count ``entry`` (if known) as rejected and dropped, and log the rejection."""
        if entry is not None:
            self._counters.rejected += 1
            delivery = self._delivery
            with delivery.lock:
                delivery.drop(entry.type_name)
        self._log.warning(
            "websocket.publish_rejected",
            message=message,
            code=code,
            reason=reason,
            type=entry.type_name if entry is not None else None,
        )


def _size_with_id(entry: Entry, message_id: int) -> int:
    """Bytes of ``_with_id(entry, message_id)`` as UTF-8: the size the bridge limits."""
    return len(entry.frames[2]) + len(b',"id":') + len(str(message_id))


def _with_id(entry: Entry, message_id: int) -> str:
    """The bus payload plus the ack id: the guide's shape with tradebus's extra fields."""
    payload = entry.frames[2]
    return (payload[:-1] + b',"id":' + str(message_id).encode() + b"}").decode()
