"""CURVE keys for the bus: key files, the proxy's authenticator, clients' start-up check.

A key is a CURVE key pair in pyzmq's certificate format (``zmq.auth``): ``NAME.key`` holds
the public key and, in its metadata, the source ids that key may publish as;
``NAME.key_secret`` holds the pair and never leaves the machine that uses it (mode 0600,
refused when group or others may read it).

The proxy reads one directory: its own pair ``proxy.key_secret`` and, as the list of who
may connect, every other ``NAME.key`` there; a client reads its own ``NAME.key_secret`` and
the proxy's public ``proxy.key``. The ZAP User-Id of an admitted peer is its key NAME, so
the proxy can check what that peer publishes against ``ServerKeys.sources_for(name)``.

A client cannot see a ZAP refusal in any reply: ``connect_checked`` (and
``connect_checked_async``) watch the socket's handshake events while it connects at
start-up and raise AuthError with one line naming the key.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import os
import re
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import zmq
import zmq.asyncio
import zmq.auth
import zmq.auth.thread
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from bus.errors import AuthError, KeyFileError
from bus.topics import validate_source
from monitoring.logging import get_logger

DEFAULT_KEYS_DIR: Final = "tradebus-keys"
PROXY_KEY_NAME: Final = "proxy"
ZAP_DOMAIN: Final = "tradebus"
PUBLIC_SUFFIX: Final = ".key"
SECRET_SUFFIX: Final = ".key_secret"
ROLE_PROXY: Final = "proxy"
ROLE_PUBLISHER: Final = "publisher"
ROLE_SUBSCRIBER: Final = "subscriber"
NAME_MAX_LEN: Final = 64
# how long a client's start-up waits for the proxy's verdict on its key
DEFAULT_HANDSHAKE_TIMEOUT: Final = 5.0
# fingerprints of refused keys remembered (to log each once); a peer that makes up a new
# key for every attempt must not grow this without bound
REFUSED_LOG_MEMORY: Final = 10_000

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_Z85_KEY_LEN: Final = 40
_SECRET_MODE: Final = 0o600
_PUBLIC_MODE: Final = 0o644
_HANDSHAKE_EVENTS: Final = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_CONNECT_RETRIED
)
_BANNER: Final = """#   ****  Generated on {now} by tradebus keys new  ****
#   ZeroMQ CURVE {kind} Certificate (pyzmq's zmq.auth format)
#   {advice}

"""


def fingerprint(public_key: bytes) -> str:
    """12 hex digits identifying a public key (z85), safe to log and to compare by eye."""
    try:
        raw = z85.decode(public_key)
    except (ValueError, KeyError, TypeError):
        raw = bytes(public_key)
    return hashlib.sha256(raw).hexdigest()[:12]


def validate_key_name(name: str) -> str:
    """``name`` if it can name a key (and so a file and a ZAP User-Id), else KeyFileError."""
    if not 0 < len(name) <= NAME_MAX_LEN or not _NAME_RE.match(name):
        raise KeyFileError(
            f"key name {name!r} is invalid: 1..{NAME_MAX_LEN} characters, starting with a "
            "letter or digit, then letters, digits and _ . -"
        )
    return name


@dataclass(frozen=True)
class KeyInfo:
    """One public certificate ``NAME.key``."""

    name: str
    public_key: bytes  # z85, 40 bytes
    role: str  # "proxy" | "publisher" (has sources) | "subscriber"
    sources: frozenset[str]
    path: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


@dataclass(frozen=True)
class ServerKeys:
    """What the proxy needs: its own pair and the keys it admits (z85 public key -> info)."""

    public_key: bytes
    secret_key: bytes = field(repr=False)
    authorized: Mapping[bytes, KeyInfo]

    def sources_for(self, user_id: str) -> frozenset[str]:
        """The sources key ``user_id`` (a key NAME, the ZAP User-Id) may publish as."""
        for info in self.authorized.values():
            if info.name == user_id:
                return info.sources
        return frozenset()

    def name_of(self, public_key: bytes) -> str | None:
        info = self.authorized.get(public_key)
        return info.name if info is not None else None


@dataclass(frozen=True)
class ClientKeys:
    """A client's own pair and the proxy's public key."""

    name: str
    public_key: bytes
    secret_key: bytes = field(repr=False)
    server_public_key: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


# -- files -------------------------------------------------------------------------------------
def _role(name: str, sources: frozenset[str]) -> str:
    if name == PROXY_KEY_NAME:
        return ROLE_PROXY
    return ROLE_PUBLISHER if sources else ROLE_SUBSCRIBER


def _certificate(
    kind: str, public_key: bytes, secret_key: bytes | None, meta: dict[str, str]
) -> str:
    advice = (
        "SECRET: keep it on the machine that uses it, mode 0600; never copy it to the proxy"
        if secret_key
        else "Public: copy it to the proxy's key directory to authorize this key"
    )
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines = [_BANNER.format(now=now, kind=kind, advice=advice), "metadata\n"]
    lines += [f'    {key} = "{value}"\n' for key, value in meta.items()]
    lines.append("curve\n")
    lines.append(f'    public-key = "{public_key.decode()}"\n')
    if secret_key:
        lines.append(f'    secret-key = "{secret_key.decode()}"\n')
    return "".join(lines)


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never a moment more open), never replace."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyFileError(_exists_message(path)) from None
    except OSError as error:
        raise KeyFileError(f"{path}: cannot create ({error.strerror})") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(fd, mode)  # the umask may have taken bits away; none are added
        out.write(text)


def _exists_message(path: Path) -> str:
    return (
        f"{path}: already exists; keys are never overwritten (to rotate: create a key with "
        "a new name, authorize it, switch the client to it, then delete the old files)"
    )


def create_key(directory: str | Path, name: str, sources: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) in ``directory``.

    ``sources`` are the source ids this key may publish as (none: it may only subscribe);
    the proxy's key takes none. Returns (public_path, secret_path). An existing key is
    never overwritten (KeyFileError).
    """
    validate_key_name(name)
    checked = sorted({validate_source(source) for source in sources})
    if name == PROXY_KEY_NAME and checked:
        raise KeyFileError("the proxy's key takes no --sources: it forwards, it never publishes")
    folder = Path(directory)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise KeyFileError(f"{folder}: cannot create the directory ({error.strerror})") from None
    public_path = folder / f"{name}{PUBLIC_SUFFIX}"
    secret_path = folder / f"{name}{SECRET_SUFFIX}"
    for path in (public_path, secret_path):
        if os.path.lexists(path):
            raise KeyFileError(_exists_message(path))
    public_key, secret_key = zmq.curve_keypair()
    meta = {
        "name": name,
        "role": _role(name, frozenset(checked)),
        "sources": ",".join(checked),
    }
    _write_new(secret_path, _certificate("Secret", public_key, secret_key, meta), _SECRET_MODE)
    try:
        _write_new(public_path, _certificate("Public", public_key, None, meta), _PUBLIC_MODE)
    except KeyFileError:
        secret_path.unlink()  # half a key is no key
        raise
    return public_path, secret_path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: missing") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path}: unreadable: is a directory, not a key file") from None
    except PermissionError:
        raise KeyFileError(f"{path}: unreadable: permission denied") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a CURVE certificate (not UTF-8 text)") from None
    except OSError as error:
        raise KeyFileError(f"{path}: unreadable: {error.strerror}") from None


def _metadata(text: str) -> dict[str, str]:
    """The ``metadata`` section of a ZPL certificate: ``    key = value`` lines."""
    values: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        if section == "metadata" and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip().strip("\"'")
    return values


def _z85_key(value: bytes | None, path: Path, what: str) -> bytes:
    if value is None:
        raise KeyFileError(f"{path}: not a CURVE certificate (no {what})")
    try:
        ok = len(value) == _Z85_KEY_LEN and len(z85.decode(value)) == 32
    except (ValueError, KeyError):
        ok = False
    if not ok:
        raise KeyFileError(f"{path}: the {what} is not a 40-character Z85 CURVE key")
    return value


def _certificate_keys(path: Path) -> tuple[bytes | None, bytes | None]:
    """(public, secret) as pyzmq's loader reads them; the text was read once already."""
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError):
        return None, None


def _check_private(path: Path) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: missing") from None
    except OSError as error:
        raise KeyFileError(f"{path}: unreadable: {error.strerror}") from None
    if os.path.isdir(path):
        raise KeyFileError(f"{path}: unreadable: is a directory, not a key file")
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: secret key file is readable by group/others (mode {mode:04o}); chmod 600 it"
        )


def read_public_key(path: Path) -> KeyInfo:
    """The public certificate at ``path`` (``NAME.key``)."""
    name = path.name.removesuffix(PUBLIC_SUFFIX)
    try:
        validate_key_name(name)
    except KeyFileError as error:
        raise KeyFileError(f"{path}: {error}") from None
    text = _read_text(path)
    public_key, _secret = _certificate_keys(path)
    public_key = _z85_key(public_key, path, "public key")
    listed = _metadata(text).get("sources", "")
    sources: set[str] = set()
    for source in (part.strip() for part in listed.split(",")):
        if source:
            try:
                sources.add(validate_source(source))
            except ValueError as error:
                raise KeyFileError(f"{path}: metadata sources: {error}") from None
    if name == PROXY_KEY_NAME and sources:
        raise KeyFileError(f"{path}: the proxy's key lists sources; it must not")
    frozen = frozenset(sources)
    return KeyInfo(name, public_key, _role(name, frozen), frozen, path)


def read_key_pair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from the secret certificate at ``path``, refused when too open."""
    _check_private(path)
    _read_text(path)
    public_key, secret_key = _certificate_keys(path)
    return (
        _z85_key(public_key, path, "public key"),
        _z85_key(secret_key, path, "secret key"),
    )


def _directory(directory: str | Path) -> Path:
    folder = Path(directory)
    if not folder.exists():
        raise KeyFileError(
            f"{folder}: no such key directory (create keys with `tradebus keys new NAME "
            f"--dir {folder}`)"
        )
    if not folder.is_dir():
        raise KeyFileError(f"{folder}: not a directory")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise KeyFileError(f"{folder}: unreadable: permission denied")
    return folder


def list_keys(directory: str | Path) -> list[KeyInfo]:
    """Every public certificate ``NAME.key`` in ``directory``, by name."""
    folder = _directory(directory)
    return [read_public_key(path) for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}"))]


def load_server_keys(directory: str | Path) -> ServerKeys:
    """The proxy's pair (``proxy.key_secret``) and every other ``NAME.key`` as authorized."""
    folder = _directory(directory)
    secret_path = folder / f"{PROXY_KEY_NAME}{SECRET_SUFFIX}"
    if not os.path.lexists(secret_path):
        raise KeyFileError(
            f"{secret_path}: missing (create it with `tradebus keys new {PROXY_KEY_NAME} "
            f"--dir {folder}`)"
        )
    public_key, secret_key = read_key_pair(secret_path)
    authorized: dict[bytes, KeyInfo] = {}
    for info in list_keys(folder):
        if info.name == PROXY_KEY_NAME:
            if info.public_key != public_key:
                raise KeyFileError(
                    f"{info.path}: does not match {secret_path} (clients would hold the "
                    "wrong proxy key)"
                )
            continue
        earlier = authorized.get(info.public_key)
        if earlier is not None:
            raise KeyFileError(f"{info.path}: same public key as {earlier.path}; one key, one name")
        authorized[info.public_key] = info
    if not authorized:
        raise KeyFileError(
            f"{folder}: no client keys (NAME.key) besides the proxy's, so nobody could connect; "
            f"create one with `tradebus keys new NAME --dir {folder}`"
        )
    return ServerKeys(public_key, secret_key, authorized)


def load_client_keys(directory: str | Path, name: str | None = None) -> ClientKeys:
    """A client's pair ``NAME.key_secret`` and the proxy's ``proxy.key`` from ``directory``.

    With ``name`` None the directory must hold exactly one pair other than the proxy's.
    """
    folder = _directory(directory)
    if name is None:
        names = sorted(
            path.name.removesuffix(SECRET_SUFFIX)
            for path in folder.glob(f"*{SECRET_SUFFIX}")
            if path.name != f"{PROXY_KEY_NAME}{SECRET_SUFFIX}"
        )
        if not names:
            raise KeyFileError(
                f"{folder}: no key pair (NAME.key_secret) for this client; create one with "
                f"`tradebus keys new NAME --dir {folder}`"
            )
        if len(names) > 1:
            raise KeyFileError(
                f"{folder}: holds several key pairs ({', '.join(names)}); name the one to use"
            )
        name = names[0]
    validate_key_name(name)
    if name == PROXY_KEY_NAME:
        raise KeyFileError("the proxy's own key is not a client key; name the client's key")
    public_key, secret_key = read_key_pair(folder / f"{name}{SECRET_SUFFIX}")
    server_path = folder / f"{PROXY_KEY_NAME}{PUBLIC_SUFFIX}"
    if not os.path.lexists(server_path):
        raise KeyFileError(f"{server_path}: missing (copy the proxy's public key file here)")
    server = read_public_key(server_path)
    return ClientKeys(name, public_key, secret_key, server.public_key)


# -- sockets -----------------------------------------------------------------------------------
def configure_client(socket: zmq.Socket[Any], keys: ClientKeys) -> None:
    """Make ``socket`` a CURVE client of the proxy; call before connect()."""
    socket.curve_secretkey = keys.secret_key
    socket.curve_publickey = keys.public_key
    socket.curve_serverkey = keys.server_public_key


def configure_server(socket: zmq.Socket[Any], keys: ServerKeys) -> None:
    """Make ``socket`` a CURVE server in ZAP domain ``tradebus``; call before bind().

    ZAP_ENFORCE_DOMAIN makes it fail closed: without a running BusAuthenticator in the
    socket's context every client is refused, where libzmq would otherwise admit any key.
    """
    socket.curve_server = True
    socket.curve_secretkey = keys.secret_key
    socket.curve_publickey = keys.public_key
    socket.zap_domain = ZAP_DOMAIN.encode()
    socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


class BusAuthenticator(zmq.auth.thread.ThreadAuthenticator):
    """pyzmq's ThreadAuthenticator admitting exactly the keys of ``ServerKeys.authorized``.

    The ZAP User-Id of an admitted peer is its key NAME. Each refusal is counted in
    ``refused`` and logged once per key fingerprint (``bus.auth_refused``); no key is
    ever logged, only fingerprints.
    """

    def __init__(self, context: zmq.Context[Any], keys: ServerKeys) -> None:
        super().__init__(context=context)
        self.keys = keys
        self.refused = 0
        self._logged: set[str] = set()
        self._count_lock = threading.Lock()
        self._log = get_logger("proxy")

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: is this z85 key authorized?"""
        if domain == ZAP_DOMAIN and key in self.keys.authorized:
            return True
        with self._count_lock:
            self.refused += 1
        print_ = fingerprint(key)
        if print_ not in self._logged:
            if len(self._logged) >= REFUSED_LOG_MEMORY:
                self._logged.clear()
            self._logged.add(print_)
            self._log.warning(
                "bus.auth_refused",
                fingerprint=print_,
                reason="key not authorized in the proxy's key directory",
            )
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        name = self.keys.name_of(z85.encode(client_public_key))
        # only called after callback() admitted the key, so it has a name
        return name if name is not None else "unknown"


# -- the client's start-up check -----------------------------------------------------------------
Verdict = Literal["admitted", "unreachable"]


def judge_handshake(event: int, value: int, keys: ClientKeys, endpoint: str) -> Verdict | None:
    """What one monitor event says about the key: admitted, proxy unreachable (nothing to
    judge yet: ZeroMQ keeps retrying), None (wait for more); AuthError when refused."""
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return "admitted"
    if event == zmq.EVENT_CONNECT_RETRIED:
        return "unreachable"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        raise AuthError(
            f"the proxy at {endpoint} refused key {keys.name} (fingerprint "
            f"{keys.fingerprint}): not authorized in its key directory (add "
            f"{keys.name}.key there and restart the proxy)"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            raise AuthError(
                f"the bus at {endpoint} does not use CURVE keys (was it started without "
                f"--keys?), but this client uses key {keys.name}"
            )
        raise AuthError(f"the CURVE handshake with {endpoint} failed (protocol error {value:#x})")
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        raise AuthError(
            f"the CURVE handshake with {endpoint} failed for key {keys.name}: that proxy runs "
            "without --keys, or its key is not the proxy.key in this client's key directory "
            f"(fingerprint {fingerprint(keys.server_public_key)}), or it cannot check keys"
        )
    return None


def connect_checked(
    socket: zmq.Socket[Any],
    endpoint: str,
    keys: ClientKeys,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> bool:
    """Connect ``socket`` (configured with ``keys``) and wait for the proxy's verdict.

    True: admitted. False: the proxy did not answer within ``timeout`` or refused the TCP
    connection; the socket stays connected and ZeroMQ keeps retrying, as without keys.
    Raises AuthError when the proxy refused the key.
    """
    monitor: zmq.Socket[bytes] = socket.get_monitor_socket(_HANDSHAKE_EVENTS, _monitor_address())
    try:
        socket.connect(endpoint)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not monitor.poll(max(1, int(remaining * 1000))):
                break
            message = parse_monitor_message(monitor.recv_multipart())
            verdict = judge_handshake(message["event"], message["value"], keys, endpoint)
            if verdict is not None:
                return verdict == "admitted"
        return False
    finally:
        _stop_monitor(socket, monitor)


async def connect_checked_async(
    socket: zmq.asyncio.Socket,
    endpoint: str,
    keys: ClientKeys,
    seconds: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> bool:
    """``connect_checked`` for an asyncio socket: waits without blocking the loop."""
    monitor: zmq.asyncio.Socket = socket.get_monitor_socket(_HANDSHAKE_EVENTS, _monitor_address())
    try:
        socket.connect(endpoint)
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if not await monitor.poll(max(1, int(remaining * 1000))):
                break
            message = parse_monitor_message(await monitor.recv_multipart())
            verdict = judge_handshake(message["event"], message["value"], keys, endpoint)
            if verdict is not None:
                return verdict == "admitted"
        return False
    finally:
        _stop_monitor(socket, monitor)


_monitor_numbers = itertools.count()


def _monitor_address() -> str:
    """An inproc address of the check's own: libzmq unbinds a stopped monitor's address in
    the background, so reusing pyzmq's default (one per socket) would make the caller's
    own monitor, attached right after the check, fail with "Address already in use"."""
    return f"inproc://tradebus-key-check-{os.getpid()}-{next(_monitor_numbers)}"


def _stop_monitor(socket: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
    with contextlib.suppress(zmq.ZMQError):
        socket.disable_monitor()
    monitor.close(linger=0)
