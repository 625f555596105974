"""bot_client's pure parts: outbox policy, interval gate, filter, settings, encoding. No I/O."""

from __future__ import annotations

import dataclasses
import enum
import itertools
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import numpy as np
import orjson
import pydantic
import pytest

from bot_client import InvalidEventError, Publisher, PublisherSettings, SettingsError
from bot_client.core import DropLog, Entry, IntervalGate, Outbox, SignificanceFilter
from bot_client.encoding import DUMPS_OPTIONS, event_data, to_json_value


def entry(type_name: str, topic: str | None = None, n: int = 0) -> Entry:
    return Entry(
        type_name,
        topic or type_name,
        type_name in ("trading_decision", "trade_execution", "error"),
        type_name in ("market_data", "position_update"),
        (b"", b"", str(n).encode()),
    )


def names(entries: list[Entry]) -> list[tuple[str, bytes]]:
    return [(e.topic, e.frames[2]) for e in entries]


# -- outbox ------------------------------------------------------------------------------
def test_outbox_keeps_order_below_capacity() -> None:
    outbox = Outbox(5)
    for n in range(5):
        assert outbox.push(entry("ai_decision", n=n)) is None
    assert [e.frames[2] for e in outbox.drain()] == [b"0", b"1", b"2", b"3", b"4"]


def test_outbox_overflow_replaces_superseded_market_data_first() -> None:
    outbox = Outbox(4)
    outbox.push(entry("ai_decision", n=0))
    outbox.push(entry("market_data", "market_data.BTC-USD", 1))
    outbox.push(entry("market_data", "market_data.ETH-USD", 2))
    outbox.push(entry("market_data", "market_data.BTC-USD", 3))
    # full: the older BTC price is redundant, so it goes before the older ai_decision
    dropped = outbox.push(entry("llm_request", n=4))
    assert dropped is not None
    assert (dropped.topic, dropped.frames[2]) == ("market_data.BTC-USD", b"1")
    assert names(outbox.entries()) == [
        ("ai_decision", b"0"),
        ("market_data.ETH-USD", b"2"),
        ("market_data.BTC-USD", b"3"),
        ("llm_request", b"4"),
    ]


def test_outbox_overflow_counts_and_critical_survive_longest() -> None:
    outbox = Outbox(10)
    dropped: list[Entry] = []
    pushed: dict[str, int] = {}
    kinds = ["trading_decision", "ai_decision", "trade_execution", "system_status", "error"]
    for n in range(200):
        kind = kinds[n % len(kinds)]
        pushed[kind] = pushed.get(kind, 0) + 1
        lost = outbox.push(entry(kind, n=n))
        if lost is not None:
            dropped.append(lost)
    kept = outbox.entries()
    assert len(kept) == 10
    assert len(dropped) == 200 - 10
    # every event is either kept or dropped, never both, never neither
    counted: dict[str, int] = {}
    for e in dropped + kept:
        counted[e.type_name] = counted.get(e.type_name, 0) + 1
    assert counted == pushed
    # all survivors are critical; the most recent critical ones, in order
    assert all(e.critical for e in kept)
    critical_numbers = [n for n in range(200) if kinds[n % 5] in kinds[::2]]
    assert [int(e.frames[2]) for e in kept] == critical_numbers[-10:]


def test_outbox_drops_arriving_noncritical_when_full_of_critical() -> None:
    outbox = Outbox(2)
    outbox.push(entry("error", n=0))
    outbox.push(entry("trading_decision", n=1))
    dropped = outbox.push(entry("ai_decision", n=2))
    assert dropped is not None
    assert dropped.frames[2] == b"2"
    dropped = outbox.push(entry("trade_execution", n=3))
    assert dropped is not None
    assert dropped.frames[2] == b"0"
    assert [e.frames[2] for e in outbox.entries()] == [b"1", b"3"]


def test_outbox_pop_and_oldest_follow_order() -> None:
    outbox = Outbox(3)
    assert outbox.oldest(5) == []
    outbox.push(entry("market_data", "market_data.A", 0))
    outbox.push(entry("market_data", "market_data.A", 1))
    assert [e.frames[2] for e in outbox.oldest(5)] == [b"0", b"1"]
    assert [e.frames[2] for e in outbox.oldest(1)] == [b"0"]
    assert outbox.pop().frames[2] == b"0"
    # the popped event's supersession is forgotten: the next overflow drops the oldest
    outbox.push(entry("ai_decision", n=2))
    outbox.push(entry("ai_decision", n=3))
    dropped = outbox.push(entry("ai_decision", n=4))
    assert dropped is not None
    assert dropped.frames[2] == b"1"


# -- interval gate -------------------------------------------------------------------------
def test_gate_sends_first_then_latest_of_each_interval() -> None:
    gate: IntervalGate[int] = IntervalGate(1.0)
    delivered: list[tuple[float, int]] = []
    replaced = 0
    # prices every 0.1 s for 3.5 s, released by a timer ticking every 0.05 s
    for step in range(71):
        now = step * 0.05
        for value in gate.due(now):
            delivered.append((now, value))
        if step % 2 == 0:
            price = step // 2
            if gate.offer("BTC", now):
                delivered.append((now, price))
            elif gate.hold("BTC", price) is not None:
                replaced += 1
    delivered += [(99.0, value) for value in gate.release_all()]
    assert delivered[0] == (0.0, 0)
    times = [at for at, _value in delivered[:-1]]
    assert all(later - earlier >= 1.0 - 1e-9 for earlier, later in itertools.pairwise(times))
    # the first at once, then each interval's last value: 9 of [0, 1) released at t=1.0,
    # 19 of [1, 2) at t=2.0, 29 at t=3.0, and 35, still held, at close
    assert [value for _at, value in delivered] == [0, 9, 19, 29, 35]
    assert replaced == 35 - 4


def test_gate_quiet_topic_goes_at_once_and_topics_are_independent() -> None:
    gate: IntervalGate[str] = IntervalGate(1.0)
    assert gate.offer("BTC", 0.0)
    assert gate.offer("ETH", 0.1)
    assert not gate.offer("BTC", 0.5)
    assert gate.hold("BTC", "b1") is None
    assert gate.next_due() == 1.0
    assert gate.due(0.99) == []
    assert gate.due(1.0) == ["b1"]
    assert gate.next_due() is None
    assert gate.offer("BTC", 2.5)


def test_significance_filter_passes_moves_above_threshold() -> None:
    significant = SignificanceFilter(0.001).significant
    assert significant("BTC", 45000.0)
    assert not significant("BTC", 45040.0)  # 0.089 %
    assert significant("BTC", 45046.0)  # 0.102 % from the last one passed
    assert significant("ETH", 3000)
    assert significant("BTC", "not a number")
    assert not significant("BTC", Decimal("45046.1"))


def test_drop_log_reports_at_most_once_per_period() -> None:
    log = DropLog(5.0)
    assert log.record("market_data", 0.0) == {"market_data": 1}
    assert log.record("market_data", 1.0) is None
    assert log.record("ai_decision", 2.0) is None
    assert not log.due(4.9)
    assert log.due(5.0)
    assert log.take(5.0) == {"market_data": 1, "ai_decision": 1}
    assert log.take(6.0) is None


# -- settings ------------------------------------------------------------------------------
GUIDE_DEFAULTS = {
    "enabled": False,
    "dashboard_url": "ws://localhost:8000/ws",
    "publish_interval": 1.0,
    "max_retries": 3,
    "retry_delay": 5.0,
    "timeout": 10.0,
    "queue_size": 100,
}


def test_env_defaults_are_the_guides() -> None:
    settings = PublisherSettings.from_env({})
    for name, value in GUIDE_DEFAULTS.items():
        assert getattr(settings, name) == value, name
    assert settings.transport == "ws"
    assert settings.heartbeat_interval == 10.0
    assert settings.significance_filter == 0.0
    assert settings.bus_url is None


def test_env_values_are_read() -> None:
    settings = PublisherSettings.from_env(
        {
            "SYSTEM__ENABLE_WEBSOCKET_PUBLISHING": "TRUE",
            "SYSTEM__WEBSOCKET_DASHBOARD_URL": "wss://dash.example:443/ws",
            "SYSTEM__TRADEBUS_BUS_URL": "ipc:///run/tradebus/in.sock",
            "SYSTEM__WEBSOCKET_PUBLISH_INTERVAL": "0.25",
            "SYSTEM__WEBSOCKET_MAX_RETRIES": "10",
            "SYSTEM__WEBSOCKET_RETRY_DELAY": "10",
            "SYSTEM__WEBSOCKET_TIMEOUT": "3",
            "SYSTEM__WEBSOCKET_QUEUE_SIZE": "5000",
            "SYSTEM__TRADEBUS_SOURCE_ID": "bot-7",
            "SYSTEM__WEBSOCKET_SIGNIFICANCE_FILTER": "0.001",
            "SYSTEM__WEBSOCKET_HEARTBEAT_INTERVAL": "0",
        }
    )
    assert settings.enabled
    assert settings.url == "ipc:///run/tradebus/in.sock"
    assert settings.transport == "zmq"
    assert (settings.publish_interval, settings.max_retries, settings.retry_delay) == (0.25, 10, 10)
    assert (settings.timeout, settings.queue_size, settings.source_id) == (3.0, 5000, "bot-7")
    assert (settings.significance_filter, settings.heartbeat_interval) == (0.001, 0.0)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SYSTEM__ENABLE_WEBSOCKET_PUBLISHING", "maybe", "true or false"),
        ("SYSTEM__WEBSOCKET_DASHBOARD_URL", "http://x:8000/ws", "ws://"),
        ("SYSTEM__WEBSOCKET_DASHBOARD_URL", "tcp://host", "tcp://host:port"),
        ("SYSTEM__TRADEBUS_BUS_URL", "ws://x:1/ws", "tcp://host:port or ipc://path"),
        ("SYSTEM__WEBSOCKET_PUBLISH_INTERVAL", "-1", "seconds >= 0"),
        ("SYSTEM__WEBSOCKET_PUBLISH_INTERVAL", "nan", "seconds >= 0"),
        ("SYSTEM__WEBSOCKET_MAX_RETRIES", "3.5", "a whole number >= 0"),
        ("SYSTEM__WEBSOCKET_RETRY_DELAY", "0", "seconds > 0"),
        ("SYSTEM__WEBSOCKET_TIMEOUT", "ten", "seconds > 0"),
        ("SYSTEM__WEBSOCKET_QUEUE_SIZE", "0", "a whole number >= 1"),
        ("SYSTEM__TRADEBUS_SOURCE_ID", "bot 1", "letters, digits"),
        ("SYSTEM__WEBSOCKET_SIGNIFICANCE_FILTER", "1.5", "a fraction"),
        ("SYSTEM__WEBSOCKET_HEARTBEAT_INTERVAL", "-5", "seconds >= 0"),
    ],
)
def test_env_errors_name_variable_value_and_form(variable: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        PublisherSettings.from_env({variable: value})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{variable}={value!r}: expected ")
    assert expected in message


def test_bad_env_fails_publisher_start() -> None:
    with pytest.raises(SettingsError, match="SYSTEM__WEBSOCKET_QUEUE_SIZE='lots'"):
        Publisher.from_env({"SYSTEM__WEBSOCKET_QUEUE_SIZE": "lots"})


def test_keyword_errors_and_unknown_settings() -> None:
    with pytest.raises(SettingsError, match="SYSTEM__WEBSOCKET_QUEUE_SIZE=0"):
        PublisherSettings(queue_size=0)
    with pytest.raises(SettingsError, match="unknown publisher setting"):
        PublisherSettings.from_env({}, queue_sise=5)
    with pytest.raises(SettingsError, match="SYSTEM__WEBSOCKET_TIMEOUT=True"):
        PublisherSettings(timeout=True)


def test_token_value_never_appears_in_errors() -> None:
    with pytest.raises(SettingsError) as caught:
        PublisherSettings(token="")
    assert "<hidden>" in str(caught.value)
    assert "secret" not in repr(PublisherSettings(token="secret"))


def test_settings_object_like_the_guides_bots_pass() -> None:
    class System:
        enable_websocket_publishing = True
        websocket_dashboard_url = "tcp://127.0.0.1:5555"
        websocket_queue_size = 7

    class BotSettings:
        system = System()

    settings = PublisherSettings.from_object(BotSettings())
    assert settings.enabled
    assert settings.url == "tcp://127.0.0.1:5555"
    assert settings.queue_size == 7
    assert settings.publish_interval == 1.0


def test_backoff_grows_then_stays_at_the_longest_delay() -> None:
    assert PublisherSettings(retry_delay=5, max_retries=3).backoff_delays() == [5, 10, 20, 40]
    assert PublisherSettings(retry_delay=5, max_retries=0).backoff_delays() == [5]
    assert PublisherSettings(retry_delay=100, max_retries=5).backoff_delays()[-1] == 300


# -- encoding --------------------------------------------------------------------------------
class Side(enum.Enum):
    BUY = "buy"


@dataclasses.dataclass
class Fill:
    price: Decimal
    at: datetime


class Position(pydantic.BaseModel):
    symbol: str
    size: Decimal
    opened: datetime


def dumps(value: object) -> object:
    return orjson.loads(orjson.dumps(value, default=to_json_value, option=DUMPS_OPTIONS))


def test_decimal_encodes_as_exact_json_number() -> None:
    raw = orjson.dumps(
        {"p": Decimal("45000.123456789012345"), "n": Decimal("NaN")},
        default=to_json_value,
        option=DUMPS_OPTIONS,
    )
    assert raw == b'{"p":45000.123456789012345,"n":null}'


def test_datetimes_are_iso_utc() -> None:
    paris = timezone(timedelta(hours=2))
    assert dumps(
        {
            "aware": datetime(2024, 1, 20, 12, 30, tzinfo=paris),
            "naive": datetime(2024, 1, 20, 10, 30, 0, 123000),
            "utc": datetime(2024, 1, 20, 10, 30, tzinfo=UTC),
            "day": date(2024, 1, 20),
        }
    ) == {
        "aware": "2024-01-20T10:30:00Z",
        "naive": "2024-01-20T10:30:00.123000Z",
        "utc": "2024-01-20T10:30:00Z",
        "day": "2024-01-20",
    }


def test_pydantic_dataclass_enum_and_numpy_values() -> None:
    at = datetime(2024, 1, 20, 10, 30, tzinfo=UTC)
    assert dumps(
        {
            "position": Position(symbol="BTC-USD", size=Decimal("0.1"), opened=at),
            "fill": Fill(Decimal("45000.5"), at),
            "side": Side.BUY,
            "rsi": np.float64(45.2),
            "count": np.int64(3),
            "closes": np.array([1.5, 2.5]),
            "every_other": np.arange(6, dtype=np.int32)[::2],
            "flag": np.bool_(True),
            "tags": {"x"},
        }
    ) == {
        "position": {"symbol": "BTC-USD", "size": 0.1, "opened": "2024-01-20T10:30:00Z"},
        "fill": {"price": 45000.5, "at": "2024-01-20T10:30:00Z"},
        "side": "buy",
        "rsi": 45.2,
        "count": 3,
        "closes": [1.5, 2.5],
        "every_other": [0, 2, 4],
        "flag": True,
        "tags": ["x"],
    }


def test_event_data_accepts_objects_and_rejects_the_rest() -> None:
    at = datetime(2024, 1, 20, tzinfo=UTC)
    assert event_data("t", Position(symbol="X", size=Decimal(1), opened=at))["symbol"] == "X"
    assert event_data("t", Fill(Decimal(1), at)) == {"price": Decimal(1), "at": at}
    for bad in ([1, 2], "text", 3, None):
        with pytest.raises(InvalidEventError, match="must be a JSON object"):
            event_data("market_data", bad)


def test_disabled_publisher_is_a_no_op() -> None:
    publisher = Publisher.from_env({})
    assert not publisher.settings.enabled
    publisher.publish("market_data", {"symbol": "BTC-USD", "price": 1.0})
    publisher.publish_error("x")
    status = publisher.status()
    assert status["enabled"] is False
    assert status["connected"] is False
    assert status["published"] == 0
    publisher.close()


@pytest.mark.parametrize("interval", [0.0, 1.0])
def test_oversized_events_raise_at_once_on_every_path(tmp_path: Path, interval: float) -> None:
    # interval 1.0 sends market data through the publish-interval gate, 0.0 straight out
    publisher = Publisher(
        url=f"ipc://{tmp_path}/nobody.sock", publish_interval=interval, heartbeat_interval=0
    )
    huge = "x" * (1024 * 1024 + 1)
    try:
        with pytest.raises(InvalidEventError, match="bus limit"):
            publisher.publish_market_data("BTC-USD", 1.0, note=huge)
        with pytest.raises(InvalidEventError, match="bus limit"):
            publisher.publish("ai_decision", {"reasoning": huge})
        # data under the limit whose envelope takes it over
        nearly = "x" * (1024 * 1024 - 60)
        with pytest.raises(InvalidEventError, match="bus limit"):
            publisher.publish_market_data("BTC-USD", 1.0, note=nearly)
        with pytest.raises(InvalidEventError, match="bus limit"):
            publisher.publish("ai_decision", {"reasoning": nearly})
        assert publisher.status()["queued"] == 0
    finally:
        publisher.close(timeout=0.5)
