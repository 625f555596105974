"""Paced bus publisher for bench/bench_bridge.py, run as its own process.

``python -m bench.loadgen_publisher FRONTEND`` connects to the proxy's XSUB endpoint and
obeys commands on stdin, one per line, answering on stdout:

* ``WARM rate``: send ``bench_warmup`` events at ``rate``/s until the next command;
* ``STOP``: stop warming; answers ``STOPPED``;
* ``RUN rate count``: encode ``count`` ``market_data.BTC-USD`` events with
  bus.envelope.encode_event, answer ``PREPARED first_seq``, wait for ``GO``, send them at
  ``rate``/s and answer ``SENT count first_publish_ns last_publish_ns``;
* ``QUIT``.

Events are encoded before the timed run so that the publisher spends its time sending;
only the publish time is written into each event as it is sent, both in the meta frame
and as ``data.pub_ns`` (fixed width), which the load generator reads to compute latency.
Its own process keeps its CPU use and GIL out of the bench orchestrator.
"""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Final

import zmq

from bus.envelope import META_HEADER, WIRE_VERSION, encode_event, format_timestamp

EVENT_TOPIC: Final = "market_data.BTC-USD"
WARM_TOPIC: Final = "bench_warmup"
SOURCE: Final = "bench-publisher"
# 19 digits, like every time_ns() until the year 2286, so the stamp is patched in place
PUB_NS_PLACEHOLDER: Final = 1_000_000_000_000_000_000
PUB_NS_KEY: Final = b'"pub_ns":'

Prepared = list[tuple[bytes, bytearray, bytearray, int, int]]


class PacedPublisher:
    def __init__(self, frontend: str) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        # XPUB, not PUB: the proxy's subscription message tells us the link is up, and
        # NODROP makes a full queue block the publisher instead of losing events silently.
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)
        self.socket.sndhwm = 1_000_000
        self.socket.connect(frontend)
        self.socket.recv()
        self.epoch = time.time_ns()
        self.next_seq = 1
        self.warm_seq = 1

    def prepare(self, count: int) -> Prepared:
        events: Prepared = []
        timestamp = format_timestamp(time.time_ns())
        for seq in range(self.next_seq, self.next_seq + count):
            data = {"symbol": "BTC-USD", "price": 45000.0 + (seq % 400) / 4, "size": 0.25}
            data["pub_ns"] = PUB_NS_PLACEHOLDER
            topic, meta, payload = encode_event(
                EVENT_TOPIC,
                "market_data",
                data,
                SOURCE,
                self.epoch,
                seq,
                publish_ns=PUB_NS_PLACEHOLDER,
                timestamp=timestamp,
            )
            offset = payload.index(PUB_NS_KEY) + len(PUB_NS_KEY)
            events.append((topic, bytearray(meta), bytearray(payload), offset, seq))
        self.next_seq += count
        return events

    def run(self, events: Prepared, rate: float) -> tuple[int, int]:
        """Send the events paced at ``rate``/s; returns the first and last publish times."""
        send = self.socket.send_multipart
        pack_meta = META_HEADER.pack_into
        epoch = self.epoch
        total = len(events)
        first_ns = last_ns = 0
        start = time.perf_counter()
        sent = 0
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            while sent < due:
                topic, meta, payload, offset, seq = events[sent]
                now = time.time_ns()
                payload[offset : offset + 19] = b"%d" % now
                pack_meta(meta, 0, WIRE_VERSION, 0, epoch, seq, now)
                send([topic, meta, payload])
                if not first_ns:
                    first_ns = now
                last_ns = now
                sent += 1
            delay = start + sent / rate - time.perf_counter()
            if sent < total and delay > 0:
                time.sleep(delay)
        return first_ns, last_ns

    def send_warmup(self) -> None:
        frames = encode_event(WARM_TOPIC, WARM_TOPIC, {}, SOURCE, self.epoch, self.warm_seq)
        self.warm_seq += 1
        self.socket.send_multipart(frames)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


class LineReader:
    """Lines from stdin without blocking, so warm-up sending goes on between commands."""

    def __init__(self) -> None:
        self.buffer = b""

    def next_line(self, timeout: float | None) -> str | None:
        while b"\n" not in self.buffer:
            readable, _, _ = select.select([0], [], [], timeout)
            if not readable:
                return None
            chunk = os.read(0, 4096)
            if not chunk:
                return "QUIT"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().strip()


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.loadgen_publisher FRONTEND_ENDPOINT", file=sys.stderr)
        return 2
    publisher = PacedPublisher(argv[0])
    reader = LineReader()
    say("CONNECTED")
    warm_interval: float | None = None
    try:
        while True:
            line = reader.next_line(warm_interval)
            if line is None:
                publisher.send_warmup()
                continue
            words = line.split()
            if not words:
                continue
            command = words[0]
            if command == "WARM":
                warm_interval = 1 / float(words[1])
                publisher.send_warmup()
            elif command == "STOP":
                warm_interval = None
                say("STOPPED")
            elif command == "RUN":
                warm_interval = None
                rate, count = float(words[1]), int(words[2])
                events = publisher.prepare(count)
                say(f"PREPARED {events[0][4]}")
                if reader.next_line(None) != "GO":
                    say("ERROR expected GO")
                    continue
                first_ns, last_ns = publisher.run(events, rate)
                say(f"SENT {count} {first_ns} {last_ns}")
            elif command == "QUIT":
                return 0
            else:
                say(f"ERROR unknown command {command!r}")
    finally:
        publisher.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
