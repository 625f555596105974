"""Topics, patterns and the pattern index: pure functions, no I/O.

Grammar (docs/protocol.md is the reference):

    topic   = type [ "." key ]
    type    = letter *( letter / digit / "_" )          1..64 characters
    key     = keychar *( keychar )                       1..128 characters
    keychar = letter / digit / "_" / "-" / "/" / ":" / "+" / "@" / "#" / "=" / "~"
    pattern = ptoken [ "." ptoken ]      ptoken = the token of that position, or "*"

A pattern matches a topic when each pattern token equals the topic token at the same
position or is ``*``, and the topic has at least as many tokens as the pattern: so
``market_data`` matches ``market_data`` and ``market_data.BTC-USD`` (sub-topics, on token
boundaries, never ``market_datax``), ``*.BTC-USD`` matches every type's ``BTC-USD`` topic,
and ``*`` matches every topic.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from typing import Final, Generic, TypeVar

from bus.errors import TopicError

TYPE_MAX_LEN: Final = 64
KEY_MAX_LEN: Final = 128
TOPIC_MAX_LEN: Final = TYPE_MAX_LEN + 1 + KEY_MAX_LEN
SOURCE_MAX_LEN: Final = 64
WILDCARD: Final = "*"

_TYPE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_KEY_RE: Final = re.compile(r"[A-Za-z0-9_\-/:+@#=~]+\Z")
_SOURCE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]*\Z")
_KEY_CHARS_TEXT: Final = "letters, digits and _ - / : + @ # = ~"


def validate_type(name: object) -> str:
    """Return ``name`` if it is a valid event type, else raise TopicError saying why."""
    if not isinstance(name, str):
        raise TopicError(f"event type must be a string, got {type(name).__name__}")
    if not name:
        raise TopicError("event type is empty")
    if len(name) > TYPE_MAX_LEN:
        raise TopicError(f"event type {name[:20]!r}... is longer than {TYPE_MAX_LEN} characters")
    if not _TYPE_RE.match(name):
        raise TopicError(
            f"event type {name!r} is invalid: it must start with a letter and hold only "
            "letters, digits and underscores"
        )
    return name


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid topic key (e.g. a symbol), else raise TopicError."""
    if not isinstance(key, str):
        raise TopicError(f"topic key must be a string, got {type(key).__name__}")
    if not key:
        raise TopicError("topic key is empty")
    if len(key) > KEY_MAX_LEN:
        raise TopicError(f"topic key {key[:20]!r}... is longer than {KEY_MAX_LEN} characters")
    if not _KEY_RE.match(key):
        raise TopicError(f"topic key {key!r} is invalid: it may hold only {_KEY_CHARS_TEXT}")
    return key


def make_topic(type_name: str, key: str | None = None) -> str:
    """Build the topic ``type`` or ``type.key``, validating both parts."""
    validate_type(type_name)
    if key is None:
        return type_name
    return f"{type_name}.{validate_key(key)}"


def validate_topic(topic: object) -> str:
    """Return ``topic`` if it follows the topic grammar, else raise TopicError."""
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, got {type(topic).__name__}")
    type_name, dot, key = topic.partition(".")
    validate_type(type_name)
    if dot:
        validate_key(key)
    return topic


def validate_source(source: object) -> str:
    """Return ``source`` if it is a valid source id, else raise TopicError."""
    if not isinstance(source, str):
        raise TopicError(f"source id must be a string, got {type(source).__name__}")
    if not 0 < len(source) <= SOURCE_MAX_LEN or not _SOURCE_RE.match(source):
        raise TopicError(
            f"source id {source!r} is invalid: 1..{SOURCE_MAX_LEN} characters, starting with "
            "a letter or digit, then letters, digits and _ . : -"
        )
    return source


class Pattern:
    """A parsed subscription pattern; build with ``Pattern(text)``, test with ``matches``."""

    __slots__ = ("text", "tokens")

    def __init__(self, text: object) -> None:
        if not isinstance(text, str):
            raise TopicError(f"pattern must be a string, got {type(text).__name__}")
        if not text:
            raise TopicError("pattern is empty (use '*' for every topic)")
        tokens = tuple(text.split("."))
        if len(tokens) > 2:
            raise TopicError(f"pattern {text!r} has {len(tokens)} tokens; at most 2 (type.key)")
        for position, token in enumerate(tokens):
            if token == WILDCARD:
                continue
            try:
                (validate_type if position == 0 else validate_key)(token)
            except TopicError as error:
                raise TopicError(f"pattern {text!r}: {error}") from None
        self.text: str = text
        self.tokens: tuple[str, ...] = tokens

    def matches(self, topic: str) -> bool:
        """Whether this pattern matches ``topic`` (assumed valid)."""
        topic_tokens = topic.split(".")
        if len(topic_tokens) < len(self.tokens):
            return False
        return all(p in (WILDCARD, t) for p, t in zip(self.tokens, topic_tokens, strict=False))

    @property
    def zmq_prefix(self) -> bytes:
        """The ZeroMQ subscription prefix that receives at least every matching topic.

        ZeroMQ filters by byte prefix, so it may also deliver non-matching topics
        (``market_data.BTC`` receives ``market_data.BTCX``); receivers re-check with ``matches``.
        """
        literal: list[str] = []
        for token in self.tokens:
            if token == WILDCARD:
                break
            literal.append(token)
        return ".".join(literal).encode()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


def pattern_matches(pattern: str, topic: str) -> bool:
    """Pure matching function: does ``pattern`` match ``topic``? Both are validated."""
    return Pattern(pattern).matches(validate_topic(topic))


def minimal_prefixes(patterns: Iterable[Pattern]) -> set[bytes]:
    """ZeroMQ prefixes covering ``patterns`` with none that another already covers."""
    prefixes = sorted({p.zmq_prefix for p in patterns})
    kept: list[bytes] = []
    for prefix in prefixes:
        if not any(prefix.startswith(shorter) for shorter in kept):
            kept.append(prefix)
    return set(kept)


Subscriber = TypeVar("Subscriber", bound=Hashable)


class PatternIndex(Generic[Subscriber]):
    """Maps topics to the subscribers whose patterns match them.

    Lookup cost depends on the topic's depth and the subscribers that match, not on how
    many unrelated subscribers exist: patterns are stored in a token trie, and each
    topic's answer is cached until the subscriptions change.
    """

    __slots__ = ("_cache", "_patterns", "_trie")

    def __init__(self) -> None:
        # trie node: token -> (subscribers ending at this node, children)
        self._trie: dict[str, tuple[set[Subscriber], dict[str, object]]] = {}
        self._patterns: dict[Subscriber, set[Pattern]] = {}
        self._cache: dict[str, frozenset[Subscriber]] = {}

    def add(self, pattern: Pattern, subscriber: Subscriber) -> bool:
        """Subscribe; returns False when ``subscriber`` already had ``pattern``."""
        owned = self._patterns.setdefault(subscriber, set())
        if pattern in owned:
            return False
        owned.add(pattern)
        self._node(pattern, create=True)[0].add(subscriber)  # type: ignore[index]
        self._cache.clear()
        return True

    def remove(self, pattern: Pattern, subscriber: Subscriber) -> bool:
        """Unsubscribe; returns False when ``subscriber`` did not have ``pattern``."""
        owned = self._patterns.get(subscriber)
        if owned is None or pattern not in owned:
            return False
        owned.discard(pattern)
        if not owned:
            del self._patterns[subscriber]
        node = self._node(pattern, create=False)
        if node is not None:
            node[0].discard(subscriber)
        self._cache.clear()
        return True

    def remove_subscriber(self, subscriber: Subscriber) -> None:
        """Drop every pattern of ``subscriber``."""
        for pattern in list(self._patterns.get(subscriber, ())):
            self.remove(pattern, subscriber)

    def patterns_of(self, subscriber: Subscriber) -> frozenset[Pattern]:
        return frozenset(self._patterns.get(subscriber, ()))

    def all_patterns(self) -> set[Pattern]:
        """Every pattern some subscriber holds."""
        result: set[Pattern] = set()
        for owned in self._patterns.values():
            result |= owned
        return result

    def __len__(self) -> int:
        return len(self._patterns)

    def match(self, topic: str) -> frozenset[Subscriber]:
        """The subscribers with at least one pattern matching ``topic``."""
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        found: set[Subscriber] = set()
        level: list[dict[str, tuple[set[Subscriber], dict[str, object]]]] = [self._trie]
        for token in topic.split("."):
            next_level: list[dict[str, tuple[set[Subscriber], dict[str, object]]]] = []
            for children in level:
                for key in (token, WILDCARD):
                    node = children.get(key)
                    if node is not None:
                        found |= node[0]
                        next_level.append(node[1])  # type: ignore[arg-type]
            level = next_level
            if not level:
                break
        result = frozenset(found)
        if len(self._cache) > 100_000:
            # topics are unbounded in principle; keep the cache bounded
            self._cache.clear()
        self._cache[topic] = result
        return result

    def _node(
        self, pattern: Pattern, *, create: bool
    ) -> tuple[set[Subscriber], dict[str, object]] | None:
        children: dict[str, object] = self._trie  # type: ignore[assignment]
        node: tuple[set[Subscriber], dict[str, object]] | None = None
        for token in pattern.tokens:
            found = children.get(token)
            if found is None:
                if not create:
                    return None
                found = (set(), {})
                children[token] = found
            node = found  # type: ignore[assignment]
            children = node[1]  # type: ignore[index]
        return node
