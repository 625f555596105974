"""Topic grammar, pattern matching and the pattern index: pure, property-based where it pays."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.errors import TopicError
from bus.topics import (
    KEY_MAX_LEN,
    TYPE_MAX_LEN,
    Pattern,
    PatternIndex,
    make_topic,
    minimal_prefixes,
    pattern_matches,
    validate_source,
    validate_topic,
)


@pytest.mark.parametrize(
    "topic",
    [
        "trading_decision",
        "market_data.BTC-USD",
        "market_data.BTC/USD",
        "position_update.ETH-PERP",
        "indicator_update.SPX:IDX",
        "a",
        "A1_b.x",
        "t" * TYPE_MAX_LEN,
        "t." + "k" * KEY_MAX_LEN,
        "trade_execution.BTC+USD@binance#1=a~b",
    ],
)
def test_valid_topics_are_accepted(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "complaint"),
    [
        ("", "empty"),
        (".BTC-USD", "empty"),
        ("market_data.", "empty"),
        ("market_data..BTC", "invalid"),
        ("market_data.BTC.USD", "invalid"),
        ("1market", "start with a letter"),
        ("_market", "start with a letter"),
        ("market data", "invalid"),
        ("market_data.BTC USD", "invalid"),
        ("market_data.*", "invalid"),
        ("*", "invalid"),
        ("marché", "invalid"),
        ("market_data.BTC€", "invalid"),
        ("t" * (TYPE_MAX_LEN + 1), "longer than 64"),
        ("t." + "k" * (KEY_MAX_LEN + 1), "longer than 128"),
        ("\x00sync.abc", "invalid"),
    ],
)
def test_invalid_topics_are_rejected_saying_why(topic: str, complaint: str) -> None:
    with pytest.raises(TopicError, match=re.escape(complaint)):
        validate_topic(topic)


def test_non_string_topic_is_rejected() -> None:
    with pytest.raises(TopicError, match="must be a string"):
        validate_topic(b"market_data")


def test_topic_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        validate_topic("")


def test_make_topic_builds_and_validates() -> None:
    assert make_topic("market_data", "BTC/USD") == "market_data.BTC/USD"
    assert make_topic("trading_decision") == "trading_decision"
    with pytest.raises(TopicError):
        make_topic("market_data", "BTC USD")


@pytest.mark.parametrize("source", ["bot-1", "1", "ai.trader:7", "a" * 64])
def test_valid_sources(source: str) -> None:
    assert validate_source(source) == source


@pytest.mark.parametrize("source", ["", "-bot", "bot 1", "a" * 65, "bot/1"])
def test_invalid_sources(source: str) -> None:
    with pytest.raises(TopicError, match="source id"):
        validate_source(source)


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        (
            "market_data",
            ["market_data", "market_data.BTC-USD"],
            ["market_datax", "market_datax.BTC-USD", "ai_decision"],
        ),
        (
            "market_data.BTC-USD",
            ["market_data.BTC-USD"],
            ["market_data.BTC-USDT", "market_data", "market_data.ETH-USD"],
        ),
        (
            "*.BTC-USD",
            ["market_data.BTC-USD", "position_update.BTC-USD"],
            ["market_data.ETH-USD", "ai_decision", "market_data.BTC-USDT"],
        ),
        ("*", ["ai_decision", "market_data.BTC/USD"], []),
        ("market_data.*", ["market_data.X"], ["market_data", "ai_decision.X"]),
    ],
)
def test_documented_pattern_examples(
    pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    for topic in matching:
        assert pattern_matches(pattern, topic), (pattern, topic)
    for topic in not_matching:
        assert not pattern_matches(pattern, topic), (pattern, topic)


@pytest.mark.parametrize(
    "pattern", ["", "market_data.", ".x", "a.b.c", "market data", "mar*", "*x", "1abc"]
)
def test_invalid_patterns_are_rejected(pattern: str) -> None:
    with pytest.raises(TopicError):
        Pattern(pattern)


# -- property-based: matching against an independent reference --------------------------

TYPE_CHARS = "abcXY_1"
KEY_CHARS = "AB-/:1_"
types = st.text(TYPE_CHARS, min_size=1, max_size=4).filter(lambda t: t[0].isalpha())
keys = st.text(KEY_CHARS, min_size=1, max_size=4)
topics = st.one_of(types, st.tuples(types, keys).map(".".join))
patterns = st.one_of(
    st.one_of(types, st.just("*")),
    st.tuples(st.one_of(types, st.just("*")), st.one_of(keys, st.just("*"))).map(".".join),
)


def reference_matches(pattern: str, topic: str) -> bool:
    """The rule of docs/protocol.md as a regular expression built from the pattern text."""
    parts = [r"[^.]+" if token == "*" else re.escape(token) for token in pattern.split(".")]
    return re.fullmatch(r"\.".join(parts) + r"(\..+)?", topic) is not None


@settings(max_examples=500, deadline=None)
@given(patterns, topics)
def test_pattern_matching_agrees_with_the_reference(pattern: str, topic: str) -> None:
    assert Pattern(pattern).matches(topic) == reference_matches(pattern, topic)


@settings(max_examples=300, deadline=None)
@given(patterns, topics)
def test_zmq_prefix_never_hides_a_matching_topic(pattern: str, topic: str) -> None:
    if Pattern(pattern).matches(topic):
        assert topic.encode().startswith(Pattern(pattern).zmq_prefix)


@settings(max_examples=200, deadline=None)
@given(st.lists(patterns, min_size=1, max_size=6), topics)
def test_minimal_prefixes_cover_every_pattern(pattern_texts: list[str], topic: str) -> None:
    parsed = [Pattern(p) for p in pattern_texts]
    prefixes = minimal_prefixes(parsed)
    if any(p.matches(topic) for p in parsed):
        assert any(topic.encode().startswith(prefix) for prefix in prefixes)
    for prefix in prefixes:
        assert not any(other != prefix and prefix.startswith(other) for other in prefixes)


# -- PatternIndex against brute force ------------------------------------------------------

operations = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "drop"]), st.integers(0, 4), patterns),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(operations, st.lists(topics, min_size=1, max_size=8))
def test_pattern_index_agrees_with_brute_force(
    ops: list[tuple[str, int, str]], probe_topics: list[str]
) -> None:
    index: PatternIndex[int] = PatternIndex()
    held: dict[int, set[str]] = {}
    for op, subscriber, text in ops:
        pattern = Pattern(text)
        if op == "add":
            assert index.add(pattern, subscriber) == (text not in held.get(subscriber, set()))
            held.setdefault(subscriber, set()).add(text)
        elif op == "remove":
            assert index.remove(pattern, subscriber) == (text in held.get(subscriber, set()))
            held.get(subscriber, set()).discard(text)
        else:
            index.remove_subscriber(subscriber)
            held.pop(subscriber, None)
        # match between mutations too, so a stale cached answer would show
        for topic in probe_topics:
            expected = {
                s for s, texts in held.items() if any(Pattern(t).matches(topic) for t in texts)
            }
            assert index.match(topic) == expected
    assert index.all_patterns() == {Pattern(t) for texts in held.values() for t in texts}
    for subscriber, texts in held.items():
        assert index.patterns_of(subscriber) == {Pattern(t) for t in texts}
