"""The event types with a rule attached, listed once for Python and the browser client.

``SYMBOL_KEYED_TYPES`` are published under ``<type>.<symbol>`` (docs/protocol.md, Topics).
``CONFLATABLE_TYPES`` are state: the latest event of a topic is its whole state, so a newer
one makes an older one redundant. The publisher's outbox drops a superseded one first, the
bridge replaces a slow client's queued one (its ``--conflate-types`` default), and
tradebus.js leaves their positions out of a resume first (the snapshot brings the latest).

bridge/static/tradebus.js cannot import Python: its copy of the lists is the block
``js_block()`` renders, and tests/test_event_types.py checks the file holds exactly that.
No I/O.
"""

from __future__ import annotations

import json
from typing import Final

SYMBOL_KEYED_TYPES: Final = frozenset(
    {"market_data", "position_update", "indicator_update", "trading_loop", "trade_execution"}
)
CONFLATABLE_TYPES: Final = frozenset({"market_data", "position_update"})

JS_BEGIN: Final = "// BEGIN event types: generated from bus/event_types.py, do not edit"
JS_END: Final = "// END event types"


def js_block() -> str:
    """The lines of tradebus.js between ``JS_BEGIN`` and ``JS_END``, markers included."""
    conflatable = json.dumps(sorted(CONFLATABLE_TYPES))
    return "\n".join(
        [
            JS_BEGIN,
            "// Types whose latest event is their whole state: a resume may fall back to a",
            "// snapshot for them.",
            f"const CONFLATABLE = new Set({conflatable});",
            JS_END,
        ]
    )
