"""WebSocket clients for the benchmark (the ``websockets`` library on asyncio, no compression).

* ``echo_load``: N connections, each sending a small message and waiting for its echo in a loop
  for a fixed time; counts round trips.
* ``hold_idle``: opens N connections, calls back while they are all open and idle, closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MESSAGE = "x" * 64
OPEN_AT_ONCE = 64  # handshakes in flight at a time while opening many connections


@dataclass
class EchoResult:
    round_trips: int
    seconds: float
    errors: int


def _connect(url: str, headers: dict[str, str], context: ssl.SSLContext | None) -> Any:
    from websockets.asyncio.client import connect

    return connect(
        url,
        ssl=context,
        additional_headers=headers,
        compression=None,
        ping_interval=None,
        max_size=None,
        open_timeout=60,
        close_timeout=5,
    )


async def _echo_load(
    url: str,
    headers: dict[str, str],
    context: ssl.SSLContext | None,
    connections: int,
    duration: float,
) -> EchoResult:
    opened = [await _connect(url, headers, context) for _ in range(connections)]
    counts = [0] * connections
    errors = 0
    deadline = time.monotonic() + duration

    async def loop(i: int, ws: Any) -> None:
        nonlocal errors
        try:
            while time.monotonic() < deadline:
                await ws.send(MESSAGE)
                if await ws.recv() != MESSAGE:
                    errors += 1
                counts[i] += 1
        except Exception:  # noqa: BLE001 - counted, the run goes on
            errors += 1

    started = time.monotonic()
    await asyncio.gather(*(loop(i, ws) for i, ws in enumerate(opened)))
    elapsed = time.monotonic() - started
    for ws in opened:
        with contextlib.suppress(Exception):
            await ws.close()
    return EchoResult(sum(counts), elapsed, errors)


def echo_load(
    url: str,
    headers: dict[str, str],
    context: ssl.SSLContext | None,
    connections: int,
    duration: float,
) -> EchoResult:
    return asyncio.run(_echo_load(url, headers, context, connections, duration))


async def _hold_idle(
    url: str,
    headers: dict[str, str],
    context: ssl.SSLContext | None,
    count: int,
    while_open: Callable[[], object],
    settle: float,
) -> object:
    gate = asyncio.Semaphore(OPEN_AT_ONCE)
    opened: list[Any] = []

    async def one() -> None:
        async with gate:
            opened.append(await _connect(url, headers, context))

    try:
        await asyncio.gather(*(one() for _ in range(count)))
        # One echo on every connection, so each is fully set up on both legs.
        for ws in opened:
            await ws.send(MESSAGE)
            await ws.recv()
        await asyncio.sleep(settle)
        return while_open()
    finally:
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)


def hold_idle(
    url: str,
    headers: dict[str, str],
    context: ssl.SSLContext | None,
    count: int,
    while_open: Callable[[], object],
    settle: float = 1.0,
) -> object:
    """Open ``count`` connections, then return ``while_open()`` called while they are idle."""
    return asyncio.run(_hold_idle(url, headers, context, count, while_open, settle))
