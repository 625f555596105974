"""bus.keys: key files, the CURVE server side, and clients' start-up check, on real sockets."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.auth
from structlog.testing import capture_logs

from bus.errors import AuthError, BusError, KeyFileError, TopicError
from bus.keys import (
    PROXY_KEY_NAME,
    BusAuthenticator,
    ClientKeys,
    ServerKeys,
    configure_client,
    configure_server,
    connect_checked,
    create_key,
    fingerprint,
    list_keys,
    load_client_keys,
    load_server_keys,
)
from tests.conftest import scaled


def make_keys(directory: Path) -> None:
    create_key(directory, PROXY_KEY_NAME)
    create_key(directory, "bot-1", ["bot-1", "bot-1.paper"])
    create_key(directory, "viewer")


# -- files ---------------------------------------------------------------------------------------
def test_new_key_writes_pyzmq_certificates_with_a_private_secret(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the secret must be private whatever the umask allows
    try:
        public, secret = create_key(tmp_path / "keys", "bot-1", ["bot-1"])
    finally:
        os.umask(old_umask)
    assert (public.name, secret.name) == ("bot-1.key", "bot-1.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    public_key, no_secret = zmq.auth.load_certificate(public)
    pair_public, pair_secret = zmq.auth.load_certificate(secret)
    assert no_secret is None, "the public certificate must not hold the secret key"
    assert public_key == pair_public
    assert pair_secret is not None
    assert zmq.curve_public(pair_secret) == public_key


def test_sources_round_trip_through_the_public_certificate(tmp_path: Path) -> None:
    make_keys(tmp_path)
    keys = {info.name: info for info in list_keys(tmp_path)}
    assert set(keys) == {"bot-1", "proxy", "viewer"}
    assert keys["bot-1"].role == "publisher"
    assert keys["bot-1"].sources == {"bot-1", "bot-1.paper"}
    assert keys["viewer"].role == "subscriber"
    assert not keys["viewer"].sources
    assert keys["proxy"].role == "proxy"
    assert len(keys["bot-1"].fingerprint) == 12
    assert keys["bot-1"].fingerprint != keys["viewer"].fingerprint


def test_an_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    public, secret = create_key(tmp_path, "bot-1")
    before = (public.read_bytes(), secret.read_bytes())
    with pytest.raises(KeyFileError, match=r"bot-1\.key.*already exists.*rotate"):
        create_key(tmp_path, "bot-1", ["bot-1"])
    assert (public.read_bytes(), secret.read_bytes()) == before


@pytest.mark.parametrize(
    ("name", "sources", "error"),
    [
        ("../escape", (), KeyFileError),
        ("", (), KeyFileError),
        ("bot 1", (), KeyFileError),
        ("bot-1", ("no spaces",), TopicError),
        (PROXY_KEY_NAME, ("bot-1",), KeyFileError),
    ],
)
def test_bad_names_and_sources_are_refused_and_write_nothing(
    tmp_path: Path, name: str, sources: tuple[str, ...], error: type[BusError]
) -> None:
    with pytest.raises(error):
        create_key(tmp_path / "keys", name, sources)
    assert not list((tmp_path / "keys").glob("*")) if (tmp_path / "keys").exists() else True


def test_server_keys_authorize_every_key_but_the_proxys(tmp_path: Path) -> None:
    make_keys(tmp_path)
    server = load_server_keys(tmp_path)
    names = {info.name for info in server.authorized.values()}
    assert names == {"bot-1", "viewer"}
    assert server.sources_for("bot-1") == {"bot-1", "bot-1.paper"}
    assert server.sources_for("viewer") == frozenset()
    assert server.sources_for("stranger") == frozenset()
    assert zmq.curve_public(server.secret_key) == server.public_key


def test_client_keys_are_its_pair_and_the_proxys_public_key(tmp_path: Path) -> None:
    make_keys(tmp_path)
    server = load_server_keys(tmp_path)
    client = load_client_keys(tmp_path, "viewer")
    assert client.name == "viewer"
    assert client.server_public_key == server.public_key
    assert server.authorized[client.public_key].name == "viewer"


def test_a_client_directory_with_one_pair_needs_no_name(tmp_path: Path) -> None:
    make_keys(tmp_path)
    bot_dir = tmp_path / "bot"
    bot_dir.mkdir()
    for name in ("bot-1.key_secret", "proxy.key"):
        (bot_dir / name).write_bytes((tmp_path / name).read_bytes())
    (bot_dir / "bot-1.key_secret").chmod(0o600)
    assert load_client_keys(bot_dir).name == "bot-1"
    with pytest.raises(KeyFileError, match=r"several key pairs \(bot-1, viewer\)"):
        load_client_keys(tmp_path)


def test_a_group_readable_secret_is_refused_with_the_file_and_the_fix(tmp_path: Path) -> None:
    make_keys(tmp_path)
    secret = tmp_path / "viewer.key_secret"
    secret.chmod(0o644)
    with pytest.raises(KeyFileError) as caught:
        load_client_keys(tmp_path, "viewer")
    assert str(caught.value) == (
        f"{secret}: secret key file is readable by group/others (mode 0644); chmod 600 it"
    )
    (tmp_path / "proxy.key_secret").chmod(0o640)
    with pytest.raises(KeyFileError, match=r"proxy\.key_secret: .*mode 0640"):
        load_server_keys(tmp_path)


def test_missing_unreadable_and_malformed_files_name_the_file(tmp_path: Path) -> None:
    make_keys(tmp_path)
    with pytest.raises(KeyFileError, match=r"nowhere: no such key directory"):
        load_client_keys(tmp_path / "nowhere")
    with pytest.raises(KeyFileError, match=r"ghost\.key_secret: missing"):
        load_client_keys(tmp_path, "ghost")
    (tmp_path / "proxy.key").rename(tmp_path / "proxy.key.old")
    with pytest.raises(KeyFileError, match=r"proxy\.key: missing \(copy the proxy's"):
        load_client_keys(tmp_path, "viewer")
    (tmp_path / "proxy.key.old").rename(tmp_path / "proxy.key")
    (tmp_path / "viewer.key_secret").unlink()
    (tmp_path / "viewer.key_secret").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match=r"viewer\.key_secret: unreadable: is a directory"):
        load_client_keys(tmp_path, "viewer")
    (tmp_path / "viewer.key").write_text('metadata\ncurve\n    public-key = "short"\n')
    with pytest.raises(KeyFileError, match=r"viewer\.key: the public key is not a 40-character"):
        load_server_keys(tmp_path)
    (tmp_path / "viewer.key").write_bytes(b"\xff\xfe not text")
    with pytest.raises(KeyFileError, match=r"viewer\.key: not a CURVE certificate"):
        list_keys(tmp_path)


def test_a_proxy_directory_without_client_keys_is_refused(tmp_path: Path) -> None:
    create_key(tmp_path, PROXY_KEY_NAME)
    with pytest.raises(KeyFileError, match=r"no client keys .* nobody could connect"):
        load_server_keys(tmp_path)


def test_a_proxy_public_key_that_does_not_match_its_secret_is_refused(tmp_path: Path) -> None:
    make_keys(tmp_path)
    other = tmp_path / "other"
    create_key(other, PROXY_KEY_NAME)
    (tmp_path / "proxy.key").write_bytes((other / "proxy.key").read_bytes())
    with pytest.raises(KeyFileError, match=r"proxy\.key: does not match .*proxy\.key_secret"):
        load_server_keys(tmp_path)


# -- sockets: a minimal CURVE server built from bus.keys, on real loopback sockets ----------
@dataclass
class CurveServer:
    keys: ServerKeys
    authenticator: BusAuthenticator
    pull: zmq.Socket[bytes]  # where clients' PUSH messages arrive (User-Id visible)
    pub: zmq.Socket[bytes]  # what clients' SUB sockets read
    pull_endpoint: str
    pub_endpoint: str


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    make_keys(tmp_path)
    return tmp_path


@pytest.fixture
def curve_server(
    key_dir: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> Iterator[CurveServer]:
    keys = load_server_keys(key_dir)
    authenticator = BusAuthenticator(zmq_context, keys)
    authenticator.start()
    pull: zmq.Socket[bytes] = zmq_context.socket(zmq.PULL)
    pub: zmq.Socket[bytes] = zmq_context.socket(zmq.PUB)
    for socket in (pull, pub):
        socket.linger = 0
        configure_server(socket, keys)
    pull_port = pull.bind_to_random_port("tcp://127.0.0.1")
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    yield CurveServer(
        keys,
        authenticator,
        pull,
        pub,
        f"tcp://127.0.0.1:{pull_port}",
        f"tcp://127.0.0.1:{pub_port}",
    )
    pull.close(linger=0)
    pub.close(linger=0)
    authenticator.stop()


def client_socket(
    context: zmq.Context[zmq.Socket[bytes]], kind: int, keys: ClientKeys | None
) -> zmq.Socket[bytes]:
    socket: zmq.Socket[bytes] = context.socket(kind)
    socket.linger = 0
    if keys is not None:
        configure_client(socket, keys)
    if kind == zmq.SUB:
        socket.subscribe(b"")
    return socket


def test_an_authorized_publisher_is_admitted_and_its_messages_carry_its_key_name(
    curve_server: CurveServer, key_dir: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    keys = load_client_keys(key_dir, "bot-1")
    push = client_socket(zmq_context, zmq.PUSH, keys)
    try:
        assert connect_checked(push, curve_server.pull_endpoint, keys, scaled(5))
        push.send(b"hello")
        assert curve_server.pull.poll(int(scaled(5) * 1000))
        frame = curve_server.pull.recv(copy=False)
        assert frame.bytes == b"hello"
        assert frame.get("User-Id") == "bot-1"
        assert curve_server.keys.sources_for(frame.get("User-Id")) == {"bot-1", "bot-1.paper"}
    finally:
        push.close(linger=0)
    assert curve_server.authenticator.refused == 0


def test_an_authorized_subscriber_receives_and_an_anonymous_one_gets_nothing(
    curve_server: CurveServer, key_dir: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    keys = load_client_keys(key_dir, "viewer")
    authorized = client_socket(zmq_context, zmq.SUB, keys)
    anonymous = client_socket(zmq_context, zmq.SUB, None)
    try:
        anonymous.connect(curve_server.pub_endpoint)
        assert connect_checked(authorized, curve_server.pub_endpoint, keys, scaled(5))
        # the subscription travels after the handshake: publish until it took effect
        for number in range(int(scaled(500))):
            curve_server.pub.send(b"event %d" % number)
            if authorized.poll(10):
                break
        assert authorized.recv().startswith(b"event ")
        sent_after = 20
        for number in range(sent_after):
            curve_server.pub.send(b"late %d" % number)
        received = [authorized.recv() for _ in range(sent_after)]
        assert received[-1] == b"late 19"
        # the anonymous peer had every chance to receive the same events
        assert not anonymous.poll(0)
    finally:
        authorized.close(linger=0)
        anonymous.close(linger=0)


def test_an_unauthorized_key_is_refused_at_start_up_counted_and_logged_once(
    curve_server: CurveServer, tmp_path: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    stranger_dir = tmp_path / "stranger"
    create_key(stranger_dir, "stranger", ["stranger"])
    (stranger_dir / "proxy.key").write_bytes((tmp_path / "proxy.key").read_bytes())
    keys = load_client_keys(stranger_dir)
    with capture_logs() as logs:
        for _attempt in range(2):
            push = client_socket(zmq_context, zmq.PUSH, keys)
            try:
                with pytest.raises(AuthError) as caught:
                    connect_checked(push, curve_server.pull_endpoint, keys, scaled(5))
                push.send(b"forged", zmq.NOBLOCK)
            except zmq.Again:
                pass  # nowhere to send: that is the point
            finally:
                push.close(linger=0)
    refused = curve_server.authenticator.refused
    assert str(caught.value).startswith(
        f"the proxy at {curve_server.pull_endpoint} refused key stranger "
        f"(fingerprint {keys.fingerprint}): not authorized in its key directory"
    )
    assert refused == 2
    refusals = [entry for entry in logs if entry["event"] == "bus.auth_refused"]
    assert len(refusals) == 1, refusals
    assert refusals[0]["fingerprint"] == fingerprint(keys.public_key)
    assert refusals[0]["log_level"] == "warning"
    text = repr(logs)
    assert keys.secret_key.decode() not in text
    assert keys.public_key.decode() not in text
    assert not curve_server.pull.poll(0), "a refused peer must not get a message through"


def test_without_an_authenticator_a_curve_server_refuses_everyone(
    key_dir: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    server = zmq_context.socket(zmq.PULL)
    server.linger = 0
    configure_server(server, load_server_keys(key_dir))
    endpoint = f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}"
    keys = load_client_keys(key_dir, "bot-1")
    push = client_socket(zmq_context, zmq.PUSH, keys)
    try:
        # libzmq tells the client no more than "failed": nothing got through is what counts
        with pytest.raises(AuthError, match=r"handshake with .* failed for key bot-1"):
            connect_checked(push, endpoint, keys, scaled(5))
    finally:
        push.close(linger=0)
        server.close(linger=0)


def test_a_wrong_proxy_key_or_a_bus_without_keys_stops_the_client_with_one_line(
    curve_server: CurveServer,
    key_dir: Path,
    tmp_path: Path,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    keys = load_client_keys(key_dir, "viewer")
    impostor = ClientKeys(keys.name, keys.public_key, keys.secret_key, zmq.curve_keypair()[0])
    sub = client_socket(zmq_context, zmq.SUB, impostor)
    plain = zmq_context.socket(zmq.PUB)
    plain.linger = 0
    plain_endpoint = f"tcp://127.0.0.1:{plain.bind_to_random_port('tcp://127.0.0.1')}"
    other = client_socket(zmq_context, zmq.SUB, keys)
    try:
        with pytest.raises(AuthError, match=r"its key is not the proxy\.key in this client's"):
            connect_checked(sub, curve_server.pub_endpoint, impostor, scaled(5))
        with pytest.raises(AuthError, match=r"does not use CURVE keys"):
            connect_checked(other, plain_endpoint, keys, scaled(5))
    finally:
        for socket in (sub, plain, other):
            socket.close(linger=0)


def test_a_proxy_that_is_not_there_yet_does_not_stop_the_client(
    key_dir: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    keys = load_client_keys(key_dir, "viewer")
    sub = client_socket(zmq_context, zmq.SUB, keys)
    try:
        assert connect_checked(sub, f"ipc://{key_dir}/no-proxy.sock", keys, scaled(5)) is False
    finally:
        sub.close(linger=0)


def test_a_socket_checked_with_its_key_takes_a_monitor_of_its_own_at_once(
    curve_server: CurveServer, key_dir: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    # the bridge attaches its SUB monitor right after the key check; when the check's
    # monitor used pyzmq's default address, libzmq had not always unbound it yet and the
    # bridge died at start with "Address already in use" (seen in make test-compose)
    keys = load_client_keys(key_dir, "viewer")
    for _ in range(50):
        sub = client_socket(zmq_context, zmq.SUB, keys)
        try:
            assert connect_checked(sub, curve_server.pub_endpoint, keys, scaled(5))
            sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED).close(linger=0)
        finally:
            sub.close(linger=0)
