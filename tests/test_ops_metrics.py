"""Metrics: the proxy's real counters over a real HTTP scrape; publisher status as metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
import zmq
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from bus.envelope import encode_event
from bus.proxy import Proxy
from monitoring.metrics import (
    MetricsServer,
    MetricsServerError,
    ProxyCollector,
    PublisherCollector,
    render,
)
from tests.conftest import scaled
from tests.support import free_port, wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=scaled(5)) as response:
        return samples(response.read().decode())


def test_proxy_metrics_count_forwarded_events_by_type_and_gaps(
    proxy: Proxy, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    registry = CollectorRegistry()
    registry.register(ProxyCollector(lambda: proxy.cache.stats))
    server = MetricsServer(registry, port=0)
    publisher = zmq_context.socket(zmq.XPUB)
    try:
        publisher.connect(proxy.frontend_endpoint)
        assert publisher.poll(scaled(5_000)), "the proxy's subscribe-all never arrived"
        publisher.recv()
        for seq in (1, 2, 3):
            publisher.send_multipart(
                encode_event("market_data.BTC-USD", "market_data", {"price": 1.0}, "bot", 1, seq)
            )
        # seq 4 and 5 never sent: a gap of 2 the proxy must count
        publisher.send_multipart(
            encode_event("market_data.BTC-USD", "market_data", {"price": 1.0}, "bot", 1, 6)
        )
        publisher.send_multipart(encode_event("ai_decision", "ai_decision", {}, "bot", 1, 1))
        wait_until(lambda: proxy.cache.stats.events >= 5, "the proxy to see the events")
        found = scrape(server.url)
    finally:
        publisher.close(linger=0)
        server.close()
    assert found[("tradebus_proxy_events_total", (("type", "market_data"),))] == 4
    assert found[("tradebus_proxy_events_total", (("type", "ai_decision"),))] == 1
    assert found[("tradebus_proxy_gaps_total", ())] == 1
    assert found[("tradebus_proxy_missed_events_total", ())] == 2
    assert found[("tradebus_proxy_cache_topics", ())] == 2


def test_publisher_status_becomes_metrics() -> None:
    status: dict[str, Any] = {
        "connected": True,
        "sent": 10,
        "queued": 3,
        "dropped": {"market_data": 4, "ai_decision": 1},
        "reconnects": 2,
    }
    registry = CollectorRegistry()
    registry.register(PublisherCollector(lambda: status, "demo-bot"))
    found = samples(render(registry).decode())
    src = (("source", "demo-bot"),)
    assert found[("tradebus_publisher_connected", src)] == 1
    assert found[("tradebus_publisher_sent_events_total", src)] == 10
    assert found[("tradebus_publisher_queue_size", src)] == 3
    assert found[("tradebus_publisher_reconnects_total", src)] == 2
    key = (
        "tradebus_publisher_dropped_events_total",
        (("source", "demo-bot"), ("type", "market_data")),
    )
    assert found[key] == 4
    status["connected"] = False
    assert samples(render(registry).decode())[("tradebus_publisher_connected", src)] == 0


def test_a_taken_port_is_a_clear_error() -> None:
    first = MetricsServer(CollectorRegistry(), port=0)
    try:
        with pytest.raises(MetricsServerError, match=f"127.0.0.1:{first.port}"):
            MetricsServer(CollectorRegistry(), port=first.port)
    finally:
        first.close()


def test_the_metrics_port_has_health_and_nothing_else() -> None:
    server = MetricsServer(CollectorRegistry(), port=0)
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/health", timeout=scaled(5)) as reply:
            assert reply.read() == b'{"status":"ok"}'
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/other", timeout=scaled(5))
        assert missing.value.code == 404
        missing.value.close()
    finally:
        server.close()
    assert MetricsServer.ROUTES == ("/health", "/metrics")


def test_tradebus_proxy_serves_metrics_and_health() -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tradebus",
            "proxy",
            "--frontend",
            "tcp://127.0.0.1:*",
            "--backend",
            "tcp://127.0.0.1:*",
            "--snapshot",
            "tcp://127.0.0.1:*",
            "--metrics-port",
            str(port),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        started = json.loads(process.stderr.readline())
        assert started["event"] == "proxy.started"
        assert started["metrics"] == f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=scaled(5)) as r:
            assert r.status == 200
        found = scrape(started["metrics"])
        assert found[("tradebus_proxy_cache_topics", ())] == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(scaled(10)) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=scaled(5))
