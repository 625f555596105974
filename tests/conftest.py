"""Shared fixtures: real sockets on 127.0.0.1, random ports, bounded teardowns.

Every wait in a test is scaled by TRADEBUS_TEST_TIMEOUT_FACTOR (default 1), so a slow
machine raises one number instead of editing many tests.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import zmq

from bus.proxy import Proxy, ProxyConfig
from bus.subscriber import BlockingSubscriber

TIMEOUT_FACTOR = float(os.environ.get("TRADEBUS_TEST_TIMEOUT_FACTOR", "1"))


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


def scaled(seconds: float) -> float:
    """A test wait, scaled for the machine."""
    return seconds * TIMEOUT_FACTOR


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A fresh context whose teardown fails the test when sockets were left open."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
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
def proxy(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> Iterator[Proxy]:
    """A running proxy on random loopback ports (see .frontend/.backend/.snapshot_endpoint)."""
    config = ProxyConfig(
        frontend="tcp://127.0.0.1:*",
        backend="tcp://127.0.0.1:*",
        snapshot="tcp://127.0.0.1:*",
        heartbeat_ms=500,
    )
    running = Proxy(config, context=zmq_context)
    running.start()
    yield running
    running.stop()


def synced_subscriber(
    proxy: Proxy, context: zmq.Context[zmq.Socket[bytes]], patterns: Sequence[str] = ("*",)
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
