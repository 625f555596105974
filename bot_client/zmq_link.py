"""``ZmqLink``: the publisher's I/O thread on the bus (an XPUB connected to the proxy).

It learns the connection's state (socket monitor, the proxy's subscribe-all), sends what
callers hand over and what the outbox holds, in order, whenever the connection allows
(through the publisher's ``Delivery``), runs the publisher's timers and lets libzmq
reconnect, forever. Its log lines say ``bus``: it never speaks WebSocket.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from typing import Final

import zmq
from zmq.utils.monitor import recv_monitor_message

from bot_client.core import Entry
from bot_client.errors import SettingsError
from bot_client.links import BLOCKED_WAIT, IDLE_WAIT, LinkHost
from bot_client.zmq_resend import ZmqResend
from bus.errors import AuthError, KeyFileError
from bus.keys import ClientKeys, configure_client, judge_handshake, load_client_keys
from bus.transport import batch_sender, sender
from monitoring.logging import redact

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


class ZmqLink:
    """An XPUB socket connected to the proxy's XSUB, with ZMQ_XPUB_NODROP.

    "Connected" means: the handshake with the proxy succeeded (socket monitor) and the
    proxy's subscribe-all (``\\x01``) arrived, so ZeroMQ will not discard what is sent.
    Only this thread touches the socket. Callers hand events over through the
    publisher's ``Delivery``; sending them from here, back to back, costs callers a deque
    append instead of three ZeroMQ calls each waking libzmq's I/O thread.
    """

    def __init__(self, host: LinkHost, context: zmq.Context[zmq.Socket[bytes]] | None) -> None:
        settings = host.settings
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
        self._host = host
        self._delivery = host.delivery
        self._counters = host.counters
        self._log = host.log
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
        # the hand-off and outbox: many messages per call, sent with the GIL released
        self._send_batch = batch_sender(xpub)
        # the resend window: one call per three-frame message; False when the pipe is full
        self._send = sender(xpub)
        # resend: what was sent shortly before losing the proxy goes again (None: off).
        # With it, ZMQ_IMMEDIATE: libzmq discards what it still held for a lost connection
        # instead of sending it on the next one ahead of the older events sent again.
        self._resend = ZmqResend.of(host)
        if self._resend is not None:
            xpub.setsockopt(zmq.IMMEDIATE, 1)
        xpub.connect(settings.url)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"tradebus-publisher-{self._host.source}", daemon=True
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

    def abandoned(self) -> list[Entry]:
        return [] if self._resend is None else self._resend.abandoned()  # resend

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        delivery = self._delivery
        run_timers = self._host.run_timers
        selector = selectors.DefaultSelector()
        selector.register(self._xpub.getsockopt(zmq.FD), selectors.EVENT_READ)  # type: ignore[arg-type]
        selector.register(self._monitor.getsockopt(zmq.FD), selectors.EVENT_READ)  # type: ignore[arg-type]
        selector.register(self._wake_r, selectors.EVENT_READ)
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
                    next_due = run_timers(now, self.connected)
                    self._read_monitor()
                    self._read_subscriptions()
                    if self._resend is not None:  # resend
                        self._resend.collect(now)
                sent, blocked = self._drain() if self.connected else (0, False)
                if sent:
                    last_busy = now
                idle = delivery.idle() and not self.in_flight()
                if self._stop.is_set() and (idle or now >= self._deadline):
                    break
                if blocked:
                    selector.select(BLOCKED_WAIT)
                    self._woken = True
                elif self.connected and delivery.handed():
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
            self._log.error(
                "bus.publisher_thread_failed",
                message="bus publisher I/O thread failed",
                error=redact(repr(error)),
            )
            raise
        finally:
            selector.close()
            self._close_sockets()

    def _drain(self) -> tuple[int, bool]:
        """(sent, the pipe is full): in-doubt events first (resend), then the delivery's."""
        resend = self._resend
        if resend is not None:
            resent, blocked, hold = resend.drain(self._send, time.monotonic())
            if hold:
                return resent, blocked
        return self._delivery.drain(self._send_batch)

    def _sleep(self, selector: selectors.BaseSelector, wait: float) -> None:
        delivery = self._delivery
        if delivery.doze() or not self.connected:
            selector.select(wait)
        delivery.awake()
        self._woken = True
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _read_monitor(self) -> None:
        counters = self._counters
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
                    counters.reconnects += 1
                self._ever_up = True
            elif kind == zmq.EVENT_DISCONNECTED:
                self._link_up = False
                if self._resend is not None:  # resend
                    self._resend.lost(time.monotonic())
            elif kind == zmq.EVENT_CONNECT_RETRIED:
                attempts = counters.connect_attempts = counters.connect_attempts + 1
                if attempts in (1, 10, 100) or attempts % 1000 == 0:
                    self._log.warning(
                        "bus.publisher_connect_retry",
                        message="bus publisher cannot reach the bus; retrying",
                        url=self._host.settings.loggable_url,
                        attempts=attempts,
                        queued=self._host.queued(),
                    )
            self._update_state()

    def _judge(self, kind: int, value: int, keys: ClientKeys) -> None:
        url = self._host.settings.url
        try:
            verdict = judge_handshake(kind, value, keys, url)
        except AuthError as error:
            self._counters.auth_refusals += 1
            if self.refusal != str(error):
                self.refusal = str(error)
                self._log.error(
                    "bus.publisher_refused",
                    message="the bus refused the publisher's CURVE key; events are held, "
                    "then dropped (counted), until the key is authorized and the bot restarted",
                    url=url,
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
        self.connected = connected
        url = self._host.settings.loggable_url
        if connected:
            if self._resend is not None:  # resend
                self._resend.reconnected(time.monotonic())
            self._log.info(
                "bus.publisher_connected",
                message="bus publisher connected to the bus",
                url=url,
                reconnects=self._counters.reconnects,
                queued=self._host.queued(),
            )
        else:
            self._delivery.shut()
            self._log.warning(
                "bus.publisher_disconnected",
                message="bus publisher lost the bus; holding events",
                url=url,
            )

    def _close_sockets(self) -> None:
        self._delivery.shut()
        remaining = max(0.0, self._deadline - time.monotonic())
        with contextlib.suppress(zmq.ZMQError):
            self._xpub.disable_monitor()
        self._monitor.close(linger=0)
        # what libzmq still holds gets the rest of the close timeout to go out
        self._xpub.close(linger=int(remaining * 1000) if self.connected else 0)
        self.connected = False
        self._wake_r.close()
        self._wake_w.close()
