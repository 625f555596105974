"""WebSocket-publish intake: a publishing connection's event turned into bus frames. Pure.

Checks the connection's right to publish and the topic against its grant, gives the
connection its source and epoch, numbers its events per (source, epoch, topic) (or keeps
the numbers the publisher sent, refusing one already seen) and encodes the three frames
the bus carries (bus/envelope.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from bridge.client import Client
from bridge.protocol import PublishRequest, RequestError
from bridge.stats import HubStats
from bus.envelope import encode_event
from bus.errors import TopicError
from bus.topics import make_topic


class Intake:
    def __init__(self, stats: HubStats, symbol_keyed: Iterable[str]) -> None:
        self.stats = stats
        # types whose topic is "<type>.<symbol>" when the event names a symbol
        self.symbol_keyed = frozenset(symbol_keyed)
        self.published_seq: dict[tuple[str, int, str], int] = {}
        self._ws_publishers = itertools.count(1)

    def publish(self, client: Client, request: PublishRequest, now_ns: int) -> list[bytes] | None:
        """The bus frames for a publisher's event, or None when it is a duplicate."""
        if not client.may_publish:
            self.stats.reject_publish("forbidden")
            raise RequestError(
                "publish_forbidden",
                "this connection may not publish (needs a publish token naming a source, or "
                "--allow-publish and a loopback connection without an Origin header)",
                request.request_id,
            )
        topic = request.topic or self.derive_topic(request.type, request.data)
        if not client.grant.allows_topic(topic):
            raise RequestError(
                "publish_forbidden",
                f"your token does not allow topic {topic!r}",
                request.request_id,
            )
        if not client.source:
            # a credential publishes as the first source it names (it may name no other)
            named = client.grant.sources
            client.source = named[0] if named else f"ws-{next(self._ws_publishers)}"
        if not client.epoch:
            client.epoch = now_ns
        key = (client.source, client.epoch, topic)
        last = self.published_seq.get(key, 0)
        if request.seq is not None:
            if request.seq <= last:
                self.stats.reject_publish("duplicate")
                return None
            seq = request.seq
        else:
            seq = last + 1
        self.published_seq[key] = seq
        self.stats.published += 1
        return encode_event(
            topic,
            request.type,
            request.data,
            client.source,
            client.epoch,
            seq,
            publish_ns=now_ns,
            timestamp=request.timestamp,
        )

    def derive_topic(self, type_name: str, data: dict[str, Any]) -> str:
        symbol = data.get("symbol")
        if type_name in self.symbol_keyed and isinstance(symbol, str):
            try:
                return make_topic(type_name, symbol)
            except TopicError:
                pass
        return type_name
