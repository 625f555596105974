"""Where a tradebus deployment listens by default, and the variables that move it.

The proxy binds these, and everything that reaches it (bridge, subscribers, record,
replay, ``tradebus up``) connects to the same ones unless told otherwise. The bridge's
address is here too because bots (bot_client) and tools (tap) default to it, and they
may not import the bridge. No I/O.
"""

from __future__ import annotations

from typing import Final

# the proxy: publishers -> XSUB (frontend), XPUB (backend) -> subscribers, snapshot service
DEFAULT_FRONTEND: Final = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND: Final = "tcp://127.0.0.1:5556"
DEFAULT_SNAPSHOT: Final = "tcp://127.0.0.1:5557"
FRONTEND_VARIABLE: Final = "TRADEBUS__PROXY_FRONTEND"
BACKEND_VARIABLE: Final = "TRADEBUS__PROXY_BACKEND"
SNAPSHOT_VARIABLE: Final = "TRADEBUS__PROXY_SNAPSHOT"

# the bridge: HTTP and WebSocket on one port; /ws is where browsers and guide bots connect
DEFAULT_BRIDGE_HOST: Final = "127.0.0.1"
DEFAULT_BRIDGE_PORT: Final = 8000
# the guide's SYSTEM__WEBSOCKET_DASHBOARD_URL default, which tap uses too
DEFAULT_BRIDGE_URL: Final = f"ws://localhost:{DEFAULT_BRIDGE_PORT}/ws"
