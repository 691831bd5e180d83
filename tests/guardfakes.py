"""In-memory doubles for the guard's unit tests: a directory, a recording backend handler, and
the whole request path (ProxySite -> Root -> guard -> handler) driven over a StringTransport.

Only for fast tests of glue; end-to-end tests use the real directory and real sockets.
"""

from __future__ import annotations

import secrets
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import directlyProvides

from cocalcproxy.directory import Account, NotFound, Project, Unavailable
from cocalcproxy.guard.core import Guard
from cocalcproxy.guard.csrf import CsrfTokens
from cocalcproxy.guard.web import GuardPages
from cocalcproxy.http.ownpages import OwnPages
from cocalcproxy.http.site import Access, ProxyRequest, ProxySite, Root

PID = "0b5c5f3e-3d6a-4d1f-9a43-2f6f0e6c8a11"
OTHER_PID = "5d2a4d5e-8a7b-4c1e-b0a9-1c2d3e4f5a6b"
UNKNOWN_PID = "9f8e7d6c-5b4a-4321-8fed-cba987654321"


@dataclass
class _Token:
    id: str
    account: str
    expires: float | None


@dataclass
class _Session:
    account_id: int
    expires: float
    family: str | None = None


class FakeDirectory:
    """IDirectory over dicts, answering at once (or, with ``hold``, when the test says so)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.counter = 0
        self.next_id = 1
        self.passwords: dict[str, str] = {}
        self.accounts: dict[str, Account] = {}
        self.tokens: dict[str, _Token] = {}
        self.sessions: dict[str, _Session] = {}
        self.projects: dict[str, Project] = {}
        self.used: dict[tuple[str, str], float] = {}
        self.calls: Counter[str] = Counter()
        self.unavailable = False
        self.hold = False
        self.held: list[tuple[Deferred[Any], Any]] = []

    # -- plumbing ---------------------------------------------------------------------------

    def _answer(self, method: str, value: Any) -> Deferred[Any]:
        self.calls[method] += 1
        if self.unavailable:
            return fail(Unavailable("database down"))
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append((d, value))
            return d
        return succeed(value)

    def release(self) -> None:
        held, self.held = self.held, []
        for d, value in held:
            d.callback(value)

    def _bump(self) -> None:
        self.counter += 1

    def queries(self) -> int:
        return sum(n for k, n in self.calls.items() if k != "change_counter")

    # -- the IDirectory face the guard uses -------------------------------------------------

    def ping(self) -> Deferred[None]:
        return self._answer("ping", None)

    def close(self) -> Deferred[None]:
        return succeed(None)

    def change_counter(self) -> Deferred[int]:
        return self._answer("change_counter", self.counter)

    def check_password(self, name: str, password: str) -> Deferred[Account | None]:
        ok = name in self.accounts and secrets.compare_digest(
            self.passwords[name].encode(), password.encode()
        )
        return self._answer("check_password", self.accounts[name] if ok else None)

    def account_for_token(self, token: str) -> Deferred[Account | None]:
        t = self.tokens.get(token)
        account = None
        if t is not None and (t.expires is None or t.expires > self.clock.seconds()):
            account = self.accounts.get(t.account)
        return self._answer("account_for_token", account)

    def account_for_session(self, token: str) -> Deferred[Account | None]:
        s = self.sessions.get(token)
        account = None
        if s is not None and s.expires > self.clock.seconds():
            account = self._by_id(s.account_id)
        return self._answer("account_for_session", account)

    def create_session(
        self, account_id: int, lifetime_seconds: float, parent: str | None = None
    ) -> Deferred[str]:
        family = None
        if parent is not None:
            found = self.sessions.get(parent)
            if found is None or found.account_id != account_id:
                return fail(NotFound("the parent session has ended"))
            family = found.family or parent
        token = secrets.token_urlsafe(32)
        self.sessions[token] = _Session(account_id, self.clock.seconds() + lifetime_seconds, family)
        self._bump()
        return self._answer("create_session", token)

    def use_once(self, purpose: str, value: str, expires: float) -> Deferred[bool]:
        now = self.clock.seconds()
        self.used = {k: v for k, v in self.used.items() if v > now}
        first = (purpose, value) not in self.used
        if first:
            self.used[(purpose, value)] = expires
        return self._answer("use_once", first)

    def delete_session(self, token: str) -> Deferred[None]:
        gone = [t for t, s in self.sessions.items() if t == token or s.family == token]
        for t in gone:
            del self.sessions[t]
        if gone:
            self._bump()
        return self._answer("delete_session", None)

    def project_for(self, account_id: int, project_id: str) -> Deferred[Project | None]:
        p = self.projects.get(project_id)
        account = self._by_id(account_id)
        allowed = (
            p is not None
            and account is not None
            and (p.owner_id == account_id or account.name in p.collaborators)
        )
        return self._answer("project_for", p if allowed else None)

    def projects_for(self, account_id: int) -> Deferred[list[Project]]:
        account = self._by_id(account_id)
        found = [
            p
            for p in self.projects.values()
            if account is not None and (p.owner_id == account_id or account.name in p.collaborators)
        ]
        return self._answer("projects_for", found)

    def _by_id(self, account_id: int) -> Account | None:
        for a in self.accounts.values():
            if a.id == account_id:
                return a
        return None

    # -- administration, synchronous for tests ----------------------------------------------

    def add_user(self, name: str, password: str) -> Account:
        account = Account(self.next_id, name)
        self.next_id += 1
        self.accounts[name] = account
        self.passwords[name] = password
        self._bump()
        return account

    def set_password(self, name: str, password: str) -> None:
        self.passwords[name] = password
        account = self.accounts[name]
        for token in [t for t, s in self.sessions.items() if s.account_id == account.id]:
            del self.sessions[token]
        self._bump()

    def remove_user(self, name: str) -> None:
        account = self.accounts.pop(name)
        del self.passwords[name]
        self.sessions = {t: s for t, s in self.sessions.items() if s.account_id != account.id}
        self.tokens = {t: v for t, v in self.tokens.items() if v.account != name}
        for pid, p in list(self.projects.items()):
            if p.owner_id == account.id:
                del self.projects[pid]
            elif name in p.collaborators:
                self.projects[pid] = replace(
                    p, collaborators=tuple(c for c in p.collaborators if c != name)
                )
        self._bump()

    def create_token(self, name: str, expires_at: float | None = None) -> tuple[str, str]:
        token = "cpt_" + secrets.token_urlsafe(24)
        token_id = secrets.token_hex(4)
        self.tokens[token] = _Token(token_id, name, expires_at)
        self._bump()
        return token_id, token

    def revoke_token(self, token_id: str) -> None:
        self.tokens = {t: v for t, v in self.tokens.items() if v.id != token_id}
        self._bump()

    def add_session(self, name: str, lifetime: float = 3600.0) -> str:
        token = secrets.token_urlsafe(32)
        self.sessions[token] = _Session(self.accounts[name].id, self.clock.seconds() + lifetime)
        self._bump()
        return token

    def add_project(self, owner: str, pid: str | None = None, title: str = "") -> Project:
        account = self.accounts[owner]
        project = Project(pid or str(uuid.uuid4()), account.id, owner, "127.0.0.1", None, title)
        self.projects[project.id] = project
        self._bump()
        return project

    def add_collaborator(self, pid: str, name: str) -> None:
        p = self.projects[pid]
        self.projects[pid] = replace(p, collaborators=(*p.collaborators, name))
        self._bump()

    def remove_collaborator(self, pid: str, name: str) -> None:
        p = self.projects[pid]
        self.projects[pid] = replace(
            p, collaborators=tuple(c for c in p.collaborators if c != name)
        )
        self._bump()


class RecordingHandler:
    """Stands in for the forwarder: records what reached it and answers 200."""

    def __init__(self) -> None:
        self.seen: list[tuple[ProxyRequest, Access]] = []
        self.bodies: list[bytes] = []
        self.args: list[dict[bytes, list[bytes]]] = []

    def handle(self, request: ProxyRequest, route: Any, access: Access) -> None:
        self.seen.append((request, access))
        self.args.append(dict(request.args))
        if request.content is not None:
            request.content.seek(0)
            self.bodies.append(request.content.read())
        body = b"backend says hello"
        request.setHeader(b"Content-Type", b"text/plain")
        request.setHeader(b"Strict-Transport-Security", b"max-age=1; includeSubDomains")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        request.write(body)
        request.finish()


class Transport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802
        pass


@dataclass
class Response:
    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def cookies(self) -> dict[str, str]:
        """Set-Cookie name -> the whole header line."""
        out = {}
        for line in self.headers.get(b"set-cookie", []):
            text = line.decode("latin-1")
            out[text.split("=", 1)[0]] = text
        return out

    def cookie_value(self, name: str) -> str | None:
        line = self.cookies().get(name)
        if line is None:
            return None
        return line.split("=", 1)[1].split(";", 1)[0]


def parse_response(data: bytes) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return Response(status, headers, body)


@dataclass
class World:
    """A guarded site in memory, with its directory, clock and recording backend."""

    clock: Clock
    directory: FakeDirectory
    guard: Guard
    guard_pages: GuardPages
    handler: RecordingHandler
    site: ProxySite
    transports: list[StringTransport] = field(default_factory=list)

    def send(
        self,
        method: bytes,
        target: bytes,
        headers: dict[bytes, bytes | list[bytes]] | None = None,
        body: bytes = b"",
        secure: bool = True,
        peer: str = "10.0.0.1",
        host: bytes = b"proxy.example",
    ) -> StringTransport:
        """Send one request on a fresh connection; the answer may still be in progress."""
        address = IPv6Address("TCP", peer, 4321) if ":" in peer else IPv4Address("TCP", peer, 4321)
        transport = Transport(peerAddress=address)
        if secure:
            directlyProvides(transport, ISSLTransport)
        channel = self.site.buildProtocol(address)
        assert channel is not None
        channel.makeConnection(transport)
        lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host]
        for name, value in (headers or {}).items():
            for v in value if isinstance(value, list) else [value]:
                lines.append(name + b": " + v)
        if body or method == b"POST":
            lines.append(b"Content-Length: " + str(len(body)).encode())
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.transports.append(transport)
        return transport

    def request(self, method: bytes, target: bytes, **kwargs: Any) -> Response:
        transport = self.send(method, target, **kwargs)
        return parse_response(transport.value())


HTML = {b"Accept": b"text/html,application/xhtml+xml"}


def make_world(
    hsts_max_age: int = 0,
    project_domain: str | None = None,
    directory: FakeDirectory | None = None,
    **guard_options: Any,
) -> World:
    """A site over a fake directory; pass another world's ``directory`` for a second proxy
    process on the same directory (it shares that world's clock)."""
    if directory is None:
        clock = Clock()
        clock.advance(1_800_000_000)
        directory = FakeDirectory(clock)
    clock = directory.clock
    guard = Guard(directory, clock, **guard_options)  # type: ignore[arg-type]
    guard_pages = GuardPages(
        guard,
        directory,  # type: ignore[arg-type]
        CsrfTokens(b"k" * 32),
        clock,
        session_lifetime=14 * 86400.0,
    )
    handler = RecordingHandler()
    root = Root(
        guard=guard,
        forwarder=handler,
        relay=handler,
        raw=handler,
        own_pages=OwnPages(directory, guard_pages),  # type: ignore[arg-type]
        project_domain=project_domain,
    )
    site = ProxySite(root, reactor=clock)
    site.hsts_max_age = hsts_max_age
    return World(clock, directory, guard, guard_pages, handler, site)
