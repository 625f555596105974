"""Write docs/dashboard.png: the dashboard in headless Chromium, fed by the demo bot.

    .venv/bin/python tools/screenshot.py [--out docs/dashboard.png] [--seconds 30]

Starts a proxy and a bridge on random loopback ports, opens the dashboard in Debian's
Chromium (never a downloaded browser), publishes the seeded demo session (tradebus.demo) in
real time through bot_client as source ``demo-bot``, plus one heartbeat from ``backtest-bot``
that then falls silent (so the picture shows a stale source), and takes the screenshot.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import zmq
from aiohttp import web
from playwright.async_api import async_playwright

from bot_client import Publisher
from bridge.app import create_app
from bridge.config import BridgeConfig
from bus.proxy import Proxy, ProxyConfig
from tradebus.demo import DemoSettings, run_demo

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


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
    # The demo bot publishes through bot_client, like a real bot; the second source sends
    # one heartbeat and falls silent, so the picture shows a stale source.
    demo_bot = Publisher(
        url=proxy.frontend_endpoint, source_id="demo-bot", publish_interval=0.0, context=context
    )
    quiet_bot = Publisher(
        url=proxy.frontend_endpoint,
        source_id="backtest-bot",
        heartbeat_interval=0.0,
        context=context,
    )
    try:
        settings = DemoSettings(
            tick=0.05, decision_every=2.0, heartbeat_every=2.0, volatility=0.0004
        )
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(f"http://127.0.0.1:{port}/?window={seconds:g}&stale=30")
            await page.wait_for_selector('[data-testid="connection-state"][data-state="open"]')
            quiet_bot.publish_system_status("paused", True, [])
            await run_demo(demo_bot, settings, asyncio.Event(), seed=7, duration=seconds)
            await page.screenshot(path=str(out), full_page=True)
            await browser.close()
    finally:
        demo_bot.close(timeout=1.0)
        quiet_bot.close(timeout=1.0)
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
