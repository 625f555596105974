"""``tradebus replay``: publish a recording (``tradebus record``) back onto the bus."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import zmq

from bus.endpoints import DEFAULT_FRONTEND, FRONTEND_VARIABLE
from bus.settings import argument, number
from bus.subscriber import resolve_endpoint
from monitoring.logging import configure_logging, get_logger
from tradebus.keys import add_client_key_arguments, client_keys
from tradebus.record import (
    RecordingError,
    Restamper,
    connect_publisher,
    read_recording,
    replay,
    stop_on_signals,
)

HELP = "publish a recording back onto the bus (as a new run of its sources) at its pace"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a recording made by `tradebus record`")
    parser.add_argument(
        "--frontend",
        default=None,
        help=f"the proxy's XSUB endpoint (default ${FRONTEND_VARIABLE} or {DEFAULT_FRONTEND})",
    )
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=argument(number(0, what="a speed factor (e.g. 2 or 0.5)")),
        default=1.0,
        help="pace factor: 2 plays twice as fast, 0.5 half as fast (default 1: original pace)",
    )
    pace.add_argument(
        "--as-fast-as-possible",
        action="store_true",
        help="no pauses between events (nothing is dropped: sending waits for the bus)",
    )
    identity = parser.add_mutually_exclusive_group()
    identity.add_argument(
        "--source",
        help="republish under this source id (default: each event's recorded source), "
        "as always with a new epoch and fresh sequence numbers",
    )
    identity.add_argument(
        "--exact",
        action="store_true",
        help="republish source, epoch, seq and payload bytes unchanged: only for a bus that "
        "has not seen them (its subscribers would drop them as duplicates or report gaps)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=argument(number(0, what="seconds")),
        default=5.0,
        help="seconds to wait for the proxy (default %(default)s)",
    )
    add_client_key_arguments(parser)


def run(args: argparse.Namespace) -> int:
    configure_logging()
    log = get_logger("replay")
    frontend = resolve_endpoint("--frontend", args.frontend, FRONTEND_VARIABLE, DEFAULT_FRONTEND)
    # by default a new run of the recorded sources: a bus that saw the recording already
    # would otherwise drop its events as duplicates or report them as gaps
    transform = None if args.exact else Restamper(args.source, time.time_ns())
    keys = client_keys(args)
    try:
        lines = open(args.file, "rb")  # noqa: SIM115
    except OSError as error:
        raise RecordingError(f"cannot read {args.file}: {error.strerror}") from None
    stop = stop_on_signals()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        socket = connect_publisher(context, frontend, args.connect_timeout, keys)
        try:
            log.info("replay.started", file=os.fspath(args.file), frontend=frontend)
            started = time.monotonic()
            sent = replay(
                read_recording(lines, os.fspath(args.file)),
                socket,
                stop,
                speed=None if args.as_fast_as_possible else args.speed,
                transform=transform,
            )
        finally:
            socket.close()  # lingers until the proxy has every event
    finally:
        lines.close()
        context.term()
    seconds = time.monotonic() - started
    log.info("replay.stopped", events=sent, seconds=round(seconds, 3))
    print(f"replayed {sent} events in {seconds:.2f} s", file=sys.stderr)
    return 0
