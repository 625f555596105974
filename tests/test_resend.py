"""The publisher's resend window and its state after a lost proxy (bot_client/resend.py),
with plain values and clocks; and what the ZeroMQ link sends recorded into it, on a real proxy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from bot_client import Publisher
from bot_client.errors import SettingsError
from bot_client.resend import Resend, ResendWindow, SubscriptionWatch
from bot_client.settings import PublisherSettings
from bus.proxy import Proxy
from tests.conftest import scaled

pytestmark = pytest.mark.timeout(30)


def events(*names: str, size: int = 10) -> list[bytes]:
    """Flat frames of one event per name: topic, meta, a payload of ``size`` bytes."""
    frames: list[bytes] = []
    for name in names:
        frames += [name.encode(), b"m", name.encode().ljust(size, b".")]
    return frames


def topics(frames: list[bytes]) -> list[str]:
    return [topic.decode() for topic in frames[0::3]]


class TestWindow:
    def test_takes_everything_held_in_send_order_and_is_empty_after(self) -> None:
        window = ResendWindow(100, 10_000, 10.0)
        window.record(events("a.1", "b"), 1.0)
        window.record(events("a.2"), 2.0)
        frames, lost = window.take(3.0)
        assert topics(frames) == ["a.1", "b", "a.2"]
        assert lost == {}
        assert window.events == 0
        assert window.size == 0
        assert window.take(3.0) == ([], {})

    def test_older_than_the_span_counts_as_delivered(self) -> None:
        window = ResendWindow(100, 10_000, 10.0)
        window.record(events("old"), 0.0)
        window.record(events("new"), 5.0)
        frames, lost = window.take(10.5)
        assert topics(frames) == ["new"]
        assert lost == {}

    def test_the_event_bound_pushes_out_the_oldest_and_remembers_them(self) -> None:
        window = ResendWindow(3, 10_000, 10.0)
        window.record(events("a.1", "a.2"), 0.0)
        window.record(events("b", "a.3", "c"), 1.0)
        assert window.events == 3
        frames, lost = window.take(2.0)
        assert topics(frames) == ["b", "a.3", "c"]
        assert lost == {"a": 2}
        window.record(events("d"), 3.0)
        window.record(events("e"), 3.0)
        window.record(events("f", "g"), 3.0)
        assert topics(window.take(4.0)[0]) == ["e", "f", "g"]

    def test_events_sent_together_leave_together(self) -> None:
        """No per-event work: the oldest batch goes whole, even if part would do."""
        window = ResendWindow(4, 10_000, 10.0)
        window.record(events("a", "b", "c"), 0.0)
        window.record(events("d", "e"), 1.0)
        frames, lost = window.take(2.0)
        assert topics(frames) == ["d", "e"]
        assert lost == {"a": 1, "b": 1, "c": 1}

    def test_the_byte_bound(self) -> None:
        # each event: topic (1) + meta (1) + payload (20) = 22 bytes
        window = ResendWindow(100, 50, 10.0)
        window.record(events("a", size=20), 0.0)
        window.record(events("b", size=20), 0.5)
        assert window.size == 44
        window.record(events("c", size=20), 1.0)
        assert window.size == 44
        frames, lost = window.take(2.0)
        assert topics(frames) == ["b", "c"]
        assert lost == {"a": 1}

    def test_pushed_out_events_stop_counting_once_older_than_the_span(self) -> None:
        for at, expected in ((9.5, {"a": 1}), (10.5, {})):
            window = ResendWindow(1, 10_000, 10.0)
            window.record(events("a"), 0.0)
            window.record(events("b"), 0.0)  # "a" pushed out at 0.0
            window.record(events("c"), 9.0)  # "b" pushed out at 9.0
            frames, lost = window.take(at)
            assert topics(frames) == ["c"]
            assert lost == {**expected, "b": 1}

    def test_bounds_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="positive"):
            ResendWindow(0, 1, 1.0)


class TestWatch:
    def test_waits_for_the_subscriptions_seen_before_the_loss(self) -> None:
        watch = SubscriptionWatch(settle=1.0)
        for message in (b"\x01", b"\x01trade", b"\x01ai_decision", b"\x01\x00sync.x"):
            watch.observe(message)
        watch.lost()
        assert not watch.settled(0.0)  # disconnected
        watch.observe(b"\x01")  # the new proxy's own subscribe-all: not a subscriber
        watch.reconnected(10.0)
        assert not watch.settled(10.1)
        watch.observe(b"\x01trade")
        assert watch.missing == 1
        assert not watch.settled(10.2)
        watch.observe(b"\x01ai_decision")
        assert watch.settled(10.3)

    def test_gives_up_after_settle_seconds(self) -> None:
        watch = SubscriptionWatch(settle=1.0)
        watch.observe(b"\x01gone")
        watch.lost()
        watch.reconnected(10.0)
        assert not watch.settled(10.9)
        assert watch.settled(11.0)

    def test_a_subscriber_that_left_while_connected_is_not_waited_for(self) -> None:
        watch = SubscriptionWatch(settle=1.0)
        watch.observe(b"\x01left")
        watch.observe(b"\x00left")
        watch.lost()
        watch.reconnected(10.0)
        assert watch.settled(10.0)

    def test_the_sockets_own_unsubscriptions_at_the_loss_are_not_departures(self) -> None:
        """ZMQ_IMMEDIATE: the ended connection unsubscribes everything, the empty prefix
        first, maybe before the monitor says disconnected."""
        watch = SubscriptionWatch(settle=1.0)
        watch.observe(b"\x01")
        watch.observe(b"\x01trade")
        for message in (b"\x00", b"\x00trade"):
            watch.observe(message)
        watch.lost()  # the monitor, later
        watch.reconnected(10.0)
        assert not watch.settled(10.5)
        watch.observe(b"\x01trade")
        assert watch.settled(10.6)

    def test_nothing_to_wait_for_without_a_loss(self) -> None:
        watch = SubscriptionWatch(settle=1.0)
        watch.observe(b"\x01trade")
        assert watch.settled(0.0)


def sender(accept: int | None = None) -> tuple[list[str], Callable[[bytes, bytes, bytes], bool]]:
    """A send that takes ``accept`` events (None: all), then reports a full pipe."""
    sent: list[str] = []

    def send(topic: bytes, _meta: bytes, _payload: bytes) -> bool:
        if accept is not None and len(sent) >= accept:
            return False
        sent.append(topic.decode())
        return True

    return sent, send


class TestResend:
    def make(self, max_events: int = 100) -> Resend:
        return Resend(ResendWindow(max_events, 10_000, 10.0), SubscriptionWatch(1.0))

    def test_in_doubt_after_a_loss_then_sent_again_in_order(self) -> None:
        resend = self.make()
        resend.sent(events("a", "b", "c"), 1.0)
        assert not resend.holding(1.0)
        assert resend.lost(2.0) == {}
        assert resend.in_doubt == 3
        resend.reconnected(3.0)
        assert resend.holding(3.0)
        sent, send = sender()
        assert resend.resend(send, 3.0, limit=2) == (2, False)
        assert resend.resend(send, 3.0, limit=2) == (1, False)
        assert sent == ["a", "b", "c"]
        assert resend.in_doubt == 0
        assert not resend.holding(3.0)
        # what went again is in doubt again, like any send
        assert topics(resend.window.take(4.0)[0]) == ["a", "b", "c"]

    def test_a_full_pipe_keeps_the_rest(self) -> None:
        resend = self.make()
        resend.sent(events("a", "b", "c"), 1.0)
        resend.lost(2.0)
        resend.reconnected(3.0)
        _sent, send = sender(accept=1)
        assert resend.resend(send, 3.0, limit=10) == (1, True)
        assert resend.in_doubt == 2

    def test_a_second_loss_while_resending_keeps_the_original_order(self) -> None:
        resend = self.make()
        resend.sent(events("a", "b", "c", "d"), 1.0)
        resend.lost(2.0)
        resend.reconnected(3.0)
        _sent, send = sender(accept=2)
        resend.resend(send, 3.0, limit=10)
        resend.lost(4.0)  # a, b went again into a connection that died too
        assert resend.in_doubt == 4
        resend.reconnected(5.0)
        sent, send = sender()
        resend.resend(send, 5.0, limit=10)
        assert sent == ["a", "b", "c", "d"]

    def test_sent_while_the_loss_is_being_noticed_is_in_doubt_at_once(self) -> None:
        resend = self.make()
        resend.lost(1.0)
        resend.sent(events("late"), 1.5)
        assert resend.in_doubt == 1

    def test_what_the_window_could_not_keep_is_reported_lost(self) -> None:
        resend = self.make(max_events=2)
        resend.sent(events("a.1"), 1.0)
        resend.sent(events("a.2", "b.1"), 1.0)
        assert resend.lost(2.0) == {"a": 1}
        assert resend.in_doubt == 2

    def test_waits_for_subscribers_before_sending_anything(self) -> None:
        resend = self.make()
        resend.watch.observe(b"\x01a")
        resend.lost(1.0)
        resend.reconnected(2.0)
        assert resend.holding(2.0)  # nothing in doubt, still waiting for "a"
        resend.watch.observe(b"\x01a")
        assert not resend.holding(2.1)

    def test_abandoned_at_close(self) -> None:
        resend = self.make()
        resend.sent(events("a", "b"), 1.0)
        resend.lost(2.0)
        assert [frames[0] for frames in resend.abandon()] == [b"a", b"b"]
        assert resend.in_doubt == 0


def test_settings_from_the_environment() -> None:
    settings = PublisherSettings.from_env(
        {
            "SYSTEM__TRADEBUS_RESEND_EVENTS": "0",
            "SYSTEM__TRADEBUS_RESEND_BYTES": "1000",
            "SYSTEM__TRADEBUS_RESEND_SECONDS": "2.5",
            "SYSTEM__TRADEBUS_RESEND_SETTLE": "0",
        }
    )
    assert (settings.resend_events, settings.resend_bytes) == (0, 1000)
    assert (settings.resend_seconds, settings.resend_settle) == (2.5, 0.0)
    with pytest.raises(SettingsError, match="SYSTEM__TRADEBUS_RESEND_SECONDS"):
        PublisherSettings.from_env({"SYSTEM__TRADEBUS_RESEND_SECONDS": "0"})


def test_off_with_zero_events(proxy: Proxy, zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    publisher = Publisher(url=proxy.frontend_endpoint, context=zmq_context, resend_events=0)
    try:
        link: Any = publisher._link
        assert link._resend is None
    finally:
        publisher.close(timeout=1)


def test_every_event_sent_is_recorded_once_in_order(
    proxy: Proxy, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Two threads publishing flat out through the hand-off, and the outbox used before the
    connection: the window gets every event sent, once, in order."""
    publisher = Publisher(
        url=proxy.frontend_endpoint,
        context=zmq_context,
        heartbeat_interval=0,
        publish_interval=0,
        queue_size=50_000,
    )
    try:
        publisher.publish("custom_event", {"n": -1}, "outbox")  # before the connection
        deadline = time.monotonic() + scaled(10)
        while not publisher.connected:
            assert time.monotonic() < deadline, "never connected"
            time.sleep(0.01)

        def publish(key: str) -> None:
            for n in range(5000):
                publisher.publish("custom_event", {"n": n}, key)

        threads = [threading.Thread(target=publish, args=(key,)) for key in ("x", "y")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert publisher.flush(scaled(10))
        link: Any = publisher._link
        resend = link._resend
        # the I/O thread collects every few ms; wait until it has it all
        while resend.state.window.events < 10_001:
            assert time.monotonic() < deadline + scaled(10), resend.state.window.events
            time.sleep(0.01)
        frames, lost = resend.state.window.take(time.monotonic())
        assert lost == {}
        seqs: dict[bytes, list[int]] = {}
        for topic, meta in zip(frames[0::3], frames[1::3], strict=True):
            seqs.setdefault(topic, []).append(int.from_bytes(meta[10:18], "big"))
        assert seqs == {
            b"custom_event.outbox": [1],
            b"custom_event.x": list(range(1, 5001)),
            b"custom_event.y": list(range(1, 5001)),
        }
    finally:
        publisher.close(timeout=1)
