"""Turning the values a bot really has into the JSON the guide's messages carry.

orjson encodes str/int/float/bool/None, dict, list, tuple, enums, dataclasses, UUIDs and
(with OPT_SERIALIZE_NUMPY) numpy arrays and scalars natively; ``to_json_value`` handles the
rest: Decimal as an exact JSON number, datetimes as ISO-8601 UTC with ``Z``, pydantic models,
sets, non-contiguous numpy arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, Final

import orjson

from bot_client.errors import InvalidEventError
from bus.envelope import MAX_PAYLOAD_BYTES

DUMPS_OPTIONS: Final = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_PASSTHROUGH_DATETIME
)


def format_datetime(value: datetime) -> str:
    """ISO-8601 in UTC with a ``Z``; a naive datetime is taken to be UTC already."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat() + "Z"


def to_json_value(value: Any) -> Any:
    """orjson ``default``: a JSON-encodable stand-in for ``value`` or TypeError."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        # the exact digits the bot computed, as a JSON number, not a rounded float
        return orjson.Fragment(str(value))
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, date | time):
        return value.isoformat()
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump) and not isinstance(value, type):
        return model_dump()
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        # numpy arrays orjson does not take natively (non-contiguous, object dtype, ...)
        return tolist()
    if isinstance(value, set | frozenset):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON-encodable")


def event_data(type_name: str, data: Any) -> dict[Any, Any]:
    """``data`` as a dict, or InvalidEventError: the guide's ``data`` is always an object."""
    if isinstance(data, dict):
        return data
    if isinstance(data, Mapping):
        return dict(data)
    model_dump = getattr(data, "model_dump", None)
    if callable(model_dump) and not isinstance(data, type):
        dumped = model_dump()
        if isinstance(dumped, dict):
            return dumped
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    raise InvalidEventError(
        f"data of event {type_name!r} must be a JSON object (a dict, mapping, dataclass or "
        f"pydantic model), got {type(data).__name__}"
    )


def dumps_data(type_name: str, data: dict[Any, Any]) -> bytes:
    """Encode the data object alone (events held before their envelope is built).

    Raises InvalidEventError when it cannot be encoded or cannot fit in a bus payload.
    """
    try:
        encoded = orjson.dumps(data, default=to_json_value, option=DUMPS_OPTIONS)
    except TypeError as error:
        raise unencodable(type_name, error) from None
    if len(encoded) > MAX_PAYLOAD_BYTES:
        raise InvalidEventError(
            f"data of event {type_name!r} encodes to {len(encoded)} bytes; the bus limit "
            f"is {MAX_PAYLOAD_BYTES}"
        )
    return encoded


def unencodable(type_name: str, error: Exception) -> InvalidEventError:
    # orjson reports an exception raised while converting a value (model_dump, tolist) as
    # "Type is not JSON serializable"; the cause says what really failed
    cause = f" ({error.__cause__!r})" if error.__cause__ is not None else ""
    return InvalidEventError(f"data of event {type_name!r} is not JSON-encodable: {error}{cause}")
