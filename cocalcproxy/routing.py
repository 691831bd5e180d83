"""Pure routing: (host, raw request-target) -> what to do with it. No Twisted imports.

PLACEHOLDER: the forwarding issue owns the full parser and its property tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["server", "port", "raw"]


@dataclass(frozen=True)
class Route:
    """A request for a project.

    ``prefix`` is the part of the path that names the route (``/<pid>/server/<port>``,
    ``/<pid>/port/<port>``, ``/<pid>/raw``; empty in subdomain mode).
    ``backend_target`` is the request-target the backend sees (path and query, bytes exactly as
    the client sent them); for ``raw`` it is the still-encoded path after the prefix plus query.
    """

    project_id: str
    kind: Kind
    port: int | None
    prefix: bytes
    backend_target: bytes
    subdomain: bool = False


@dataclass(frozen=True)
class OwnPage:
    """One of the proxy's own pages: ``index`` (``/``), ``login``, ``logout``, ``health``, ``static``."""

    name: str
    rest: bytes = b""


@dataclass(frozen=True)
class Redirect:
    location: bytes


@dataclass(frozen=True)
class NotFound:
    reason: str


Outcome = Route | OwnPage | Redirect | NotFound

_SIMPLE = re.compile(
    rb"^/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/(server|port)/([1-9][0-9]{0,4})(/[^?]*)?(\?.*)?$"
)


def parse(host: bytes | None, target: bytes, project_domain: str | None = None) -> Outcome:
    """Classify a request. Placeholder until the forwarding issue lands."""
    path = target.split(b"?", 1)[0]
    if path == b"/":
        return OwnPage("index")
    for name in ("login", "logout", "health"):
        if path == b"/_/" + name.encode():
            return OwnPage(name)
    if path.startswith(b"/_/static/"):
        return OwnPage("static", path[len(b"/_/static/") :])
    m = _SIMPLE.match(target)
    if not m:
        return NotFound("no such route")
    pid, kind, port_s, rest, query = m.groups()
    port = int(port_s)
    if port > 65535:
        return NotFound("port out of range")
    prefix = b"/" + pid + b"/" + kind + b"/" + port_s
    if rest is None:
        return Redirect(prefix + b"/" + (query or b""))
    backend = (rest + (query or b"")) if kind == b"server" else target
    return Route(pid.decode(), "server" if kind == b"server" else "port", port, prefix, backend)
