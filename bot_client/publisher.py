"""``Publisher``: hands a trading bot's events to the bus (tcp://, ipc://) or the bridge (ws://).

The call path never waits for the network. ``publish`` validates and encodes the event
once, in the caller's thread, stamps it under the lock (seq, timestamp, the payload from
``bus.envelope``) and hands it to the publisher's ``Delivery`` (bot_client.delivery): to
the I/O thread of its link while the link is up and nothing is held, otherwise into the
bounded outbox that the link delivers, in order, when the connection allows. Anything the
outbox must drop is counted by type, logged (rate-limited) and shown by ``status()``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson
import zmq

from bot_client.core import (
    INTERVAL_TYPES,
    SYMBOL_KEYED_TYPES,
    Counters,
    IntervalGate,
    SignificanceFilter,
)
from bot_client.delivery import Delivery, TopicSlot
from bot_client.encoding import DUMPS_OPTIONS, dumps_data, event_data, to_json_value, unencodable
from bot_client.errors import AuthRefusedError, InvalidEventError
from bot_client.links import Link, LinkHost
from bot_client.settings import PublisherSettings
from bot_client.ws_link import WebSocketLink
from bot_client.zmq_link import ZmqLink
from bus.envelope import (
    LONGEST_STAMP_AND_SEQ,
    MAX_PAYLOAD_BYTES,
    META_HEADER,
    TIMESTAMP_FIELD,
    WIRE_VERSION,
    assemble_payload,
    payload_parts,
    timestamp_bytes,
    with_timestamp,
)
from bus.errors import TopicError
from bus.topics import make_topic, validate_key
from monitoring.logging import get_logger

AT_EXIT_SECONDS: Final = 2.0
HEARTBEAT_TOPIC_KEY: Final = "heartbeat"
# A "websocket.publish_summary" log line this often.
SUMMARY_SECONDS: Final = 60.0
_time_ns = time.time_ns
_timestamp_bytes = timestamp_bytes
_assemble = assemble_payload
_dumps = orjson.dumps
# Held market data whose data object is already encoded (validated) at call time.
_Held = tuple[TopicSlot, bytes]


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
    ``caller_sends`` is accepted for compatibility and changes nothing: events always go
    out through the I/O thread (the hand-off the benchmark favours, docs/performance.md).
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
        # the meta frame of this publisher's events from (seq, publish_ns)
        self._meta = functools.partial(
            struct.Struct(f"{META_HEADER.format}{len(self._source_bytes)}s").pack,
            WIRE_VERSION,
            0,
            self.epoch,
        )
        self._log = get_logger("WebSocket publisher", source=self.source)
        self.counters = Counters()
        self._delivery = Delivery(settings.queue_size, self.counters, clock, self._warn_drops)
        self._lock = self._delivery.lock
        self._hand_over = self._delivery.hand_over
        # (type, key), (type, symbol) or type -> its topic's slot
        self._slots: dict[Any, TopicSlot] = {}
        self._topics: dict[str, TopicSlot] = {}
        self._gate: IntervalGate[_Held] | None = (
            IntervalGate(settings.publish_interval) if settings.publish_interval > 0 else None
        )
        self._filter = (
            SignificanceFilter(settings.significance_filter)
            if settings.significance_filter > 0
            else None
        )
        self._closed = False
        self._started = False
        heartbeat = settings.heartbeat_interval
        self._heartbeat_interval = heartbeat
        self._next_heartbeat = float("inf")
        self._next_summary = float("inf")
        self._link: Link | None = None
        if not settings.enabled:
            self.publish = self._discard  # type: ignore[method-assign]
            if autostart:
                self.start()
            return
        host = LinkHost(
            settings=settings,
            source=self.source,
            epoch=self.epoch,
            delivery=self._delivery,
            counters=self.counters,
            run_timers=self._run_timers,
            queued=self.queued,
            log=self._log,
        )
        self._link = WebSocketLink(host) if settings.transport == "ws" else ZmqLink(host, context)
        self._delivery.set_waker(self._link.wake)
        if autostart:
            self.start()

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
        now = time.monotonic()
        interval = self._heartbeat_interval
        self._next_heartbeat = now + interval if interval > 0 else float("inf")
        self._next_summary = now + SUMMARY_SECONDS
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
        delivery = self._delivery
        with self._lock:
            if self._closed:
                return
            self._closed = True
            delivery.close()
            if self._gate is not None:
                for held in self._gate.release_all():
                    self._emit_held(held)
        if self._link is None:
            return
        self.start()
        atexit.unregister(self._close_at_exit)
        self._link.stop(min(self.settings.timeout, 5.0) if timeout is None else timeout)
        with self._lock:
            lost, report = delivery.stop()
            if self._gate is not None:  # market data published while closing
                lost += [slot.entry(b"", b"") for slot, _data in self._gate.release_all()]
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
        return self._delivery.waiting() + held + in_flight

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

    def _figures(self) -> dict[str, Any]:
        counters = self.counters
        # queued before sent: an event that goes out in between shows in both, never in
        # neither (the I/O thread counts an event sent before it leaves the hand-off)
        queued = self.queued()
        return {
            "connected": self.connected,
            "published": counters.interval_accepted
            + sum(slot.seq for slot in list(self._topics.values()) if not slot.gated),
            "sent": counters.sent,
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
        # after the encoding: a default= callback may have changed the dict
        data_stamped = "timestamp" in data
        with self._lock:
            # stamped under the lock: timestamps follow seq order, whichever thread calls
            now_ns = _time_ns()
            seq = slot.seq + 1
            payload = _assemble(
                slot.head, data_json, _timestamp_bytes(now_ns), slot.tail, seq, data_stamped
            )
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise InvalidEventError(
                    f"event {type_name!r} encodes to {len(payload)} bytes; the bus limit is "
                    f"{MAX_PAYLOAD_BYTES}"
                )
            slot.seq = seq  # also the count of this topic's published events
            self._hand_over(slot, self._meta(seq, now_ns, self._source_bytes), payload)

    def _discard(self, type_name: str, data: Any, key: str | None = None) -> None:
        """publish() of a disabled publisher: the guide's default, costs nothing."""

    def _new_slot(self, type_name: Any, key: Any, symbol: Any, slot_key: Any) -> TopicSlot:
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
                head, tail = payload_parts(type_name, topic, self.source, self.epoch)
                slot = self._topics[topic] = TopicSlot(type_name, topic, gated, head, tail)
            with contextlib.suppress(TypeError):
                self._slots[slot_key] = slot
            return slot

    def _publish_gated(self, slot: TopicSlot, data: dict[Any, Any]) -> None:
        """Market data: significance filter, then at most one per symbol per interval."""
        gate = self._gate
        assert gate is not None
        data_json = dumps_data(slot.type_name, data)
        if "timestamp" not in data:
            # the time of the call; the envelope's timestamp is the time it goes out
            data_json = with_timestamp(data_json, _timestamp_bytes(_time_ns()))
        # the payload it becomes, with the longest timestamp and seq, must fit the bus
        parts = len(slot.head) + len(data_json) + len(TIMESTAMP_FIELD) + len(slot.tail)
        largest = parts + LONGEST_STAMP_AND_SEQ
        if largest > MAX_PAYLOAD_BYTES:
            raise InvalidEventError(
                f"event {slot.type_name!r} encodes to up to {largest} bytes; the bus limit is "
                f"{MAX_PAYLOAD_BYTES}"
            )
        now = self._clock()
        delivery = self._delivery
        with self._lock:
            if delivery.stopped:  # nothing would ever release it
                delivery.drop(slot.type_name)
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
        """Stamp and hand over an event whose data was encoded (and stamped) earlier. Lock
        held."""
        slot, data_json = held
        now_ns = _time_ns()
        seq = slot.seq + 1
        slot.seq = seq
        payload = _assemble(slot.head, data_json, _timestamp_bytes(now_ns), slot.tail, seq, True)
        self._hand_over(slot, self._meta(seq, now_ns, self._source_bytes), payload)

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
    def _run_timers(self, now: float, connected: bool) -> float:
        """Release due market data, then drop reports, heartbeat and summary when due;
        returns the next time anything is due (the link's thread calls it)."""
        with self._lock:
            if self._gate is not None:
                for held in self._gate.due(now):
                    self._emit_held(held)
            report = self._delivery.due_report(now)
            next_due = self._gate.next_due() if self._gate is not None else None
        if report:
            self._warn_drops(report)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self._heartbeat_interval
            if connected and not self._closed:
                self._heartbeat()
        if now >= self._next_summary:
            self._next_summary = now + SUMMARY_SECONDS
            self._log.info(
                "websocket.publish_summary", message="WebSocket publish summary", **self._figures()
            )
        candidates = [self._next_heartbeat, self._next_summary]
        if next_due is not None:
            candidates.append(next_due)
        return min(candidates)

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
                    "sent": self.counters.sent,
                    "queued": self.queued(),
                    "dropped": sum(self.counters.dropped.values()),
                },
            },
            HEARTBEAT_TOPIC_KEY,
        )


def _is_bus_url(url: str) -> bool:
    return url.startswith(("tcp://", "ipc://"))
