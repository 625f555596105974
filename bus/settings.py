"""A setting as the user gave it, and the one line it gets when it is wrong.

A value reaches tradebus as a command-line flag, an environment variable or a keyword
argument. Its error names that one (never another spelling of the same setting), the
value as given and the form expected, for example::

    TRADEBUS__BRIDGE_PORT='abc': expected a port number 0..65535

The proxy's and the bridge's commands and the publisher's settings all word their errors
through ``bad_value``; ``Form`` turns text into a value or that error. No I/O.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, NamedTuple, TypeVar

T = TypeVar("T")

HIDDEN: Final = "<hidden>"
ENDPOINT_FORM: Final = "a ZeroMQ endpoint tcp://host:port or ipc://path"
_NOT_BUS: Final = {
    "ws": "ws:// is a bridge's WebSocket URL",
    "wss": "wss:// is a bridge's WebSocket URL",
    "http": "http:// is a bridge's web address",
    "https": "https:// is a bridge's web address",
}


@dataclass(frozen=True, slots=True)
class Given:
    """A value and the name the user gave it under: ``--port``, ``TRADEBUS__BRIDGE_PORT``..."""

    name: str
    text: str
    secret: bool = False

    @property
    def shown(self) -> str:
        return HIDDEN if self.secret else repr(self.text)


def bad_value(name: str, value: object, expected: str, *, secret: bool = False) -> str:
    """The one line for a bad setting: ``NAME='value': expected FORM``."""
    shown = HIDDEN if secret else repr(value)
    return f"{name}={shown}: expected {expected}"


def pick(
    flag: str,
    flag_value: str | None,
    variable: str,
    environ: Mapping[str, str],
    *,
    secret: bool = False,
) -> Given | None:
    """The flag when it was given, else the environment variable when it is set, else None."""
    if flag_value is not None:
        return Given(flag, flag_value, secret)
    raw = environ.get(variable)
    if raw is not None:
        return Given(variable, raw, secret)
    return None


@dataclass(frozen=True, slots=True)
class Form(Generic[T]):
    """What a setting must look like: ``expected`` says it, ``convert`` raises ValueError."""

    expected: str
    convert: Callable[[str], T]

    def parse(self, given: Given, error: Callable[[str], Exception]) -> T:
        """The value of ``given``, or ``error(one line)`` raised."""
        try:
            return self.convert(given.text.strip())
        except (ValueError, TypeError) as problem:
            hint = f" ({problem})" if isinstance(problem, HintError) else ""
            line = bad_value(given.name, given.text, self.expected, secret=given.secret)
            raise error(line + hint) from None


class HintError(ValueError):
    """A ValueError whose text is worth adding to the one line (why, not only what)."""


def whole_number(low: int = 1, high: int | None = None, what: str = "") -> Form[int]:
    """A whole number in ``low..high`` (no upper bound when ``high`` is None)."""
    noun = what or "a whole number"
    if high is not None:
        expected = f"{noun} {low}..{high}"
    else:
        expected = f"{noun} above 0" if low == 1 else f"{noun} >= {low}"

    def convert(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise ValueError(text)
        return value

    return Form(expected, convert)


def number(low: float = 0.0, *, above: bool = True, what: str = "a number") -> Form[float]:
    """A finite number above ``low`` (``above=False``: ``low`` or more)."""
    expected = f"{what} {'above' if above else '>='} {low:g}"

    def convert(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value < low or (above and value == low):
            raise ValueError(text)
        return value

    return Form(expected, convert)


def boolean() -> Form[bool]:
    def convert(text: str) -> bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(text)

    return Form("true or false", convert)


def check_endpoint(text: str, *, bind: bool = False) -> str:
    """``text`` if it is a ZeroMQ endpoint tradebus uses, else HintError / ValueError.

    tcp://host:port and ipc://path, inproc://name for tests and embedding; binding also
    takes ``*`` as host or port (any interface, a free port).
    """
    scheme, sep, rest = text.partition("://")
    if not sep or not rest:
        raise ValueError(text)
    if scheme in _NOT_BUS:
        raise HintError(f"{_NOT_BUS[scheme]}; the bus speaks tcp:// or ipc://")
    if scheme in ("ipc", "inproc"):
        return text
    if scheme != "tcp":
        raise ValueError(text)
    host, colon, port = rest.rpartition(":")
    if not colon or not host or "/" in rest:
        raise ValueError(text)
    if bind and port == "*":
        return text
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(text)
    return text


def endpoint(*, bind: bool = False, optional: bool = False) -> Form[str]:
    """A ZeroMQ endpoint (``optional``: or '' for none)."""
    expected = ENDPOINT_FORM + (" (or '' for none)" if optional else "")

    def convert(text: str) -> str:
        if optional and not text:
            return ""
        return check_endpoint(text, bind=bind)

    return Form(expected, convert)


class Option(NamedTuple):
    """A command-line flag that also has an environment variable."""

    variable: str
    form: Form[Any]
    default: Any
    help: str


def add_options(parser: argparse.ArgumentParser, options: Mapping[str, Option]) -> None:
    """The flags, kept as text: ``resolve_options`` parses them after argparse is done."""
    for flag, option in options.items():
        shown = "off" if option.default is None else option.default
        parser.add_argument(flag, help=f"{option.help} [{option.variable}; default {shown}]")


def resolve_options(
    args: argparse.Namespace,
    options: Mapping[str, Option],
    environ: Mapping[str, str],
    error: Callable[[str], Exception],
) -> None:
    """Replace each option's text on ``args`` by its value: the flag's, else the variable's,
    else the default; a bad one raises ``error`` naming the one that was given."""
    for flag, option in options.items():
        dest = flag[2:].replace("-", "_")
        given = pick(flag, getattr(args, dest), option.variable, environ)
        setattr(args, dest, option.default if given is None else option.form.parse(given, error))
