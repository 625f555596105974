"""Settings: typed fields read from flags and environment variables, one line when wrong.

A value reaches tradebus as a command-line flag, an environment variable or a keyword
argument. Its error names that one (never another spelling of the same setting), the
value as given (a secret as ``<hidden>``) and the form expected, for example::

    TRADEBUS__BRIDGE_PORT='abc': expected a port number 0..65535

``Form`` is what a value must look like: it turns text into a value or that line, and
checks a value given directly. ``Setting`` is one typed field of a settings object: its
variable, its flag, its form and its default. The proxy's (bus.proxy_config), the
bridge's (bridge.config) and the publisher's settings (bot_client.settings) are each a
table of them, read by ``read``; ``fields_of`` builds the table of a dataclass whose
variables are a prefix plus the field's name. Every number and boolean is parsed here
and nowhere else. No I/O: the environment is passed in.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass
from dataclasses import fields as dataclass_fields
from typing import Any, Final, Generic, TypeVar

T = TypeVar("T")

HIDDEN: Final = "<hidden>"
ENDPOINT_FORM: Final = "a ZeroMQ endpoint tcp://host:port or ipc://path"
TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS: Final = frozenset({"0", "false", "no", "off", ""})
_NOT_BUS: Final = {
    "ws": "ws:// is a bridge's WebSocket URL",
    "wss": "wss:// is a bridge's WebSocket URL",
    "http": "http:// is a bridge's web address",
    "https": "https:// is a bridge's web address",
}

ErrorType = Callable[[str], Exception]


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
    """What a setting must look like: ``expected`` says it, ``convert`` raises ValueError.

    ``kind`` is the Python type of a value given directly (a keyword argument), which
    ``accepts`` checks as strictly as text: a bool is not a number, a number not a bool.
    """

    expected: str
    convert: Callable[[str], T]
    kind: type | tuple[type, ...] = str

    def parse(self, given: Given, error: ErrorType) -> T:
        """The value of ``given``, or ``error(one line)`` raised."""
        try:
            return self.convert(given.text.strip())
        except (ValueError, TypeError) as problem:
            hint = f" ({problem})" if isinstance(problem, HintError) else ""
            line = bad_value(given.name, given.text, self.expected, secret=given.secret)
            raise error(line + hint) from None

    def accepts(self, value: object) -> bool:
        """Whether ``value``, given as a Python value rather than text, has this form."""
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            return False
        try:
            self.convert(value if isinstance(value, str) else str(value))
        except (ValueError, TypeError):
            return False
        return True


class HintError(ValueError):
    """A ValueError whose text is worth adding to the one line (why, not only what)."""


def whole_number(
    low: int = 1, high: int | None = None, what: str = "", *, expected: str = ""
) -> Form[int]:
    """A whole number in ``low..high`` (no upper bound when ``high`` is None)."""
    noun = what or "a whole number"
    if not expected and high is not None:
        expected = f"{noun} {low}..{high}"
    elif not expected:
        expected = f"{noun} above 0" if low == 1 else f"{noun} >= {low}"

    def convert(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise ValueError(text)
        return value

    return Form(expected, convert, int)


def port_number(low: int = 0) -> Form[int]:
    """A TCP port, ``low``..65535 (0: any free port, where binding allows it)."""
    return whole_number(low, 65535, "a port number")


def number(
    low: float = 0.0,
    *,
    above: bool = True,
    below: float | None = None,
    what: str = "a number",
    expected: str = "",
) -> Form[float]:
    """A finite number above ``low`` (``above=False``: ``low`` or more), under ``below``."""
    expected = expected or f"{what} {'above' if above else '>='} {low:g}"

    def convert(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value < low or (above and value == low):
            raise ValueError(text)
        if below is not None and value >= below:
            raise ValueError(text)
        return value

    return Form(expected, convert, (int, float))


def boolean() -> Form[bool]:
    def convert(text: str) -> bool:
        lowered = text.lower()
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
        raise ValueError(text)

    return Form("true or false", convert, bool)


def text(expected: str = "a value", *, required: bool = False) -> Form[str]:
    """Any text (``required``: not empty)."""

    def convert(value: str) -> str:
        if required and not value:
            raise ValueError(value)
        return value

    return Form(expected, convert)


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


@dataclass(frozen=True, slots=True)
class Setting:
    """One typed field of a settings object and every way a user may give it.

    ``field`` names the attribute (and the argparse ``dest``), ``variable`` the environment
    variable, ``flag`` the command-line flag (None: none). ``optional``: None is a value.
    """

    field: str
    variable: str
    form: Form[Any]
    flag: str | None = None
    default: Any = None
    help: str = ""
    secret: bool = False
    optional: bool = False
    aliases: tuple[str, ...] = ()

    def given(self, flag_text: str | None, environ: Mapping[str, str]) -> Given | None:
        return pick(self.flag or self.field, flag_text, self.variable, environ, secret=self.secret)

    def parse(self, text: str, error: ErrorType, name: str | None = None) -> Any:
        """The value of ``text`` given under ``name`` (default: the variable), or ``error``."""
        return self.form.parse(Given(name or self.variable, text, self.secret), error)

    def check(self, value: object, error: ErrorType, name: str | None = None) -> None:
        """Raise ``error`` naming ``name`` (default: the variable) unless ``value`` fits."""
        if value is None and self.optional:
            return
        if not self.form.accepts(value):
            shown = bad_value(name or self.variable, value, self.form.expected, secret=self.secret)
            raise error(shown)


def read(
    table: Iterable[Setting],
    environ: Mapping[str, str],
    error: ErrorType,
    *,
    flags: Mapping[str, str | None] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Field -> value of every setting given: as a value in ``overrides`` (None: not given),
    else as a flag (``flags``: its text by field), else as a variable; the others are left
    out, so their defaults apply. A bad one raises ``error`` naming the one given. The
    variable of an override is not read at all: the caller decided."""
    texts = flags or {}
    values = {name: value for name, value in (overrides or {}).items() if value is not None}
    for setting in table:
        if setting.field in values:
            continue
        given = setting.given(texts.get(setting.field), environ)
        if given is not None:
            values[setting.field] = setting.form.parse(given, error)
    return values


def fields_of(
    cls: type,
    prefix: str,
    form_of: Callable[[str, Any], Form[Any]],
    *,
    secret: Iterable[str] = (),
    help: Mapping[str, str] | None = None,
) -> tuple[Setting, ...]:
    """The settings of dataclass ``cls``: variable ``prefix + NAME``, flag ``--name``,
    form ``form_of(name, type)``, default the field's."""
    hidden = set(secret)
    hints = typing.get_type_hints(cls)
    table = []
    for field in dataclass_fields(cls):
        default = None if field.default is MISSING else field.default
        hint = hints[field.name]
        table.append(
            Setting(
                field.name,
                prefix + field.name.upper(),
                form_of(field.name, hint),
                flag="--" + field.name.replace("_", "-"),
                default=default,
                help=(help or {}).get(field.name, field.name),
                secret=field.name in hidden,
                optional=isinstance(hint, types.UnionType) and type(None) in hint.__args__,
            )
        )
    return tuple(table)


def _shown_default(setting: Setting) -> str:
    default = setting.default
    if default is None:
        return "off"
    if isinstance(default, tuple):
        return ",".join(default) or "none"
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def add_arguments(parser: argparse.ArgumentParser, table: Iterable[Setting]) -> None:
    """A flag for every setting that has one, kept as text (None when not given): ``read``
    or ``resolve`` parses it after argparse is done, so its error names the flag."""
    for setting in table:
        if setting.flag is None:
            continue
        shown = "" if setting.secret else f"; default {_shown_default(setting)}"
        kwargs: dict[str, Any] = {
            "dest": setting.field,
            "default": None,
            "help": f"{setting.help} [{setting.variable}{shown}]",
        }
        if setting.form.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:  # named after the flag, as argparse would, not after the field
            kwargs["metavar"] = setting.flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(setting.flag, *setting.aliases, **kwargs)


def flag_texts(args: argparse.Namespace, table: Iterable[Setting]) -> dict[str, str | None]:
    """Field -> the text of its flag as given (None: not given), for ``read``."""
    texts: dict[str, str | None] = {}
    for setting in table:
        value = getattr(args, setting.field, None)
        texts[setting.field] = str(value).lower() if isinstance(value, bool) else value
    return texts


def resolve(
    args: argparse.Namespace,
    table: Iterable[Setting],
    environ: Mapping[str, str],
    error: ErrorType,
) -> None:
    """Replace each setting's text on ``args`` by its value: the flag's, else the variable's,
    else the default; a bad one raises ``error`` naming the one that was given."""
    table = tuple(table)
    values = read(table, environ, error, flags=flag_texts(args, table))
    for setting in table:
        setattr(args, setting.field, values.get(setting.field, setting.default))


def argument(form: Form[T]) -> Callable[[str], T]:
    """``form`` as an argparse ``type``, for a flag that has no variable (argparse names it)."""

    def parse(text: str) -> T:
        try:
            return form.convert(text.strip())
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"expected {form.expected}, got {text!r}") from None

    return parse
