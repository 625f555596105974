"""``Publisher``: hands a trading bot's events to the bus (tcp://, ipc://) or the bridge (ws://).

The call path never waits for the network. ``publish`` validates and encodes the event
once, in the caller's thread, then either sends it straight to the ZeroMQ socket
(connected, nothing queued: one non-blocking C call for its three frames, under a lock) or
puts it in the bounded outbox that the publisher's I/O thread delivers, in order, when the
connection allows. Anything the outbox must drop is counted by type, logged (rate-limited)
and shown by ``status()``.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson
import zmq

from bot_client.core import (
    CONFLATABLE_TYPES,
    CRITICAL_TYPES,
    INTERVAL_TYPES,
    SYMBOL_KEYED_TYPES,
    Counters,
    DropLog,
    Entry,
    IntervalGate,
    Outbox,
    SignificanceFilter,
)
from bot_client.encoding import DUMPS_OPTIONS, dumps_data, event_data, to_json_value, unencodable
from bot_client.errors import AuthRefusedError, InvalidEventError
from bot_client.links import Link, ZmqLink, make_link
from bot_client.settings import PublisherSettings
from bus.envelope import (
    MAX_PAYLOAD_BYTES,
    META_HEADER,
    TIMESTAMP_FIELD,
    WIRE_VERSION,
    payload_parts,
    timestamp_bytes,
    with_timestamp,
)
from bus.errors import TopicError
from bus.topics import make_topic, validate_key
from bus.transport import ACCELERATOR_OFF_VARIABLE, libzmq_send_address
from monitoring.logging import get_logger

DROP_REPORT_SECONDS: Final = 5.0
AT_EXIT_SECONDS: Final = 2.0
HEARTBEAT_TOPIC_KEY: Final = "heartbeat"
_time_ns = time.time_ns
_timestamp_bytes = timestamp_bytes
_dumps = orjson.dumps


def _c_path_module() -> Any:
    """bot_client._publish (bot_client/_publish.c), or None where it was not built."""
    try:
        from bot_client import _publish
    except ImportError:  # built without a C compiler: publish() stays all Python
        return None
    return _publish


_C_PATH: Final[Any] = _c_path_module()
C_PATH_BUILT: Final = _C_PATH is not None
# the data object's own timestamp (added when it has none), then the envelope's field
_DATA_TIMESTAMP_FIRST: Final = b'"timestamp":"'
_DATA_END_AND_TIMESTAMP: Final = b'"}' + TIMESTAMP_FIELD
# what a payload adds to its parts at most: the timestamp and the largest seq with "}"
_LONGEST_STAMP_AND_SEQ: Final = len(b"2024-01-20T10:30:00.123456Z") + len(b"%d}" % (2**64 - 1))
# Events on the fast path at most; beyond it the outbox (and its drop policy) takes over.
FAST_LIMIT: Final = 8192
# The same for the C hand-off (bot_client/_publish.c), whose sender holds no lock: room for
# the 5 ms the I/O thread can wait for the interpreter while a caller publishes flat out.
HANDOFF_LIMIT: Final = 65_536
# Held market data whose data object is already encoded (validated) at call time.
_Held = tuple["_Slot", bytes]


class _Slot:
    """Per-topic state: the topic in both forms, its sequence counter and its policies."""

    __slots__ = (
        "conflatable",
        "critical",
        "gated",
        "head",
        "seq",
        "tail",
        "topic",
        "topic_bytes",
        "type_name",
    )

    def __init__(self, type_name: str, topic: str, gated: bool, source: str, epoch: int) -> None:
        self.type_name = type_name
        self.topic = topic
        self.topic_bytes = topic.encode()
        self.seq = 0
        self.critical = type_name in CRITICAL_TYPES
        self.conflatable = type_name in CONFLATABLE_TYPES
        self.gated = gated
        # this topic's payload bytes around the data, timestamp and seq (bus.envelope)
        self.head, self.tail = payload_parts(type_name, topic, source, epoch)


class EventHelpers:
    """Typed helpers for every event the guide's bot sent; fields equal the parameters."""

    def publish(self, type_name: str, data: Any, key: str | None = None) -> None:
        raise NotImplementedError

    def publish_market_data(
        self, symbol: str, price: Any, timestamp: Any = None, **fields: Any
    ) -> None:
        data: dict[str, Any] = {"symbol": symbol, "price": price, **fields}
        if timestamp is not None:
            data["timestamp"] = timestamp
        self.publish("market_data", data)

    def publish_trading_loop(
        self, price: Any, action: str, confidence: Any, symbol: str = "BTC-USD"
    ) -> None:
        self.publish(
            "trading_loop",
            {"price": price, "action": action, "confidence": confidence, "symbol": symbol},
        )

    def publish_ai_decision(self, action: str, reasoning: str, confidence: Any) -> None:
        self.publish(
            "ai_decision", {"action": action, "reasoning": reasoning, "confidence": confidence}
        )

    def publish_trading_decision(
        self,
        request_id: str,
        action: str,
        confidence: Any,
        reasoning: str,
        price: Any,
        quantity: Any = None,
        leverage: Any = None,
        indicators: Mapping[str, Any] | None = None,
        risk_analysis: Mapping[str, Any] | None = None,
    ) -> None:
        upper = str(action).upper()
        self.publish(
            "trading_decision",
            {
                "request_id": request_id,
                "action": upper if upper in ("BUY", "SELL", "HOLD") else "HOLD",
                "confidence": confidence,
                "reasoning": reasoning,
                "price": price,
                "quantity": quantity,
                "leverage": leverage,
                "indicators": indicators,
                "risk_analysis": risk_analysis,
            },
        )

    def publish_system_status(
        self, status: str, health: Any, errors: list[Any] | None = None
    ) -> None:
        self.publish(
            "system_status",
            {"status": status, "health": health, "errors": [] if errors is None else errors},
        )

    def publish_llm_request(
        self,
        request_id: str,
        model: str,
        prompt_tokens: int | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        context: Any = None,
    ) -> None:
        self.publish(
            "llm_request",
            {
                "request_id": request_id,
                "model": model,
                "prompt_tokens": prompt_tokens,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "context": context,
            },
        )

    def publish_llm_response(
        self,
        request_id: str,
        model: str,
        response_time_ms: Any,
        completion_tokens: int | None = None,
        total_tokens: int | None = None,
        cost_estimate_usd: Any = None,
        success: bool = True,
        error: str | None = None,
        raw_response: Any = None,
    ) -> None:
        self.publish(
            "llm_response",
            {
                "request_id": request_id,
                "model": model,
                "response_time_ms": response_time_ms,
                "completion_tokens": completion_tokens,
                "total_tokens": total_tokens,
                "cost_estimate_usd": cost_estimate_usd,
                "success": success,
                "error": error,
                "raw_response": raw_response,
            },
        )

    def publish_position_update(
        self,
        symbol: str,
        side: str,
        size: Any,
        entry_price: Any,
        current_price: Any,
        unrealized_pnl: Any,
    ) -> None:
        self.publish(
            "position_update",
            {
                "symbol": symbol,
                "side": side,
                "size": size,
                "entry_price": entry_price,
                "current_price": current_price,
                "unrealized_pnl": unrealized_pnl,
            },
        )

    def publish_indicator_data(self, symbol: str, indicators: Mapping[str, Any]) -> None:
        self.publish("indicator_update", {"symbol": symbol, "indicators": indicators})

    def publish_trade_execution(
        self,
        order_id: str,
        symbol: str,
        side: str,
        quantity: Any,
        price: Any,
        status: str,
        trade_action: Any = None,
    ) -> None:
        self.publish(
            "trade_execution",
            {
                "order_id": order_id,
                "symbol": symbol,
                "side": side,
                "quantity": quantity,
                "price": price,
                "status": status,
                "trade_action": trade_action,
            },
        )

    def publish_performance_update(
        self, metrics: Mapping[str, Any] | None = None, **fields: Any
    ) -> None:
        self.publish("performance_update", {**(metrics or {}), **fields})

    def publish_error(self, error_message: str, level: str = "ERROR") -> None:
        self.publish("error", {"message": error_message, "level": level})

    def publish_custom_event(self, data: Mapping[str, Any]) -> None:
        self.publish("custom_event", data)


class Publisher(EventHelpers):
    """Publishes events from any thread; never blocks on, or raises because of, the network.

    ``Publisher(url="tcp://127.0.0.1:5555", source_id="bot-1")`` takes PublisherSettings
    fields as keywords; ``Publisher.from_env()`` reads the ``SYSTEM__*`` variables.
    """

    def __init__(
        self,
        settings: PublisherSettings | None = None,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        autostart: bool = True,
        caller_sends: bool = False,
        clock: Callable[[], float] = time.monotonic,
        **overrides: Any,
    ) -> None:
        if "url" in overrides:
            url = overrides.pop("url")
            overrides["bus_url" if url is not None and _is_bus_url(url) else "dashboard_url"] = url
        base = settings if settings is not None else PublisherSettings()
        self.settings = base.replace(**overrides) if overrides else base
        settings = self.settings
        self._clock = clock
        self.source: str = settings.source_id
        self.epoch: int = time.time_ns()
        self._source_bytes = self.source.encode()
        self._pack_meta = struct.Struct(f"{META_HEADER.format}{len(self._source_bytes)}s").pack
        self._log = get_logger("WebSocket publisher", source=self.source)
        # the C path's lock where it is built: it takes it without a Python call
        self._lock: Any = _C_PATH.Lock() if _C_PATH is not None else threading.Lock()
        self._fast_path: Any = None
        # (type, key), (type, symbol) or type -> its topic's slot
        self._slots: dict[Any, _Slot] = {}
        self._topics: dict[str, _Slot] = {}
        self._outbox = Outbox(settings.queue_size)
        self._gate: IntervalGate[_Held] | None = (
            IntervalGate(settings.publish_interval) if settings.publish_interval > 0 else None
        )
        self._filter = (
            SignificanceFilter(settings.significance_filter)
            if settings.significance_filter > 0
            else None
        )
        self._drop_log = DropLog(DROP_REPORT_SECONDS)
        self.counters = Counters()
        # Events handed to the I/O thread on the fast path: (slot, meta, payload), in order,
        # used while the link is up and the outbox empty (``_fast_ok``).
        # (a bot_client._publish.HandOff instead where the C path is built: see
        # _install_fast_path)
        self._fast: Any = deque()
        self._fast_ok = False
        # no more than the queue size waits in the deque, so what is held stays within
        # twice it (the C hand-off holds up to HANDOFF_LIMIT in flight: _install_fast_path)
        self._fast_limit = min(FAST_LIMIT, settings.queue_size)
        self._io_sleeping = False
        # ZeroMQ with caller_sends: bus.transport's sender, used under the lock instead
        # of the hand-off deque (see docs/performance.md for the measured difference)
        self._caller_send: Any = None
        self.caller_sends = caller_sends
        self._closed = False
        self._stopped = False
        self._started = False
        self._link: Link | None = None
        # resend: every send path on a ZeroMQ socket appends the frames it sent here, for
        # the link's resend window (bot_client/resend.py); None: resending is off
        self._sent_log: list[bytes] | None = (
            [] if settings.transport == "zmq" and settings.resend_events > 0 else None
        )
        if not settings.enabled:
            self.publish = self._discard  # type: ignore[method-assign]
            if autostart:
                self.start()
            return
        self._link = make_link(self, context)
        self.fast_path = self._install_fast_path()
        if autostart:
            self.start()

    def _install_fast_path(self) -> bool:
        """Route publish() through bot_client/_publish.c where it is built and bound.

        The C path does what ``Publisher.publish`` does for the common event and calls it
        for everything else; with caller_sends it sends on the link's socket itself.
        """
        if _C_PATH is None or os.environ.get(ACCELERATOR_OFF_VARIABLE):
            return False
        socket = self._link.caller_socket() if self._link is not None else None
        send_address = libzmq_send_address()
        if send_address is None and (socket is not None or isinstance(self._link, ZmqLink)):
            return False
        if socket is None and isinstance(self._link, ZmqLink):
            assert send_address is not None
            self._fast_limit = HANDOFF_LIMIT
            self._fast = _C_PATH.HandOff(HANDOFF_LIMIT, _Slot, send_address)
        path = _C_PATH.FastPath(
            owner=self,
            slots=self._slots,
            slot_type=_Slot,
            lock=self._lock,
            socket=socket,
            send_address=send_address or 0,
            handoff=self._fast if isinstance(self._fast, _C_PATH.HandOff) else None,
            dumps=_dumps,
            default=to_json_value,
            option=DUMPS_OPTIONS,
            symbol_keyed=SYMBOL_KEYED_TYPES,
            source=self._source_bytes,
            epoch=self.epoch,
            max_payload=MAX_PAYLOAD_BYTES,
            fallback=Publisher.publish.__get__(self),
            hand_over=self._hold if socket is not None else self._send_or_hold,
            sent_log=self._sent_log,  # resend
        )
        self._fast_path = path
        self.publish = path.publish  # type: ignore[method-assign]
        return True

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        autostart: bool = True,
        **overrides: Any,
    ) -> Publisher:
        """Settings from ``SYSTEM__*`` variables (disabled unless ENABLE_WEBSOCKET_PUBLISHING)."""
        return cls(
            PublisherSettings.from_env(env, **overrides), context=context, autostart=autostart
        )

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the I/O thread (events published before are held and delivered in order)."""
        if self._started:
            return
        self._started = True
        if self._link is None:
            # disabled is the guide's default: said once, so "nothing arrives" has an answer
            self._log.warning(
                "websocket.publisher_disabled",
                message="WebSocket publisher disabled: publish calls do nothing",
                enable_with="SYSTEM__ENABLE_WEBSOCKET_PUBLISHING=true",
            )
            return
        self._link.start()
        # a bot that exits without close() still gets its held events out (or counted)
        atexit.register(self._close_at_exit)
        self._log.info(
            "websocket.publisher_started",
            message="WebSocket publisher started",
            url=self.settings.loggable_url,
            transport=self.settings.transport,
            epoch=self.epoch,
            queue_size=self.settings.queue_size,
            publish_interval=self.settings.publish_interval,
        )

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is held for up to ``timeout`` s (default: SYSTEM__WEBSOCKET_TIMEOUT,
        at most 5 s), then stop; what is still undelivered is counted as dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._fast_ok = False
            if self._gate is not None:
                for held in self._gate.release_all():
                    self._emit_held(held)
        if self._link is None:
            return
        self.start()
        atexit.unregister(self._close_at_exit)
        self._link.stop(min(self.settings.timeout, 5.0) if timeout is None else timeout)
        with self._lock:
            self._stopped = True
            lost = [_entry(*held) for held in self._fast] + self._outbox.drain()
            self._fast.clear()
            if self._gate is not None:  # market data published while closing
                lost += [_entry(slot, b"", b"") for slot, _data in self._gate.release_all()]
            report = self._drop_log.take(math.inf) or {}
        lost += self._link.abandoned()
        with self._lock:
            counted = self.counters.count_drops(lost)
        if counted or report:
            self._log.warning(
                "websocket.publish_dropped",
                message="WebSocket publish dropped events",
                dropped=report,
                undelivered_at_close=counted,
                dropped_total=sum(self.counters.dropped.values()),
            )
        self._log.info(
            "websocket.publisher_closed", message="WebSocket publisher closed", **self._figures()
        )

    def wait_admitted(self, timeout: float = 5.0) -> bool:
        """With SYSTEM__TRADEBUS_KEYS: wait up to ``timeout`` s for the bus's verdict on the key.

        True: admitted (or no keys: nothing to refuse). False: no verdict yet, the bus is not
        reachable; the publisher keeps trying as always. AuthRefusedError (one line naming
        the key): refused, so a program can stop at start-up instead of publishing nowhere.
        """
        link = self._link
        if not isinstance(link, ZmqLink) or link.keys is None:
            return True
        self.start()
        if not link.judged.wait(timeout):
            return False
        if link.refusal is not None:
            raise AuthRefusedError(link.refusal)
        return link.admitted

    def _close_at_exit(self) -> None:
        self.close(min(self.settings.timeout, AT_EXIT_SECONDS))

    def __enter__(self) -> Publisher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is held or in flight; False if that took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if self.queued() == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            if self._link is not None:
                self._link.wake()
            time.sleep(0.002)

    # -- state ----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.connected

    def queued(self) -> int:
        held = len(self._gate) if self._gate is not None else 0
        in_flight = self._link.in_flight() if self._link is not None else 0
        return len(self._fast) + len(self._outbox) + held + in_flight

    def status(self) -> dict[str, Any]:
        """connected, sent, queued, dropped (by type), reconnects and the other counters."""
        with self._lock:
            return {
                "enabled": self.settings.enabled,
                "transport": self.settings.transport,
                "url": self.settings.url,
                "source": self.source,
                "epoch": self.epoch,
                "closed": self._closed,
                **self._figures(),
            }

    def _sent(self) -> int:
        """Events handed to the transport: the Python paths' count and the C path's (sent
        from callers, or by the I/O thread from the C hand-off)."""
        path = self._fast_path
        sent = self.counters.sent + (path.sent if path is not None else 0)
        return sent + (0 if isinstance(self._fast, deque) else self._fast.sent)

    def _figures(self) -> dict[str, Any]:
        counters = self.counters
        # queued before sent: an event that goes out in between shows in both, never in
        # neither (the hand-off counts an event sent before it leaves the queue)
        queued = self.queued()
        return {
            "connected": self.connected,
            "published": counters.interval_accepted
            + sum(slot.seq for slot in list(self._topics.values()) if not slot.gated),
            "sent": self._sent(),
            "queued": queued,
            "dropped": dict(counters.dropped),
            "dropped_total": sum(counters.dropped.values()),
            "conflated": counters.conflated,
            "filtered": counters.filtered,
            "rejected": counters.rejected,
            "resent": counters.resent,
            "reconnects": counters.reconnects,
            "connect_attempts": counters.connect_attempts,
            "heartbeats": counters.heartbeats,
            "auth_refusals": counters.auth_refusals,
        }

    # -- the call path --------------------------------------------------------------------
    def publish(self, type_name: str, data: Any, key: str | None = None) -> None:
        """Publish ``data`` (a JSON object) as an event of ``type_name`` under topic
        ``type`` or ``type.key``; symbol-keyed types default the key to ``data["symbol"]``.

        Raises InvalidEventError for a bad type name, key or data; never for the network.
        """
        if type(data) is not dict:
            data = event_data(type_name, data)
        slot_key: Any = None
        symbol: Any = None
        try:
            if key is not None:
                slot_key = (type_name, key)
            elif type_name in SYMBOL_KEYED_TYPES:
                symbol = data.get("symbol")
                slot_key = (type_name, symbol)
            else:
                slot_key = type_name
            slot = self._slots.get(slot_key)
        except TypeError:  # unhashable type name or key: _new_slot says what is wrong
            slot = None
        if slot is None:
            slot = self._new_slot(type_name, key, symbol, slot_key)
        if slot.gated:
            self._publish_gated(slot, data)
            return
        try:
            data_json = _dumps(data, default=to_json_value, option=DUMPS_OPTIONS)
        except TypeError as error:
            raise unencodable(type_name, error) from None
        lock = self._lock
        lock.acquire()
        try:
            # stamped under the lock: timestamps follow seq order, whichever thread calls
            now_ns = _time_ns()
            stamp = _timestamp_bytes(now_ns)
            seq = slot.seq + 1
            # the payload as bus.envelope.encode_payload writes it, from pre-encoded parts
            if "timestamp" in data:
                payload = b"".join(
                    (slot.head, data_json, TIMESTAMP_FIELD, stamp, slot.tail, b"%d}" % seq)
                )
            else:
                payload = b"".join(
                    (
                        slot.head,
                        data_json[:-1],
                        # from the encoding: a default= callback may have changed the dict
                        _DATA_TIMESTAMP_FIRST if data_json == b"{}" else TIMESTAMP_FIELD,
                        stamp,
                        _DATA_END_AND_TIMESTAMP,
                        stamp,
                        slot.tail,
                        b"%d}" % seq,
                    )
                )
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise InvalidEventError(
                    f"event {type_name!r} encodes to {len(payload)} bytes; the bus limit is "
                    f"{MAX_PAYLOAD_BYTES}"
                )
            slot.seq = seq  # also the count of this topic's published events
            meta = self._pack_meta(WIRE_VERSION, 0, self.epoch, seq, now_ns, self._source_bytes)
            self._send_or_hold(slot, meta, payload)
        finally:
            lock.release()

    def _discard(self, type_name: str, data: Any, key: str | None = None) -> None:
        """publish() of a disabled publisher: the guide's default, costs nothing."""

    def _new_slot(self, type_name: Any, key: Any, symbol: Any, slot_key: Any) -> _Slot:
        try:
            if key is not None:
                topic = make_topic(type_name, key)
            else:
                topic = make_topic(type_name)
                if symbol is not None:
                    # as the bridge does: an unusable symbol leaves the bare type as topic
                    with contextlib.suppress(TopicError):
                        topic = f"{topic}.{validate_key(symbol)}"
        except TopicError as error:
            raise InvalidEventError(str(error)) from None
        with self._lock:
            # several slot keys may name one topic (explicit key == symbol): one counter
            slot = self._topics.get(topic)
            if slot is None:
                gated = self._gate is not None and type_name in INTERVAL_TYPES
                slot = self._topics[topic] = _Slot(type_name, topic, gated, self.source, self.epoch)
            with contextlib.suppress(TypeError):
                self._slots[slot_key] = slot
            return slot

    def _publish_gated(self, slot: _Slot, data: dict[Any, Any]) -> None:
        """Market data: significance filter, then at most one per symbol per interval."""
        gate = self._gate
        assert gate is not None
        data_json = dumps_data(slot.type_name, data)
        if "timestamp" not in data:
            # the time of the call; the envelope's timestamp is the time it goes out
            data_json = with_timestamp(data_json, _timestamp_bytes(_time_ns()))
        # the payload it becomes, with the longest timestamp and seq, must fit the bus
        parts = len(slot.head) + len(data_json) + len(TIMESTAMP_FIELD) + len(slot.tail)
        largest = parts + _LONGEST_STAMP_AND_SEQ
        if largest > MAX_PAYLOAD_BYTES:
            raise InvalidEventError(
                f"event {slot.type_name!r} encodes to up to {largest} bytes; the bus limit is "
                f"{MAX_PAYLOAD_BYTES}"
            )
        now = self._clock()
        with self._lock:
            if self._stopped:  # nothing would ever release it
                self._dropped(slot.type_name)
                return
            if self._filter is not None and not self._filter.significant(
                slot.topic, data.get("price")
            ):
                self.counters.filtered += 1
                return
            self.counters.interval_accepted += 1
            if gate.offer(slot.topic, now):
                self._emit_held((slot, data_json))
                return
            first_held = gate.hold(slot.topic, (slot, data_json)) is None
            if not first_held:
                self.counters.conflated += 1
        if first_held and self._link is not None:
            self._link.wake()

    def _emit_held(self, held: _Held) -> None:
        """Build and send (or queue) an event whose data was encoded earlier. Lock held."""
        slot, data_json = held
        now_ns = _time_ns()
        seq = slot.seq + 1
        slot.seq = seq
        payload = b"".join(
            (
                slot.head,
                data_json,
                TIMESTAMP_FIELD,
                _timestamp_bytes(now_ns),
                slot.tail,
                b"%d}" % seq,
            )
        )
        meta = self._pack_meta(WIRE_VERSION, 0, self.epoch, seq, now_ns, self._source_bytes)
        self._send_or_hold(slot, meta, payload)

    def _send_or_hold(self, slot: _Slot, meta: bytes, payload: bytes) -> None:
        """Send now (caller_sends), hand to the I/O thread, or queue in the outbox. Lock held.

        The fast ways are open only while nothing waits in the outbox, so order is kept.
        """
        if self._fast_ok:
            caller_send = self._caller_send
            if caller_send is not None:
                if caller_send(slot.topic_bytes, meta, payload):
                    self.counters.sent += 1
                    if self._sent_log is not None:  # resend
                        self._sent_log += (slot.topic_bytes, meta, payload)
                    return
            elif len(self._fast) < self._fast_limit:
                self._fast.append((slot, meta, payload))
                if self._io_sleeping:
                    self._io_sleeping = False
                    self._wake()
                return
        self._hold(slot, meta, payload)

    def _hold(self, slot: _Slot, meta: bytes, payload: bytes) -> None:
        """Queue an event in the outbox and close the fast ways until it is empty, so that
        order is kept (also the C path's way when a caller's own send fails). Lock held."""
        self._fast_ok = False
        self._enqueue(_entry(slot, meta, payload))

    def _wake(self) -> None:
        if self._link is not None:
            self._link.wake()

    def _enqueue(self, entry: Entry) -> None:
        """Put an encoded event in the outbox, counting what overflow drops. Lock held."""
        if self._stopped:
            self._dropped(entry.type_name)
            return
        was_empty = not self._outbox
        dropped = self._outbox.push(entry)
        if dropped is not None:
            self._dropped(dropped.type_name)
        if was_empty:
            self._wake()

    def _dropped(self, type_name: str) -> None:
        """Count one lost event of ``type_name`` and report it (rate-limited). Lock held."""
        counters = self.counters
        counters.dropped[type_name] = counters.dropped.get(type_name, 0) + 1
        report = self._drop_log.record(type_name, self._clock())
        if report is not None:
            self._warn_drops(report)

    def _warn_drops(self, report: dict[str, int]) -> None:
        self._log.warning(
            "websocket.publish_dropped",
            message="WebSocket publish queue full: events dropped",
            dropped=report,
            dropped_total=sum(self.counters.dropped.values()),
            queue_size=self.settings.queue_size,
            connected=self.connected,
        )

    # -- for the I/O thread -----------------------------------------------------------------
    def _tick(self, now: float) -> float | None:
        """Release due market data and overdue drop reports; returns the next due time."""
        report = None
        with self._lock:
            if self._gate is not None:
                for held in self._gate.due(now):
                    self._emit_held(held)
            if self._drop_log.due(now):
                report = self._drop_log.take(now)
            next_due = self._gate.next_due() if self._gate is not None else None
        if report:
            self._warn_drops(report)
        return next_due

    def _heartbeat(self) -> None:
        self.counters.heartbeats += 1
        self.publish(
            "system_status",
            {
                "status": "alive",
                "health": True,
                "errors": [],
                "heartbeat": True,
                "publisher": {
                    "sent": self._sent(),
                    "queued": self.queued(),
                    "dropped": sum(self.counters.dropped.values()),
                },
            },
            HEARTBEAT_TOPIC_KEY,
        )

    def _summary(self) -> None:
        self._log.info(
            "websocket.publish_summary", message="WebSocket publish summary", **self._figures()
        )


def _entry(slot: _Slot, meta: bytes, payload: bytes) -> Entry:
    return Entry(
        slot.type_name,
        slot.topic,
        slot.critical,
        slot.conflatable,
        (slot.topic_bytes, meta, payload),
    )


def _is_bus_url(url: str) -> bool:
    return url.startswith(("tcp://", "ipc://"))
