"""A small, fast HTTP/1.1 backend for the benchmarks (asyncio, keep-alive, no dependencies).

Routes (any prefix before them is ignored, so the same server answers direct and proxied):

* ``GET .../small``               a 13-byte body;
* ``GET .../large?bytes=N``       N bytes of zeros, streamed in 256 KiB chunks with backpressure;
* ``POST|PUT .../upload``         reads and counts the body (Content-Length or chunked), answers
                                  ``{"received": N}``.

A second listener is a WebSocket echo server (the ``websockets`` library, no compression): every
message comes back as it was sent.

Run: ``python3 bench/backend.py [--host 127.0.0.1] [--port 0]``; prints ``PORT <n>`` and then
``WSPORT <n>`` when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

SMALL = b"hello, world\n"
CHUNK = b"\0" * (256 * 1024)
MAX_HEAD = 64 * 1024


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> int:
    """Read and discard the request body; return its length."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return total
            remaining = size
            while remaining:
                data = await reader.read(min(remaining, 1 << 20))
                if not data:
                    raise ConnectionError("body cut short")
                remaining -= len(data)
            total += size
            await reader.readexactly(2)
    remaining = int(headers.get("content-length", "0"))
    total = remaining
    while remaining:
        data = await reader.read(min(remaining, 1 << 20))
        if not data:
            raise ConnectionError("body cut short")
        remaining -= len(data)
    return total


def head(status: str, length: int, content_type: str = "text/plain", close: bool = False) -> bytes:
    """A response head; ``close`` says the connection closes after it (a client that reuses
    connections, like node's agent in configurable-http-proxy, must be told)."""
    connection = "Connection: close\r\n" if close else ""
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n"
        f"{connection}\r\n"
    ).encode()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = raw.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            received = await read_body(reader, headers)
            close = "close" in {t.strip().lower() for t in headers.get("connection", "").split(",")}
            parts = urlsplit(target)
            if parts.path.endswith("/small"):
                body = SMALL if method != "HEAD" else b""
                writer.write(head("200 OK", len(SMALL), close=close) + body)
            elif parts.path.endswith("/large"):
                size = int(parse_qs(parts.query).get("bytes", ["0"])[0])
                writer.write(head("200 OK", size, "application/octet-stream", close=close))
                remaining = size if method != "HEAD" else 0
                while remaining:
                    piece = CHUNK if remaining >= len(CHUNK) else CHUNK[:remaining]
                    writer.write(piece)
                    remaining -= len(piece)
                    await writer.drain()
            elif parts.path.endswith("/upload"):
                body = json.dumps({"received": received}).encode()
                writer.write(head("200 OK", len(body), "application/json", close=close) + body)
            else:
                writer.write(head("404 Not Found", 0, close=close))
            await writer.drain()
            if close:
                return
    except (ConnectionError, ValueError):
        return
    finally:
        writer.close()


async def echo(connection: Any) -> None:
    async for message in connection:
        await connection.send(message)


async def serve(host: str, port: int) -> None:
    from websockets.asyncio.server import serve as ws_serve

    server = await asyncio.start_server(handle, host, port, limit=MAX_HEAD, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    # No ping timeouts: thousands of idle connections must stay open for the memory figure.
    ws = await ws_serve(
        echo, host, 0, compression=None, ping_interval=None, max_size=None, backlog=4096
    )
    ws_bound = next(iter(ws.sockets)).getsockname()[1]
    print(f"PORT {bound}", flush=True)
    print(f"WSPORT {ws_bound}", flush=True)
    async with server, ws:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
