# bus/_wire.c: one C call per three-frame bus message (see bus/transport.py).
def bind(
    send: int,
    msg_init: int,
    msg_recv: int,
    msg_data: int,
    msg_size: int,
    msg_more: int,
    msg_close: int,
    error: type[BaseException],
    again: type[BaseException],
    /,
) -> None: ...
def send3(socket: object, topic: bytes, meta: bytes, payload: bytes, /) -> bool: ...
def recv_message(socket: object, /) -> tuple[bytes, ...]: ...
def cache_drain(socket: object, cache: object, limit: int, /) -> tuple[int, bytes | None]: ...
