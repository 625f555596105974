"""Shared fixtures: real sockets on 127.0.0.1, random ports, bounded teardowns.

Every wait in a test is scaled by TRADEBUS_TEST_TIMEOUT_FACTOR (default 1), so a slow
machine raises one number instead of editing many tests; that includes pytest-timeout's
limit of every test. The plain helpers (``scaled``, ``free_port``, ``wait_until``,
``wait_for``, ``BusPublisher``, ``bridge_config``, ``running_bridge``) live in
tests/support.py; each fixture below says what it gives.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import zmq

from bridge.app import BridgeServer
from bus.proxy import Proxy, ProxyConfig
from bus.subscriber import BlockingSubscriber
from bus.transport import ACCELERATOR_OFF_VARIABLE
from tests.support import TIMEOUT_FACTOR as TIMEOUT_FACTOR
from tests.support import BusPublisher, bridge_config, loopback_proxy_config, running_bridge
from tests.support import scaled as scaled

Context = zmq.Context[zmq.Socket[bytes]]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "bridge(**changes): BridgeConfig changes for the `server` fixture's bridge"
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With TRADEBUS_FAIL_ON_SKIP=1 (set by .ci/run) a skipped test fails the run."""
    if os.environ.get("TRADEBUS_FAIL_ON_SKIP") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and session.exitstatus == 0:
        names = ", ".join(report.nodeid for report in skipped[:5])
        print(f"\nTRADEBUS_FAIL_ON_SKIP: {len(skipped)} test(s) skipped ({names}); failing the run")
        session.exitstatus = 1


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Scale every test's pytest-timeout limit (its marker's, else the configured one) by
    TRADEBUS_TEST_TIMEOUT_FACTOR, like every wait inside the tests."""
    if TIMEOUT_FACTOR == 1:
        return
    option = config.getoption("timeout", None)
    default = float(option if option is not None else config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker is not None and marker.args else default
        if limit > 0:
            item.add_marker(pytest.mark.timeout(scaled(limit)), append=False)


@pytest.fixture(params=[True, False], ids=["accelerated", "pure"])
def accelerated(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The one parametrisation of the differential tests: each runs once with the C
    accelerators and once with the pure-Python code they must match. For ``False`` the
    switch users have (TRADEBUS_NO_ACCELERATOR) is set for the test; code that chose at
    import time is picked by the test itself from this flag."""
    if not request.param:
        monkeypatch.setenv(ACCELERATOR_OFF_VARIABLE, "1")
    return bool(request.param)


@pytest.fixture
def zmq_context() -> Iterator[Context]:
    """A fresh context whose teardown fails the test when sockets were left open."""
    context: Context = zmq.Context()
    yield context
    leaked = [s for s in list(context._sockets) if not s.closed]  # type: ignore[attr-defined]
    for socket in leaked:
        socket.close(linger=0)
    terminated = threading.Event()

    def terminate() -> None:
        context.term()
        terminated.set()

    threading.Thread(target=terminate, daemon=True).start()
    if not terminated.wait(scaled(5)):
        pytest.fail("zmq context did not terminate within 5 s: a socket is still open")
    if leaked:
        pytest.fail(f"{len(leaked)} ZeroMQ socket(s) leaked: {[s.socket_type for s in leaked]}")


@pytest.fixture
def zmq_socket(zmq_context: Context) -> Iterator[Callable[[int], zmq.Socket[bytes]]]:
    """A factory of sockets on ``zmq_context`` with linger 0, all closed after the test
    (before the context's leak check), like pyzmq's own tests' ``self.socket``."""
    made: list[zmq.Socket[bytes]] = []

    def make(kind: int) -> zmq.Socket[bytes]:
        socket: zmq.Socket[bytes] = zmq_context.socket(kind)
        socket.linger = 0
        made.append(socket)
        return socket

    yield make
    for socket in made:
        socket.close(linger=0)


@pytest.fixture
def proxy(zmq_context: Context) -> Iterator[Proxy]:
    """A running proxy on random loopback ports (see .frontend/.backend/.snapshot_endpoint).
    Its teardown is bounded and strict: a thread of the proxy still running after
    ``stop`` fails the test, and so does a socket left open (``zmq_context``'s check)."""
    config = loopback_proxy_config(
        heartbeat_ms=500,
    )
    running = Proxy(config, context=zmq_context)
    before = set(threading.enumerate())
    running.start()
    threads = [t for t in set(threading.enumerate()) - before if t.name.startswith("tradebus-")]
    yield running
    running.stop(timeout=scaled(5))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        pytest.fail(f"the proxy's threads did not stop within {scaled(5):g} s: {stuck}")


@pytest.fixture
def publisher(zmq_context: Context, proxy: Proxy) -> Iterator[BusPublisher]:
    """A raw publisher (source ``bot-1``) connected to ``proxy``'s frontend; await its
    ``connected()`` before publishing (the ``server`` fixture does)."""
    bus = BusPublisher(zmq_context, proxy.frontend_endpoint, "bot-1")
    yield bus
    bus.close()


@pytest.fixture
def bridge_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The BridgeConfig changes of the ``server`` fixture's bridge: a test's
    ``@pytest.mark.bridge(**changes)``, else none; a module may override the fixture."""
    marker = request.node.get_closest_marker("bridge")
    return dict(marker.kwargs) if marker is not None else {}


@pytest.fixture
async def server(
    proxy: Proxy, publisher: BusPublisher, bridge_options: dict[str, Any]
) -> AsyncIterator[BridgeServer]:
    """A bridge on a free loopback port reading ``proxy``, ready, with ``publisher``
    already heard by the proxy; closed after the test."""
    await publisher.connected()
    async with running_bridge(bridge_config(proxy, **bridge_options)) as running:
        yield running


def synced_subscriber(
    proxy: Proxy, context: Context, patterns: Sequence[str] = ("*",)
) -> BlockingSubscriber:
    """A subscriber to ``proxy`` whose subscription is in force once its ``with`` is entered
    (the synced snapshot guarantees it), so nothing published afterwards is missed."""
    return BlockingSubscriber(
        list(patterns),
        endpoint=proxy.backend_endpoint,
        snapshot=True,
        snapshot_endpoint=proxy.snapshot_endpoint,
        context=context,
    )


def staging_proxy(tmp_path: Path) -> Proxy:
    """A proxy (not started) whose publisher socket is ``tmp_path/staging.sock``: renaming
    that file into a publisher's ipc path makes the bus appear for it at a chosen moment.

    It has a ZeroMQ context of its own (closed when it stops): a proxy answers its
    context's ZAP requests, so two proxies never share one."""
    return Proxy(
        ProxyConfig(
            frontend=f"ipc://{tmp_path}/staging.sock",
            backend="tcp://127.0.0.1:*",
            snapshot="tcp://127.0.0.1:*",
        )
    )
