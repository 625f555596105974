"""Write docs/dashboard.png: the dashboard in headless Chromium, fed by the demo bot.

    .venv/bin/python tools/screenshot.py [--out docs/dashboard.png] [--seconds 30]

Starts a proxy and a bridge on random loopback ports, publishes the seeded demo session
(tradebus.demo) in real time as source ``demo-bot``, plus one heartbeat from ``backtest-bot``
that then falls silent (so the picture shows a stale source), opens the dashboard in
Debian's Chromium (never a downloaded browser) and takes the screenshot.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import zmq
from aiohttp import web
from playwright.async_api import async_playwright

from bridge.app import create_app
from bridge.config import BridgeConfig
from bus.envelope import encode_event
from bus.proxy import Proxy, ProxyConfig
from tradebus.demo import DemoSession, DemoSettings

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


class Source:
    """One bot's bus publisher (XPUB, so it knows when the proxy is listening)."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, name: str) -> None:
        self.name = name
        self.epoch = time.time_ns()
        self.seqs: dict[str, int] = {}
        self.socket = context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        if not self.socket.poll(5000):
            raise SystemExit("the proxy did not accept the demo publisher within 5 s")
        self.socket.recv()

    def publish(self, type_name: str, data: dict[str, object], key: str | None) -> None:
        topic = type_name if key is None else f"{type_name}.{key}"
        self.seqs[topic] = self.seqs.get(topic, 0) + 1
        frames = encode_event(topic, type_name, data, self.name, self.epoch, self.seqs[topic])
        self.socket.send_multipart(frames)


async def feed(bot: Source, session: DemoSession, started: float, until: float) -> None:
    for event in session.events():
        due = started + event.at
        if due > until:
            return
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        bot.publish(event.type, event.data, event.key)


async def shoot(out: Path, seconds: float) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    proxy = Proxy(
        ProxyConfig(
            frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*", snapshot="tcp://127.0.0.1:*"
        ),
        context=context,
    )
    proxy.start()
    config = BridgeConfig(
        port=0,
        bus=proxy.backend_endpoint,
        snapshot=proxy.snapshot_endpoint,
        publish_to=proxy.frontend_endpoint,
        stale_after=5.0,
    )
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    bots = [Source(context, proxy.frontend_endpoint, name) for name in ("demo-bot", "backtest-bot")]
    try:
        bots[1].publish("system_status", {"status": "paused", "health": True, "errors": []}, None)
        settings = DemoSettings(
            tick=0.05, decision_every=2.0, heartbeat_every=2.0, volatility=0.0004
        )
        session = DemoSession(random.Random(7), time.time(), settings)
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(f"http://127.0.0.1:{port}/?window={seconds:g}&stale=30")
            started = time.monotonic()
            await feed(bots[0], session, started, started + seconds)
            await page.screenshot(path=str(out), full_page=True)
            await browser.close()
    finally:
        for bot in bots:
            bot.socket.close(linger=0)
        await runner.cleanup()
        proxy.stop()
        context.term()
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--seconds", type=float, default=30.0, help="demo time before the shot")
    args = parser.parse_args()
    asyncio.run(shoot(args.out, args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
