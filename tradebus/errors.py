"""The commands' own error, below common.errors.TradebusError like every package's root.

TradebusError
└── ToolError      an operations tool (up, demo, tap, record, replay) could not do its job
    └── tradebus.record.RecordingError
"""

from __future__ import annotations

from common.errors import TradebusError


class ToolError(TradebusError):
    """An operations tool (up, demo, tap, record, replay) could not do its job."""
