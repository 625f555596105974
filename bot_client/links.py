"""The publisher's I/O threads: ZeroMQ straight onto the bus, or WebSocket to the bridge.

Each link owns one thread. It learns the connection state, delivers the outbox in order
whenever the connection allows, runs the publisher's timers (interval releases, drop
reports, heartbeat, summary) and reconnects with backoff, forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import orjson
import zmq
from aiohttp import WSCloseCode
from zmq.utils.monitor import recv_monitor_message

from bot_client.core import Entry, backoff_delay
from bot_client.errors import SettingsError
from bot_client.zmq_resend import ZmqResend
from bus.errors import AuthError, KeyFileError
from bus.keys import ClientKeys, configure_client, judge_handshake, load_client_keys
from bus.transport import sender
from monitoring.logging import redact

if TYPE_CHECKING:
    from bot_client.publisher import Publisher

# A "websocket.publish_summary" log line this often.
SUMMARY_SECONDS: Final = 60.0
# Longest sleep of an idle I/O thread: bounds how late a missed wake-up can make anything.
IDLE_WAIT: Final = 0.25
# While blocked on a full ZeroMQ pipe, re-check at least this often.
BLOCKED_WAIT: Final = 0.01
# Events sent in one go before the lock is released to callers.
DRAIN_BATCH: Final = 256
# Events the C hand-off sends in one go: it holds neither the GIL nor the lock, so callers
# are not held up by it; the bound only keeps state checks (CHECK_SECONDS) coming.
HANDOFF_DRAIN_BATCH: Final = 65_536
# how long a new connection waits for the bridge's greeting before sending
GREETING_SECONDS: Final = 1.0
# how long a failed send waits for the bridge's close frame
READ_CLOSE_SECONDS: Final = 0.25
# Messages libzmq itself holds per connection; beyond it our outbox's policy applies.
ZMQ_SNDHWM: Final = 10_000
# A ZeroMQ reconnect attempt is one TCP connect that the proxy's host answers or refuses at
# once, so it is tried often: back on the bus within 1 s of the proxy's return whatever the
# outage's length (RETRY_DELAY's backoff, 5 s doubling, is for WebSocket handshakes; as
# libzmq's RECONNECT_IVL_MAX it once kept a bot off the bus for 8 s after a 10 s outage).
# libzmq adds up to one RECONNECT_IVL of jitter: at most 750 ms between attempts.
BUS_RECONNECT_IVL_MS: Final = 250
BUS_RECONNECT_IVL_MAX_MS: Final = 500
# a connect that hangs (a host that drops SYNs) is abandoned and retried after this
BUS_CONNECT_TIMEOUT_MS: Final = 1000
# While busy, connection state and timers are checked this often.
CHECK_SECONDS: Final = 0.005
# After sending, nap this long (instead of sleeping until woken) for this many seconds.
SPIN_NAP: Final = 0.0002
SPIN_SECONDS: Final = 0.02
# Bridge error codes that mean "not now", not "never": the event is kept and resent.
TRANSIENT_ERRORS: Final = frozenset({"bus_unavailable"})
# Unacknowledged WebSocket events allowed in flight (resent after a reconnect).
WS_WINDOW: Final = 1_000


class Link(Protocol):
    connected: bool

    def start(self) -> None: ...
    def stop(self, timeout: float) -> None: ...
    def wake(self) -> None: ...
    def in_flight(self) -> int: ...
    def abandoned(self) -> list[Entry]: ...
    def caller_socket(self) -> zmq.Socket[bytes] | None: ...


def make_link(publisher: Publisher, context: zmq.Context[zmq.Socket[bytes]] | None) -> Link:
    if publisher.settings.transport == "ws":
        return WebSocketLink(publisher)
    return ZmqLink(publisher, context)


class _Timers:
    """Heartbeat and summary schedule shared by both links (monotonic seconds)."""

    def __init__(self, publisher: Publisher, now: float) -> None:
        self.publisher = publisher
        interval = publisher.settings.heartbeat_interval
        self.heartbeat_interval = interval
        self.next_heartbeat = now + interval if interval > 0 else float("inf")
        self.next_summary = now + SUMMARY_SECONDS

    def run(self, now: float, connected: bool) -> float:
        """Run what is due; returns the next time anything is due."""
        publisher = self.publisher
        next_due = publisher._tick(now)
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.heartbeat_interval
            if connected and not publisher._closed:
                publisher._heartbeat()
        if now >= self.next_summary:
            self.next_summary = now + SUMMARY_SECONDS
            publisher._summary()
        candidates = [self.next_heartbeat, self.next_summary]
        if next_due is not None:
            candidates.append(next_due)
        return min(candidates)


class ZmqLink:
    """An XPUB socket connected to the proxy's XSUB, with ZMQ_XPUB_NODROP.

    "Connected" means: the handshake with the proxy succeeded (socket monitor) and the
    proxy's subscribe-all (``\\x01``) arrived, so ZeroMQ will not discard what is sent.
    Only this thread touches the socket. Callers hand events over through the
    publisher's fast deque; sending them from here, back to back, costs callers a deque
    append instead of three ZeroMQ calls each waking libzmq's I/O thread.
    """

    def __init__(
        self, publisher: Publisher, context: zmq.Context[zmq.Socket[bytes]] | None
    ) -> None:
        settings = publisher.settings
        self.keys: ClientKeys | None = None
        if settings.keys:
            try:
                self.keys = load_client_keys(settings.keys, settings.key_name)
            except KeyFileError as error:
                raise SettingsError(f"SYSTEM__TRADEBUS_KEYS: {error}") from None
        # set once the bus has judged the key (admitted, refused) or cannot be reached
        self.judged = threading.Event()
        self.admitted = False
        self.refusal: str | None = None
        self.publisher = publisher
        self.connected = False
        self._link_up = False
        self._subscribed = False
        self._ever_up = False
        self._context = context if context is not None else zmq.Context.instance()
        self._stop = threading.Event()
        self._deadline = 0.0
        self._thread: threading.Thread | None = None
        self._woken = True
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        delays = settings.backoff_delays()
        xpub: zmq.Socket[bytes] = self._context.socket(zmq.XPUB)
        xpub.setsockopt(zmq.XPUB_NODROP, 1)
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        xpub.setsockopt(zmq.SNDHWM, ZMQ_SNDHWM)
        xpub.setsockopt(zmq.LINGER, 0)
        xpub.setsockopt(zmq.RECONNECT_IVL, max(1, min(int(delays[0] * 1000), BUS_RECONNECT_IVL_MS)))
        xpub.setsockopt(
            zmq.RECONNECT_IVL_MAX, max(1, min(int(delays[-1] * 1000), BUS_RECONNECT_IVL_MAX_MS))
        )
        timeout_ms = max(1, int(settings.timeout * 1000))
        xpub.setsockopt(zmq.CONNECT_TIMEOUT, min(timeout_ms, BUS_CONNECT_TIMEOUT_MS))
        xpub.setsockopt(zmq.HEARTBEAT_IVL, max(100, timeout_ms // 3))
        xpub.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
        if self.keys is not None:
            configure_client(xpub, self.keys)
            events |= (
                zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            )
        self._monitor = xpub.get_monitor_socket(events)
        self._xpub = xpub
        # one call per three-frame message (bus.transport); False when the pipe is full
        self._send = sender(xpub)
        if publisher.caller_sends:
            publisher._caller_send = self._send
        # resend: what was sent shortly before losing the proxy goes again (None: off).
        # With it, ZMQ_IMMEDIATE: libzmq discards what it still held for a lost connection
        # instead of sending it on the next one ahead of the older events sent again.
        self._resend = ZmqResend.of(publisher)
        if self._resend is not None:
            xpub.setsockopt(zmq.IMMEDIATE, 1)
        xpub.connect(settings.url)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"tradebus-publisher-{self.publisher.source}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout + 5.0)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\x00")

    def in_flight(self) -> int:
        return 0 if self._resend is None else self._resend.in_flight()  # resend

    def caller_socket(self) -> zmq.Socket[bytes] | None:
        """The socket callers send on under the publisher's lock (caller_sends), or None."""
        return self._xpub if self.publisher.caller_sends else None

    def abandoned(self) -> list[Entry]:
        return [] if self._resend is None else self._resend.abandoned()  # resend

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        publisher = self.publisher
        selector = selectors.DefaultSelector()
        selector.register(self._xpub.getsockopt(zmq.FD), selectors.EVENT_READ)  # type: ignore[arg-type]
        selector.register(self._monitor.getsockopt(zmq.FD), selectors.EVENT_READ)  # type: ignore[arg-type]
        selector.register(self._wake_r, selectors.EVENT_READ)
        timers = _Timers(publisher, time.monotonic())
        last_busy = 0.0
        next_check = 0.0
        next_due = 0.0
        try:
            while True:
                now = time.monotonic()
                # while events stream through, connection state and timers are looked at
                # every CHECK_SECONDS only: the sending loop stays short, which leaves the
                # interpreter to the bot's threads
                if now >= next_check or now >= next_due or self._woken:
                    self._woken = False
                    next_check = now + CHECK_SECONDS
                    next_due = timers.run(now, self.connected)
                    self._read_monitor()
                    with publisher._lock:  # callers may be sending (caller_sends)
                        self._read_subscriptions()
                    if self._resend is not None:  # resend
                        self._resend.collect(now)
                sent, blocked = self._drain()
                if sent:
                    last_busy = now
                if self._stop.is_set() and (self._idle() or now >= self._deadline):
                    break
                if blocked:
                    selector.select(BLOCKED_WAIT)
                    self._woken = True
                elif publisher._fast and self.connected:
                    continue
                elif now - last_busy < SPIN_SECONDS:
                    # busy publishers hand over the next event within microseconds: a short
                    # nap spares them the cost of waking this thread
                    time.sleep(SPIN_NAP)
                else:
                    wait = min(max(next_due - now, 0.0), IDLE_WAIT)
                    if self._stop.is_set():
                        wait = min(wait, BLOCKED_WAIT)
                    self._sleep(selector, wait)
        except Exception as error:  # never let the I/O thread die silently
            publisher._log.error(
                "websocket.publisher_thread_failed",
                message="WebSocket publisher I/O thread failed",
                error=redact(repr(error)),
            )
            raise
        finally:
            selector.close()
            self._close_sockets()

    def _sleep(self, selector: selectors.BaseSelector, wait: float) -> None:
        publisher = self.publisher
        publisher._io_sleeping = True
        # re-check after raising the flag: a caller that appended before it saw it down
        if not (publisher._fast and self.connected):
            selector.select(wait)
        publisher._io_sleeping = False
        self._woken = True
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _idle(self) -> bool:
        publisher = self.publisher
        return not publisher._fast and not publisher._outbox and not self.in_flight()

    def _read_monitor(self) -> None:
        publisher = self.publisher
        log = publisher._log
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if self.keys is not None:
                self._judge(kind, event["value"], self.keys)
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._link_up = True
                if self._ever_up:
                    publisher.counters.reconnects += 1
                self._ever_up = True
            elif kind == zmq.EVENT_DISCONNECTED:
                self._link_up = False
                if self._resend is not None:  # resend
                    self._resend.lost(time.monotonic())
            elif kind == zmq.EVENT_CONNECT_RETRIED:
                attempts = publisher.counters.connect_attempts = (
                    publisher.counters.connect_attempts + 1
                )
                if attempts in (1, 10, 100) or attempts % 1000 == 0:
                    log.warning(
                        "websocket.publisher_connect_retry",
                        message="WebSocket publisher cannot reach the bus; retrying",
                        url=publisher.settings.loggable_url,
                        attempts=attempts,
                        queued=publisher.queued(),
                    )
            self._update_state()

    def _judge(self, kind: int, value: int, keys: ClientKeys) -> None:
        publisher = self.publisher
        try:
            verdict = judge_handshake(kind, value, keys, publisher.settings.url)
        except AuthError as error:
            publisher.counters.auth_refusals += 1
            if self.refusal != str(error):
                self.refusal = str(error)
                publisher._log.error(
                    "websocket.publisher_refused",
                    message="the bus refused the publisher's CURVE key; events are held, "
                    "then dropped (counted), until the key is authorized and the bot restarted",
                    url=publisher.settings.url,
                    key=keys.name,
                    fingerprint=keys.fingerprint,
                    reason=str(error),
                )
            self.judged.set()
            return
        if verdict == "admitted":
            self.admitted = True
            self.refusal = None
        if verdict is not None:
            self.judged.set()

    def _read_subscriptions(self) -> None:
        while True:
            try:
                message = self._xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if self._resend is not None:  # resend
                self._resend.observe(message)
            # only the proxy's subscribe-all counts; it also forwards subscribers' own
            # (un)subscriptions, such as snapshot sync markers, which say nothing about us
            if message == b"\x01":
                self._subscribed = True
            elif message == b"\x00":
                self._subscribed = False
        self._update_state()

    def _update_state(self) -> None:
        connected = self._link_up and self._subscribed
        if connected == self.connected:
            return
        publisher = self.publisher
        self.connected = connected
        if connected:
            if self._resend is not None:  # resend
                self._resend.reconnected(time.monotonic())
            publisher._log.info(
                "websocket.publisher_connected",
                message="WebSocket publisher connected to the bus",
                url=publisher.settings.loggable_url,
                reconnects=publisher.counters.reconnects,
                queued=publisher.queued(),
            )
        else:
            # a plain store (this may run under the lock): a caller already past its
            # check sends into libzmq's pipe, which survives the reconnect
            publisher._fast_ok = False
            publisher._log.warning(
                "websocket.publisher_disconnected",
                message="WebSocket publisher lost the bus; holding events",
                url=publisher.settings.loggable_url,
            )

    def _drain(self) -> tuple[int, bool]:
        """Send what is handed over, then the outbox, in order: (sent, pipe full)."""
        if not self.connected:
            return 0, False
        resend = self._resend
        if resend is not None:  # resend: in-doubt events go first
            resent, blocked, hold = resend.drain(self._send, time.monotonic())
            if hold:
                return resent, blocked
        publisher = self.publisher
        fast = publisher._fast
        if isinstance(fast, deque):
            return self._drain_python(fast)
        handed_sent = 0
        if fast:  # bot_client._publish.HandOff: sends with the GIL released, and counts
            # what it sent itself (Publisher._sent)
            handed_sent, blocked = fast.drain(
                self._xpub,
                HANDOFF_DRAIN_BATCH,
                publisher._sent_log,  # resend
            )
            if blocked or fast:
                return handed_sent, blocked
        sent, blocked = self._drain_outbox(0)
        return handed_sent + sent, blocked

    def _drain_python(self, fast: deque[Any]) -> tuple[int, bool]:
        """The hand-off deque, then the outbox (publish() without its C path)."""
        send = self._send
        log = self.publisher._sent_log
        sent = 0
        try:
            # popleft is atomic; callers only append, so no lock is needed here
            while fast:
                slot, meta, payload = fast[0]
                if not send(slot.topic_bytes, meta, payload):
                    return sent, True
                if log is not None:  # resend
                    log += (slot.topic_bytes, meta, payload)
                fast.popleft()
                sent += 1
                if sent >= DRAIN_BATCH:
                    return sent, False
        finally:
            self._count_sent(sent)
        return self._drain_outbox(sent)

    def _drain_outbox(self, sent: int) -> tuple[int, bool]:
        """Send from the outbox, up to DRAIN_BATCH events in all; reopen the fast path once
        it is empty. ``sent``: events this round has already sent."""
        publisher = self.publisher
        send = self._send
        if not publisher._outbox:
            if not publisher._fast_ok and not publisher._closed:
                with publisher._lock:
                    publisher._fast_ok = not publisher._outbox and not publisher._closed
            return sent, False
        blocked = False
        from_outbox = 0
        try:
            with publisher._lock:
                outbox = publisher._outbox
                log = publisher._sent_log
                while outbox and sent + from_outbox < DRAIN_BATCH:
                    frames = outbox.peek().frames
                    if not send(*frames):
                        blocked = True
                        break
                    if log is not None:  # resend
                        log += frames
                    outbox.pop()
                    from_outbox += 1
                publisher._fast_ok = not outbox and not publisher._fast and not publisher._closed
        finally:
            self._count_sent(from_outbox)
        return sent + from_outbox, blocked

    def _count_sent(self, sent: int) -> None:
        if sent:
            with self.publisher._lock:  # callers count their own sends (caller_sends)
                self.publisher.counters.sent += sent

    def _close_sockets(self) -> None:
        publisher = self.publisher
        with publisher._lock:
            publisher._fast_ok = False
        remaining = max(0.0, self._deadline - time.monotonic())
        with contextlib.suppress(zmq.ZMQError):
            self._xpub.disable_monitor()
        self._monitor.close(linger=0)
        # what libzmq still holds gets the rest of the close timeout to go out
        self._xpub.close(linger=int(remaining * 1000) if self.connected else 0)
        self.connected = False
        self._wake_r.close()
        self._wake_w.close()


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

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.connected = False
        settings = publisher.settings
        parts = urlsplit(settings.url)
        query = {"role": "publisher", "source": publisher.source, "epoch": str(publisher.epoch)}
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
            name=f"tradebus-publisher-{self.publisher.source}",
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
        publisher = self.publisher
        timers = asyncio.create_task(self._run_timers())
        try:
            async with aiohttp.ClientSession() as session:
                await self._connect_forever(session)
        except Exception as error:  # never let the I/O thread die silently
            publisher._log.error(
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
        timers = _Timers(self.publisher, time.monotonic())
        while True:
            now = time.monotonic()
            next_due = timers.run(now, self.connected)
            await asyncio.sleep(min(max(next_due - now, 0.0), IDLE_WAIT))

    async def _connect_forever(self, session: aiohttp.ClientSession) -> None:
        publisher = self.publisher
        settings = publisher.settings
        log = publisher._log
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
                publisher.counters.connect_attempts += 1
                delay = backoff_delay(delays, failures)
                log.warning(
                    "websocket.publisher_connect_failed",
                    message="WebSocket publisher cannot reach the bridge; retrying",
                    url=settings.loggable_url,
                    **_error_fields(error),
                    attempt=failures,
                    retry_in=delay,
                    queued=publisher.queued(),
                )
                if self._stopping.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                continue
            if ever_connected:
                publisher.counters.reconnects += 1
            ever_connected = True
            failures = 0
            self.connected = True
            log.info(
                "websocket.publisher_connected",
                message="WebSocket publisher connected to the bridge",
                url=settings.loggable_url,
                resending=len(self._in_flight),
                queued=len(publisher._outbox),
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
        publisher = self.publisher
        idle = not publisher._outbox and not self._in_flight
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
                self.publisher.counters.resent += 1
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
            async with asyncio.timeout(min(self.publisher.settings.timeout, GREETING_SECONDS)):
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
        publisher = self.publisher
        wakeup = self._wakeup
        stopping = self._stopping
        assert wakeup is not None
        assert stopping is not None
        while not reader.done():
            if self._finished():
                return
            wakeup.clear()
            batch: list[tuple[int, Entry]] = []
            with publisher._lock:
                outbox = publisher._outbox
                while outbox and len(self._in_flight) + len(batch) < WS_WINDOW:
                    batch.append((self._next_id, outbox.pop()))
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
        publisher = self.publisher
        counters = publisher.counters
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
                    publisher._log.warning(
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
        publisher = self.publisher
        rejected: Entry | None = None
        if isinstance(message_id, int):
            while self._in_flight and self._in_flight[0][0] <= message_id:
                found_id, entry = self._in_flight.popleft()
                if found_id == message_id:
                    rejected = entry
                    break
                publisher.counters.sent += 1
        self._count_rejected(
            rejected,
            "WebSocket publish rejected by the bridge",
            body.get("code"),
            body.get("message"),
        )

    def _count_rejected(self, entry: Entry | None, message: str, code: Any, reason: Any) -> None:
        """Count ``entry`` (if known) as rejected and dropped, and log the rejection."""
        publisher = self.publisher
        if entry is not None:
            publisher.counters.rejected += 1
            with publisher._lock:
                publisher._dropped(entry.type_name)
        publisher._log.warning(
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
