"""Helpers for end-to-end tests: a real proxy on loopback TLS, and HTTPS clients that trust it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, reactor, ssl
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from cocalcproxy.ops.options import Options
from cocalcproxy.ops.service import ProxyService, build_service


@dataclass
class RunningProxy:
    service: ProxyService
    port: int
    state_dir: str
    cert_path: str
    directory: Any

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def origin(self) -> str:
        return self.url


def options_for(state_dir: str, *extra: str) -> Options:
    options = Options()
    # The access log goes to a file in the state directory, not the test runner's terminal.
    log = [] if "--access-log" in extra else ["--access-log", os.path.join(state_dir, "access.log")]
    options.parseOptions(
        ["--state-dir", state_dir, "--listen", "tcp:0:interface=127.0.0.1", *log, *extra]
    )
    return options


@defer.inlineCallbacks
def start_proxy(case: unittest.TestCase, *extra: str, state_dir: str | None = None):  # type: ignore[no-untyped-def]
    """Start the whole proxy in this process on a free loopback port; stopped at cleanup."""
    state_dir = state_dir or case.mktemp()
    os.makedirs(state_dir, exist_ok=True)
    options = options_for(state_dir, *extra)
    proxy = build_service(options, reactor)
    proxy.startService()
    case.addCleanup(proxy.stopService)
    yield proxy.all_listening()
    port = proxy.listeners[0].port.getHost().port
    cert = options["tls-cert"] or os.path.join(state_dir, "tls", "cert.pem")
    directory = _directory_of(proxy)
    return RunningProxy(proxy, port, state_dir, cert, directory)


def _directory_of(proxy: ProxyService) -> Any:
    from cocalcproxy.ops.service import DirectoryService

    for child in proxy:
        if isinstance(child, DirectoryService):
            return child.directory
    raise LookupError("no directory service")


@implementer(IPolicyForHTTPS)
class TrustOne:
    """Trust exactly one certificate (the proxy's), with normal hostname verification."""

    def __init__(self, cert_path: str) -> None:
        with open(cert_path, "rb") as f:
            self.authority = ssl.Certificate.loadPEM(f.read())

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:  # noqa: N802
        return ssl.optionsForClientTLS(hostname.decode(), trustRoot=self.authority)


def https_client(case: unittest.TestCase, cert_path: str, persistent: bool = True) -> HTTPClient:
    """A treq client trusting the proxy's certificate; its pool is closed at cleanup."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    case.addCleanup(pool.closeCachedConnections)
    agent = Agent(reactor, contextFactory=TrustOne(cert_path), pool=pool)
    return HTTPClient(agent)


def plain_client(case: unittest.TestCase) -> HTTPClient:
    pool = HTTPConnectionPool(reactor, persistent=False)
    case.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))
