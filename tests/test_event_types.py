"""The event-type lists exist once (bus/event_types.py): the publisher, the bridge and
tradebus.js all follow them, and the JavaScript copy is exactly the generated block."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bot_client import core
from bridge.config import BridgeConfig
from bridge.hub import Hub
from bus.event_types import CONFLATABLE_TYPES, JS_BEGIN, JS_END, SYMBOL_KEYED_TYPES, js_block

TRADEBUS_JS = Path(__file__).resolve().parent.parent / "bridge" / "static" / "tradebus.js"


def js_set(name: str) -> frozenset[str]:
    """The strings of ``const NAME = new Set([...])`` in tradebus.js."""
    found = re.search(rf"const {name} = new Set\((\[.*?\])\);", TRADEBUS_JS.read_text(), re.S)
    assert found is not None, f"tradebus.js defines no {name}"
    return frozenset(json.loads(found.group(1)))


def test_the_browser_client_leaves_out_the_types_the_publisher_and_bridge_conflate() -> None:
    assert js_set("CONFLATABLE") == CONFLATABLE_TYPES == core.CONFLATABLE_TYPES
    assert frozenset(BridgeConfig().conflate_types) == CONFLATABLE_TYPES
    assert Hub().conflate_types == CONFLATABLE_TYPES


def test_tradebus_js_holds_the_generated_block_unchanged() -> None:
    text = TRADEBUS_JS.read_text()
    start, end = text.index(JS_BEGIN), text.index(JS_END) + len(JS_END)
    assert text[start:end] == js_block(), (
        "bridge/static/tradebus.js: replace the block between its BEGIN and END markers "
        "with bus.event_types.js_block()"
    )


def test_symbol_keyed_types_are_the_publishers_and_the_bridges() -> None:
    assert core.SYMBOL_KEYED_TYPES is SYMBOL_KEYED_TYPES
    # the bridge's WebSocket-publish intake derives topics (bridge/intake.py)
    intake = Hub().intake
    assert intake.derive_topic("indicator_update", {"symbol": "BTC-USD"}) == (
        "indicator_update.BTC-USD"
    )
    assert intake.derive_topic("trading_decision", {"symbol": "BTC-USD"}) == "trading_decision"
    assert CONFLATABLE_TYPES <= SYMBOL_KEYED_TYPES  # state is kept per symbol
