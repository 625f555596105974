"""Write docs/dashboard.png: what `make run` shows, in headless Chromium.

    .venv/bin/python tools/screenshot.py [--out docs/dashboard.png] [--seconds 40]

Starts `tradebus up` (the command `make run` runs) on free loopback ports with its demo bot,
seeded and at ``--speed`` times the simulated pace so the picture fills in less time, opens
the dashboard in Debian's Chromium (never a downloaded browser) at 1400x900, waits until
prices, decisions and a position are shown plus ``--seconds`` of chart history, and takes
the screenshot. Any failing step exits non-zero and leaves the old picture in place (CI
runs this after `make test`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
VIEWPORT = {"width": 1400, "height": 900}
STARTUP_SECONDS = 30.0
CONTENT_SECONDS = 120.0


def start_stack(seed: int, speed: float) -> tuple[subprocess.Popen[str], str]:
    """`tradebus up` on free ports; its process and the dashboard URL it printed."""
    command = [
        sys.executable,
        "-m",
        "tradebus",
        "up",
        "--port",
        "0",
        "--frontend",
        "tcp://127.0.0.1:*",
        "--backend",
        "tcp://127.0.0.1:*",
        "--snapshot",
        "tcp://127.0.0.1:*",
        "--no-metrics",
        "--demo-seed",
        str(seed),
        "--demo-speed",
        f"{speed:g}",
    ]
    environment = {**os.environ, "TRADEBUS_LOG_LEVEL": "WARNING"}
    stack = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment, cwd=ROOT)
    assert stack.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stack.stdout], daemon=True).start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while (remaining := deadline - time.monotonic()) > 0 and stack.poll() is None:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        found = re.search(r"Dashboard: (http://\S+)", line)
        if found:
            return stack, found.group(1)
    stop_stack(stack)
    raise SystemExit(f"`tradebus up` did not print its dashboard URL (exit {stack.returncode})")


def stop_stack(stack: subprocess.Popen[str]) -> int:
    """Ctrl-C, as a user stops `make run`; its exit status."""
    if stack.poll() is None:
        stack.send_signal(signal.SIGINT)
        try:
            stack.wait(timeout=15)
        except subprocess.TimeoutExpired:
            stack.kill()
            stack.wait()
    return stack.returncode


async def shoot(url: str, out: Path, seconds: float) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport=VIEWPORT)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(url)
            wait_ms = CONTENT_SECONDS * 1000
            await page.wait_for_selector(
                '[data-testid="connection-state"][data-state="open"]', timeout=wait_ms
            )
            for shown in ("price-card", "decision", "position", "source"):
                await page.wait_for_selector(f'[data-testid="{shown}"]', timeout=wait_ms)
            # chart history: the picture is of a stack that has run for a while
            await page.wait_for_timeout(seconds * 1000)
            if errors:
                raise SystemExit(f"the dashboard failed: {errors[0]}")
            partial = out.with_suffix(".partial.png")
            await page.screenshot(path=str(partial))
            partial.replace(out)
        finally:
            await browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--seconds", type=float, default=40.0, help="chart history to wait for")
    parser.add_argument("--speed", type=float, default=5.0, help="the demo's --demo-speed")
    parser.add_argument("--seed", type=int, default=7, help="the demo's --demo-seed")
    args = parser.parse_args()
    stack, url = start_stack(args.seed, args.speed)
    try:
        asyncio.run(shoot(url, args.out, args.seconds))
    finally:
        status = stop_stack(stack)
    if status != 0:
        print(f"`tradebus up` exited with status {status} when stopped", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
